//! The host's compiled-cell cache: a directory of entries, one per build key, each the
//! library rustc made and what cargo needs beside it. Entries are written whole in a scratch
//! directory and renamed into place, so a reader never sees half of one; a reader checks the
//! library's digest before using it, so a damaged entry is removed and built again, never
//! loaded. The least recently used entries go when the cache outgrows its limit. Several
//! engines and kernels share it: the counters and the eviction take a lock, reads take none
//! (a file removed under a reader stays readable through the handle it opened).

use super::key::{BuildKey, StoreUse};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Overrides where the cache lives (tests give each run its own).
pub const DIR_VAR: &str = "PARALLAX_CELL_CACHE";

/// The size the cache is kept under unless `%cache --limit` set another.
pub const DEFAULT_LIMIT: u64 = 1 << 30;

const LIBRARY: &str = "library";
const DEP_INFO: &str = "dep-info";
const MESSAGES: &str = "messages";
/// The stored variables the library's entry takes, and those it puts back, a line each.
const VARIABLES: &str = "variables";
const PUTS: &str = "puts";
/// What the build read besides the cell's source (rustc's dep-info): files with their
/// digests, and environment variables with their values.
const INPUTS: &str = "inputs";
const DIGEST: &str = "digest";
/// Touched on every use: the entries' recency for eviction.
const USED: &str = "used";
const LOCK: &str = ".lock";
const COUNTERS: &str = "counters";
/// The bytes of the whole entries, kept up to date under the lock, so that a build need not
/// measure every entry to know whether the cache is over its limit.
const TOTAL: &str = "total";
const LIMIT: &str = "limit";
const SCRATCH_PREFIX: &str = ".scratch-";

/// What one build left, as the cache keeps it: paths inside the crate's directory are
/// written relative to a placeholder (see `super::Placeholders`).
pub struct Built {
    pub library: Vec<u8>,
    pub dep_info: String,
    pub messages: String,
}

/// The cache's size and use, for `%cache`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub limit: u64,
    /// Since the cache was made or cleared, by every process of the host.
    pub hits: u64,
    pub builds: u64,
}

pub struct CellCache {
    dir: PathBuf,
}

