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
use std::borrow::Cow;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// A Unix socket's address holds at most 107 bytes of path, and a socket in a deep temporary
/// directory (a long `TMPDIR`) lies further; such a socket is bound and reached through the
/// `/proc/self/fd` link of its open directory, whose path is short whatever the directory's.
pub mod socket_path {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};

    /// The longest path bound or reached as it is.
    const DIRECT_LIMIT: usize = 100;

    /// A path to use for a socket, and the directory it goes through (kept open while used).
    pub struct Usable {
        pub path: PathBuf,
        _directory: Option<File>,
    }

    /// `socket` itself if it is short enough, else its name under its open directory's link.
    pub fn usable(socket: &Path) -> io::Result<Usable> {
        if socket.as_os_str().len() <= DIRECT_LIMIT {
            return Ok(Usable {
                path: socket.to_owned(),
                _directory: None,
            });
        }
        let (Some(directory), Some(name)) = (socket.parent(), socket.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a socket path",
            ));
        };
        let directory = File::open(directory)?;
        let path = Path::new(&format!("/proc/self/fd/{}", directory.as_raw_fd())).join(name);
        Ok(Usable {
            path,
            _directory: Some(directory),
        })
    }

    /// Connects to the socket at `socket`, however long its path.
    pub fn connect(socket: &Path) -> io::Result<UnixStream> {
        UnixStream::connect(usable(socket)?.path)
    }
}

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
    /// cell -> host: transfer `id` has `start` bytes; where may they go? The host answers
    /// `SHARED` with one region of shared memory, or `ERROR` if it has none (then `PUT`).
    pub const RESERVE: u8 = 10;
    /// host -> cell: the bytes are (or go) in the regions of shared memory that `extra` lists
    /// (see `encode_regions`), one after another; `meta` and `ends` describe them.
    pub const SHARED: u8 = 11;
    /// cell -> host: transfer `id` is written in the region reserved for it; `start` bytes.
    pub const PUT_SHARED: u8 = 12;
    /// host -> cell: items `start..` of a map's input, as chunk `id`, in the regions of shared
    /// memory that `extra` lists, as for `SHARED`.
    pub const CHUNK_SHARED: u8 = 13;
}

/// Values at least this big go through shared memory when the host offers it; smaller ones
/// are cheaper to send on the socket than a file is to make.
pub const SHARED_FROM: u64 = 1 << 16;

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

fn cast<A: 'static, B: 'static>(value: A) -> B {
    match (Box::new(value) as Box<dyn Any>).downcast::<B>() {
        Ok(b) => *b,
        Err(_) => unreachable!("cast between types already found equal"),
    }
}

/// Values of type `T`, encoded. Numbers are their own encoding, so their bytes are borrowed
/// where they are, not copied.
pub struct Encoded<'a, T> {
    pub meta: Meta,
    pub ends: Vec<u64>,
    pub data: Cow<'a, [u8]>,
    item: PhantomData<fn() -> T>,
}

