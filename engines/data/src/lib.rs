//! Moves values between a Parallax cell and the process that hosts its evcxr context (the
//! kernel for the notebook's own context, an engine for its own). The magics `%pmap`,
//! `%scatter`, `%gather`, `%push` and `%pull` generate cells that call the functions at the end
//! of this file; the host reads and writes the same frames on a Unix socket in a private
//! directory. Values are encoded compactly: numbers and vectors of numbers as their
//! little-endian bytes, everything else with postcard through serde. Never as source code.
//!
//! Longer than one sitting: the parallax binary carries this crate as one source string, which
//! it writes out as the lib.rs of every evcxr context that moves data.

use serde::{de::DeserializeOwned, Serialize};
use std::any::{type_name, Any, TypeId};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Frame kinds. A cell opens the connection with `HELLO`, then asks or offers.
pub mod kind {
    /// cell -> host: `text` is the connection token.
    pub const HELLO: u8 = 1;
    /// cell -> host: items for transfer `id`.
    pub const PUT: u8 = 2;
    /// cell -> host: send me transfer `id`. The host answers `DATA` or `ERROR`.
    pub const GET: u8 = 3;
    pub const DATA: u8 = 4;
    /// host -> cell or cell -> host: `text` says what went wrong.
    pub const ERROR: u8 = 5;
    /// cell -> host: the map of task `id` is ready; `text` is the argument type, the meta's
    /// type name the result type.
    pub const MAP_JOIN: u8 = 6;
    /// host -> cell: items `start..` of a map's input, as chunk `id`.
    pub const CHUNK: u8 = 7;
    /// host -> cell: the map is over.
    pub const END: u8 = 8;
    /// cell -> host: the results of chunk `id`; `start` is the compute time in nanoseconds,
    /// `extra` the failed items (postcard `Vec<(u64, String)>`: input index, panic message).
    pub const CHUNK_DONE: u8 = 9;
}

/// What a sequence of encoded values holds and how it is laid out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// `std::any::type_name` of the item type, compared before anything is decoded.
    pub type_name: String,
    pub count: u64,
    /// Non-zero: every item is a number of this many bytes, stored back to back, no `ends`.
    pub width: u32,
    /// Non-zero: every item is a `Vec` of numbers of this many bytes; an item is their bytes.
    pub elem_width: u32,
}

/// One message on the data socket. `ends` (where each item ends in `data`) is empty when the
/// items have a fixed width.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    pub kind: u8,
    pub id: u64,
    pub start: u64,
    pub text: String,
    pub meta: Meta,
    pub ends: Vec<u64>,
    pub data: Vec<u8>,
    pub extra: Vec<u8>,
}

/// The pieces of a frame to write; the data is borrowed so that big payloads are not copied.
pub struct FrameRef<'a> {
    pub kind: u8,
    pub id: u64,
    pub start: u64,
    pub text: &'a str,
    pub meta: &'a Meta,
    pub ends: &'a [u64],
    pub data: &'a [u8],
    pub extra: &'a [u8],
}

const HEADER_LEN: usize = 1 + 8 + 8 + 4 + 4 + 8 + 4 + 4 + 8 + 8 + 8;

