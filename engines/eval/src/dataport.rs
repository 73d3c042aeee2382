//! The host's end of the data socket: where cells of this process's evcxr context hand over
//! and fetch values (through the `parallax_data` crate) and where a `%pmap` cell takes its
//! chunks. A Unix socket in a private directory (0700), and every connection must open with this
//! process's random token, so only cells this process generated can use it.

use crate::ipc::{bind_private, same_secret, serve_connections, Locked, PrivateDir};
use bytes::Bytes;
use parallax_data::SharedRegion;
use parallax_data::{encode_regions, kind, read_frame, write_frame, Frame, FrameRef, Meta};
use parallax_engine_protocol::shared::{shm_base, Segment, SegmentFile, SharedDir};
use parallax_engine_protocol::Payload;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// What a map's host side hands the serving cell.
pub enum MapInput {
    Chunk {
        chunk: u64,
        start: u64,
        items: Payload,
    },
    End,
}

/// What comes back from a serving cell.
#[derive(Debug)]
pub enum MapOutput {
    /// The cell is serving: its argument and result types (`std::any::type_name`).
    Ready {
        arg_type: String,
        result_type: String,
    },
    Done {
        chunk: u64,
        elapsed_ns: u64,
        results: Payload,
        failures: Vec<(u64, String)>,
    },
    /// A chunk the cell could not read (its items are not of the argument type).
    Refused { chunk: u64, message: String },
}

/// The host's handles on one map: feed chunks in, read results out.
pub struct MapSession {
    pub input: std_mpsc::Sender<MapInput>,
    pub output: mpsc::UnboundedReceiver<MapOutput>,
}

struct MapWaiting {
    input: std_mpsc::Receiver<MapInput>,
    output: mpsc::UnboundedSender<MapOutput>,
}

#[derive(Default)]
struct Table {
    expected: HashMap<u64, oneshot::Sender<Payload>>,
    /// Where an expected transfer's bytes go when not in this port's own shared memory: a
    /// file another process named, which that process removes.
    destinations: HashMap<u64, PathBuf>,
    /// Shared memory handed to a cell that is writing a transfer into it.
    reserved: HashMap<u64, Arc<SegmentFile>>,
    /// Parts of a transfer a cell will fetch, joined in order.
    offered: HashMap<u64, Vec<Payload>>,
    maps: HashMap<u64, MapWaiting>,
    /// The transfer or map of the cell running now, which `parallax_data::CURRENT` names.
    current: Option<u64>,
}

struct Inner {
    dir: PrivateDir,
    socket: String,
    token: String,
    shared: Option<Arc<SharedDir>>,
    table: Mutex<Table>,
}

/// Cheap to clone; the socket and its directory go when the last clone does.
#[derive(Clone)]
pub struct DataPort {
    inner: Arc<Inner>,
}

/// The longest first frame a connection may send before it has shown the token.
const HELLO_LIMIT: u64 = 4096;

impl DataPort {
    /// Binds a fresh socket in a new private directory under `base`.
    pub fn open(base: &Path) -> std::io::Result<DataPort> {
        let token = random_token()?;
        let dir = base.join(format!(
            "parallax-data-{}-{}",
            std::process::id(),
            &token[..8]
        ));
        let (dir, socket_path, listener) = bind_private(dir, "data.sock")?;
        let port = DataPort {
            inner: Arc::new(Inner {
                dir,
                socket: socket_path.to_string_lossy().into_owned(),
                token,
                shared: SharedDir::open(&shm_base()),
                table: Mutex::default(),
            }),
        };
        serve_connections(
            listener,
            Arc::downgrade(&port.inner),
            "data",
            |inner, stream| DataPort { inner }.serve(stream),
        )?;
        Ok(port)
    }

