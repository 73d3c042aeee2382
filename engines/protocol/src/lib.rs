//! The messages Parallax's controller (in the kernel) and its engines exchange over ZeroMQ, and
//! their signed framing. Engines may run on other hosts, so nothing here assumes a shared file
//! system: everything an engine needs travels in these messages.
//!
//! A message is a list of frames: the hex HMAC-SHA256 signature, the JSON envelope, then, when
//! it carries binary buffers, their keyed BLAKE3 digests in one frame and the buffers. The
//! signature covers the envelope and the digests, so every byte is authenticated while bulk
//! data is hashed at BLAKE3's speed. Each sender numbers its messages; a receiver drops a number
//! it has already seen from that sender, so a captured message cannot be replayed. A message
//! whose header is genuine but whose buffers were altered is delivered without them, marked
//! damaged, so that the task it belongs to fails instead of waiting forever.

mod connection;
mod payload;
pub mod shared;
pub mod signing;

pub use connection::{Connection, RANK_VARIABLES};
pub use payload::{DataMeta, Payload};
pub use shared::Region;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
pub use signing::Signer;
use std::collections::HashMap;

/// Sent by the controller to one engine.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToEngine {
    /// Evaluate a cell as task `task`.
    Execute {
        task: u64,
        code: String,
        share: Share,
    },
    /// Stop task `task` if it is still running.
    Interrupt {
        task: u64,
    },
    Ping {
        nonce: u64,
    },
    /// Exit cleanly.
    Shutdown,
    /// Store the values in the buffers (item ends, then bytes, or the bytes in `region` of
    /// shared memory on the engine's host) as variable `name`, as task `task`: one value of
    /// type `type_src` (`%push`), or a `Vec<type_src>` (`%scatter`).
    Store {
        task: u64,
        name: String,
        type_src: String,
        value: bool,
        meta: DataMeta,
        share: Share,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<Region>,
    },
    /// Send variable `name` back as task `task`: as one value (`%pull`), or its items
    /// (`%gather`). The engine answers `Fetched`, then `Done`. With `into` (the controller's
    /// host), the bytes go into a new file of shared memory at that path.
    Fetch {
        task: u64,
        name: String,
        value: bool,
        share: Share,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        into: Option<String>,
        /// Send the bytes ahead in `FetchedPart`s, each answered by `Received`.
        #[serde(default)]
        parts: bool,
    },
    /// Serve a map as task `task`: apply `func` (a function's name or a closure) to the
    /// chunks that follow until `MapEnd`.
    Map {
        task: u64,
        func: String,
        share: Share,
    },
    /// Items `start..` of a map's input (buffers: item ends, then bytes, or the bytes in
    /// `region` of shared memory on the engine's host).
    Chunk {
        task: u64,
        chunk: u64,
        start: u64,
        meta: DataMeta,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<Region>,
    },
    MapEnd {
        task: u64,
    },
    /// Bytes `offset..` (the one buffer) of a value `total` bytes long that task `task` carries
    /// to the engine's host once for all its engines: the engine writes them, in order, into a
    /// file of shared memory of its own and answers `Carried`.
    Carry {
        task: u64,
        offset: u64,
        total: u64,
    },
    /// Carry `task` is over: the engine removes its file and answers `Done`.
    Release {
        task: u64,
    },
    /// The controller holds `received` bytes of what fetch `task` sends in parts.
    Received {
        task: u64,
        received: u64,
    },
    /// A step of shared cell `cell` from the engine that compiles it (`from`).
    Shared {
        cell: u64,
        from: u32,
        step: Step,
    },
    /// To a replacement of a dead engine, before any cell: the history of the engine it
    /// replaces. Its compiling context rebuilds that state without running anything, then
    /// forgets the variables (`lost`), which died with the old engine.
    Adopt {
        history: Vec<HistoryEntry>,
        lost: Vec<String>,
    },
    /// The answer to `Register`: the engine's id in the pool, and the pool's size with it.
    Welcome {
        engine: u32,
        engines: u32,
    },
    /// The answer to a `Register` the controller cannot take; the engine exits with `reason`.
    Refused {
        reason: String,
    },
}