pub fn write_frame(out: &mut impl Write, frame: &FrameRef<'_>) -> io::Result<()> {
    let mut head = Vec::with_capacity(
        HEADER_LEN + frame.text.len() + frame.meta.type_name.len() + frame.ends.len() * 8,
    );
    head.push(frame.kind);
    head.extend_from_slice(&frame.id.to_le_bytes());
    head.extend_from_slice(&frame.start.to_le_bytes());
    head.extend_from_slice(&(frame.text.len() as u32).to_le_bytes());
    head.extend_from_slice(&(frame.meta.type_name.len() as u32).to_le_bytes());
    head.extend_from_slice(&frame.meta.count.to_le_bytes());
    head.extend_from_slice(&frame.meta.width.to_le_bytes());
    head.extend_from_slice(&frame.meta.elem_width.to_le_bytes());
    head.extend_from_slice(&(frame.ends.len() as u64).to_le_bytes());
    head.extend_from_slice(&(frame.data.len() as u64).to_le_bytes());
    head.extend_from_slice(&(frame.extra.len() as u64).to_le_bytes());
    head.extend_from_slice(frame.text.as_bytes());
    head.extend_from_slice(frame.meta.type_name.as_bytes());
    for end in frame.ends {
        head.extend_from_slice(&end.to_le_bytes());
    }
    out.write_all(&head)?;
    out.write_all(frame.data)?;
    out.write_all(frame.extra)?;
    out.flush()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads one frame. Lengths above `limit` bytes are refused before anything is allocated, so
/// that a stranger on the socket cannot make the host allocate what it likes.
pub fn read_frame(input: &mut impl Read, limit: u64) -> io::Result<Frame> {
    let mut head = [0u8; HEADER_LEN];
    input.read_exact(&mut head)?;
    let mut at = 0;
    let mut take = |n: usize| {
        let bytes = &head[at..at + n];
        at += n;
        bytes
    };
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
    let kind = take(1)[0];
    let id = u64_at(take(8));
    let start = u64_at(take(8));
    let text_len = u32_at(take(4)) as u64;
    let name_len = u32_at(take(4)) as u64;
    let count = u64_at(take(8));
    let width = u32_at(take(4));
    let elem_width = u32_at(take(4));
    let ends_len = u64_at(take(8));
    let data_len = u64_at(take(8));
    let extra_len = u64_at(take(8));
    let total = [
        text_len,
        name_len,
        ends_len.saturating_mul(8),
        data_len,
        extra_len,
    ]
    .iter()
    .fold(0u64, |sum, n| sum.saturating_add(*n));
    if total > limit {
        return Err(invalid(format!(
            "a frame of {total} bytes exceeds the limit of {limit}"
        )));
    }
    let mut read_vec = |len: u64| -> io::Result<Vec<u8>> {
        let mut buffer = vec![0u8; len as usize];
        input.read_exact(&mut buffer)?;
        Ok(buffer)
    };
    let text = String::from_utf8(read_vec(text_len)?)
        .map_err(|_| invalid("frame text is not UTF-8".into()))?;
    let type_name = String::from_utf8(read_vec(name_len)?)
        .map_err(|_| invalid("frame type name is not UTF-8".into()))?;
    let ends = read_vec(ends_len * 8)?
        .chunks_exact(8)
        .map(u64_at)
        .collect();
    let data = read_vec(data_len)?;
    let extra = read_vec(extra_len)?;
    Ok(Frame {
        kind,
        id,
        start,
        text,
        meta: Meta {
            type_name,
            count,
            width,
            elem_width,
        },
        ends,
        data,
        extra,
    })
}

/// Checks that `ends` and the data length agree with `meta`, so that slicing cannot panic.
pub fn validate(meta: &Meta, ends: &[u64], data_len: u64) -> Result<(), String> {
    if meta.width > 0 {
        let expected = meta.count.checked_mul(meta.width as u64);
        if expected != Some(data_len) || !ends.is_empty() {
            return Err(format!(
                "{} items of {} bytes do not fill {data_len} bytes",
                meta.count, meta.width
            ));
        }
        return Ok(());
    }
    if ends.len() as u64 != meta.count {
        return Err(format!("{} item ends for {} items", ends.len(), meta.count));
    }
    let mut last = 0;
    for &end in ends {
        if end < last || end > data_len {
            return Err(format!(
                "item end {end} out of order or past {data_len} bytes"
            ));
        }
        last = end;
    }
    if last != data_len {
        return Err(format!(
            "items end at {last}, the data has {data_len} bytes"
        ));
    }
    Ok(())
}

/// The byte range of items `start..end` (validated items, `start <= end <= count`).
pub fn byte_range(meta: &Meta, ends: &[u64], start: u64, end: u64) -> (usize, usize) {
    if meta.width > 0 {
        let width = meta.width as u64;
        return ((start * width) as usize, (end * width) as usize);
    }
    let at = |i: u64| {
        if i == 0 {
            0
        } else {
            ends[(i - 1) as usize] as usize
        }
    };
    (at(start), at(end))
}

/// The byte size of a number type whose bytes can be copied as they are, if `T` is one.
pub fn number_width<T: 'static>() -> Option<u32> {
    if cfg!(target_endian = "big") {
        return None;
    }
    let id = TypeId::of::<T>();
    macro_rules! widths {
        ($($t:ty),*) => {$(
            if id == TypeId::of::<$t>() {
                return Some(std::mem::size_of::<$t>() as u32);
            }
        )*};
    }
    widths!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, usize, isize, f32, f64);
    None
}

