//! HMAC-SHA256 signing with a connection key, as Jupyter does it; every Parallax channel uses
//! it. Bulk bytes on the engine wire are authenticated with BLAKE3 in its keyed mode instead
//! (several times faster per core than HMAC-SHA256), under a key derived from the connection
//! key; their digests go in the part of the message HMAC signs.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The context that derives the payload key from the connection key (BLAKE3's KDF mode).
const PAYLOAD_KEY_CONTEXT: &str = "parallax engine wire 2026-11 payload digests";

/// The length of a payload digest.
pub const DIGEST_LEN: usize = 32;

/// Signs and checks messages with the connection key.
#[derive(Clone)]
pub struct Signer {
    mac: Option<Hmac<Sha256>>,
    payload_key: Option<[u8; 32]>,
}

impl Signer {
    /// An empty key means "no signing", as in the Jupyter spec; callers warn about it.
    pub fn new(key: &str) -> Self {
        if key.is_empty() {
            return Signer {
                mac: None,
                payload_key: None,
            };
        }
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
        Signer {
            mac: Some(mac),
            payload_key: Some(blake3::derive_key(PAYLOAD_KEY_CONTEXT, key.as_bytes())),
        }
    }

    /// The keyed digest of a payload buffer; empty when not signing.
    pub fn payload_digest(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.payload_key {
            Some(key) => blake3::keyed_hash(key, bytes).as_bytes().to_vec(),
            None => Vec::new(),
        }
    }

    /// Whether `digest` is the keyed digest of `bytes` (in constant time); true when not
    /// signing.
    pub fn payload_matches(&self, bytes: &[u8], digest: &[u8]) -> bool {
        match &self.payload_key {
            None => true,
            Some(key) => match <[u8; DIGEST_LEN]>::try_from(digest) {
                Ok(digest) => blake3::keyed_hash(key, bytes) == blake3::Hash::from(digest),
                Err(_) => false,
            },
        }
    }

    pub fn is_signing(&self) -> bool {
        self.mac.is_some()
    }

    fn mac_over(&self, parts: &[&[u8]]) -> Option<Hmac<Sha256>> {
        let mut mac = self.mac.clone()?;
        for part in parts {
            mac.update(part);
        }
        Some(mac)
    }

    /// The hex signature of `parts`, concatenated; empty when not signing.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        match self.mac_over(parts) {
            Some(mac) => hex::encode(mac.finalize().into_bytes()),
            None => String::new(),
        }
    }

    /// Checks a hex signature in constant time.
    pub fn verify(&self, parts: &[&[u8]], signature: &[u8]) -> bool {
        match self.mac_over(parts) {
            None => true,
            Some(mac) => match hex::decode(signature) {
                Ok(raw) => mac.verify_slice(&raw).is_ok(),
                Err(_) => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Signer;

    #[test]
    fn signature_matches_python_hmac() {
        // hmac.new(b"key", b'{"h":1}{}{}{"c":2}', hashlib.sha256).hexdigest(), as jupyter_client
        // signs the four JSON frames.
        let signer = Signer::new("key");
        let parts: [&[u8]; 4] = [b"{\"h\":1}", b"{}", b"{}", b"{\"c\":2}"];
        let signature = signer.sign(&parts);
        assert_eq!(
            signature,
            "06829948ac688bc613e1a3e1eaf6fdbabc39332b27532bd39e22164d4bc8179a"
        );
        assert!(signer.verify(&parts, signature.as_bytes()));
        assert!(!Signer::new("other").verify(&parts, signature.as_bytes()));
        assert!(!signer.verify(&parts, b"not hex"));
    }

    #[test]
    fn empty_key_does_not_sign() {
        let signer = Signer::new("");
        assert!(!signer.is_signing());
        assert_eq!(signer.sign(&[b"x"]), "");
    }
}
