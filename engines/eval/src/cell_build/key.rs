//! What a cell's build is keyed by: everything that decides the library rustc makes, and
//! nothing that only names where it is made. The cell's source, with its items in a fixed
//! order (evcxr writes earlier cells' items in hash-map order, which differs from one process
//! to the next) and its entry function's build number left out; rustc's arguments (opt level,
//! target, features), with paths inside the crate's directory made relative and cargo's
//! metadata hash (which names that directory) left out; the content of every crate it links
//! (`--extern`), so that a rebuilt dependency never serves a stale library; the depth of the
//! crate's directory (the library's path to the standard library is relative to it); and the
//! compiler itself. So one context's build serves every other's on the host.
//!
//! The stored variables are apart from the key. evcxr's entry takes every stored variable
//! out of the store at its start and puts it back at its end (unless the cell moved it), a
//! generated line each, whether the cell uses it or not; the cell's own code is the same
//! either way. A library built when
//! the store held variables `V0` therefore runs as well in a store holding more (`V1`, with
//! `V0`'s variables of the same types): it leaves the others where they are, and a variable
//! the cell defines replaces the old one. So a second `%scatter` to a name, or a cell run
//! again after it defined its variables, reuse the first build (`super::cache::CellCache::find`).

use super::RustcCall;
use ra_ap_syntax::ast::{self, HasAttrs, HasModuleItem};
use ra_ap_syntax::{AstNode, Edition, SourceFile};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bumped when what the key covers changes.
const KEY_CONTEXT: &str = "parallax compiled-cell cache, key v3";

/// evcxr names each build's entry `run_user_code_<build number>`.
pub const ENTRY_PREFIX: &str = "run_user_code_";

/// A build's key: the hex digest of all but the stored variables, how its entry uses the
/// store, and the names the cell's items define.
pub struct BuildKey {
    pub base: String,
    pub store_use: StoreUse,
    pub item_names: BTreeSet<String>,
}

/// How a build's entry uses the variable store: the variables it takes (a line each: name,
/// `mut` or not, type) and those it puts back at its end (name, type). A variable the cell
/// moves is taken and not put back; one it defines is put and not taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreUse {
    pub taken: BTreeSet<String>,
    pub put: BTreeSet<String>,
}

impl BuildKey {
    /// The key of a build.
    pub fn of(call: &RustcCall, source: &str) -> BuildKey {
        let (code, store_use) = without_variables(source);
        let (pieces, item_names) = source_pieces(&code);
        BuildKey {
            base: base_key(call, &pieces),
            store_use,
            item_names,
        }
    }

    /// Whether a library built with `built` runs right with this key's store: it took some
    /// of the variables here, each with its type and mutability, and no other variable here
    /// has the name of one of the cell's items (the cell's code might have meant the item);
    /// and it puts back what this build would, but for the others, which this build puts back
    /// as it took them and that library leaves where they are. (A build that puts a variable
    /// back is not one that moves it: evcxr's first try, which puts every variable back,
    /// fails to compile when the cell moves one, and must not find the second try's library.)
    pub fn can_run_build_with(&self, built: &StoreUse) -> bool {
        let here = &self.store_use;
        let others: BTreeMap<&str, &str> = here
            .taken
            .difference(&built.taken)
            .filter_map(|line| {
                let mut fields = line.split('\t');
                let name = fields.next()?;
                Some((name, fields.nth(1)?))
            })
            .collect();
        built.taken.is_subset(&here.taken)
            && others.keys().all(|name| !self.item_names.contains(*name))
            && built.put.is_subset(&here.put)
            && here.put.difference(&built.put).all(|line| {
                line.split_once('\t')
                    .is_some_and(|(name, ty)| others.get(name) == Some(&ty))
            })
    }
}