/// Calls `$body` with `$p` bound to the number type `P` when `$t` is `Vec<P>`.
macro_rules! with_number_vec {
    ($t:ty, |$p:ident| $body:block) => {{
        let id = TypeId::of::<$t>();
        with_number_vec!(@each id, $p, $body, u8, i8, u16, i16, u32, i32, u64, i64, u128, i128,
            usize, isize, f32, f64)
    }};
    (@each $id:ident, $p:ident, $body:block, $($n:ty),*) => {{
        let mut handled = false;
        $(
            if !handled && $id == TypeId::of::<Vec<$n>>() {
                #[allow(dead_code)]
                type $p = $n;
                handled = true;
                $body
            }
        )*
        handled
    }};
}

/// The raw bytes of numbers (no padding, every bit pattern meaningful).
fn number_bytes<P: 'static>(values: &[P]) -> &[u8] {
    debug_assert!(number_width::<P>().is_some());
    // SAFETY: callers pass only the number types of `number_width`, which have no padding.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values))
    }
}

/// Numbers from their raw little-endian bytes (`bytes.len()` is a multiple of their size).
fn numbers_from<P: 'static>(bytes: &[u8]) -> Vec<P> {
    debug_assert!(number_width::<P>().is_some());
    let count = bytes.len() / std::mem::size_of::<P>();
    let mut values: Vec<P> = Vec::with_capacity(count);
    // SAFETY: P is a number type (any bit pattern is a valid value) and the capacity holds
    // `count` of them; the copy is bytewise, so the source needs no alignment.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            values.as_mut_ptr() as *mut u8,
            count * std::mem::size_of::<P>(),
        );
        values.set_len(count);
    }
    values
}

fn cast<A: 'static, B: 'static>(value: A) -> B {
    match (Box::new(value) as Box<dyn Any>).downcast::<B>() {
        Ok(b) => *b,
        Err(_) => unreachable!("cast between types already found equal"),
    }
}

/// Values of type `T`, encoded.
pub struct Encoded<T> {
    pub meta: Meta,
    pub ends: Vec<u64>,
    pub data: Vec<u8>,
    item: PhantomData<fn() -> T>,
}

impl<T: Serialize + 'static> Encoded<T> {
    pub fn new() -> Self {
        let mut elem_width = 0;
        with_number_vec!(T, |P| {
            elem_width = number_width::<P>().unwrap_or(0);
        });
        Encoded {
            meta: Meta {
                type_name: type_name::<T>().to_owned(),
                count: 0,
                width: number_width::<T>().unwrap_or(0),
                elem_width,
            },
            ends: Vec::new(),
            data: Vec::new(),
            item: PhantomData,
        }
    }

    pub fn reserve(&mut self, items: usize) {
        if self.meta.width > 0 {
            self.data.reserve(items * self.meta.width as usize);
        } else {
            self.ends.reserve(items);
        }
    }

    pub fn push(&mut self, item: &T) -> Result<(), String> {
        if self.meta.width > 0 {
            self.data
                .extend_from_slice(number_bytes(std::slice::from_ref(item)));
        } else {
            let mut done = false;
            with_number_vec!(T, |P| {
                if let Some(numbers) = (item as &dyn Any).downcast_ref::<Vec<P>>() {
                    self.data.extend_from_slice(number_bytes(numbers));
                    done = true;
                }
            });
            if !done {
                let data = std::mem::take(&mut self.data);
                self.data = postcard::to_extend(item, data).map_err(|e| {
                    format!(
                        "a value of type {} cannot be encoded: {e}",
                        type_name::<T>()
                    )
                })?;
            }
            self.ends.push(self.data.len() as u64);
        }
        self.meta.count += 1;
        Ok(())
    }

    fn push_or_panic(&mut self, item: &T) {
        if let Err(e) = self.push(item) {
            panic!("parallax: {e}");
        }
    }
}