    /// The directory this port owns (private to this process's user).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    pub fn socket(&self) -> &str {
        &self.inner.socket
    }

    pub fn token(&self) -> &str {
        &self.inner.token
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.locked()
    }

    /// Waits for a cell to hand over transfer `id`. Register before running the cell.
    pub fn expect(&self, id: u64) -> oneshot::Receiver<Payload> {
        let (tx, rx) = oneshot::channel();
        self.table().expected.insert(id, tx);
        rx
    }

    /// Like `expect`, with the bytes going into a new file of shared memory at `path`, which
    /// the process that named it reads and removes.
    pub fn expect_into(&self, id: u64, path: PathBuf) -> oneshot::Receiver<Payload> {
        self.table().destinations.insert(id, path);
        self.expect(id)
    }

    /// Holds `payload` until a cell fetches transfer `id`.
    pub fn offer(&self, id: u64, payload: Payload) {
        self.offer_parts(id, vec![payload]);
    }

    /// Holds `parts` until a cell fetches transfer `id`, as one value of their joined items.
    pub fn offer_parts(&self, id: u64, parts: Vec<Payload>) {
        self.table().offered.insert(id, parts);
    }

    /// This port's shared memory, if the host has any.
    pub fn shared(&self) -> Option<&Arc<SharedDir>> {
        self.inner.shared.as_ref()
    }

    /// The transfer or map whose cell runs next: the one a cell naming
    /// `parallax_data::CURRENT` means. One data cell runs at a time per evaluation process.
    pub fn running(&self, id: u64) {
        self.table().current = Some(id);
    }

    /// Forgets a transfer that no cell took (its cell failed before it got there).
    pub fn withdraw(&self, id: u64) {
        let mut table = self.table();
        table.offered.remove(&id);
        table.expected.remove(&id);
        table.destinations.remove(&id);
        table.reserved.remove(&id);
        table.maps.remove(&id);
    }

    /// A file of `len` bytes for transfer `id`, which a cell is about to write: where the
    /// transfer was told to go, else in this port's shared memory.
    fn reserve(&self, id: u64, len: u64) -> Result<SharedRegion, String> {
        let destination = {
            let table = self.table();
            if !table.expected.contains_key(&id) {
                return Err("nobody expects this transfer".into());
            }
            table.destinations.get(&id).cloned()
        };
        let file = match (destination, self.shared()) {
            (Some(path), _) => SegmentFile::create_for_another(path, len),
            (None, Some(dir)) => dir.create("put", len),
            (None, None) => return Err("no shared memory on this host".into()),
        }
        .map_err(|e| format!("cannot make shared memory: {e}"))?;
        let region = SharedRegion {
            path: file.path().to_string_lossy().into_owned(),
            offset: 0,
            len,
        };
        self.table().reserved.insert(id, file);
        Ok(region)
    }

    /// The values a cell wrote into the shared memory reserved for transfer `id`.
    fn written(&self, id: u64, meta: Meta, ends: Vec<u64>, len: u64) -> Result<Payload, String> {
        let file = self
            .table()
            .reserved
            .remove(&id)
            .ok_or("no shared memory was reserved for this transfer")?;
        let data = file
            .map(0, len)
            .map_err(|e| format!("cannot map shared memory: {e}"))?;
        let payload = Payload {
            meta,
            ends,
            data,
            segment: Some(Segment { file, offset: 0 }),
        };
        payload.validate()?;
        Ok(payload)
    }

    fn deliver(&self, id: u64, payload: Result<Payload, String>) -> Result<(), String> {
        let waiting = self.table().expected.remove(&id);
        match (waiting, payload) {
            (Some(waiting), Ok(payload)) => {
                let _ = waiting.send(payload);
                Ok(())
            }
            (None, _) => Err("nobody expects this transfer".into()),
            (_, Err(e)) => Err(e),
        }
    }

    /// Prepares map task `task` for the cell that will serve it.
    pub fn open_map(&self, task: u64) -> MapSession {
        let (input_tx, input_rx) = std_mpsc::channel();
        let (output_tx, output_rx) = mpsc::unbounded_channel();
        self.table().maps.insert(
            task,
            MapWaiting {
                input: input_rx,
                output: output_tx,
            },
        );
        MapSession {
            input: input_tx,
            output: output_rx,
        }
    }

    fn serve(&self, stream: UnixStream) {
        if let Err(e) = self.serve_connection(stream) {
            tracing::warn!("data socket: {e}");
        }
    }

    fn serve_connection(&self, stream: UnixStream) -> Result<(), String> {
        let mut reader =
            BufReader::with_capacity(1 << 16, stream.try_clone().map_err(|e| e.to_string())?);
        let mut writer = BufWriter::with_capacity(1 << 16, stream);
        let hello = read_frame(&mut reader, HELLO_LIMIT)
            .map_err(|e| format!("dropped a connection: {e}"))?;
        if hello.kind != kind::HELLO || !same_secret(hello.text.as_bytes(), self.token().as_bytes())
        {
            return Err("dropped a connection without the token".into());
        }
        loop {
            let frame = match read_frame(&mut reader, u64::MAX) {
                Ok(frame) => frame,
                // The cell closed its end: that is how every connection ends.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("read failed: {e}")),
            };
            let id = match (frame.id, self.table().current) {
                (parallax_data::CURRENT, Some(current)) => current,
                (parallax_data::CURRENT, None) => {
                    return Err("a cell asked for the running transfer; none runs".into())
                }
                (id, _) => id,
            };
            match frame.kind {
                kind::PUT => {
                    let delivered =
                        self.deliver(id, payload_of(frame.meta, frame.ends, frame.data));
                    acknowledge(&mut writer, id, delivered)?;
                }
                kind::RESERVE => match self.reserve(id, frame.start) {
                    Ok(region) => shared_reply(&mut writer, id, &Meta::default(), &[], &[region])?,
                    Err(e) => reply(&mut writer, kind::ERROR, id, &e, &Payload::default())?,
                },
                kind::PUT_SHARED => {
                    let written = self.written(id, frame.meta, frame.ends, frame.start);
                    acknowledge(&mut writer, id, self.deliver(id, written))?;
                }
                kind::GET => {
                    // Kept until withdrawn: the cell reads shared memory after this answer.
                    let offered = self.table().offered.get(&id).cloned();
                    match offered {
                        Some(parts) => hand_over(&mut writer, id, parts)?,
                        None => reply(
                            &mut writer,
                            kind::ERROR,
                            id,
                            "no such transfer",
                            &Payload::default(),
                        )?,
                    }
                }
                kind::MAP_JOIN => {
                    let waiting = self.table().maps.remove(&id);
                    match waiting {
                        Some(waiting) => {
                            return serve_map(&mut reader, &mut writer, frame, waiting)
                        }
                        None => reply(
                            &mut writer,
                            kind::ERROR,
                            frame.id,
                            "no such map",
                            &Payload::default(),
                        )?,
                    }
                }
                other => return Err(format!("unexpected frame kind {other}")),
            }
        }
    }
}