fn base_key(call: &RustcCall, pieces: &[String]) -> String {
    let mut key = blake3::Hasher::new_derive_key(KEY_CONTEXT);
    let mut dump = String::new();
    let mut part = |bytes: &[u8]| {
        dump.push_str(&String::from_utf8_lossy(bytes));
        dump.push_str("\n----\n");
        key.update(&(bytes.len() as u64).to_le_bytes());
        key.update(bytes);
    };
    part(compiler_identity(&call.rustc).as_bytes());
    // The library finds the standard library's by a path relative to its own directory
    // (evcxr builds with `rpath`): a library from a crate directory at another depth would not.
    let depth = call.crate_dir.components().count();
    part(format!("crate directory depth {depth}").as_bytes());
    let digests = ExternDigests::load(&call.crate_dir);
    for arg in call.keyed_args(&digests) {
        part(arg.as_bytes());
    }
    digests.save();
    for piece in pieces {
        part(piece.as_bytes());
    }
    key.finalize().to_hex().to_string()
}

/// The source without evcxr's lines that check, take and put back stored variables, and how
/// its entry uses the store.
fn without_variables(source: &str) -> (String, StoreUse) {
    const STORE: &str = "evcxr_variable_store.";
    let mut code = String::with_capacity(source.len());
    let mut store_use = StoreUse::default();
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with(&format!("vars_ok &= {STORE}check_variable::<")) {
            continue;
        }
        if let Some(put) = put_variable(trimmed) {
            store_use.put.insert(put);
            continue;
        }
        if let Some(taken) = taken_variable(trimmed) {
            store_use.taken.insert(taken);
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    (code, store_use)
}

/// `evcxr_variable_store.put_variable::<Vec<u64>>(stringify!(v), v);` as `v<TAB>Vec<u64>`.
fn put_variable(line: &str) -> Option<String> {
    let rest = line.strip_prefix("evcxr_variable_store.put_variable::<")?;
    let (ty, named) = rest.rsplit_once(">(stringify!(")?;
    let (name, value) = named.split_once("), ")?;
    (value == format!("{name});")).then(|| format!("{name}\t{ty}"))
}

/// `let mut v = evcxr_variable_store.take_variable::<Vec<u64>>(stringify!(v));` as
/// `v<TAB>mut<TAB>Vec<u64>`.
fn taken_variable(line: &str) -> Option<String> {
    let rest = line.strip_prefix("let ")?;
    let (binding, take) = rest.split_once(" = evcxr_variable_store.take_variable::<")?;
    let (mutable, name) = match binding.strip_prefix("mut ") {
        Some(name) => ("mut", name),
        None => ("", binding),
    };
    let ty = take.strip_suffix(&format!(">(stringify!({name}));"))?;
    Some(format!("{name}\t{mutable}\t{ty}"))
}

/// The source as its inner attributes, in order, then its items, sorted, with the entry's
/// build number removed; and the names the items define. A source that does not parse is
/// keyed as it is.
fn source_pieces(source: &str) -> (Vec<String>, BTreeSet<String>) {
    let parsed = SourceFile::parse(source, Edition::Edition2024);
    if !parsed.errors().is_empty() {
        return (vec![source.to_owned()], BTreeSet::new());
    }
    let file = parsed.tree();
    let mut pieces: Vec<String> = file.attrs().map(|attr| attr.to_string()).collect();
    let mut items: Vec<String> = file
        .items()
        .map(|item| without_build_number(&item.syntax().to_string()))
        .collect();
    items.sort();
    pieces.extend(items);
    let names = file
        .items()
        .filter_map(|item| item_name(&item))
        .filter(|name| !name.starts_with(ENTRY_PREFIX))
        .collect();
    (pieces, names)
}

/// The name an item defines, if it defines one a variable could be mistaken for.
fn item_name(item: &ast::Item) -> Option<String> {
    use ast::HasName;
    let name = match item {
        ast::Item::Const(i) => i.name(),
        ast::Item::Enum(i) => i.name(),
        ast::Item::Fn(i) => i.name(),
        ast::Item::MacroRules(i) => i.name(),
        ast::Item::Static(i) => i.name(),
        ast::Item::Struct(i) => i.name(),
        ast::Item::Union(i) => i.name(),
        _ => None,
    };
    name.map(|name| name.text().to_string())
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

/// The content digests of the crates a cell links (see `content_digest`), remembered per file
/// (by its size, time and inode) in the crate's target directory, so that each is read once,
/// not once per cell.
pub struct ExternDigests {
    memo: std::path::PathBuf,
    known: BTreeMap<String, (String, String)>,
    changed: std::cell::Cell<bool>,
    fresh: std::cell::RefCell<BTreeMap<String, (String, String)>>,
}

impl ExternDigests {
    pub(super) fn load(crate_dir: &Path) -> ExternDigests {
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
            Ok(bytes) => content_digest(bytes),
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

/// A linked crate's digest. An archive (an rlib) is known by its members' contents, in order:
/// an incremental build names its object files after its session and stamps them with the time
/// it made them, and every context builds its own copy of a path dependency, so two contexts'
/// copies of the same crate differ in names, times and the index that lists them alone. A
/// change anywhere else (the crate's code, a dependency's hash in its metadata) still changes
/// the digest. Anything else is known by its bytes.
fn content_digest(bytes: Vec<u8>) -> String {
    const MAGIC: &[u8] = b"!<arch>\n";
    const HEADER: usize = 60;
    if !bytes.starts_with(MAGIC) {
        return blake3::hash(&bytes).to_hex().to_string();
    }
    let mut digest = blake3::Hasher::new();
    let mut at = MAGIC.len();
    while at + HEADER <= bytes.len() {
        let header = &bytes[at..at + HEADER];
        let size = std::str::from_utf8(&header[48..58])
            .ok()
            .and_then(|field| field.trim().parse::<usize>().ok());
        let (Some(size), Ok(name)) = (size, std::str::from_utf8(&header[..16])) else {
            // Not an archive as `ar` writes them: every byte counts.
            return blake3::hash(&bytes).to_hex().to_string();
        };
        let data = &bytes[(at + HEADER).min(bytes.len())..(at + HEADER + size).min(bytes.len())];
        // The symbol index and the long-name table list the members; they are not members.
        if !matches!(name.trim_end(), "/" | "//" | "/SYM64/") {
            digest.update(&(data.len() as u64).to_le_bytes());
            digest.update(data);
        }
        at += HEADER + size + size % 2;
    }
    digest.update(&bytes[at.min(bytes.len())..]);
    digest.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_is_known_by_its_members_not_their_names_or_times() {
        let archive = |name: &str, mtime: &str, data: &[u8]| {
            let mut bytes = b"!<arch>\n".to_vec();
            let names = format!("{name}/\n");
            for (member, data) in [("//", names.as_bytes()), ("/0", data)] {
                let header = format!(
                    "{member:<16}{mtime:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                    0,
                    0,
                    644,
                    data.len()
                );
                bytes.extend(header.bytes());
                bytes.extend(data);
                if data.len() % 2 == 1 {
                    bytes.push(b'\n');
                }
            }
            bytes
        };
        let first = content_digest(archive("c.1e84rwm.rcgu.o", "1700000000", b"abc"));
        let second = content_digest(archive("c.13xynb5.rcgu.o", "1800000000", b"abc"));
        assert_eq!(first, second);
        let changed = content_digest(archive("c.1e84rwm.rcgu.o", "1700000000", b"abd"));
        assert_ne!(first, changed);
        assert_ne!(
            content_digest(b"plain 1".to_vec()),
            content_digest(b"plain 2".to_vec())
        );
    }

    #[test]
    fn stored_variables_are_apart_and_a_superset_runs_a_build() {
        let source = "fn f() {}\n{let mut vars_ok = true;\n\
            vars_ok &= evcxr_variable_store.check_variable::<u64>(stringify!(a));\n\
            if !vars_ok {return evcxr_variable_store;}}\n\
            let mut a = evcxr_variable_store.take_variable::<u64>(stringify!(a));\n\
            a += 1;\n\
            evcxr_variable_store.put_variable::<u64>(stringify!(a), a);\n";
        let (code, store_use) = without_variables(source);
        assert_eq!(code, "fn f() {}\n{let mut vars_ok = true;\nif !vars_ok {return evcxr_variable_store;}}\na += 1;\n");
        let a = "a\tmut\tu64";
        assert_eq!(store_use.taken, BTreeSet::from([a.to_owned()]));
        assert_eq!(store_use.put, BTreeSet::from(["a\tu64".to_owned()]));
        let key = |taken: &[&str], put: &[&str], items: &[&str]| BuildKey {
            base: String::new(),
            store_use: uses(taken, put),
            item_names: items.iter().map(|v| v.to_string()).collect(),
        };
        let built = uses(&[a], &["a\tu64"]);
        // Another variable, put back as it was taken: the same build.
        let with_b = key(&[a, "b\t\tString"], &["a\tu64", "b\tString"], &["f"]);
        assert!(with_b.can_run_build_with(&built));
        assert!(!key(&["a\t\tu64"], &["a\tu64"], &["f"]).can_run_build_with(&built));
        assert!(!key(&["a\tmut\tu32"], &["a\tu32"], &[]).can_run_build_with(&built));
        assert!(!key(&[a, "f\t\tu8"], &["a\tu64", "f\tu8"], &["f"]).can_run_build_with(&built));
        // The other variable put back with another type (the cell redefined it): not the same.
        let retyped = key(&[a, "b\t\tString"], &["a\tu64", "b\tu8"], &[]);
        assert!(!retyped.can_run_build_with(&built));
    }

    #[test]
    fn a_build_that_moves_a_variable_is_not_one_that_puts_it_back() {
        let moved = uses(&["part\t\tVec<u8>"], &[]);
        let puts_back = uses(&["part\t\tVec<u8>"], &["part\tVec<u8>"]);
        let key = |store_use: &StoreUse| BuildKey {
            base: String::new(),
            store_use: store_use.clone(),
            item_names: BTreeSet::new(),
        };
        assert!(!key(&puts_back).can_run_build_with(&moved));
        assert!(!key(&moved).can_run_build_with(&puts_back));
        assert!(key(&moved).can_run_build_with(&moved));
        // A cell defining `y`, run again once `y` is stored: the first build serves.
        let defined = uses(&["x\t\tu64"], &["x\tu64", "y\tu64"]);
        let again = uses(&["x\t\tu64", "y\t\tu64"], &["x\tu64", "y\tu64"]);
        assert!(key(&again).can_run_build_with(&defined));
        assert_eq!(
            put_variable("evcxr_variable_store.put_variable::<Vec<(u8, u8)>>(stringify!(v), v);"),
            Some("v\tVec<(u8, u8)>".to_owned())
        );
    }

    fn uses(taken: &[&str], put: &[&str]) -> StoreUse {
        StoreUse {
            taken: taken.iter().map(|v| v.to_string()).collect(),
            put: put.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn the_build_number_and_the_item_order_do_not_count() {
        let a = "#![allow(unused)]\nfn f() {}\nstruct S;\n#[unsafe(no_mangle)]\npub extern \"C\" fn run_user_code_3(x: u8) {}\n";
        let b = "#![allow(unused)]\nstruct S;\n#[unsafe(no_mangle)]\npub extern \"C\" fn run_user_code_14(x: u8) {}\nfn f() {}\n";
        assert_eq!(source_pieces(a).0, source_pieces(b).0);
        let c = a.replace("struct S;", "struct S(u8);");
        assert_ne!(source_pieces(a).0, source_pieces(&c).0);
        assert_eq!(
            without_build_number("fn run_user_code_12(s) { run_user_code_12 }"),
            "fn run_user_code_(s) { run_user_code_12 }"
        );
    }
}
