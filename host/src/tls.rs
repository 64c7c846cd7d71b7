//! TLS on both sides: the certificates the proxy listener serves, picked by SNI from the
//! store's `ssl` objects, and the verified client configs for HTTPS upstreams. ring is the
//! one crypto provider.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// ALPN for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// TLS 1.3 and 1.2; nothing older.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// `cert` is not PEM.
    #[error("`cert` is not a PEM certificate chain: {0}")]
    CertPem(String),
    /// `cert` holds no certificate.
    #[error("`cert` holds no certificate")]
    NoCert,
    /// The leaf is not an X.509 certificate.
    #[error("`cert`'s first certificate does not parse: {0}")]
    CertDer(String),
    /// `key` is not PEM.
    #[error("`key` is not a PEM private key: {0}")]
    KeyPem(String),
    /// `key` is a kind of key the provider cannot sign with.
    #[error("`key` is not a supported key: {0}")]
    KeyKind(String),
    /// The key is not the certificate's.
    #[error("`key` does not match the certificate")]
    Mismatch,
}

impl CertError {
    /// The JSON pointer of the field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            CertError::CertPem(_) | CertError::NoCert | CertError::CertDer(_) => "/cert",
            CertError::KeyPem(_) | CertError::KeyKind(_) | CertError::Mismatch => "/key",
        }
    }
}

/// A certificate chain with its key, ready to serve.
#[derive(Clone, Debug)]
pub struct Certified {
    /// The chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// When the leaf expires, in seconds since the epoch.
    pub not_after: i64,
}

/// A PEM chain and key as one servable certificate, or why not.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Certified, CertError> {
    let chain = pem_chain(cert_pem).map_err(CertError::CertPem)?;
    let leaf = chain.first().ok_or(CertError::NoCert)?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::CertDer(e.to_string()))?;
    let not_after = parsed.validity().not_after.timestamp();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::KeyPem(e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::KeyKind(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::Mismatch);
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(other) => return Err(CertError::CertDer(other.to_string())),
    }
    Ok(Certified {
        key: Arc::new(certified),
        not_after,
    })
}

/// The certificates of a PEM text, in order.
fn pem_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The names one certificate claims: an `ssl` object's, as plain values.
#[derive(Clone, Copy, Debug)]
pub struct CertClaim<'a> {
    /// The object's id, named when another certificate already holds a name.
    pub id: &'a str,
    /// The server names it serves; `*.example.com` is a wildcard one label deep.
    pub snis: &'a [String],
    /// Whether it answers a name no other certificate claims.
    pub default: bool,
}

/// What a client config is built from: an upstream's `tls` settings, as plain values.
#[derive(Clone, Copy, Debug)]
pub struct ClientTls<'a> {
    /// PEM roots to trust instead of the system's.
    pub ca: Option<&'a str>,
    /// Whether the upstream's certificate is verified at all.
    pub verify: bool,
    /// A PEM chain to present (mutual TLS), and its key.
    pub client_cert: Option<(&'a str, &'a str)>,
}

/// Which certificate answers which server name.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the name under the wildcard: `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    /// A table of `certs`, in id order. A certificate that claims a name (or the default)
    /// that an earlier one holds is left out, with the reason.
    pub fn build<'a>(
        certs: impl IntoIterator<Item = (CertClaim<'a>, Arc<CertifiedKey>)>,
    ) -> (CertTable, Vec<(String, String)>) {
        let mut table = CertTable::default();
        let mut owners: HashMap<&str, &str> = HashMap::new();
        let mut refused = Vec::new();
        for (config, key) in certs {
            let taken = config
                .snis
                .iter()
                .find_map(|sni| owners.get(sni.as_str()).map(|owner| (sni.as_str(), *owner)))
                .or_else(|| {
                    config
                        .default
                        .then(|| owners.get("").map(|owner| ("the default", *owner)))
                        .flatten()
                });
            if let Some((name, owner)) = taken {
                refused.push((
                    config.id.to_owned(),
                    format!("{name} is already served by ssl {owner:?}"),
                ));
                continue;
            }
            for sni in config.snis {
                owners.insert(sni, config.id);
                match sni.strip_prefix("*.") {
                    Some(parent) => table.wildcard.insert(parent.to_owned(), key.clone()),
                    None => table.exact.insert(sni.clone(), key.clone()),
                };
            }
            if config.default {
                owners.insert("", config.id);
                table.default = Some(key.clone());
            }
        }
        (table, refused)
    }

    /// The certificate for `name`: an exact match, then a wildcard one label up, then the
    /// default.
    pub fn lookup(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(key) = self.exact.get(&name) {
                return Some(key.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(key) = self.wildcard.get(parent)
            {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }
}

/// Picks a certificate for each handshake from whatever table is live then.
pub struct SniResolver<F>(pub F);

impl<F> std::fmt::Debug for SniResolver<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl<F> ResolvesServerCert for SniResolver<F>
where
    F: Fn() -> Arc<CertTable> + Send + Sync,
{
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)().lookup(hello.server_name())
    }
}

/// The proxy listener's TLS config: certificates from `resolver`, ALPN h2 and http/1.1.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring speaks TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Arc::new(config)
}

/// Why an upstream's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientTlsError(pub String);