fn serve_map(
    reader: &mut impl Read,
    writer: &mut BufWriter<UnixStream>,
    join: Frame,
    waiting: MapWaiting,
) -> Result<(), String> {
    let _ = waiting.output.send(MapOutput::Ready {
        arg_type: join.text,
        result_type: join.meta.type_name,
    });
    loop {
        let input = waiting.input.recv().unwrap_or(MapInput::End);
        let (chunk, start, items) = match input {
            MapInput::Chunk {
                chunk,
                start,
                items,
            } => (chunk, start, items),
            MapInput::End => {
                return reply(writer, kind::END, 0, "", &Payload::default());
            }
        };
        // Items in shared memory on this host are named, not copied through the socket.
        let shared = items
            .region()
            .map(|region| encode_regions(&[SharedRegion::from(region)]));
        let frame = FrameRef {
            kind: if shared.is_some() {
                kind::CHUNK_SHARED
            } else {
                kind::CHUNK
            },
            id: chunk,
            start,
            text: "",
            meta: &items.meta,
            ends: &items.ends,
            data: if shared.is_some() { &[] } else { &items.data },
            extra: shared.as_deref().unwrap_or_default(),
        };
        write_frame(writer, &frame).map_err(|e| format!("map: write failed: {e}"))?;
        let done = read_frame(reader, u64::MAX).map_err(|e| format!("map: read failed: {e}"))?;
        let output = match done.kind {
            kind::CHUNK_DONE => {
                let failures: Vec<(u64, String)> = if done.extra.is_empty() {
                    Vec::new()
                } else {
                    postcard::from_bytes(&done.extra)
                        .map_err(|e| format!("map: bad failure list: {e}"))?
                };
                MapOutput::Done {
                    chunk: done.id,
                    elapsed_ns: done.start,
                    results: payload_of(done.meta, done.ends, done.data)?,
                    failures,
                }
            }
            kind::ERROR => MapOutput::Refused {
                chunk: done.id,
                message: done.text,
            },
            other => return Err(format!("map: unexpected frame kind {other}")),
        };
        if waiting.output.send(output).is_err() {
            // Nobody waits for this map any more: tell the cell to stop.
            return reply(writer, kind::END, 0, "", &Payload::default());
        }
    }
}

