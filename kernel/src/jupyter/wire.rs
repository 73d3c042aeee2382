//! The Jupyter wire format: routing identities, the `<IDS|MSG>` delimiter, an HMAC-SHA256
//! signature, then header, parent header, metadata, content and binary buffers.

use bytes::Bytes;
use jupyter_protocol::Header;
pub use parallax_engine_protocol::Signer;
use serde_json::Value;
use std::collections::{HashSet, VecDeque};
use zeromq::{SocketSend, ZmqMessage};

const DELIMITER: &[u8] = b"<IDS|MSG>";
/// How many recent signatures are remembered to drop replayed messages.
const REPLAY_WINDOW: usize = 4096;

/// Why an incoming message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum WireError {
    NoDelimiter,
    TooFewFrames(usize),
    BadSignature,
    Replayed,
    BadJson(&'static str, String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::NoDelimiter => write!(f, "no <IDS|MSG> delimiter"),
            WireError::TooFewFrames(n) => write!(f, "only {n} frames after the delimiter, need 5"),
            WireError::BadSignature => write!(f, "invalid HMAC signature"),
            WireError::Replayed => write!(f, "replayed signature (duplicate message)"),
            WireError::BadJson(part, e) => write!(f, "malformed {part}: {e}"),
        }
    }
}

/// A decoded, verified message.
#[derive(Debug, Clone)]
pub struct WireMessage {
    pub identities: Vec<Bytes>,
    /// Kept as sent, so that replies quote it exactly as their parent header.
    pub header: Value,
    pub msg_type: String,
    pub content: Value,
}

impl WireMessage {
    pub fn msg_type(&self) -> &str {
        &self.msg_type
    }
}

/// Remembers recent signatures so that a captured message cannot be sent again.
pub struct ReplayGuard {
    seen: HashSet<Vec<u8>>,
    order: VecDeque<Vec<u8>>,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard {
            seen: HashSet::with_capacity(REPLAY_WINDOW),
            order: VecDeque::with_capacity(REPLAY_WINDOW),
        }
    }
}

impl ReplayGuard {
    /// Returns false if the signature was seen before.
    fn admit(&mut self, signature: &[u8]) -> bool {
        if signature.is_empty() {
            return true;
        }
        if self.seen.contains(signature) {
            return false;
        }
        if self.order.len() == REPLAY_WINDOW {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(signature.to_vec());
        self.order.push_back(signature.to_vec());
        true
    }
}

/// Decodes and verifies a multipart message received on a ROUTER, SUB or similar socket.
pub fn decode(
    message: ZmqMessage,
    signer: &Signer,
    replay: &mut ReplayGuard,
) -> Result<WireMessage, WireError> {
    let frames = message.into_vec();
    let delimiter = frames
        .iter()
        .position(|f| f.as_ref() == DELIMITER)
        .ok_or(WireError::NoDelimiter)?;
    let identities = frames[..delimiter].to_vec();
    let rest = &frames[delimiter + 1..];
    if rest.len() < 5 {
        return Err(WireError::TooFewFrames(rest.len()));
    }
    let signature = &rest[0];
    let signed: Vec<&[u8]> = rest[1..5].iter().map(|b| b.as_ref()).collect();
    if !signer.verify(&signed, signature) {
        return Err(WireError::BadSignature);
    }
    if !replay.admit(signature) {
        return Err(WireError::Replayed);
    }
    let parse = |part: &'static str, bytes: &Bytes| -> Result<Value, WireError> {
        serde_json::from_slice(bytes).map_err(|e| WireError::BadJson(part, e.to_string()))
    };
    let header = parse("header", &rest[1])?;
    let msg_type = header["msg_type"]
        .as_str()
        .ok_or_else(|| WireError::BadJson("header", "no msg_type".into()))?
        .to_owned();
    // Parent header and metadata are not used, but a message must be well-formed to be served.
    parse("parent_header", &rest[2])?;
    parse("metadata", &rest[3])?;
    Ok(WireMessage {
        identities,
        header,
        msg_type,
        content: parse("content", &rest[4])?,
    })
}

/// Sends on `socket`; a failure is logged under the channel's `name`, not fatal: the client
/// that should have received it is gone.
pub async fn send_logged<S: SocketSend>(socket: &mut S, message: ZmqMessage, name: &str) {
    if let Err(e) = socket.send(message).await {
        tracing::warn!("{name}: send failed: {e}");
    }
}