impl<T: Serialize + 'static> Default for Encoded<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Decodes items `start..end` of what `meta`, `ends` and `data` hold as values of type `T`.
pub fn decode_items<T: DeserializeOwned + 'static>(
    meta: &Meta,
    ends: &[u64],
    data: &[u8],
) -> Result<Vec<T>, String> {
    if meta.type_name != type_name::<T>() {
        return Err(format!(
            "the values are of type `{}`, not `{}`",
            meta.type_name,
            type_name::<T>()
        ));
    }
    validate(meta, ends, data.len() as u64)?;
    if meta.width > 0 {
        if number_width::<T>() != Some(meta.width) {
            return Err(format!(
                "`{}` is not a {}-byte number",
                meta.type_name, meta.width
            ));
        }
        let mut out = None;
        macro_rules! numbers {
            ($($t:ty),*) => {$(
                if out.is_none() && TypeId::of::<T>() == TypeId::of::<$t>() {
                    out = Some(cast::<Vec<$t>, Vec<T>>(numbers_from::<$t>(data)));
                }
            )*};
        }
        numbers!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, usize, isize, f32, f64);
        return out.ok_or_else(|| format!("`{}` is not a number type", meta.type_name));
    }
    let mut items = Vec::with_capacity(meta.count as usize);
    let mut begin = 0usize;
    for (index, &end) in ends.iter().enumerate() {
        let bytes = &data[begin..end as usize];
        begin = end as usize;
        if meta.elem_width > 0 {
            let mut item = None;
            with_number_vec!(T, |P| {
                if std::mem::size_of::<P>() as u32 == meta.elem_width
                    && bytes.len().is_multiple_of(std::mem::size_of::<P>())
                {
                    item = Some(cast::<Vec<P>, T>(numbers_from::<P>(bytes)));
                }
            });
            match item {
                Some(item) => items.push(item),
                None => {
                    return Err(format!(
                        "item {index} is not a vector of `{}`",
                        meta.type_name
                    ))
                }
            }
            continue;
        }
        match postcard::from_bytes::<T>(bytes) {
            Ok(item) => items.push(item),
            Err(e) => {
                return Err(format!(
                    "item {index} cannot be decoded as `{}`: {e}",
                    type_name::<T>()
                ))
            }
        }
    }
    Ok(items)
}

/// Where an engine's evaluation process finds its engine's data socket, and its token.
pub const SOCKET_VAR: &str = "PARALLAX_DATA_SOCKET";
pub const TOKEN_VAR: &str = "PARALLAX_DATA_TOKEN";

/// The connection of a cell to its host.
pub struct Link {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
}