impl<'a, T: Serialize + 'static> Encoded<'a, T> {
    /// Numbers as items, their bytes borrowed; `None` if `T` is not a number type.
    pub fn of_numbers(values: &'a [T]) -> Option<Self> {
        number_width::<T>()?;
        let mut encoded = Encoded::new();
        encoded.data = Cow::Borrowed(number_bytes(values));
        encoded.meta.count = values.len() as u64;
        Some(encoded)
    }

    /// One vector of numbers as the only item, its bytes borrowed; `None` if `T` is not one.
    pub fn of_number_vec(value: &'a T) -> Option<Self> {
        let mut bytes: Option<&'a [u8]> = None;
        with_number_vec!(T, |P| {
            if let Some(numbers) = (value as &dyn Any).downcast_ref::<Vec<P>>() {
                bytes = Some(number_bytes(numbers));
            }
        });
        let bytes = bytes?;
        let mut encoded = Encoded::new();
        encoded.data = Cow::Borrowed(bytes);
        encoded.ends.push(bytes.len() as u64);
        encoded.meta.count = 1;
        Some(encoded)
    }

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
            data: Cow::Owned(Vec::new()),
            item: PhantomData,
        }
    }

    pub fn reserve(&mut self, items: usize) {
        if self.meta.width > 0 {
            self.data.to_mut().reserve(items * self.meta.width as usize);
        } else {
            self.ends.reserve(items);
        }
    }

    pub fn push(&mut self, item: &T) -> Result<(), String> {
        let data = self.data.to_mut();
        if self.meta.width > 0 {
            data.extend_from_slice(number_bytes(std::slice::from_ref(item)));
        } else {
            let mut done = false;
            with_number_vec!(T, |P| {
                if let Some(numbers) = (item as &dyn Any).downcast_ref::<Vec<P>>() {
                    data.extend_from_slice(number_bytes(numbers));
                    done = true;
                }
            });
            if !done {
                let taken = std::mem::take(data);
                *data = postcard::to_extend(item, taken).map_err(|e| {
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

impl<T: Serialize + 'static> Default for Encoded<'_, T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Where encoded bytes are to be read from: this process's memory, or regions of shared
/// memory read straight into the values they become.
pub enum Source<'a> {
    Memory(&'a [u8]),
    Owned(Vec<u8>),
    Shared(Vec<OpenRegion>),
}

/// A region of a file of shared memory, opened.
pub struct OpenRegion {
    file: std::fs::File,
    offset: u64,
    len: u64,
}

impl Source<'_> {
    /// The regions `list` names, opened for reading.
    pub fn shared(list: &[SharedRegion]) -> io::Result<Source<'static>> {
        let mut open = Vec::with_capacity(list.len());
        for region in list {
            let file = std::fs::File::open(&region.path).map_err(|e| {
                io::Error::new(e.kind(), format!("shared memory {}: {e}", region.path))
            })?;
            open.push(OpenRegion {
                file,
                offset: region.offset,
                len: region.len,
            });
        }
        Ok(Source::Shared(open))
    }

    /// The bytes, when they are in this process's memory.
    fn in_process(&self) -> Option<&[u8]> {
        match self {
            Source::Memory(bytes) => Some(bytes),
            Source::Owned(bytes) => Some(bytes),
            Source::Shared(_) => None,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Source::Shared(regions) => regions.iter().map(|r| r.len).sum(),
            _ => self.in_process().map_or(0, |bytes| bytes.len() as u64),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `into` with the bytes from `at` on (within `len()`).
    pub fn read(&self, mut at: u64, mut into: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            Source::Memory(_) | Source::Owned(_) => {
                let bytes = self.in_process().unwrap_or_default();
                let from = at as usize;
                into.copy_from_slice(&bytes[from..from + into.len()]);
            }
            Source::Shared(regions) => {
                for region in regions {
                    if into.is_empty() {
                        break;
                    }
                    if at >= region.len {
                        at -= region.len;
                        continue;
                    }
                    let take = ((region.len - at) as usize).min(into.len());
                    let (here, rest) = into.split_at_mut(take);
                    region.file.read_exact_at(here, region.offset + at)?;
                    into = rest;
                    at = 0;
                }
                if !into.is_empty() {
                    return Err(invalid("shared memory ends early".into()));
                }
            }
        }
        Ok(())
    }

    /// All the bytes in memory: borrowed if they are, read if they are in shared memory.
    fn in_memory(&self) -> io::Result<Cow<'_, [u8]>> {
        match self.in_process() {
            Some(bytes) => Ok(Cow::Borrowed(bytes)),
            None => {
                let mut all = vec![0u8; self.len() as usize];
                self.read(0, &mut all)?;
                Ok(Cow::Owned(all))
            }
        }
    }
}

/// `count` zero numbers, allocated zeroed (for big vectors, pages the system zeroes lazily).
fn zeroed_numbers<P: 'static>(count: usize) -> Vec<P> {
    debug_assert!(number_width::<P>().is_some());
    let Ok(layout) = std::alloc::Layout::array::<P>(count) else {
        panic!("parallax: {count} numbers do not fit in memory");
    };
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: the layout is P's array layout and non-empty; zero bytes are a valid number of
    // every type `number_width` admits; the Vec takes the allocation with that same layout.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut P;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        populate(ptr as *mut u8, layout.size());
        Vec::from_raw_parts(ptr, count, count)
    }
}

/// Has the system back a big fresh allocation with memory in one call, instead of one page
/// fault per page as it is first written: on a virtual machine the faults cost more than the
/// copy that follows. Only a hint; nothing changes where it is not supported.
fn populate(start: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        const MADV_POPULATE_WRITE: i32 = 23;
        extern "C" {
            fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32;
        }
        if len < (1 << 20) {
            return;
        }
        let first = (start as usize).div_ceil(PAGE) * PAGE;
        let end = (start as usize + len) / PAGE * PAGE;
        // SAFETY: the range lies within an allocation this process just made and owns;
        // MADV_POPULATE_WRITE only faults its pages in (they stay zero).
        unsafe {
            madvise(first as *mut u8, end - first, MADV_POPULATE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// Numbers read from `len` bytes of `source` at `at`: one copy, into their vector.
fn numbers_read<P: 'static>(source: &Source<'_>, at: u64, len: u64) -> io::Result<Vec<P>> {
    let size = std::mem::size_of::<P>() as u64;
    let mut values = zeroed_numbers::<P>((len / size) as usize);
    // SAFETY: the numbers are initialised (zero) and any bytes written make valid numbers.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr() as *mut u8,
            std::mem::size_of_val(values.as_slice()),
        )
    };
    source.read(at, bytes)?;
    Ok(values)
}

/// Decodes what `meta`, `ends` and `data` hold as values of type `T`.
pub fn decode_items<T: DeserializeOwned + 'static>(
    meta: &Meta,
    ends: &[u64],
    data: &[u8],
) -> Result<Vec<T>, String> {
    decode_from::<T>(meta, ends, &Source::Memory(data))
}