/// Encodes and signs a message for sending.
pub fn encode(
    signer: &Signer,
    identities: &[Bytes],
    header: &Header,
    parent_header: &Value,
    metadata: &Value,
    content: &Value,
    buffers: &[Bytes],
) -> ZmqMessage {
    // Serializing these JSON values and a header of plain strings cannot fail.
    let header = serde_json::to_vec(header).expect("header serializes");
    let parent = serde_json::to_vec(parent_header).expect("JSON serializes");
    let metadata = serde_json::to_vec(metadata).expect("JSON serializes");
    let content = serde_json::to_vec(content).expect("JSON serializes");
    let signature = signer.sign(&[&header, &parent, &metadata, &content]);
    let mut frames: Vec<Bytes> = identities.to_vec();
    frames.push(Bytes::from_static(DELIMITER));
    frames.push(Bytes::from(signature));
    frames.push(Bytes::from(header));
    frames.push(Bytes::from(parent));
    frames.push(Bytes::from(metadata));
    frames.push(Bytes::from(content));
    frames.extend(buffers.iter().cloned());
    // `frames` holds at least the delimiter, so it is never empty.
    ZmqMessage::try_from(frames).expect("non-empty message")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header(msg_type: &str) -> Header {
        Header {
            msg_id: "m1".into(),
            username: "u".into(),
            session: "s".into(),
            date: chrono::Utc::now(),
            msg_type: msg_type.into(),
            version: "5.3".into(),
        }
    }

    fn sample(signer: &Signer) -> ZmqMessage {
        encode(
            signer,
            &[Bytes::from_static(b"client")],
            &header("kernel_info_request"),
            &json!({}),
            &json!({}),
            &json!({"a": 1}),
            &[Bytes::from_static(b"buf")],
        )
    }

    #[test]
    fn round_trip_keeps_every_part() {
        let signer = Signer::new("secret");
        let decoded = decode(sample(&signer), &signer, &mut ReplayGuard::default()).unwrap();
        assert_eq!(decoded.identities, vec![Bytes::from_static(b"client")]);
        assert_eq!(decoded.msg_type(), "kernel_info_request");
        assert_eq!(decoded.content, json!({"a": 1}));
        assert_eq!(decoded.header["msg_id"], "m1");
    }

    #[test]
    fn wrong_key_is_rejected() {
        let message = sample(&Signer::new("secret"));
        let err = decode(message, &Signer::new("other"), &mut ReplayGuard::default()).unwrap_err();
        assert_eq!(err, WireError::BadSignature);
    }

    #[test]
    fn tampered_content_is_rejected() {
        let signer = Signer::new("secret");
        let mut frames = sample(&signer).into_vec();
        frames[6] = Bytes::from_static(b"{\"a\": 2}");
        let message = ZmqMessage::try_from(frames).unwrap();
        let err = decode(message, &signer, &mut ReplayGuard::default()).unwrap_err();
        assert_eq!(err, WireError::BadSignature);
    }

    #[test]
    fn replay_is_rejected() {
        let signer = Signer::new("secret");
        let mut guard = ReplayGuard::default();
        let message = sample(&signer);
        assert!(decode(message.clone(), &signer, &mut guard).is_ok());
        assert_eq!(
            decode(message, &signer, &mut guard).unwrap_err(),
            WireError::Replayed
        );
    }

    #[test]
    fn garbage_is_rejected() {
        let signer = Signer::new("secret");
        let mut guard = ReplayGuard::default();
        let garbage = ZmqMessage::from(vec![0xffu8, 0, 1]);
        assert_eq!(
            decode(garbage, &signer, &mut guard).unwrap_err(),
            WireError::NoDelimiter
        );
        let short: ZmqMessage = ZmqMessage::try_from(vec![
            Bytes::from_static(DELIMITER),
            Bytes::from_static(b"sig"),
        ])
        .unwrap();
        assert_eq!(
            decode(short, &signer, &mut guard).unwrap_err(),
            WireError::TooFewFrames(1)
        );
    }

    #[test]
    fn unsigned_mode_accepts_empty_signature() {
        let signer = Signer::new("");
        assert!(!signer.is_signing());
        assert!(decode(sample(&signer), &signer, &mut ReplayGuard::default()).is_ok());
    }
}
