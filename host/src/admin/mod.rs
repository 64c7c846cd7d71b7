//! The admin listener: the open probes and `/metrics`, the `/v1` API behind keys and sessions,
//! and the dashboard at `/ui`.
//!
//! Every path under `/v1` is authenticated, whatever it looks like; only the paths in
//! `admin.open` (by default `/metrics`, `/healthz` and `/readyz`) and the dashboard's static
//! files are served to anyone. The dashboard's files hold no data: everything it shows comes
//! through `/v1`.

pub mod api;
pub mod auth;
mod dispatch;
pub mod history;
pub mod origin;
mod secrets;
mod status;
mod ui;

pub use self::dispatch::handle;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use self::auth::Auth;
use self::history::History;
use crate::config::AdminConfig;
use crate::digest::sha256_hex;
use crate::gateway::Gateway;
use crate::private_file::{self, Closed};
use crate::store::ConfigStore;

/// What the admin listener serves from.
pub struct Admin {
    /// The gateway it reports on.
    pub gateway: Arc<Gateway>,
    /// The store it reads and writes.
    pub store: Arc<dyn ConfigStore>,
    /// Keys, sessions and lockouts.
    pub auth: Auth,
    /// The largest module an upload may carry.
    pub max_module_bytes: u64,
    /// The address the admin listener was asked to listen on: a `Host` naming it is served.
    pub listener_ip: IpAddr,
    /// The window of metrics the dashboard charts.
    pub history: History,
}

/// How the admin listener is protected, from the command line and the environment.
#[derive(Clone, Debug, Default)]
pub struct AdminOptions {
    /// `--admin-config FILE`: admin settings that replace the store's.
    pub config_file: Option<PathBuf>,
    /// `WEIR_ADMIN_KEY`: an admin-role key for scripts and containers.
    pub env_key: Option<String>,
    /// Where the file store keeps a generated key's hash.
    pub state_dir: Option<PathBuf>,
    /// `--admin-tls`: serve the admin listener over TLS, with the certificates of the `ssl`
    /// objects (as the TLS proxy listener does); the session cookie is then `__Host-` and
    /// `Secure`.
    pub tls: bool,
}

/// Why the admin listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminSetupError {
    /// `--admin-config` is unreadable or invalid.
    #[error("--admin-config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A non-loopback admin listener with no key configured.
    #[error(
        "the admin listener on {0} is reachable from other hosts, and no admin key is \
         configured: set admin.keys (or admin.accounts) in the config, or WEIR_ADMIN_KEY, or \
         listen on 127.0.0.1"
    )]
    Unprotected(SocketAddr),
    /// A generated key's hash could not be kept.
    #[error("cannot keep the generated admin key's hash: {0}")]
    Generated(String),
}

/// The name of the file that keeps a generated key's hash in the state dir.
const GENERATED_KEY_FILE: &str = "admin-key.sha256";
/// The most that file is read of: a hash in hex, and room for a newline an editor added.
const MAX_KEY_FILE_BYTES: u64 = 1024;

impl Admin {
    /// Sets up the admin listener's keys. With none configured it generates one (returned, to
    /// be shown once) or reuses the one generated earlier (whose hash was kept); it refuses
    /// a listener off loopback that only a generated key would protect.
    pub async fn prepare(
        options: &AdminOptions,
        listen: SocketAddr,
        gateway: Arc<Gateway>,
        store: Arc<dyn ConfigStore>,
        max_module_bytes: u64,
    ) -> Result<(Arc<Admin>, Option<String>), AdminSetupError> {
        let fixed = options.config_file.as_ref().map(read_config).transpose()?;
        let env_key = options.env_key.as_deref().filter(|k| !k.is_empty());
        let settings = fixed
            .clone()
            .unwrap_or_else(|| AdminConfig::clone(&gateway.snapshot().admin));
        let configured =
            !settings.keys.is_empty() || !settings.accounts.is_empty() || env_key.is_some();
        if !configured && !listen.ip().is_loopback() {
            return Err(AdminSetupError::Unprotected(listen));
        }
        let (generated_hash, shown) = if configured {
            (None, None)
        } else {
            let (hash, shown) = generated_key(options, store.as_ref()).await?;
            (Some(hash), shown)
        };
        let checks = auth::PasswordChecks {
            in_flight: gateway.metrics().admin_password_checks_in_flight.clone(),
            done: gateway.metrics().admin_password_checks.clone(),
        };
        let admin = Admin {
            gateway,
            store,
            auth: Auth::new(fixed, env_key, generated_hash, checks),
            max_module_bytes,
            listener_ip: listen.ip(),
            history: History::default(),
        };
        Ok((Arc::new(admin), shown))
    }

    /// Samples the gateway's metrics into the dashboard's history now and then every
    /// `admin.metrics_history.interval_s` (read again after each sample), until `stop`.
    pub async fn record_history(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.history.sample(self.gateway.metrics());
            let settings = self.auth.settings(&self.gateway.snapshot().admin);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(settings.metrics_history.interval()) => {}
            }
        }
    }
}

fn read_config(path: &PathBuf) -> Result<AdminConfig, AdminSetupError> {
    let error = |reason: String| AdminSetupError::Config {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let json: serde_json::Value =
        serde_norway::from_str(&text).map_err(|e| error(format!("not YAML or JSON: {e}")))?;
    crate::config::parse::<AdminConfig>(&json)
        .map_err(|errors| error(crate::config::describe(&errors)))
}

/// The hash of the generated key in force, and the key itself when it was made just now.
async fn generated_key(
    options: &AdminOptions,
    store: &dyn ConfigStore,
) -> Result<(String, Option<String>), AdminSetupError> {
    let key = auth::new_key();
    let hash = sha256_hex(key.as_bytes());
    if let Some(writer) = store.writer() {
        let in_force = writer
            .claim_generated_key(&hash)
            .await
            .map_err(|e| AdminSetupError::Generated(e.to_string()))?;
        let shown = (in_force == hash).then_some(key);
        return Ok((in_force, shown));
    }
    let Some(dir) = &options.state_dir else {
        // Nowhere to keep it: a new key each start.
        return Ok((hash, Some(key)));
    };
    let path = dir.join(GENERATED_KEY_FILE);
    let refused =
        |e: std::io::Error| AdminSetupError::Generated(format!("{}: {e}", path.display()));
    // Whoever could write the file could choose the admin key: it is used only if it is the
    // gateway's own and closed to others.
    match private_file::read(&path, Closed::ToEveryone, MAX_KEY_FILE_BYTES) {
        Ok(kept) => {
            if let Ok(kept) = std::str::from_utf8(&kept)
                && crate::config::is_sha256_hex(kept.trim())
            {
                tracing::info!(file = %path.display(), "using the admin key generated earlier (delete the file for a new one)");
                return Ok((kept.trim().to_owned(), None));
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(refused(error)),
    }
    private_file::write(&path, hash.as_bytes()).map_err(refused)?;
    Ok((hash, Some(key)))
}