/// Decodes what `meta` and `ends` describe in `source` as values of type `T`. Numbers and
/// vectors of numbers are read straight into their vectors.
pub fn decode_from<T: DeserializeOwned + 'static>(
    meta: &Meta,
    ends: &[u64],
    source: &Source<'_>,
) -> Result<Vec<T>, String> {
    if meta.type_name != type_name::<T>() {
        return Err(format!(
            "the values are of type `{}`, not `{}`",
            meta.type_name,
            type_name::<T>()
        ));
    }
    validate(meta, ends, source.len())?;
    let unreadable = |e: io::Error| format!("cannot read the values: {e}");
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
                    let values = numbers_read::<$t>(source, 0, source.len()).map_err(unreadable)?;
                    out = Some(cast::<Vec<$t>, Vec<T>>(values));
                }
            )*};
        }
        numbers!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, usize, isize, f32, f64);
        return out.ok_or_else(|| format!("`{}` is not a number type", meta.type_name));
    }
    let mut items = Vec::with_capacity(meta.count as usize);
    if meta.elem_width > 0 {
        let mut begin = 0u64;
        for (index, &end) in ends.iter().enumerate() {
            let len = end - begin;
            let mut item = None;
            with_number_vec!(T, |P| {
                let size = std::mem::size_of::<P>() as u64;
                if size as u32 == meta.elem_width && len.is_multiple_of(size) {
                    let values = numbers_read::<P>(source, begin, len).map_err(unreadable)?;
                    item = Some(cast::<Vec<P>, T>(values));
                }
            });
            begin = end;
            match item {
                Some(item) => items.push(item),
                None => {
                    return Err(format!(
                        "item {index} is not a vector of `{}`",
                        meta.type_name
                    ))
                }
            }
        }
        return Ok(items);
    }
    let data = source.in_memory().map_err(unreadable)?;
    let mut begin = 0usize;
    for (index, &end) in ends.iter().enumerate() {
        let bytes = &data[begin..end as usize];
        begin = end as usize;
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

/// A region of a file of shared memory, as the host names it to a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRegion {
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

/// Regions as a `SHARED` frame's `extra` lists them: per region, its offset, its length, the
/// length of its path and the path.
pub fn encode_regions(regions: &[SharedRegion]) -> Vec<u8> {
    let mut out = Vec::new();
    for region in regions {
        out.extend_from_slice(&region.offset.to_le_bytes());
        out.extend_from_slice(&region.len.to_le_bytes());
        out.extend_from_slice(&(region.path.len() as u32).to_le_bytes());
        out.extend_from_slice(region.path.as_bytes());
    }
    out
}

pub fn decode_regions(mut bytes: &[u8]) -> Result<Vec<SharedRegion>, String> {
    let mut regions = Vec::new();
    let take = |n: usize, bytes: &mut &[u8]| -> Result<Vec<u8>, String> {
        if bytes.len() < n {
            return Err("a truncated list of shared memory regions".into());
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head.to_vec())
    };
    while !bytes.is_empty() {
        let number = |b: Vec<u8>| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        let offset = number(take(8, &mut bytes)?);
        let len = number(take(8, &mut bytes)?);
        let path_len = u32::from_le_bytes(take(4, &mut bytes)?.try_into().unwrap_or([0; 4]));
        let path = String::from_utf8(take(path_len as usize, &mut bytes)?)
            .map_err(|_| "a shared memory path that is not UTF-8".to_string())?;
        regions.push(SharedRegion { path, offset, len });
    }
    Ok(regions)
}

/// Writes `data` into the regions, one after another.
fn write_regions(regions: &[SharedRegion], mut data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    for region in regions {
        let file = std::fs::OpenOptions::new().write(true).open(&region.path)?;
        let take = (region.len as usize).min(data.len());
        let (here, rest) = data.split_at(take);
        file.write_all_at(here, region.offset)?;
        data = rest;
    }
    if data.is_empty() {
        Ok(())
    } else {
        Err(invalid("the shared memory reserved is too small".into()))
    }
}

/// The id a generated cell gives: the transfer or map its host is running now. Cells that
/// name no id of their own are the same from one transfer to the next.
pub const CURRENT: u64 = u64::MAX;

/// Where an evaluation process finds its host's data socket, and its token.
pub const SOCKET_VAR: &str = "PARALLAX_DATA_SOCKET";
pub const TOKEN_VAR: &str = "PARALLAX_DATA_TOKEN";

/// The connection of a cell to its host.
pub struct Link {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
}

impl Link {
    pub fn connect(path: &str, token: &str) -> Link {
        // Generated cells name no socket, so that they are the same wherever and whenever they
        // run (compiled once per host, and found in the compiled-cell cache): each finds its
        // host's in its evaluation process's environment.
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
        let stream = socket_path::connect(std::path::Path::new(path))
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

    /// The next frame, an `ERROR` included.
    fn receive_any(&mut self) -> Frame {
        read_frame(&mut self.reader, u64::MAX)
            .unwrap_or_else(|e| panic!("parallax: lost the data socket while receiving: {e}"))
    }

    fn receive(&mut self) -> Frame {
        let frame = self.receive_any();
        if frame.kind == kind::ERROR {
            panic!("parallax: {}", frame.text);
        }
        frame
    }

    /// Hands `encoded` to the host: big values into shared memory the host reserves (written
    /// once, from where they are), others on the socket.
    fn put<T>(&mut self, id: u64, encoded: &Encoded<'_, T>) {
        let data: &[u8] = &encoded.data;
        let len = data.len() as u64;
        if len >= SHARED_FROM {
            self.send(kind::RESERVE, id, len, "", &Meta::default(), &[], &[], &[]);
            let answer = self.receive_any();
            // An `ERROR` says the host has no shared memory: the socket it is.
            if answer.kind == kind::SHARED {
                let regions =
                    decode_regions(&answer.extra).unwrap_or_else(|e| panic!("parallax: {e}"));
                // Too little shared memory (a container's small /dev/shm fills up): the
                // socket it is; the host removes the file it reserved with the transfer.
                if write_regions(&regions, data).is_ok() {
                    self.send(
                        kind::PUT_SHARED,
                        id,
                        len,
                        "",
                        &encoded.meta,
                        &encoded.ends,
                        &[],
                        &[],
                    );
                    self.receive();
                    return;
                }
            }
        }
        self.send(
            kind::PUT,
            id,
            0,
            "",
            &encoded.meta,
            &encoded.ends,
            data,
            &[],
        );
        // The host answers once it holds the data, so that the cell ends after the transfer.
        self.receive();
    }

    /// Fetches transfer `id`: its layout, and where its bytes are.
    fn get(&mut self, id: u64) -> (Frame, Source<'static>) {
        self.send(kind::GET, id, 0, "", &Meta::default(), &[], &[], &[]);
        let mut frame = self.receive();
        if frame.kind == kind::SHARED {
            let source = decode_regions(&frame.extra)
                .and_then(|regions| Source::shared(&regions).map_err(|e| e.to_string()))
                .unwrap_or_else(|e| panic!("parallax: {e}"));
            return (frame, source);
        }
        let data = std::mem::take(&mut frame.data);
        (frame, Source::Owned(data))
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

/// Items chosen by the shape of their input, not yet encoded. The choice asks nothing of the
/// item type, `Serialize` is asked only when they are encoded: evcxr names a cell's variable
/// types with rust-analyzer, which does not see derived impls, so a choice that asked for
/// `Serialize` would leave the type of what a cell sends unnamed.
pub trait Items<'a> {
    type Item;
    fn encode(self) -> Encoded<'a, Self::Item>
    where
        Self::Item: Serialize + 'static;
}

/// The items of a slice: numbers are sent from where they are, in one piece.
pub struct SliceItems<'a, T>(&'a [T]);

impl<'a, T> Items<'a> for SliceItems<'a, T> {
    type Item = T;
    fn encode(self) -> Encoded<'a, T>
    where
        T: Serialize + 'static,
    {
        let items = self.0;
        Encoded::of_numbers(items).unwrap_or_else(|| {
            let mut encoded = Encoded::new();
            encoded.reserve(items.len());
            for item in items {
                encoded.push_or_panic(item);
            }
            encoded
        })
    }
}

/// The items of something iterable by reference, read where they are.
pub struct RefItems<'a, X: ?Sized, T>(&'a X, PhantomData<fn() -> T>);