impl CellCache {
    /// This host's cache: `PARALLAX_CELL_CACHE`, else `parallax/cells` in the user's cache.
    pub fn of_host() -> CellCache {
        let dir = std::env::var_os(DIR_VAR)
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute())
            .unwrap_or_else(|| crate::places::cache_base().join("parallax").join("cells"));
        CellCache { dir }
    }

    pub fn at(dir: PathBuf) -> CellCache {
        CellCache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A whole and undamaged entry whose library runs right for `key`: the one built with the
    /// same stored variables, else one built with fewer (see `BuildKey::can_run_build_with`).
    /// A damaged entry is removed.
    pub fn find(&self, key: &BuildKey) -> Option<Built> {
        let exact = entry_name(key);
        if let Some(built) = self.load(&exact) {
            return Some(built);
        }
        let prefix = format!("{}-", key.base);
        let listing = fs::read_dir(&self.dir).ok()?;
        listing
            .flatten()
            .map(|item| item.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&prefix) && *name != exact)
            .filter(|name| {
                let lines_of = |file| {
                    fs::read_to_string(self.dir.join(name).join(file))
                        .map(|text| text.lines().map(str::to_owned).collect())
                };
                match (lines_of(VARIABLES), lines_of(PUTS)) {
                    (Ok(taken), Ok(put)) => key.can_run_build_with(&StoreUse { taken, put }),
                    _ => false,
                }
            })
            .find_map(|name| self.load(&name))
    }

    /// The entry named `name`, if it is whole and undamaged. A damaged one is removed.
    fn load(&self, name: &str) -> Option<Built> {
        let entry = self.dir.join(name);
        let read = || -> io::Result<(Built, String)> {
            let built = Built {
                library: fs::read(entry.join(LIBRARY))?,
                dep_info: fs::read_to_string(entry.join(DEP_INFO))?,
                messages: fs::read_to_string(entry.join(MESSAGES))?,
            };
            Ok((built, fs::read_to_string(entry.join(DIGEST))?))
        };
        match read() {
            Ok((built, digest))
                if digest.trim() == blake3::hash(&built.library).to_hex().as_str() =>
            {
                if !inputs_unchanged(&entry) {
                    // A file it includes or a variable it read changed: built again.
                    return None;
                }
                let _ = File::options()
                    .write(true)
                    .open(entry.join(USED))
                    .and_then(|used| used.set_modified(SystemTime::now()));
                Some(built)
            }
            Ok(_) => {
                super::note(&format!(
                    "cell cache entry {name} is damaged: removed, the cell builds again"
                ));
                self.remove_locked(&entry);
                None
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !entry.exists() => None,
            Err(e) => {
                super::note(&format!(
                    "cell cache entry {name} is unreadable ({e}): removed"
                ));
                self.remove_locked(&entry);
                None
            }
        }
    }

    /// Keeps a build under `key`, then evicts what the limit asks. A concurrent writer of the
    /// same key wins or loses whole.
    pub fn store(&self, key: &BuildKey, built: &Built) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let scratch = self.dir.join(format!(
            "{SCRATCH_PREFIX}{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        fs::create_dir(&scratch)?;
        let written = (|| -> io::Result<()> {
            fs::write(scratch.join(LIBRARY), &built.library)?;
            fs::write(scratch.join(DEP_INFO), &built.dep_info)?;
            fs::write(scratch.join(MESSAGES), &built.messages)?;
            let lines = |set: &BTreeSet<String>| -> String {
                set.iter().map(|line| format!("{line}\n")).collect()
            };
            fs::write(scratch.join(VARIABLES), lines(&key.store_use.taken))?;
            fs::write(scratch.join(PUTS), lines(&key.store_use.put))?;
            fs::write(scratch.join(INPUTS), inputs_of(&built.dep_info))?;
            fs::write(scratch.join(USED), b"")?;
            // Last: an entry without its digest is never taken for whole.
            fs::write(
                scratch.join(DIGEST),
                blake3::hash(&built.library).to_hex().as_str(),
            )
        })();
        let placed = written.and_then(|()| {
            self.locked(|cache| {
                let bytes = entry_bytes(&scratch);
                fs::rename(&scratch, cache.dir.join(entry_name(key)))?;
                cache.adjust_total(bytes as i64);
                Ok(())
            })
        });
        if placed.is_err() {
            // Another process placed the same entry first, or the disk is full.
            let _ = fs::remove_dir_all(&scratch);
        }
        self.evict()
    }

    /// Counts a use of the cache in the host's counters.
    pub fn count(&self, hit: bool) {
        let counted = self.locked(|cache| {
            let mut stats = cache.counters();
            if hit {
                stats.0 += 1;
            } else {
                stats.1 += 1;
            }
            fs::write(
                cache.dir.join(COUNTERS),
                format!("{} {}\n", stats.0, stats.1),
            )
        });
        if let Err(e) = counted {
            super::note(&format!("cell cache counters: {e}"));
        }
    }

    pub fn stats(&self) -> CacheStats {
        let (hits, builds) = self.counters();
        let mut stats = CacheStats {
            hits,
            builds,
            limit: self.limit(),
            ..CacheStats::default()
        };
        for (_, bytes, _) in self.entries() {
            stats.entries += 1;
            stats.bytes += bytes;
        }
        stats
    }

    /// Sets the size the cache is kept under, and evicts to it.
    pub fn set_limit(&self, bytes: u64) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::write(self.dir.join(LIMIT), format!("{bytes}\n"))?;
        self.evict()
    }

    /// Removes every entry and zeroes the counters; returns the bytes freed.
    pub fn clear(&self) -> io::Result<u64> {
        self.locked(|cache| {
            let mut freed = 0;
            for (entry, bytes, _) in cache.entries() {
                cache.remove_entry(&entry);
                freed += bytes;
            }
            match fs::remove_file(cache.dir.join(COUNTERS)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            fs::write(cache.dir.join(TOTAL), "0\n")?;
            Ok(freed)
        })
    }

    fn limit(&self) -> u64 {
        fs::read_to_string(self.dir.join(LIMIT))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(DEFAULT_LIMIT)
    }

    fn counters(&self) -> (u64, u64) {
        let text = fs::read_to_string(self.dir.join(COUNTERS)).unwrap_or_default();
        let mut numbers = text.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
    }

    /// Every whole entry: its directory, size and last use.
    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let Ok(listing) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        listing
            .flatten()
            .filter(|item| {
                let name = item.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && item.path().join(DIGEST).exists()
            })
            .map(|item| {
                let entry = item.path();
                let bytes = entry_bytes(&entry);
                let used = fs::metadata(entry.join(USED))
                    .and_then(|meta| meta.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (entry, bytes, used)
            })
            .collect()
    }

    /// Removes the least recently used entries until the cache is within its limit. Every
    /// entry is measured only when the running total says the cache is over it (or is
    /// missing); that measure also corrects the total.
    fn evict(&self) -> io::Result<()> {
        let limit = self.limit();
        self.locked(|cache| {
            if cache.total().is_some_and(|total| total <= limit) {
                return Ok(());
            }
            let mut entries = cache.entries();
            let mut total: u64 = entries.iter().map(|(_, bytes, _)| bytes).sum();
            entries.sort_by_key(|(_, _, used)| *used);
            for (entry, bytes, _) in entries {
                if total <= limit {
                    break;
                }
                cache.remove_entry(&entry);
                total -= bytes;
            }
            fs::write(cache.dir.join(TOTAL), format!("{total}\n"))
        })
    }

    fn total(&self) -> Option<u64> {
        fs::read_to_string(self.dir.join(TOTAL))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Moves the running total by `delta` bytes; with the lock held. A cache without one
    /// gets one at its next eviction.
    fn adjust_total(&self, delta: i64) {
        if let Some(total) = self.total() {
            let total = (total as i64 + delta).max(0);
            let _ = fs::write(self.dir.join(TOTAL), format!("{total}\n"));
        }
    }

    /// Removes an entry and takes its bytes off the total, under the lock.
    fn remove_locked(&self, entry: &Path) {
        let _ = self.locked(|cache| {
            let bytes = entry_bytes(entry);
            if entry.exists() {
                cache.remove_entry(entry);
                cache.adjust_total(-(bytes as i64));
            }
            Ok(())
        });
    }

    /// Out of sight at once (a rename), then deleted: no reader finds half an entry.
    fn remove_entry(&self, entry: &Path) {
        let doomed = self.dir.join(format!(
            "{SCRATCH_PREFIX}gone-{}-{}",
            std::process::id(),
            entry
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        if fs::rename(entry, &doomed).is_ok() {
            let _ = fs::remove_dir_all(&doomed);
        }
    }

    fn locked<T>(&self, work: impl FnOnce(&CellCache) -> io::Result<T>) -> io::Result<T> {
        fs::create_dir_all(&self.dir)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK))?;
        lock.lock()?;
        let result = work(self);
        let _ = lock.unlock();
        result
    }
}

/// What a dep-info says its build read: the files it lists (escaped spaces undone) and its
/// env-deps (`NAME=VALUE`, or `NAME` when it was unset).
pub(crate) fn dep_info_reads(dep_info: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut files = BTreeSet::new();
    let mut envs = Vec::new();
    for line in dep_info.lines() {
        if let Some(env) = line.strip_prefix("# env-dep:") {
            envs.push(env.to_owned());
        } else if let Some((_, prerequisites)) = line.split_once(": ") {
            files.extend(split_escaped(prerequisites));
        }
    }
    (files, envs)
}

/// The inputs a dep-info names outside the cell's crate (whose source the key covers):
/// `file DIGEST PATH` and `env NAME=VALUE` (or `env NAME` when it was unset) lines.
fn inputs_of(dep_info: &str) -> String {
    let (files, envs) = dep_info_reads(dep_info);
    let mut inputs: String = envs.iter().map(|env| format!("env {env}\n")).collect();
    for file in files
        .iter()
        // Relative paths and the crate's own are inside the crate, which evcxr alone writes
        // (its source is in the key).
        .filter(|f| Path::new(f).is_absolute() && !f.starts_with(super::CRATE_DIR_MARK))
    {
        let digest = fs::read(file)
            .map(|bytes| blake3::hash(&bytes).to_hex().to_string())
            .unwrap_or_else(|_| "unreadable".into());
        inputs.push_str(&format!("file {digest} {file}\n"));
    }
    inputs
}

/// Whether every input an entry recorded is as it was.
fn inputs_unchanged(entry: &Path) -> bool {
    let Ok(inputs) = fs::read_to_string(entry.join(INPUTS)) else {
        return false;
    };
    inputs.lines().all(|line| {
        if let Some(env) = line.strip_prefix("env ") {
            let (name, value) = env
                .split_once('=')
                .map_or((env, None), |(n, v)| (n, Some(v)));
            std::env::var(name).ok().as_deref() == value
        } else if let Some((digest, file)) =
            line.strip_prefix("file ").and_then(|l| l.split_once(' '))
        {
            fs::read(file).is_ok_and(|bytes| blake3::hash(&bytes).to_hex().as_str() == digest)
        } else {
            false
        }
    })
}

/// Make's words: separated by spaces, a space in a path written `\ `.
fn split_escaped(words: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut chars = words.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            ' ' => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The bytes an entry's files take.
fn entry_bytes(entry: &Path) -> u64 {
    [LIBRARY, DEP_INFO, MESSAGES, VARIABLES, PUTS, INPUTS]
        .iter()
        .filter_map(|file| fs::metadata(entry.join(file)).ok())
        .map(|meta| meta.len())
        .sum()
}

/// An entry's directory: the key's base and a digest of how it uses the store.
fn entry_name(key: &BuildKey) -> String {
    let mut variables = blake3::Hasher::new();
    for line in &key.store_use.taken {
        variables.update(line.as_bytes());
        variables.update(b"\n");
    }
    variables.update(b"put\n");
    for line in &key.store_use.put {
        variables.update(line.as_bytes());
        variables.update(b"\n");
    }
    format!("{}-{}", key.base, &variables.finalize().to_hex()[..16])
}

/// Appends a line to a file, creating it: the wrapper's word to its context.
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut file = File::options().create(true).append(true).open(path)?;
    writeln!(file, "{line}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn built(text: &str) -> Built {
        Built {
            library: text.as_bytes().to_vec(),
            dep_info: "{crate}/src/lib.rs:".into(),
            messages: String::new(),
        }
    }

    /// A key whose entry takes `variables` and puts each back as it was.
    fn key(base: &str, variables: &[&str]) -> BuildKey {
        let put_back = |line: &&str| {
            let fields: Vec<&str> = line.split('\t').collect();
            format!("{}\t{}", fields[0], fields[2])
        };
        BuildKey {
            base: base.to_owned(),
            store_use: StoreUse {
                taken: variables.iter().map(|v| v.to_string()).collect(),
                put: variables.iter().map(put_back).collect(),
            },
            item_names: BTreeSet::new(),
        }
    }

    fn scratch_cache(name: &str) -> CellCache {
        let dir =
            std::env::temp_dir().join(format!("parallax-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        CellCache::at(dir)
    }

    #[test]
    fn an_entry_comes_back_whole_and_a_damaged_one_is_dropped() {
        let cache = scratch_cache("damage");
        let k1 = key("k1", &["a\t\tu8"]);
        cache.store(&k1, &built("library one")).unwrap();
        assert_eq!(cache.find(&k1).unwrap().library, b"library one");
        // More variables: the same build; other types or fewer: none.
        assert!(cache.find(&key("k1", &["a\t\tu8", "b\t\tu8"])).is_some());
        assert!(cache.find(&key("k1", &["a\t\tu16"])).is_none());
        assert!(cache.find(&key("k1", &[])).is_none());
        let entry = cache.dir().join(entry_name(&k1));
        fs::write(entry.join(LIBRARY), b"library 0ne").unwrap();
        assert!(cache.find(&k1).is_none());
        assert!(!entry.exists());
        assert_eq!(cache.total(), Some(cache.stats().bytes));
        assert!(cache.find(&key("k2", &[])).is_none());
        fs::remove_dir_all(cache.dir()).unwrap();
    }

    #[test]
    fn an_entry_whose_included_file_or_variable_changed_is_not_used() {
        let cache = scratch_cache("inputs");
        let included = cache.dir().with_extension("included.txt");
        fs::write(&included, "one").unwrap();
        std::env::set_var("PARALLAX_TEST_INPUT", "a");
        let k = key("k", &[]);
        let mut entry = built("library");
        entry.dep_info = format!(
            "{{parallax-cell-crate}}/libctx.so: {{parallax-cell-crate}}/src/lib.rs {}\n\n\
             # env-dep:PARALLAX_TEST_INPUT=a\n",
            included.display()
        );
        cache.store(&k, &entry).unwrap();
        assert!(cache.find(&k).is_some());
        fs::write(&included, "two").unwrap();
        assert!(cache.find(&k).is_none());
        fs::write(&included, "one").unwrap();
        assert!(cache.find(&k).is_some());
        std::env::set_var("PARALLAX_TEST_INPUT", "b");
        assert!(cache.find(&k).is_none());
        fs::remove_dir_all(cache.dir()).unwrap();
        fs::remove_file(included).unwrap();
    }

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let cache = scratch_cache("lru");
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let keys = ["a", "b", "c"].map(|base| key(base, &[]));
        for key in &keys {
            cache.store(key, &built(&"x".repeat(100))).unwrap();
            let used = File::options()
                .write(true)
                .open(cache.dir().join(entry_name(key)).join(USED));
            used.unwrap().set_modified(old).unwrap();
        }
        // The running total is what measuring every entry says.
        assert_eq!(cache.total(), Some(cache.stats().bytes));
        // `b` is used last; a limit for two entries leaves it and another.
        assert!(cache.find(&keys[1]).is_some());
        let one_entry = cache.stats().bytes / 3;
        cache.set_limit(2 * one_entry).unwrap();
        let left: Vec<bool> = keys
            .iter()
            .map(|k| cache.dir().join(entry_name(k)).exists())
            .collect();
        assert_eq!(left.iter().filter(|kept| **kept).count(), 2);
        assert!(left[1], "the entry used last was evicted");
        assert_eq!(cache.total(), Some(2 * one_entry));
        cache.count(true);
        cache.count(false);
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.hits, stats.builds), (2, 1, 1));
        assert_eq!(cache.clear().unwrap(), 2 * one_entry);
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.total(), Some(0));
        fs::remove_dir_all(cache.dir()).unwrap();
    }
}
