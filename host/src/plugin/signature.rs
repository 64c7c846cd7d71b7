//! Signed modules: an Ed25519 signature over a module's sha256, and the check a gateway with
//! `server.trusted_keys` makes before it loads a module.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use serde::{Deserialize, Serialize};

/// What a signature signs: a domain tag, so that it can never be taken for another message.
const CONTEXT: &str = "weir module signature v1\nsha256:";
/// An Ed25519 SubjectPublicKeyInfo is this prefix and the 32-byte key (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A detached signature of a module: `weir plugin sign` writes it as `FILE.wasm.sig`, and a
/// plugin entry carries it as `signature`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModuleSignature {
    /// The signed module's sha256, in hex.
    pub sha256: String,
    /// The signer's Ed25519 public key: 32 bytes, base64.
    pub public_key: String,
    /// The Ed25519 signature: 64 bytes, base64.
    pub signature: String,
}

/// A key whose signatures a gateway trusts: `server.trusted_keys: [{name, public_key}]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// A name for the key, shown in `/v1/status` beside each module it signed.
    pub name: String,
    /// The Ed25519 public key: a PEM `PUBLIC KEY` (as `openssl pkey -pubout` writes it), or
    /// the 32 raw bytes in base64.
    pub public_key: String,
}

/// Why a module could not be signed, or a signature not trusted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signing key is not an Ed25519 PKCS#8 PEM.
    #[error("the signing key is not an Ed25519 private key in PKCS#8 PEM: {0}")]
    SigningKey(String),
    /// A public key that is not an Ed25519 key.
    #[error("not an Ed25519 public key (a PEM PUBLIC KEY, or 32 bytes in base64)")]
    PublicKey,
    /// The gateway trusts keys, and the module has no signature.
    #[error("the module is not signed, and server.trusted_keys says only signed modules load")]
    Unsigned,
    /// The signature is of other bytes.
    #[error(
        "the module changed after it was signed: it has sha256 {actual}, the signature is of {signed}"
    )]
    Changed {
        /// The module's sha256.
        actual: String,
        /// The sha256 the signature is of.
        signed: String,
    },
    /// The signer is not one of the trusted keys.
    #[error("the module is signed by a key that server.trusted_keys does not list ({0})")]
    Untrusted(String),
    /// The signature does not verify under the key it names.
    #[error("the module's signature does not verify")]
    Invalid,
}

/// Signs the module with sha256 `sha256` with an Ed25519 PKCS#8 PEM private key.
pub fn sign(private_key_pem: &[u8], sha256: &str) -> Result<ModuleSignature, SignatureError> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(private_key_pem)
        .map_err(|e| SignatureError::SigningKey(e.to_string()))?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
        .map_err(|e| SignatureError::SigningKey(e.to_string()))?;
    let signature = pair.sign(format!("{CONTEXT}{sha256}").as_bytes());
    Ok(ModuleSignature {
        sha256: sha256.to_owned(),
        public_key: B64.encode(pair.public_key().as_ref()),
        signature: B64.encode(signature.as_ref()),
    })
}

/// The 32 bytes of an Ed25519 public key given as PEM SPKI or as base64.
pub fn public_key_bytes(text: &str) -> Result<[u8; 32], SignatureError> {
    let raw = if text.trim_start().starts_with("-----BEGIN") {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())
            .map_err(|_| SignatureError::PublicKey)?;
        let der = spki.as_ref();
        match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(key) => key.to_vec(),
            None => return Err(SignatureError::PublicKey),
        }
    } else {
        B64.decode(text.trim())
            .map_err(|_| SignatureError::PublicKey)?
    };
    raw.try_into().map_err(|_| SignatureError::PublicKey)
}

/// Checks that `signature` is of the module with sha256 `actual` and by one of `trusted`;
/// returns the trusted key's name.
pub fn verify<'a>(
    trusted: &'a [TrustedKey],
    actual: &str,
    signature: Option<&ModuleSignature>,
) -> Result<&'a str, SignatureError> {
    let signature = signature.ok_or(SignatureError::Unsigned)?;
    if !signature.sha256.eq_ignore_ascii_case(actual) {
        return Err(SignatureError::Changed {
            actual: actual.to_owned(),
            signed: signature.sha256.chars().take(64).collect(),
        });
    }
    let signer = public_key_bytes(&signature.public_key)?;
    let key = trusted
        .iter()
        .find(|key| public_key_bytes(&key.public_key).is_ok_and(|bytes| bytes == signer))
        .ok_or_else(|| {
            SignatureError::Untrusted(signature.public_key.chars().take(44).collect())
        })?;
    let sig = B64
        .decode(&signature.signature)
        .map_err(|_| SignatureError::Invalid)?;
    UnparsedPublicKey::new(&ED25519, signer)
        .verify(format!("{CONTEXT}{actual}").as_bytes(), &sig)
        .map_err(|_| SignatureError::Invalid)?;
    Ok(&key.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ed25519 PKCS#8 key made the way `openssl genpkey -algorithm ed25519` makes one.
    fn signing_key() -> (Vec<u8>, TrustedKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(pkcs8.as_ref())
        );
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        let public = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            B64.encode(&spki)
        );
        (
            pem.into_bytes(),
            TrustedKey {
                name: "ci".into(),
                public_key: public,
            },
        )
    }

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn a_signature_verifies_only_for_its_bytes_and_a_trusted_key() {
        let (private, trusted) = signing_key();
        let (other_private, _) = signing_key();
        let signature = sign(&private, SHA).unwrap();
        let keys = [trusted];
        assert_eq!(verify(&keys, SHA, Some(&signature)), Ok("ci"));

        assert_eq!(verify(&keys, SHA, None), Err(SignatureError::Unsigned));
        let changed = SHA.replace('9', "8");
        assert!(matches!(
            verify(&keys, &changed, Some(&signature)),
            Err(SignatureError::Changed { .. })
        ));
        let untrusted = sign(&other_private, SHA).unwrap();
        assert!(matches!(
            verify(&keys, SHA, Some(&untrusted)),
            Err(SignatureError::Untrusted(_))
        ));
        // A signature moved onto other bytes, with the sha256 edited to match, fails.
        let forged = ModuleSignature {
            sha256: changed.clone(),
            ..signature.clone()
        };
        assert_eq!(
            verify(&keys, &changed, Some(&forged)),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn public_keys_are_pem_or_base64_and_nothing_else() {
        let (_, trusted) = signing_key();
        let from_pem = public_key_bytes(&trusted.public_key).unwrap();
        assert_eq!(public_key_bytes(&B64.encode(from_pem)).unwrap(), from_pem);
        assert_eq!(public_key_bytes("AAAA"), Err(SignatureError::PublicKey));
        assert_eq!(
            public_key_bytes("not base64!"),
            Err(SignatureError::PublicKey)
        );
        assert!(
            sign(
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                SHA
            )
            .is_err()
        );
    }
}
