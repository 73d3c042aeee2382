//! What a cell's build is keyed by: everything that decides the library rustc makes, and
//! nothing that only names where it is made. The cell's source, with its items in a fixed
//! order (evcxr writes earlier cells' items in hash-map order, which differs from one process
//! to the next) and its entry function's build number left out; rustc's arguments (opt level,
//! target, features, cargo's metadata hash), with paths inside the crate's directory made
//! relative; the content of every crate it links (`--extern`), so that a rebuilt dependency
//! never serves a stale library; and the compiler itself.

use super::RustcCall;
use ra_ap_syntax::ast::{HasAttrs, HasModuleItem};
use ra_ap_syntax::{AstNode, Edition, SourceFile};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bumped when what the key covers changes.
const KEY_CONTEXT: &str = "parallax compiled-cell cache, key v1";

/// evcxr names each build's entry `run_user_code_<build number>`.
pub const ENTRY_PREFIX: &str = "run_user_code_";

/// The key of a build, in hex.
pub fn build_key(call: &RustcCall, source: &str) -> String {
    let mut key = blake3::Hasher::new_derive_key(KEY_CONTEXT);
    let mut part = |bytes: &[u8]| {
        key.update(&(bytes.len() as u64).to_le_bytes());
        key.update(bytes);
    };
    part(compiler_identity(&call.rustc).as_bytes());
    let digests = ExternDigests::load(&call.crate_dir);
    for arg in call.keyed_args(&digests) {
        part(arg.as_bytes());
    }
    digests.save();
    for piece in source_pieces(source) {
        part(piece.as_bytes());
    }
    key.finalize().to_hex().to_string()
}

/// The source as its inner attributes, in order, then its items, sorted, with the entry's
/// build number removed. A source that does not parse is keyed as it is.
fn source_pieces(source: &str) -> Vec<String> {
    let parsed = SourceFile::parse(source, Edition::Edition2024);
    if !parsed.errors().is_empty() {
        return vec![source.to_owned()];
    }
    let file = parsed.tree();
    let mut pieces: Vec<String> = file.attrs().map(|attr| attr.to_string()).collect();
    let mut items: Vec<String> = file
        .items()
        .map(|item| without_build_number(&item.syntax().to_string()))
        .collect();
    items.sort();
    pieces.extend(items);
    pieces
}

/// `fn run_user_code_12(` becomes `fn run_user_code_(`.
pub fn without_build_number(text: &str) -> String {
    let marker = format!("fn {ENTRY_PREFIX}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&marker) {
        let end = at + marker.len();
        out.push_str(&rest[..end]);
        rest = rest[end..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// The compiler: its path, size and time, and the name of its driver library (which carries
/// the version's hash), so that a toolchain update is a new key.
fn compiler_identity(rustc: &Path) -> String {
    let stamp = fs::metadata(rustc)
        .map(|meta| format!("{} {}.{}", meta.len(), meta.mtime(), meta.mtime_nsec()))
        .unwrap_or_default();
    let driver = rustc
        .parent()
        .and_then(Path::parent)
        .and_then(|sysroot| fs::read_dir(sysroot.join("lib")).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|item| item.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("librustc_driver"))
        .collect::<Vec<_>>()
        .join(",");
    format!("{} {stamp} {driver}", rustc.display())
}

/// The content digests of the crates a cell links, remembered per file (by its size, time and
/// inode) in the crate's target directory, so that each is read once, not once per cell.
pub struct ExternDigests {
    memo: std::path::PathBuf,
    known: BTreeMap<String, (String, String)>,
    changed: std::cell::Cell<bool>,
    fresh: std::cell::RefCell<BTreeMap<String, (String, String)>>,
}

impl ExternDigests {
    fn load(crate_dir: &Path) -> ExternDigests {
        let memo = crate_dir.join("target").join("parallax-extern-digests");
        let known = fs::read_to_string(&memo)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, '\t');
                let (stamp, digest, path) = (fields.next()?, fields.next()?, fields.next()?);
                Some((path.to_owned(), (stamp.to_owned(), digest.to_owned())))
            })
            .collect();
        ExternDigests {
            memo,
            known,
            changed: Default::default(),
            fresh: Default::default(),
        }
    }

    /// The digest of a linked crate's file; a file that cannot be read keys by its path.
    pub fn of(&self, path: &str) -> String {
        let Ok(meta) = fs::metadata(path) else {
            return format!("unreadable {path}");
        };
        let stamp = format!(
            "{} {}.{} {}",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino()
        );
        if let Some((known_stamp, digest)) = self.known.get(path) {
            if *known_stamp == stamp {
                self.fresh
                    .borrow_mut()
                    .insert(path.to_owned(), (stamp, digest.clone()));
                return digest.clone();
            }
        }
        let digest = match fs::read(path) {
            Ok(bytes) => blake3::hash(&bytes).to_hex().to_string(),
            Err(_) => return format!("unreadable {path}"),
        };
        self.changed.set(true);
        self.fresh
            .borrow_mut()
            .insert(path.to_owned(), (stamp, digest.clone()));
        digest
    }

    /// Writes the memo back if a digest was computed (best effort: it only saves time).
    fn save(&self) {
        if !self.changed.get() {
            return;
        }
        let text: String = self
            .fresh
            .borrow()
            .iter()
            .map(|(path, (stamp, digest))| format!("{stamp}\t{digest}\t{path}\n"))
            .collect();
        let scratch = self.memo.with_extension(format!("{}", std::process::id()));
        if fs::write(&scratch, text).is_ok() {
            let _ = fs::rename(&scratch, &self.memo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_number_and_the_item_order_do_not_count() {
        let a = "#![allow(unused)]\nfn f() {}\nstruct S;\n#[unsafe(no_mangle)]\npub extern \"C\" fn run_user_code_3(x: u8) {}\n";
        let b = "#![allow(unused)]\nstruct S;\n#[unsafe(no_mangle)]\npub extern \"C\" fn run_user_code_14(x: u8) {}\nfn f() {}\n";
        assert_eq!(source_pieces(a), source_pieces(b));
        let c = a.replace("struct S;", "struct S(u8);");
        assert_ne!(source_pieces(a), source_pieces(&c));
        assert_eq!(
            without_build_number("fn run_user_code_12(s) { run_user_code_12 }"),
            "fn run_user_code_(s) { run_user_code_12 }"
        );
    }
}