/// The TLS config for connections to an upstream's nodes, offering `alpn`.
pub fn client_config(
    tls: ClientTls<'_>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring speaks TLS 1.2 and 1.3");
    let builder = if tls.verify {
        let roots = match tls.ca {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                let certs = pem_chain(pem).map_err(|e| ClientTlsError(format!("ca: {e}")))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ClientTlsError("ca holds no usable certificate".into()));
                }
                Arc::new(roots)
            }
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
    };
    let mut config = match tls.client_cert {
        Some((cert, key)) => {
            let certified = certified_key(cert, key)
                .map_err(|e| ClientTlsError(format!("client certificate: {e}")))?;
            let chain = certified.key.cert.clone();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| ClientTlsError(format!("client_key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientTlsError(format!("client certificate: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The name an upstream connection asks for and verifies: the `sni` override, or the host.
pub fn server_name(sni: Option<&str>, host: &str) -> Result<ServerName<'static>, ClientTlsError> {
    let name = sni.unwrap_or(host);
    ServerName::try_from(name.to_owned())
        .map_err(|_| ClientTlsError(format!("{name:?} is not a server name")))
}

/// The operating system's trusted roots, read once.
fn system_roots() -> Result<Arc<RootCertStore>, ClientTlsError> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "a system root certificate could not be read");
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(ClientTlsError(
            "the system has no trusted root certificates (install ca-certificates, or set `tls.ca`)"
                .into(),
        ));
    }
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

/// `verify: false`: accepts any certificate, but still checks that the handshake's signatures
/// are made with the presented key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SslConfig;

    fn ssl(id: &str, snis: &[&str], default: bool) -> SslConfig {
        SslConfig {
            id: id.into(),
            cert: String::new(),
            key: String::new(),
            snis: snis.iter().map(|s| s.to_string()).collect(),
            default,
        }
    }

    /// A distinct (unusable) key per certificate, told apart by its chain's one fake entry.
    fn key(tag: u8) -> Arc<CertifiedKey> {
        let signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::from_pem_slice(TEST_KEY.as_bytes()).unwrap())
            .unwrap();
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(vec![tag])],
            signing,
        ))
    }

    fn tag(key: Option<Arc<CertifiedKey>>) -> Option<u8> {
        key.map(|k| k.cert[0].as_ref()[0])
    }

    #[test]
    fn exact_beats_wildcard_and_the_default_catches_the_rest() {
        let configs = [
            ssl("a", &["api.example.com"], false),
            ssl("b", &["*.example.com"], false),
            ssl("c", &[], true),
        ];
        let (table, refused) =
            CertTable::build(
                configs
                    .iter()
                    .map(SslConfig::claim)
                    .zip([key(1), key(2), key(3)]),
            );
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(tag(table.lookup(Some("api.example.com"))), Some(1));
        assert_eq!(tag(table.lookup(Some("API.Example.com."))), Some(1));
        assert_eq!(tag(table.lookup(Some("www.example.com"))), Some(2));
        // A wildcard covers one label, not the bare name or two labels.
        assert_eq!(tag(table.lookup(Some("example.com"))), Some(3));
        assert_eq!(tag(table.lookup(Some("a.b.example.com"))), Some(3));
        assert_eq!(tag(table.lookup(None)), Some(3));
    }

    #[test]
    fn without_a_default_an_unknown_name_gets_nothing() {
        let configs = [ssl("a", &["a.test"], false)];
        let (table, _) = CertTable::build(configs.iter().map(SslConfig::claim).zip([key(1)]));
        assert_eq!(tag(table.lookup(Some("b.test"))), None);
        assert_eq!(tag(table.lookup(None)), None);
    }

    #[test]
    fn a_name_or_default_claimed_twice_goes_to_the_first() {
        let configs = [
            ssl("a", &["x.test"], true),
            ssl("b", &["y.test", "x.test"], false),
            ssl("c", &["z.test"], true),
        ];
        let (table, refused) =
            CertTable::build(
                configs
                    .iter()
                    .map(SslConfig::claim)
                    .zip([key(1), key(2), key(3)]),
            );
        assert_eq!(tag(table.lookup(Some("x.test"))), Some(1));
        // The refused certificate claims none of its names.
        assert_eq!(tag(table.lookup(Some("y.test"))), Some(1));
        assert_eq!(tag(table.lookup(Some("z.test"))), Some(1));
        let ids: Vec<&str> = refused.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert!(refused[0].1.contains("x.test"), "{refused:?}");
    }

    #[test]
    fn bad_pem_and_mismatched_keys_are_named() {
        assert!(matches!(
            certified_key("not pem", TEST_KEY),
            Err(CertError::NoCert)
        ));
        assert!(matches!(
            certified_key(TEST_CERT, "not pem"),
            Err(CertError::KeyPem(_))
        ));
        assert!(matches!(
            certified_key(TEST_CERT, OTHER_KEY),
            Err(CertError::Mismatch)
        ));
        let certified = certified_key(TEST_CERT, TEST_KEY).unwrap();
        assert!(certified.not_after > 1_700_000_000);
    }

    // Made once with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes
    // -subj /CN=test -days 36500`: a fixed pair, so these tests need no generator.
    const TEST_CERT: &str = include_str!("../testdata/tls/cert.pem");
    const TEST_KEY: &str = include_str!("../testdata/tls/key.pem");
    const OTHER_KEY: &str = include_str!("../testdata/tls/other-key.pem");
}