impl Link {
    pub fn connect(path: &str, token: &str) -> Link {
        // An engine's cells are the same on every engine of a host (they are compiled once), so
        // they name no socket: each finds its engine's in its evaluation process's environment.
        let (path, token) = if path.is_empty() {
            let read = |name: &str| {
                std::env::var(name)
                    .unwrap_or_else(|_| panic!("parallax: {name} is not set in this process"))
            };
            (read(SOCKET_VAR), read(TOKEN_VAR))
        } else {
            (path.to_owned(), token.to_owned())
        };
        let (path, token) = (path.as_str(), token.as_str());
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("parallax: cannot reach the data socket {path}: {e}"));
        let reader = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("parallax: data socket: {e}"));
        let mut link = Link {
            reader: BufReader::with_capacity(1 << 16, reader),
            writer: BufWriter::with_capacity(1 << 16, stream),
        };
        link.send(kind::HELLO, 0, 0, token, &Meta::default(), &[], &[], &[]);
        link
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        kind: u8,
        id: u64,
        start: u64,
        text: &str,
        meta: &Meta,
        ends: &[u64],
        data: &[u8],
        extra: &[u8],
    ) {
        let frame = FrameRef {
            kind,
            id,
            start,
            text,
            meta,
            ends,
            data,
            extra,
        };
        if let Err(e) = write_frame(&mut self.writer, &frame) {
            panic!("parallax: lost the data socket while sending: {e}");
        }
    }

    fn receive(&mut self) -> Frame {
        match read_frame(&mut self.reader, u64::MAX) {
            Ok(frame) if frame.kind == kind::ERROR => panic!("parallax: {}", frame.text),
            Ok(frame) => frame,
            Err(e) => panic!("parallax: lost the data socket while receiving: {e}"),
        }
    }

    fn put<T>(&mut self, id: u64, encoded: &Encoded<T>) {
        self.send(
            kind::PUT,
            id,
            0,
            "",
            &encoded.meta,
            &encoded.ends,
            &encoded.data,
            &[],
        );
        // The host answers once it holds the data, so that the cell ends after the transfer.
        self.receive();
    }

    fn get(&mut self, id: u64) -> Frame {
        self.send(kind::GET, id, 0, "", &Meta::default(), &[], &[], &[]);
        self.receive()
    }
}

/// Names a type without a value: what a generated cell leaves behind so that the host can ask
/// evcxr, which knows how to spell types in a cell, for the type of what was sent.
pub struct Sent<T>(PhantomData<fn() -> T>);

impl<T> Sent<T> {
    fn new() -> Self {
        Sent(PhantomData)
    }
}

/// The input of a transfer or a map: any expression that yields items, borrowed.
pub struct Input<'a, X: ?Sized>(pub &'a X);

/// For inputs that can be iterated by reference (`Vec`, slices, arrays, sets): nothing is
/// copied or moved. Chosen first by method resolution: `(&&Input(&x)).parallax_items()`.
pub trait ViaRef {
    type Item;
    fn parallax_items(&self) -> Encoded<Self::Item>;
}

impl<'a, X: ?Sized, T: Serialize + 'static> ViaRef for &Input<'a, X>
where
    &'a X: IntoIterator<Item = &'a T>,
{
    type Item = T;
    fn parallax_items(&self) -> Encoded<T> {
        let mut encoded = Encoded::new();
        let items = self.0.into_iter();
        encoded.reserve(items.size_hint().0);
        for item in items {
            encoded.push_or_panic(item);
        }
        encoded
    }
}

/// For inputs that yield items by value (ranges, iterator chains): they are cloned, so that the
/// notebook's own variables are never moved away.
pub trait ViaClone {
    type Item;
    fn parallax_items(&self) -> Encoded<Self::Item>;
}

impl<X: Clone + IntoIterator> ViaClone for Input<'_, X>
where
    X::Item: Serialize + 'static,
{
    type Item = X::Item;
    fn parallax_items(&self) -> Encoded<X::Item> {
        let mut encoded = Encoded::new();
        let items = self.0.clone().into_iter();
        encoded.reserve(items.size_hint().0);
        for item in items {
            encoded.push_or_panic(&item);
        }
        encoded
    }
}

/// Sends items to the host as transfer `id`.
pub fn send_items<T>(path: &str, token: &str, id: u64, items: Encoded<T>) -> Sent<T> {
    Link::connect(path, token).put(id, &items);
    Sent::new()
}

/// Sends one value to the host as transfer `id`; the value stays where it is.
pub fn send_value<T: Serialize + 'static>(path: &str, token: &str, id: u64, value: &T) -> Sent<T> {
    let mut encoded = Encoded::new();
    encoded.push_or_panic(value);
    Link::connect(path, token).put(id, &encoded);
    Sent::new()
}

