//! Values in shared memory on one host. A process that moves values keeps a private directory
//! under `/dev/shm` (0700, named after its pid); each value is a file there (0600) that every
//! process of the user on the host can map, so the bytes are written once and read in place
//! by each engine instead of being copied through every process on the way. A file is removed
//! when the last handle on it goes; a directory whose process died is swept by the next
//! Parallax process that starts on the host.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where shared memory lives: `PARALLAX_SHM_DIR` if set, else `/dev/shm`.
pub fn shm_base() -> PathBuf {
    std::env::var_os("PARALLAX_SHM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

/// The prefix of every directory of shared memory, followed by the owner's pid.
pub const DIR_PREFIX: &str = "parallax-shm-";

/// A region of a file of shared memory, as a message names it: only meaningful on the host
/// whose process sent it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

impl From<Region> for parallax_data::SharedRegion {
    fn from(region: Region) -> Self {
        parallax_data::SharedRegion {
            path: region.path,
            offset: region.offset,
            len: region.len,
        }
    }
}

/// This process's directory of shared memory, removed with what is left in it when dropped.
pub struct SharedDir {
    path: PathBuf,
    next: std::sync::atomic::AtomicU64,
}

impl SharedDir {
    /// Makes a fresh private directory under `base`; `None` (logged) where there is no shared
    /// memory to use, and values then travel through sockets as before.
    pub fn open(base: &Path) -> Option<Arc<SharedDir>> {
        sweep(base);
        let path = base.join(format!("{DIR_PREFIX}{}-{}", std::process::id(), nonce()));
        let made = std::fs::create_dir(&path)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)));
        match made {
            Ok(()) => {
                own_dirs().push(path.clone());
                Some(Arc::new(SharedDir {
                    path,
                    next: Default::default(),
                }))
            }
            Err(e) => {
                tracing::warn!("no shared memory in {}: {e}", base.display());
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh name in this directory, for a file this process or another one will write.
    pub fn fresh_path(&self, what: &str) -> PathBuf {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.path.join(format!("{what}-{n}"))
    }

    /// A new file of `len` bytes (zeros, taking no memory until written), the user's alone.
    pub fn create(&self, what: &str, len: u64) -> std::io::Result<Arc<SegmentFile>> {
        SegmentFile::create(self.fresh_path(what), len)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        own_dirs().retain(|dir| *dir != self.path);
    }
}

/// The directories this process made, for `remove_own_dirs`.
fn own_dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    DIRS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes every directory of shared memory this process made and has not yet removed: a
/// process ends without dropping what its threads and tasks still hold, so it calls this on
/// its way out.
pub fn remove_own_dirs() {
    for dir in own_dirs().drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One file of shared memory. The owner's handle removes it when the last clone goes; a
/// borrowed one (a file another process owns) never does.
#[derive(Debug)]
pub struct SegmentFile {
    path: PathBuf,
    /// Cleared when another handle takes over the file's removal.
    owned: std::sync::atomic::AtomicBool,
}

impl SegmentFile {
    /// Creates the file at `path` (which must not exist) with `len` bytes, 0600.
    pub fn create(path: PathBuf, len: u64) -> std::io::Result<Arc<SegmentFile>> {
        SegmentFile::make(path, len, true)
    }

    /// Creates the file at `path` for the process that named it, which removes it.
    pub fn create_for_another(path: PathBuf, len: u64) -> std::io::Result<Arc<SegmentFile>> {
        SegmentFile::make(path, len, false)
    }

    fn make(path: PathBuf, len: u64, owned: bool) -> std::io::Result<Arc<SegmentFile>> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let segment = Arc::new(SegmentFile {
            path,
            owned: owned.into(),
        });
        file.set_len(len)?;
        Ok(segment)
    }

    /// The file at `path`, to be removed when the last handle goes, whether or not another
    /// process has made it yet (an engine writing what this process asked for).
    pub fn expected(path: PathBuf) -> Arc<SegmentFile> {
        Arc::new(SegmentFile {
            path,
            owned: true.into(),
        })
    }

    /// A file another process owns.
    pub fn borrowed(path: PathBuf) -> Arc<SegmentFile> {
        Arc::new(SegmentFile {
            path,
            owned: false.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes `offset..offset + len` of the file, mapped read-only: nothing is read until used,
    /// and the mapping keeps this handle (so the file) alive.
    pub fn map(self: &Arc<Self>, offset: u64, len: u64) -> std::io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let file = File::open(&self.path)?;
        let size = file.metadata()?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} has {size} bytes, not {offset}+{len}",
                    self.path.display()
                ),
            ));
        }
        // The map cannot start mid-page: map from the page boundary and slice.
        let page = page_size();
        let start = offset - offset % page;
        let skip = (offset - start) as usize;
        // SAFETY: the file is the user's own, in a 0700 directory, and written before it is
        // named in a message; nobody truncates it while it is mapped (its owner only removes
        // it, which keeps the mapped pages valid).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(skip + len as usize)
                .map(&file)?
        };
        let mapped = Mapped {
            map,
            _file: self.clone(),
        };
        Ok(Bytes::from_owner(mapped).slice(skip..))
    }
}