fn payload_of(meta: Meta, ends: Vec<u64>, data: Vec<u8>) -> Result<Payload, String> {
    let payload = Payload {
        meta,
        ends,
        data: Bytes::from(data),
        segment: None,
    };
    payload.validate()?;
    Ok(payload)
}

/// Tells the cell its transfer arrived, or why not.
fn acknowledge(
    writer: &mut BufWriter<UnixStream>,
    id: u64,
    delivered: Result<(), String>,
) -> Result<(), String> {
    match delivered {
        Ok(()) => reply(writer, kind::DATA, id, "", &Payload::default()),
        Err(e) => reply(writer, kind::ERROR, id, &e, &Payload::default()),
    }
}

/// Hands a cell the parts of a transfer as one value: the regions of shared memory that hold
/// them, for the cell to read in place, or, when a part is only in memory, their bytes.
fn hand_over(
    writer: &mut BufWriter<UnixStream>,
    id: u64,
    parts: Vec<Payload>,
) -> Result<(), String> {
    let type_name = parts
        .first()
        .map(|p| p.meta.type_name.clone())
        .unwrap_or_default();
    let regions: Option<Vec<SharedRegion>> = parts
        .iter()
        .map(|part| part.region().map(SharedRegion::from))
        .collect();
    match (regions, Payload::joined_layout(&type_name, &parts)) {
        (_, Err(e)) => reply(writer, kind::ERROR, id, &e, &Payload::default()),
        (Some(regions), Ok((meta, ends))) if !parts.is_empty() => {
            // This copy goes before the answer: once the cell has read the regions, the
            // transfer's own handles alone decide when the files go.
            drop(parts);
            shared_reply(writer, id, &meta, &ends, &regions)
        }
        _ => match Payload::concat(&type_name, &parts) {
            Ok(joined) => reply(writer, kind::DATA, id, "", &joined),
            Err(e) => reply(writer, kind::ERROR, id, &e, &Payload::default()),
        },
    }
}

fn shared_reply(
    writer: &mut BufWriter<UnixStream>,
    id: u64,
    meta: &Meta,
    ends: &[u64],
    regions: &[SharedRegion],
) -> Result<(), String> {
    let frame = FrameRef {
        kind: kind::SHARED,
        id,
        start: 0,
        text: "",
        meta,
        ends,
        data: &[],
        extra: &encode_regions(regions),
    };
    write_frame(writer, &frame).map_err(|e| format!("write failed: {e}"))
}

fn reply(
    writer: &mut BufWriter<UnixStream>,
    kind: u8,
    id: u64,
    text: &str,
    payload: &Payload,
) -> Result<(), String> {
    let frame = FrameRef {
        kind,
        id,
        start: 0,
        text,
        meta: &payload.meta,
        ends: &payload.ends,
        data: &payload.data,
        extra: &[],
    };
    write_frame(writer, &frame).map_err(|e| format!("write failed: {e}"))
}

fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn numbers(values: &[u64]) -> Payload {
        Payload {
            meta: Meta {
                type_name: "u64".into(),
                count: values.len() as u64,
                width: 8,
                elem_width: 0,
            },
            ends: Vec::new(),
            data: Bytes::from(
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            segment: None,
        }
    }

    #[test]
    fn slices_and_concatenation_keep_item_order() {
        let all = numbers(&[1, 2, 3, 4, 5]);
        let parts = [all.slice(0, 2), all.slice(2, 2), all.slice(2, 5)];
        assert_eq!(parts[1].meta.count, 0);
        assert_eq!(Payload::concat("u64", &parts).unwrap(), all);
        let strings = Payload {
            meta: Meta {
                type_name: "s".into(),
                count: 3,
                width: 0,
                elem_width: 0,
            },
            ends: vec![1, 3, 6],
            data: Bytes::from_static(b"abbccc"),
            segment: None,
        };
        let tail = strings.slice(1, 3);
        assert_eq!(
            (tail.ends.clone(), &tail.data[..]),
            (vec![2, 5], &b"bbccc"[..])
        );
        let joined = Payload::concat("s", &[strings.slice(0, 1), tail]).unwrap();
        assert_eq!(joined, strings);
        assert!(Payload::concat("u64", &[all, strings]).is_err());
    }

    #[test]
    fn a_connection_without_the_token_is_dropped_and_the_port_keeps_serving() {
        let port = DataPort::open(&std::env::temp_dir()).unwrap();
        let mode = std::fs::metadata(port.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let mut stranger = UnixStream::connect(port.socket()).unwrap();
        let hello = FrameRef {
            kind: kind::HELLO,
            id: 0,
            start: 0,
            text: "wrong",
            meta: &Meta::default(),
            ends: &[],
            data: &[],
            extra: &[],
        };
        write_frame(&mut stranger, &hello).unwrap();
        let mut rest = Vec::new();
        // The host closes the connection without a word.
        assert_eq!(stranger.read_to_end(&mut rest).unwrap(), 0);

        let expected = port.expect(5);
        let mut cell = UnixStream::connect(port.socket()).unwrap();
        write_frame(
            &mut cell,
            &FrameRef {
                text: port.token(),
                ..hello
            },
        )
        .unwrap();
        let sent = numbers(&[7, 8]);
        let put = FrameRef {
            kind: kind::PUT,
            id: 5,
            start: 0,
            text: "",
            meta: &sent.meta,
            ends: &sent.ends,
            data: &sent.data,
            extra: &[],
        };
        write_frame(&mut cell, &put).unwrap();
        let ack = read_frame(&mut cell, 1 << 20).unwrap();
        assert_eq!(ack.kind, kind::DATA);
        assert_eq!(expected.blocking_recv().unwrap(), sent);
    }

    fn cell(port: &DataPort) -> UnixStream {
        let mut cell = UnixStream::connect(port.socket()).unwrap();
        let hello = FrameRef {
            kind: kind::HELLO,
            id: 0,
            start: 0,
            text: port.token(),
            meta: &Meta::default(),
            ends: &[],
            data: &[],
            extra: &[],
        };
        write_frame(&mut cell, &hello).unwrap();
        cell
    }

    fn ask(cell: &mut UnixStream, kind: u8, id: u64, start: u64, payload: &Payload) -> Frame {
        let frame = FrameRef {
            kind,
            id,
            start,
            text: "",
            meta: &payload.meta,
            ends: &payload.ends,
            data: &[],
            extra: &[],
        };
        write_frame(cell, &frame).unwrap();
        read_frame(cell, 1 << 20).unwrap()
    }

    #[test]
    fn values_in_shared_memory_are_handed_over_in_place_and_removed_after_use() {
        let base = std::env::temp_dir().join(format!("parallax-shm-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        std::env::set_var("PARALLAX_SHM_DIR", &base);
        let port = DataPort::open(&std::env::temp_dir()).unwrap();
        let shared = port.shared().expect("shared memory").path().to_owned();
        let sent = numbers(&(0..20_000).collect::<Vec<u64>>());
        // A cell reserves room, writes there, and says so: the host maps what it wrote.
        let expected = port.expect(9);
        let mut writer = cell(&port);
        let reserved = ask(&mut writer, kind::RESERVE, 9, sent.data.len() as u64, &sent);
        assert_eq!(reserved.kind, kind::SHARED);
        let region = &parallax_data::decode_regions(&reserved.extra).unwrap()[0];
        assert!(Path::new(&region.path).starts_with(&shared), "{region:?}");
        std::fs::write(&region.path, &sent.data).unwrap();
        let ack = ask(
            &mut writer,
            kind::PUT_SHARED,
            9,
            sent.data.len() as u64,
            &sent,
        );
        assert_eq!(ack.kind, kind::DATA);
        let arrived = expected.blocking_recv().unwrap();
        assert_eq!((&arrived.meta, &arrived.data), (&sent.meta, &sent.data));
        // Parts in shared memory are named to the fetching cell, not copied to it.
        port.offer_parts(10, vec![arrived.slice(0, 5), arrived.slice(5, 20_000)]);
        let mut reader = cell(&port);
        let answer = ask(&mut reader, kind::GET, 10, 0, &Payload::default());
        assert_eq!((answer.kind, answer.meta.count), (kind::SHARED, 20_000));
        let regions = parallax_data::decode_regions(&answer.extra).unwrap();
        assert_eq!(
            regions
                .iter()
                .map(|r| (r.offset, r.len))
                .collect::<Vec<_>>(),
            vec![(0, 40), (40, 159_960)]
        );
        drop(arrived);
        assert!(Path::new(&region.path).exists(), "offered until withdrawn");
        port.withdraw(10);
        assert!(
            !Path::new(&region.path).exists(),
            "the file goes with its last user"
        );
        std::env::remove_var("PARALLAX_SHM_DIR");
        std::fs::remove_dir_all(base).unwrap();
    }
}