/// Fetches transfer `id` from the host as a vector of `T`.
pub fn receive_items<T: DeserializeOwned + 'static>(path: &str, token: &str, id: u64) -> Vec<T> {
    let frame = Link::connect(path, token).get(id);
    decode_items(&frame.meta, &frame.ends, &frame.data)
        .unwrap_or_else(|e| panic!("parallax: cannot store the data: {e}"))
}

/// Fetches transfer `id` from the host as one value of type `T`.
pub fn receive_value<T: DeserializeOwned + 'static>(path: &str, token: &str, id: u64) -> T {
    let mut items = receive_items::<T>(path, token, id);
    match (items.pop(), items.is_empty()) {
        (Some(value), true) => value,
        _ => panic!("parallax: expected exactly one value"),
    }
}

/// The message of a panic, whatever its payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "Box<dyn Any>".to_owned())
}

/// While alive, panics on this thread are recorded instead of reported: `serve_map` reports
/// each item's panic itself, with the item's index.
type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync>;

struct QuietPanics {
    previous: std::sync::Arc<PanicHook>,
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

impl QuietPanics {
    fn install() -> QuietPanics {
        let previous = std::sync::Arc::new(std::panic::take_hook());
        let serving = std::thread::current().id();
        let fallback = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == serving {
                let message = panic_message(info.payload());
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(message));
            } else {
                fallback(info);
            }
        }));
        QuietPanics { previous }
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        let previous = self.previous.clone();
        std::panic::set_hook(Box::new(move |info| previous(info)));
    }
}

/// Applies `f` to the chunks of map task `task` that the host sends, until it says the map is
/// over. A panic on one item is reported with the item's index; the other items go on.
pub fn serve_map<T, R, F>(path: &str, token: &str, task: u64, mut f: F) -> Sent<R>
where
    T: DeserializeOwned + 'static,
    R: Serialize + 'static,
    F: FnMut(T) -> R,
{
    let mut link = Link::connect(path, token);
    let result_meta = Meta {
        type_name: type_name::<R>().to_owned(),
        ..Meta::default()
    };
    link.send(
        kind::MAP_JOIN,
        task,
        0,
        type_name::<T>(),
        &result_meta,
        &[],
        &[],
        &[],
    );
    let _quiet = QuietPanics::install();
    loop {
        let chunk = link.receive();
        if chunk.kind != kind::CHUNK {
            break;
        }
        let started = Instant::now();
        let items: Vec<T> = match decode_items(&chunk.meta, &chunk.ends, &chunk.data) {
            Ok(items) => items,
            Err(e) => {
                link.send(
                    kind::ERROR,
                    chunk.id,
                    0,
                    &e,
                    &Meta::default(),
                    &[],
                    &[],
                    &[],
                );
                continue;
            }
        };
        let mut results = Encoded::<R>::new();
        results.reserve(items.len());
        let mut failures: Vec<(u64, String)> = Vec::new();
        for (offset, item) in items.into_iter().enumerate() {
            let index = chunk.start + offset as u64;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(item)));
            let failure = match outcome {
                Ok(result) => results.push(&result).err(),
                Err(payload) => Some(
                    LAST_PANIC
                        .with(|last| last.borrow_mut().take())
                        .unwrap_or_else(|| panic_message(payload.as_ref())),
                ),
            };
            if let Some(message) = failure {
                failures.push((index, message));
            }
        }
        let elapsed = started.elapsed().as_nanos() as u64;
        let extra = if failures.is_empty() {
            Vec::new()
        } else {
            postcard::to_allocvec(&failures).unwrap_or_default()
        };
        link.send(
            kind::CHUNK_DONE,
            chunk.id,
            elapsed,
            "",
            &results.meta,
            &results.ends,
            &results.data,
            &extra,
        );
    }
    Sent::new()
}