/// How an engine executes a cell that other engines on its host execute too: it compiles the
/// cell and passes the compiled cell on (`Lead`), or it runs what its leader compiled
/// (`Follow`). `cell` is the same on every engine that executes it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Share {
    pub cell: u64,
    pub role: Role,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    Lead { followers: Vec<u32> },
    Follow { leader: u32 },
}

impl Share {
    /// A cell an engine compiles for itself alone.
    pub fn alone(cell: u64) -> Share {
        Share {
            cell,
            role: Role::Lead {
                followers: Vec::new(),
            },
        }
    }
}

/// What a leading engine tells its followers while it executes a shared cell.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The fingerprint of the leader's history before the cell: only an engine with the same
    /// one may run what it compiles.
    Begin {
        fingerprint: u64,
    },
    /// The leader's context began executing this (the cell, or a command it needs first).
    Entry {
        code: String,
    },
    /// Run this compiled cell (an evcxr `LOAD_AND_RUN` line).
    Run {
        line: String,
    },
    EntryEnd {
        ok: bool,
    },
    /// The cell is over: the leader's outcome, whether its last execution ran compiled code,
    /// the variables before and after, the type of the values a data cell sent, the
    /// fingerprint after, and how the last compiled cell ended on the leader, in words.
    Done {
        outcome: Outcome,
        ran: bool,
        before: Vec<String>,
        after: Vec<String>,
        sent_type: Option<String>,
        fingerprint: u64,
        ended: String,
    },
    /// Sent by the controller: the leader is gone.
    Abort {
        reason: String,
    },
}

/// Values that cross between hosts in parts (carries out, fetches back): the bytes of one part,
/// big enough that a message's fixed cost vanishes and small enough that the parts in flight
/// stay a bounded buffer on both sides (the socket copies what it sends)...
pub const PART_BYTES: u64 = 8 << 20;
/// ...how many parts may be sent and not yet answered...
pub const PARTS_IN_FLIGHT: u64 = 4;
/// ...and the smallest value sent that way: smaller ones travel in one message, where a round
/// trip more would cost more than it saves.
pub const PARTS_FROM: u64 = 64 << 10;

/// The error a carry ends with when the engine's host has no room in shared memory for it:
/// the controller then sends the value in each engine's own message.
pub const NO_SHARED_ROOM: &str = "NoSharedRoom";

/// Pings with nonces from here up time the control path: their answers carry nothing else.
pub const TIMED_PING_NONCES: u64 = 1 << 63;

/// CPU time and memory of an engine with every process it started, on its own host.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessUsage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// Where an engine's state stands after a task, for `%cluster status` and for grouping.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct StateReport {
    /// Of the engine's history: engines with equal fingerprints can share compiled cells.
    pub fingerprint: u64,
    pub entries: u64,
    /// The engine holds a compiling context for its state.
    pub compiler: bool,
    /// Why the engine's state left the one it shared, if it did, most recent first.
    pub note: Option<String>,
    /// What the engine's compiling context has built since it started.
    #[serde(default)]
    pub builds: BuildCounts,
    /// The entries the task added to the engine's history (it only grows while the engine
    /// lives): the controller keeps a copy, from which a replacement rebuilds the engine's
    /// functions, types and dependencies if it dies.
    #[serde(default)]
    pub added: Vec<HistoryEntry>,
    /// Its variables after the task: what its death would lose.
    #[serde(default)]
    pub variables: Vec<String>,
}

/// The entry a replacement's history ends with, after the dead engine's: a trivial cell whose
/// compiled cell is recorded as the evaluation process's death, so that a context replaying
/// the history forgets every variable, as evcxr does when its process dies, and keeps the
/// rest. (evcxr's `:restart` would not do: its command keeps the variables it clears.)
pub fn take_over_entry() -> HistoryEntry {
    HistoryEntry {
        code: "// This engine took over from a dead one: its variables died with it.\n()".into(),
        lines: vec![LineReport {
            died: true,
            ..LineReport::default()
        }],
    }
}

/// One entry of an engine's history on the wire: what its compiling context executed (a cell
/// or a command), and how each compiled cell it ran ended (`parallax_eval::history::Entry`,
/// which this crate cannot name).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryEntry {
    pub code: String,
    pub lines: Vec<LineReport>,
}