impl<'a, X: ?Sized, T: 'a> Items<'a> for RefItems<'a, X, T>
where
    &'a X: IntoIterator<Item = &'a T>,
{
    type Item = T;
    fn encode(self) -> Encoded<'a, T>
    where
        T: Serialize + 'static,
    {
        let mut encoded = Encoded::new();
        let items = self.0.into_iter();
        encoded.reserve(items.size_hint().0);
        for item in items {
            encoded.push_or_panic(item);
        }
        encoded
    }
}

/// The items a clone of the input yields, so that the notebook's own variables are never
/// moved away.
pub struct ClonedItems<'a, X>(&'a X);

impl<'a, X: Clone + IntoIterator> Items<'a> for ClonedItems<'a, X> {
    type Item = X::Item;
    fn encode(self) -> Encoded<'a, X::Item>
    where
        X::Item: Serialize + 'static,
    {
        let mut encoded = Encoded::new();
        let items = self.0.clone().into_iter();
        encoded.reserve(items.size_hint().0);
        for item in items {
            encoded.push_or_panic(&item);
        }
        encoded
    }
}

/// For inputs that are slices of items (`Vec`, slices, arrays). Chosen first by method
/// resolution: `(&&&Input(&x)).parallax_items()`.
pub trait ViaSlice<'a, T> {
    fn parallax_items(&self) -> SliceItems<'a, T>;
}