#[cfg(test)]
// `(&&Input(&x))` is how generated cells pick the by-reference or by-clone encoding.
#[allow(clippy::needless_borrow)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + 'static + PartialEq + std::fmt::Debug>(
        values: Vec<T>,
    ) {
        let encoded = (&&Input(&values)).parallax_items();
        assert_eq!(encoded.meta.count, values.len() as u64);
        let decoded: Vec<T> = decode_items(&encoded.meta, &encoded.ends, &encoded.data).unwrap();
        assert_eq!(decoded, values);
    }

    #[test]
    fn numbers_strings_vectors_and_tuples_round_trip() {
        round_trip::<u64>(vec![0, 1, u64::MAX]);
        round_trip::<f64>(vec![1.5, -0.0, f64::INFINITY]);
        round_trip::<i8>(vec![-128, 127]);
        round_trip::<String>(vec!["".into(), "héllo".into()]);
        round_trip::<Vec<u32>>(vec![vec![], vec![1, 2, 3]]);
        round_trip::<(u8, String, Option<i64>)>(vec![
            (1, "a".into(), None),
            (2, "b".into(), Some(-3)),
        ]);
        round_trip::<u64>(vec![]);
    }

    #[test]
    fn numbers_are_raw_bytes_and_vectors_of_numbers_too() {
        let encoded = (&&Input(&vec![1u32, 2])).parallax_items();
        assert_eq!(encoded.meta.width, 4);
        assert_eq!(encoded.data, vec![1, 0, 0, 0, 2, 0, 0, 0]);
        assert!(encoded.ends.is_empty());
        let encoded = (&&Input(&vec![vec![7u16]])).parallax_items();
        assert_eq!((encoded.meta.width, encoded.meta.elem_width), (0, 2));
        assert_eq!(encoded.data, vec![7, 0]);
    }

    #[test]
    fn ranges_are_cloned_and_literals_follow_the_expected_type() {
        let range = 0..5;
        let encoded: Encoded<u64> = (&&Input(&range)).parallax_items();
        assert_eq!(encoded.meta.type_name, "u64");
        assert_eq!(range.end, 5, "the range was not consumed");
    }

    #[test]
    fn a_type_mismatch_is_an_error_not_garbage() {
        let encoded = (&&Input(&vec![1i32, 2])).parallax_items();
        let err = decode_items::<u64>(&encoded.meta, &encoded.ends, &encoded.data).unwrap_err();
        assert!(err.contains("`i32`, not `u64`"), "{err}");
    }

    #[test]
    fn frames_round_trip_and_slices_follow_item_ends() {
        let encoded = (&&Input(&vec!["ab".to_string(), "c".into(), "def".into()])).parallax_items();
        let mut wire = Vec::new();
        let frame = FrameRef {
            kind: kind::PUT,
            id: 7,
            start: 3,
            text: "t",
            meta: &encoded.meta,
            ends: &encoded.ends,
            data: &encoded.data,
            extra: b"x",
        };
        write_frame(&mut wire, &frame).unwrap();
        let back = read_frame(&mut wire.as_slice(), 1 << 20).unwrap();
        assert_eq!(
            (back.kind, back.id, back.start, back.text.as_str()),
            (kind::PUT, 7, 3, "t")
        );
        assert_eq!(back.meta, encoded.meta);
        assert_eq!(back.extra, b"x");
        validate(&back.meta, &back.ends, back.data.len() as u64).unwrap();
        let (from, to) = byte_range(&back.meta, &back.ends, 1, 3);
        assert_eq!(&back.data[from..to], &encoded.data[3..]);
        assert!(
            read_frame(&mut wire.as_slice(), 4).is_err(),
            "the limit holds"
        );
    }

    #[test]
    fn inconsistent_layouts_are_refused() {
        let meta = Meta {
            type_name: "u64".into(),
            count: 2,
            width: 8,
            elem_width: 0,
        };
        assert!(validate(&meta, &[], 16).is_ok());
        assert!(validate(&meta, &[], 15).is_err());
        let meta = Meta {
            type_name: "x".into(),
            count: 2,
            width: 0,
            elem_width: 0,
        };
        assert!(validate(&meta, &[3, 2], 3).is_err());
        assert!(validate(&meta, &[1, 3], 4).is_err());
        assert!(validate(&meta, &[1, 3], 3).is_ok());
    }
}