impl Drop for SegmentFile {
    fn drop(&mut self) {
        if *self.owned.get_mut() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why a part of a value was not written.
#[derive(Debug, Clone, PartialEq)]
pub enum PartRefused {
    /// Not the part that comes next.
    OutOfPlace(String),
    /// Shared memory is full (a container's small /dev/shm).
    NoRoom(String),
}

impl std::fmt::Display for PartRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartRefused::OutOfPlace(why) | PartRefused::NoRoom(why) => f.write_str(why),
        }
    }
}

/// A value arriving in parts, written in order into a new file of shared memory this process
/// owns: what a host's engines then map, instead of each receiving the bytes.
pub struct Assembly {
    segment: Arc<SegmentFile>,
    file: File,
    total: u64,
    received: u64,
}

impl Assembly {
    /// Room for `total` bytes in `dir`, named after `what`.
    pub fn new(dir: &SharedDir, what: &str, total: u64) -> std::io::Result<Assembly> {
        let segment = dir.create(what, total)?;
        let file = OpenOptions::new().write(true).open(segment.path())?;
        Ok(Assembly {
            segment,
            file,
            total,
            received: 0,
        })
    }

    /// Writes the part that starts at `offset`, which must be the next one; returns the bytes
    /// held so far.
    pub fn write(&mut self, offset: u64, part: &[u8]) -> Result<u64, PartRefused> {
        use std::os::unix::fs::FileExt;
        let end = offset.saturating_add(part.len() as u64);
        if offset != self.received || end > self.total {
            return Err(PartRefused::OutOfPlace(format!(
                "a part at {offset}..{end} of {} bytes, when {} had arrived",
                self.total, self.received
            )));
        }
        self.file.write_all_at(part, offset).map_err(|e| {
            PartRefused::NoRoom(format!(
                "cannot write {}: {e}",
                self.segment.path().display()
            ))
        })?;
        self.received = end;
        Ok(end)
    }

    /// The bytes written so far, read back.
    pub fn written(&self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0; self.received as usize];
        File::open(self.segment.path())?.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    /// The length of the whole value.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The whole value's region, once every part has arrived, for a handle made from it
    /// (`SegmentFile::expected`) that removes the file in this one's place.
    pub fn hand_over(self) -> Result<Region, String> {
        let region = self
            .region()
            .ok_or_else(|| format!("{} of {} bytes arrived", self.received, self.total))?;
        self.segment
            .owned
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(region)
    }

    /// Where the whole value is, once every part has arrived.
    pub fn region(&self) -> Option<Region> {
        (self.received == self.total).then(|| Region {
            path: self.segment.path().to_string_lossy().into_owned(),
            offset: 0,
            len: self.total,
        })
    }
}

struct Mapped {
    map: memmap2::Mmap,
    _file: Arc<SegmentFile>,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// Where a payload's bytes are on this host besides memory: a file and the offset in it.
#[derive(Clone, Debug)]
pub struct Segment {
    pub file: Arc<SegmentFile>,
    pub offset: u64,
}

impl PartialEq for Segment {
    fn eq(&self, other: &Self) -> bool {
        self.file.path == other.file.path && self.offset == other.offset
    }
}

/// Removes the directories of shared memory whose process is gone (killed before it could).
pub fn sweep(base: &Path) {
    sweep_dead(base, &[DIR_PREFIX]);
}

/// Removes the directories under `base` named `PREFIX` + pid (+ anything) whose process is gone:
/// what a killed process of ours left. The first prefix that matches a name decides its pid.
pub fn sweep_dead(base: &Path, prefixes: &[&str]) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|name| {
            prefixes
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
        });
        if let Some(pid) = pid {
            if !is_running(pid) {
                tracing::info!("removing what a dead process left: {name:?}");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Whether process `pid` exists and has not ended (a zombie, or one being reaped, has).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn page_size() -> u64 {
    // Every Linux page size divides 64 KiB, so a map from a 64 KiB boundary is always aligned.
    65536
}

/// Tells apart the directories one pid makes (a pid is reused only after its owner died).
fn nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}
