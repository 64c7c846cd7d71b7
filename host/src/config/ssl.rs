//! Certificates: `ssl` objects, each a chain, its key and the server names it answers for.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Checks, ConfigObject, Kind, check_id, checked_serde};

/// The most server names one certificate may answer for.
pub const MAX_SNIS: usize = 256;

/// A certificate the TLS listener serves: `/weir/ssl/<id>` in etcd, `ssl:` in the file.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SslConfig {
    /// `id: api-cert`
    pub id: String,
    /// `cert: "-----BEGIN CERTIFICATE-----..."`: the PEM chain, leaf first.
    pub cert: String,
    /// `key: "-----BEGIN PRIVATE KEY-----..."`: the leaf's PEM private key (PKCS#8, PKCS#1
    /// or SEC1). In the file, either may instead be a path relative to the file.
    pub key: String,
    /// `snis: [api.example.com, "*.example.com"]`: the names it serves; an exact name beats a
    /// wildcard, and a wildcard covers one label.
    #[serde(default)]
    pub snis: Vec<String>,
    /// `default: true`: served to clients that send no name, or a name no certificate has.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub default: bool,
}

impl SslConfig {
    /// The names this certificate claims, as the certificate table takes them.
    pub fn claim(&self) -> crate::tls::CertClaim<'_> {
        crate::tls::CertClaim {
            id: &self.id,
            snis: &self.snis,
            default: self.default,
        }
    }
}

impl std::fmt::Debug for SslConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log line.
        f.debug_struct("SslConfig")
            .field("id", &self.id)
            .field("snis", &self.snis)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

checked_serde!(SslConfig);

impl ConfigObject for SslConfig {
    const KIND: Kind = Kind::Ssl;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SslConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/id", check_id(&self.id));
        if self.snis.is_empty() && !self.default {
            checks.fail("/snis", "set `snis`, or `default: true`");
        }
        if self.snis.len() > MAX_SNIS {
            checks.fail("/snis", format!("more than {MAX_SNIS} names"));
        }
        for (index, sni) in self.snis.iter().enumerate() {
            checks.check(format!("/snis/{index}"), check_sni(sni));
        }
        if let Err(error) = crate::tls::certified_key(&self.cert, &self.key) {
            checks.fail(error.field(), error.to_string());
        }
    }
}

/// A server name a certificate may answer for: a DNS name, or `*.` and a DNS name.
fn check_sni(sni: &str) -> Result<(), String> {
    let name = sni.strip_prefix("*.").unwrap_or(sni);
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if labels_ok {
        Ok(())
    } else {
        Err(format!(
            "{sni:?} is not a lowercase DNS name, or `*.` and one"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_lowercase_dns_names_or_one_wildcard() {
        for good in ["api.example.com", "*.example.com", "localhost", "a-b.c1"] {
            check_sni(good).unwrap();
        }
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "**.a",
            "API.example.com",
            "a..b",
            "-a.b",
            "a b",
            "a/b",
            "1.2.3.4:443",
        ] {
            assert!(check_sni(bad).is_err(), "{bad:?}");
        }
    }
}