impl<'a, X: ?Sized + AsRef<[T]>, T> ViaSlice<'a, T> for &&Input<'a, X> {
    fn parallax_items(&self) -> SliceItems<'a, T> {
        SliceItems(self.0.as_ref())
    }
}

/// For inputs that can be iterated by reference (sets, maps' keys): nothing is copied or
/// moved. Chosen next.
pub trait ViaRef {
    type Items;
    fn parallax_items(&self) -> Self::Items;
}

impl<'a, X: ?Sized, T: 'a> ViaRef for &Input<'a, X>
where
    &'a X: IntoIterator<Item = &'a T>,
{
    type Items = RefItems<'a, X, T>;
    fn parallax_items(&self) -> RefItems<'a, X, T> {
        RefItems(self.0, PhantomData)
    }
}

/// For inputs that yield items by value (ranges, iterator chains): they are cloned.
pub trait ViaClone {
    type Items;
    fn parallax_items(&self) -> Self::Items;
}

impl<'a, X: Clone + IntoIterator> ViaClone for Input<'a, X> {
    type Items = ClonedItems<'a, X>;
    fn parallax_items(&self) -> ClonedItems<'a, X> {
        ClonedItems(self.0)
    }
}

/// Sends items to the host as transfer `id`.
pub fn send_items<'a, T, S>(path: &str, token: &str, id: u64, items: S) -> Sent<T>
where
    S: Items<'a, Item = T>,
    T: Serialize + 'static,
{
    Link::connect(path, token).put(id, &items.encode());
    Sent::new()
}

/// Sends one value to the host as transfer `id`; the value stays where it is.
pub fn send_value<T: Serialize + 'static>(path: &str, token: &str, id: u64, value: &T) -> Sent<T> {
    let encoded = Encoded::of_number_vec(value).unwrap_or_else(|| {
        let mut encoded = Encoded::new();
        encoded.push_or_panic(value);
        encoded
    });
    Link::connect(path, token).put(id, &encoded);
    Sent::new()
}