/// How one compiled cell ended, as far as the variables are concerned.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct LineReport {
    pub panicked: bool,
    pub user_error: bool,
    pub changed_type: Vec<String>,
    pub died: bool,
    pub rolled_back: bool,
}

/// What an evcxr context's cell builds came to: compiled by rustc, loaded from the host's
/// compiled-cell cache, or failed (a compile error). One cell can take more than one build.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuildCounts {
    pub compiled: u64,
    pub cached: u64,
    pub failed: u64,
}

impl BuildCounts {
    pub fn add(&mut self, other: BuildCounts) {
        self.compiled += other.compiled;
        self.cached += other.cached;
        self.failed += other.failed;
    }

    pub fn is_empty(&self) -> bool {
        *self == BuildCounts::default()
    }
}

/// Sent by an engine to the controller.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromEngine {
    /// The first message of an engine process, said again each second until the controller
    /// answers (`Welcome` or `Refused`): the id it was launched as (none for an engine started
    /// by hand, which the controller numbers), its process id and host.
    Register {
        engine: Option<u32>,
        pid: u32,
        host: String,
    },
    /// The engine's evaluation context is built; it can take cells.
    Ready { engine: u32 },
    /// Output a task printed, as it printed it.
    Stream {
        task: u64,
        name: StreamName,
        text: String,
    },
    /// Rich output (a MIME bundle) a task produced.
    Display { task: u64, data: Map<String, Value> },
    /// A task ended.
    Done {
        task: u64,
        outcome: Outcome,
        #[serde(default)]
        state: Option<StateReport>,
    },
    /// A step of shared cell `cell`, for engines `to`.
    Share { cell: u64, to: Vec<u32>, step: Step },
    /// The answer to `Ping`; to a keep-alive ping (a nonce below `TIMED_PING_NONCES`), with
    /// what the engine's processes use, which only its host can read.
    Pong {
        nonce: u64,
        #[serde(default)]
        usage: Option<ProcessUsage>,
    },
    /// The values a `Fetch` asked for (buffers: item ends, then bytes, or the bytes in
    /// `region`, the file the `Fetch` named); `type_src` is their type as a cell writes it.
    Fetched {
        task: u64,
        type_src: String,
        meta: DataMeta,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<Region>,
        /// The bytes came ahead in `FetchedPart`s; the buffers hold the item ends alone.
        #[serde(default)]
        streamed: bool,
    },
    /// Bytes `offset..` (the one buffer) of the `total` bytes fetch `task` sends back, ahead
    /// of its `Fetched`.
    FetchedPart { task: u64, offset: u64, total: u64 },
    /// A map's cell is serving; the types are `std::any::type_name`s.
    MapReady {
        task: u64,
        arg_type: String,
        result_type: String,
    },
    /// The results of one chunk (buffers: item ends, then bytes), without the failed items.
    ChunkDone {
        task: u64,
        chunk: u64,
        elapsed_ns: u64,
        failures: Vec<(u64, String)>,
        meta: DataMeta,
    },
    /// The map's cell could not read a chunk.
    ChunkRefused {
        task: u64,
        chunk: u64,
        message: String,
    },
    /// After a map: its result type as a cell writes it.
    ResultType { task: u64, type_src: String },
    /// How many bytes of carry `task` the engine holds; with all of them, where they are on
    /// its host.
    Carried {
        task: u64,
        received: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<Region>,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// How a task ended.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The cell ran; `data` is its final expression's MIME bundle (empty when it has none).
    Ok { data: Map<String, Value> },
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
}

/// A decoded message with its sender's session and sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    pub session: String,
    pub seq: u64,
    pub body: T,
    /// Empty when `damaged`.
    pub buffers: Vec<Bytes>,
    /// Set when the header is genuine but a buffer was altered: what was wrong.
    pub damaged: Option<String>,
}

#[derive(Serialize)]
struct OutgoingHeader<'a, T> {
    session: &'a str,
    seq: u64,
    body: &'a T,
}

#[derive(Deserialize)]
struct IncomingHeader<T> {
    session: String,
    seq: u64,
    body: T,
}

