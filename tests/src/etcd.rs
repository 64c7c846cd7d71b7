//! A real etcd-server for a test: started on free loopback ports, stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};

use crate::free_port;

const INSTALL_HINT: &str = "etcd-server is not installed: the etcd tests need a real etcd.\n\
     Install it with:  sudo apt-get install -y etcd-server   (or run ./.ci/run, which does)";

/// One etcd member, with its data in a temporary folder.
pub struct Etcd {
    /// The client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    client_port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let client_port = free_port();
        let mut etcd = Etcd {
            url: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port: free_port(),
            data: tempfile::tempdir().expect("a temporary folder"),
            child: None,
        };
        etcd.run().await;
        etcd
    }

    async fn run(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log =
            std::fs::File::create(self.data.path().join("etcd.log")).expect("an etcd log file");
        let spawned = Command::new("etcd")
            .args(["--name", "weir-test", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args([
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("weir-test={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            Err(e) => panic!("starting etcd: {e}"),
        };
        self.child = Some(child);
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(mut client) = Client::connect([&self.url], None).await
                    && client.status().await.is_ok()
                {
                    return;
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!(
                        "etcd exited with {status}; see {}",
                        self.data.path().join("etcd.log").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "etcd did not become ready");
    }

    /// Kills etcd (its data stays, for [`Etcd::restart`]).
    pub fn kill(&mut self) {
        crate::kill_child(&mut self.child);
    }

    /// Starts etcd again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        Client::connect([&self.url], None)
            .await
            .expect("connecting to the test etcd")
    }

    /// Puts `value` as JSON under `key`.
    pub async fn put(&self, key: &str, value: serde_json::Value) {
        self.client()
            .await
            .put(key, value.to_string(), None)
            .await
            .expect("etcd put");
    }

    /// Puts raw bytes under `key`.
    pub async fn put_raw(&self, key: &str, value: impl Into<Vec<u8>>) {
        self.client()
            .await
            .put(key, value, None)
            .await
            .expect("etcd put");
    }

    /// Puts `value` under `key` attached to a new lease of `ttl` seconds that nobody keeps alive.
    pub async fn put_with_lease(&self, key: &str, value: serde_json::Value, ttl: i64) -> i64 {
        let mut client = self.client().await;
        let lease = client.lease_grant(ttl, None).await.expect("a lease").id();
        client
            .put(
                key,
                value.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .expect("etcd put");
        lease
    }

    /// Puts `value` under `key` on a lease of `ttl` seconds that a task keeps alive until it is
    /// aborted, as a registered backend does until it dies.
    pub async fn put_kept_alive(
        &self,
        key: &str,
        value: serde_json::Value,
        ttl: i64,
    ) -> tokio::task::JoinHandle<()> {
        let lease = self.put_with_lease(key, value, ttl).await;
        let (mut keeper, mut answers) = self
            .client()
            .await
            .lease_keep_alive(lease)
            .await
            .expect("keeping the lease alive");
        let every = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 4);
        tokio::spawn(async move {
            loop {
                keeper.keep_alive().await.expect("a keep-alive");
                answers.message().await.expect("a keep-alive answer");
                // The interval of a keep-alive, not a wait for an event.
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) {
        self.client()
            .await
            .delete(key, None)
            .await
            .expect("etcd delete");
    }

    /// The current revision.
    pub async fn revision(&self) -> i64 {
        let response = self
            .client()
            .await
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .expect("etcd get");
        response.header().expect("a header").revision()
    }

    /// Compacts the history up to the current revision.
    pub async fn compact(&self) {
        let revision = self.revision().await;
        self.client()
            .await
            .compact(revision, None)
            .await
            .expect("etcd compact");
    }

    /// Where etcd keeps its data.
    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