/// Fetches transfer `id` from the host as a vector of `T`.
pub fn receive_items<T: DeserializeOwned + 'static>(path: &str, token: &str, id: u64) -> Vec<T> {
    let (frame, source) = Link::connect(path, token).get(id);
    decode_from(&frame.meta, &frame.ends, &source)
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
        let source = match chunk.kind {
            kind::CHUNK => Ok(Source::Memory(&chunk.data)),
            // Items the notebook wrote into shared memory on this host: read in place.
            kind::CHUNK_SHARED => decode_regions(&chunk.extra)
                .and_then(|regions| Source::shared(&regions).map_err(|e| e.to_string())),
            _ => break,
        };
        let started = Instant::now();
        let decoded = source.and_then(|source| decode_from::<T>(&chunk.meta, &chunk.ends, &source));
        let items: Vec<T> = match decoded {
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
// `(&&&Input(&x))` is how generated cells pick the by-slice, by-reference or by-clone encoding.
#[allow(clippy::needless_borrow)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + 'static + PartialEq + std::fmt::Debug>(
        values: Vec<T>,
    ) {
        let encoded = (&&&Input(&values)).parallax_items().encode();
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
        let values = vec![1u32, 2];
        let encoded = (&&&Input(&values)).parallax_items().encode();
        assert_eq!(encoded.meta.width, 4);
        assert_eq!(encoded.data, vec![1, 0, 0, 0, 2, 0, 0, 0]);
        assert!(encoded.ends.is_empty());
        let nested = vec![vec![7u16]];
        let encoded = (&&&Input(&nested)).parallax_items().encode();
        assert_eq!((encoded.meta.width, encoded.meta.elem_width), (0, 2));
        assert_eq!(encoded.data, vec![7, 0]);
    }

    #[test]
    fn ranges_are_cloned_and_literals_follow_the_expected_type() {
        let range = 0..5;
        let encoded: Encoded<u64> = (&&&Input(&range)).parallax_items().encode();
        assert_eq!(encoded.meta.type_name, "u64");
        assert_eq!(range.end, 5, "the range was not consumed");
    }

    #[test]
    fn slices_of_numbers_are_borrowed_and_other_inputs_still_encode() {
        let values = vec![0.5f64, 1.5];
        let encoded = (&&&Input(&values)).parallax_items().encode();
        assert!(matches!(encoded.data, Cow::Borrowed(_)));
        assert_eq!(encoded.data.len(), 16);
        let array = [1u8, 2, 3];
        let encoded: Encoded<u8> = (&&&Input(&array)).parallax_items().encode();
        assert!(matches!(encoded.data, Cow::Borrowed(_)));
        let set: std::collections::BTreeSet<u16> = [3, 1].into_iter().collect();
        let encoded: Encoded<u16> = (&&&Input(&set)).parallax_items().encode();
        assert_eq!(&*encoded.data, &[1, 0, 3, 0]);
        let words = vec!["a".to_string()];
        let encoded: Encoded<String> = (&&&Input(&words)).parallax_items().encode();
        assert_eq!(encoded.ends, vec![2]);
        let single = Encoded::of_number_vec(&values).unwrap();
        assert_eq!((single.meta.count, single.ends.clone()), (1, vec![16]));
        assert!(Encoded::of_number_vec(&words).is_none());
    }

    #[test]
    fn values_are_read_from_regions_of_shared_memory_in_order() {
        let dir = std::env::temp_dir().join(format!("parallax-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<u32> = (0..1000).collect();
        let bytes = number_bytes(&values);
        let regions = vec![
            SharedRegion {
                path: dir.join("a").to_string_lossy().into(),
                offset: 8,
                len: 1000,
            },
            SharedRegion {
                path: dir.join("b").to_string_lossy().into(),
                offset: 0,
                len: 3000,
            },
        ];
        std::fs::write(&regions[0].path, vec![9u8; 1008]).unwrap();
        std::fs::write(&regions[1].path, vec![9u8; 3000]).unwrap();
        write_regions(&regions, bytes).unwrap();
        assert_eq!(decode_regions(&encode_regions(&regions)).unwrap(), regions);
        let source = Source::shared(&regions).unwrap();
        let meta = Meta {
            type_name: "u32".into(),
            count: 1000,
            width: 4,
            elem_width: 0,
        };
        assert_eq!(decode_from::<u32>(&meta, &[], &source).unwrap(), values);
        assert!(decode_regions(&encode_regions(&regions)[..20]).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_type_mismatch_is_an_error_not_garbage() {
        let values = vec![1i32, 2];
        let encoded = (&&&Input(&values)).parallax_items().encode();
        let err = decode_items::<u64>(&encoded.meta, &encoded.ends, &encoded.data).unwrap_err();
        assert!(err.contains("`i32`, not `u64`"), "{err}");
    }

    #[test]
    fn frames_round_trip_and_slices_follow_item_ends() {
        let words = vec!["ab".to_string(), "c".into(), "def".into()];
        let encoded = (&&&Input(&words)).parallax_items().encode();
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