/// Why an incoming message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum ProtocolError {
    TooFewFrames(usize),
    BadSignature,
    Replayed { session: String, seq: u64 },
    BadJson(String),
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtocolError::TooFewFrames(n) => write!(f, "{n} frames, need at least 2"),
            ProtocolError::BadSignature => write!(f, "invalid HMAC signature"),
            ProtocolError::Replayed { session, seq } => {
                write!(f, "replayed message {seq} from session {session}")
            }
            ProtocolError::BadJson(e) => write!(f, "malformed envelope: {e}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A message's kind as the wire names it (`store`, `fetched`, ...), for logs.
pub fn kind_of<T: Serialize>(message: &T) -> String {
    serde_json::to_value(message)
        .ok()
        .and_then(|value| value.get("type")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "a message".to_owned())
}

/// Numbers and signs outgoing messages for one sender.
pub struct Sender {
    signer: Signer,
    session: String,
    next_seq: u64,
}

impl Sender {
    pub fn new(signer: Signer, session: impl Into<String>) -> Self {
        Sender {
            signer,
            session: session.into(),
            next_seq: 0,
        }
    }

    pub fn encode<T: Serialize>(&mut self, body: &T, buffers: Vec<Bytes>) -> Vec<Bytes> {
        let header = OutgoingHeader {
            session: &self.session,
            seq: self.next_seq,
            body,
        };
        self.next_seq += 1;
        // Our message types hold only strings, numbers and JSON values: they always serialize.
        let envelope = serde_json::to_vec(&header).expect("protocol messages serialize");
        let mut signed: Vec<&[u8]> = vec![&envelope];
        let digests: Vec<u8> = buffers
            .iter()
            .flat_map(|b| self.signer.payload_digest(b))
            .collect();
        if !buffers.is_empty() {
            signed.push(&digests);
        }
        let signature = self.signer.sign(&signed);
        let mut frames = Vec::with_capacity(3 + buffers.len());
        frames.push(Bytes::from(signature));
        frames.push(Bytes::from(envelope));
        if !buffers.is_empty() {
            frames.push(Bytes::from(digests));
            frames.extend(buffers);
        }
        frames
    }
}

/// Checks and decodes incoming messages, remembering each sender's last sequence number.
pub struct Receiver {
    signer: Signer,
    last_seq: HashMap<String, u64>,
}

impl Receiver {
    pub fn new(signer: Signer) -> Self {
        Receiver {
            signer,
            last_seq: HashMap::new(),
        }
    }

    pub fn decode<T: DeserializeOwned>(
        &mut self,
        mut frames: Vec<Bytes>,
    ) -> Result<Envelope<T>, ProtocolError> {
        if frames.len() < 2 {
            return Err(ProtocolError::TooFewFrames(frames.len()));
        }
        let mut buffers = frames.split_off(2);
        let digests = if buffers.is_empty() {
            Bytes::new()
        } else {
            buffers.remove(0)
        };
        let mut signed: Vec<&[u8]> = vec![&frames[1]];
        if !buffers.is_empty() || !digests.is_empty() {
            signed.push(&digests);
        }
        if !self.signer.verify(&signed, &frames[0]) {
            return Err(ProtocolError::BadSignature);
        }
        let damaged = self.damaged(&digests, &buffers);
        let header: IncomingHeader<T> = serde_json::from_slice(&frames[1])
            .map_err(|e| ProtocolError::BadJson(e.to_string()))?;
        let last = self.last_seq.get(&header.session);
        if last.is_some_and(|&last| header.seq <= last) {
            return Err(ProtocolError::Replayed {
                session: header.session,
                seq: header.seq,
            });
        }
        self.last_seq.insert(header.session.clone(), header.seq);
        Ok(Envelope {
            session: header.session,
            seq: header.seq,
            body: header.body,
            buffers: if damaged.is_some() {
                Vec::new()
            } else {
                buffers
            },
            damaged,
        })
    }

    /// Why the buffers are not the ones the signed digests name, if they are not.
    fn damaged(&self, digests: &[u8], buffers: &[Bytes]) -> Option<String> {
        if !self.signer.is_signing() {
            return None;
        }
        if digests.len() != buffers.len() * signing::DIGEST_LEN {
            return Some(format!(
                "{} bytes of digests for {} buffers",
                digests.len(),
                buffers.len()
            ));
        }
        let altered: Vec<String> = buffers
            .iter()
            .zip(digests.chunks_exact(signing::DIGEST_LEN))
            .enumerate()
            .filter(|(_, (buffer, digest))| !self.signer.payload_matches(buffer, digest))
            .map(|(index, (buffer, _))| format!("buffer {index} ({} bytes)", buffer.len()))
            .collect();
        (!altered.is_empty()).then(|| {
            format!(
                "{} altered on the way (its keyed digest does not match)",
                altered.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pair() -> (Sender, Receiver) {
        (
            Sender::new(Signer::new("k"), "engine-0"),
            Receiver::new(Signer::new("k")),
        )
    }

    #[test]
    fn round_trip_with_buffers() {
        let (mut tx, mut rx) = pair();
        let body = FromEngine::Done {
            task: 3,
            outcome: Outcome::Ok {
                data: json!({"text/plain": "2"}).as_object().unwrap().clone(),
            },
            state: None,
        };
        let frames = tx.encode(&body, vec![Bytes::from_static(b"\x00\x01binary")]);
        let got: Envelope<FromEngine> = rx.decode(frames).unwrap();
        assert_eq!(got.body, body);
        assert_eq!(got.session, "engine-0");
        assert_eq!(got.buffers, vec![Bytes::from_static(b"\x00\x01binary")]);
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let (mut tx, _) = pair();
        let frames = tx.encode(
            &ToEngine::Execute {
                task: 1,
                code: "1 + 1".into(),
                share: Share {
                    cell: 4,
                    role: Role::Follow { leader: 0 },
                },
            },
            vec![],
        );
        let envelope: Value = serde_json::from_slice(&frames[1]).unwrap();
        assert_eq!(
            envelope,
            json!({"session": "engine-0", "seq": 0, "body": {"type": "execute", "task": 1, "code": "1 + 1",
                "share": {"cell": 4, "role": {"role": "follow", "leader": 0}}}})
        );
    }

    #[test]
    fn tampered_buffer_or_wrong_key_is_rejected() {
        let (mut tx, mut rx) = pair();
        let mut frames = tx.encode(
            &ToEngine::Shutdown,
            vec![Bytes::from_static(b"ends"), Bytes::from_static(b"data")],
        );
        // The buffers follow the signature, the envelope and the digests.
        frames[4] = Bytes::from_static(b"DATA");
        let got = rx.decode::<ToEngine>(frames).unwrap();
        assert_eq!(got.body, ToEngine::Shutdown);
        assert!(got.buffers.is_empty());
        let why = got.damaged.unwrap();
        assert!(why.starts_with("buffer 1 (4 bytes) altered"), "{why}");
        // Digests altered to match: the signature no longer does.
        let mut frames = tx.encode(&ToEngine::Shutdown, vec![Bytes::from_static(b"data")]);
        frames[2] = Bytes::from(Signer::new("k").payload_digest(b"DATA"));
        frames[3] = Bytes::from_static(b"DATA");
        assert_eq!(
            rx.decode::<ToEngine>(frames).unwrap_err(),
            ProtocolError::BadSignature
        );
        let frames = Sender::new(Signer::new("other"), "x").encode(&ToEngine::Shutdown, vec![]);
        assert_eq!(
            rx.decode::<ToEngine>(frames).unwrap_err(),
            ProtocolError::BadSignature
        );
    }

    #[test]
    fn replays_and_old_sequence_numbers_are_rejected() {
        let (mut tx, mut rx) = pair();
        let first = tx.encode(&ToEngine::Ping { nonce: 1 }, vec![]);
        let second = tx.encode(&ToEngine::Ping { nonce: 2 }, vec![]);
        assert!(rx.decode::<ToEngine>(second).is_ok());
        assert!(matches!(
            rx.decode::<ToEngine>(first),
            Err(ProtocolError::Replayed { seq: 0, .. })
        ));
    }

    #[test]
    fn garbage_is_rejected() {
        let (_, mut rx) = pair();
        assert_eq!(
            rx.decode::<ToEngine>(vec![Bytes::from_static(b"x")])
                .unwrap_err(),
            ProtocolError::TooFewFrames(1)
        );
        let signer = Signer::new("k");
        let body = b"{not json";
        let frames = vec![Bytes::from(signer.sign(&[body])), Bytes::from_static(body)];
        assert!(matches!(
            rx.decode::<ToEngine>(frames),
            Err(ProtocolError::BadJson(_))
        ));
    }
}
