//! Which cells can run again without evcxr. A cell that leaves the compiling context's state as
//! it found it (`crate::stateless`: expressions, and non-`mut` `let`s that bind only variables
//! that existed already, each of the type it had), ran cleanly and asked for no input is
//! remembered with the compiled cells it ran (their `LOAD_AND_RUN` lines). Run again unchanged,
//! with no cell that changed the state run since, its compiled cells run again in the store as
//! they are: no analysis, no cargo, no rustc. (So the cells a `%pmap` generates, which rebind
//! the same variables each time, run again from memory.) Any other cell forgets every
//! remembered cell, and a cell is not run from memory once a file its build read (a path
//! dependency's source, a file an item includes) or an environment variable it read changed
//! since: cargo would build it again then. Engines (`parallax_engine::sharing`) and the notebook (`crate::notebook`)
//! each keep one.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Default)]
pub struct Memo {
    /// A cell's code, the `LOAD_AND_RUN` lines of its compiled cells and the stamp of what
    /// their builds read.
    cells: HashMap<String, (Vec<String>, u64)>,
}

impl Memo {
    /// The compiled cells of `code`, if it is remembered and what their builds read is as it
    /// was.
    pub fn lines(&self, code: &str) -> Option<Vec<String>> {
        let (lines, stamp) = self.cells.get(code)?;
        (inputs_stamp(lines) == *stamp).then(|| lines.clone())
    }

    pub fn forget(&mut self) {
        self.cells.clear();
    }

    /// After evcxr executed `code`: remembers it when it left the state as it found it,
    /// forgets everything otherwise.
    pub fn after_execution(&mut self, ran: &Executed) {
        let clean = ran.ok
            && !ran.lines.is_empty()
            && ran.before == ran.after
            && ran.outcomes_clean
            && !ran.asked_input
            && crate::stateless::reach(ran.code) != crate::stateless::Reach::Anything;
        if clean {
            let stamp = inputs_stamp(&ran.lines);
            self.cells
                .insert(ran.code.to_owned(), (ran.lines.clone(), stamp));
        } else {
            self.forget();
        }
    }
}

/// What one execution by evcxr came to, for the memo.
pub struct Executed<'a> {
    pub code: &'a str,
    pub ok: bool,
    pub lines: Vec<String>,
    /// The variables with their types (`crate::Evaluator::typed_variables`), before and after.
    pub before: &'a BTreeSet<String>,
    pub after: &'a BTreeSet<String>,
    /// Its compiled cells neither panicked, failed a `?`, changed a type nor died.
    pub outcomes_clean: bool,
    /// It asked the user for input: run again, it would ask again, and a replay cannot.
    pub asked_input: bool,
}

/// The files the builds behind `lines` and their dependencies read, as they are now (size and
/// times), and the environment variables they read, with their values: from the dep-info
/// files beside each compiled cell's library. The cell crate's own source (evcxr rewrites it
/// for every cell) and the registry's sources (cargo never changes them) are left out.
fn inputs_stamp(lines: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut stamp = std::collections::hash_map::DefaultHasher::new();
    let mut dirs: Vec<PathBuf> = lines.iter().filter_map(|line| deps_dir(line)).collect();
    dirs.dedup();
    let registry = crate::places::home().join(".cargo").join("registry");
    for dir in dirs {
        let Ok(listing) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut inputs = BTreeSet::new();
        for item in listing.flatten() {
            let path = item.path();
            if path.extension().is_some_and(|ext| ext == "d") {
                inputs.extend(dep_info_inputs(&path));
            }
        }
        for input in inputs.iter().filter(|input| !input.starts_with(&registry)) {
            input.hash(&mut stamp);
            if let Some(env) = input.to_str().and_then(|i| i.strip_prefix("env:")) {
                let name = env.split_once('=').map_or(env, |(name, _)| name);
                std::env::var_os(name).hash(&mut stamp);
            } else if let Ok(meta) = std::fs::metadata(input) {
                (
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ctime_nsec(),
                )
                    .hash(&mut stamp);
            }
        }
    }
    stamp.finish()
}

/// The directory of a compiled cell's dependencies: its library's, or `deps` beside it.
fn deps_dir(line: &str) -> Option<PathBuf> {
    let (path, _) = line.strip_prefix("LOAD_AND_RUN ")?.rsplit_once(' ')?;
    let dir = Path::new(path).parent()?;
    Some(if dir.ends_with("deps") {
        dir.to_owned()
    } else {
        dir.join("deps")
    })
}

/// The absolute files a dep-info file lists as read, and its env-deps as `env:NAME=VALUE`.
fn dep_info_inputs(dep_info: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(dep_info).unwrap_or_default();
    let (files, envs) = crate::cell_build::cache::dep_info_reads(&text);
    let files = files.into_iter().filter(|file| file.starts_with('/'));
    let envs = envs.into_iter().map(|env| format!("env:{env}"));
    files.chain(envs).map(PathBuf::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran<'a>(
        code: &'a str,
        before: &'a BTreeSet<String>,
        after: &'a BTreeSet<String>,
    ) -> Executed<'a> {
        Executed {
            code,
            ok: true,
            lines: vec!["LOAD_AND_RUN /lib.so run_user_code_3".to_owned()],
            before,
            after,
            outcomes_clean: true,
            asked_input: false,
        }
    }

    #[test]
    fn only_a_clean_expression_cell_is_remembered_and_anything_else_forgets() {
        let x = BTreeSet::from(["x: u32".to_owned()]);
        let x_and_y = BTreeSet::from(["x: u32".to_owned(), "y: i32".to_owned()]);
        let mut memo = Memo::default();
        memo.after_execution(&ran("x + 1", &x, &x));
        assert!(memo.lines("x + 1").is_some());
        let asking = Executed {
            asked_input: true,
            ..ran("x + 2", &x, &x)
        };
        memo.after_execution(&asking);
        assert!(memo.lines("x + 1").is_none() && memo.lines("x + 2").is_none());
        memo.after_execution(&ran("x + 1", &x, &x));
        memo.after_execution(&ran("let y = 2;", &x, &x_and_y));
        assert!(memo.lines("x + 1").is_none() && memo.lines("let y = 2;").is_none());
    }

    #[test]
    fn a_let_that_rebinds_a_variable_of_the_same_type_is_remembered() {
        let x = BTreeSet::from(["x: u32".to_owned()]);
        let x_u64 = BTreeSet::from(["x: u64".to_owned()]);
        let mut memo = Memo::default();
        memo.after_execution(&ran("x + 1", &x, &x));
        memo.after_execution(&ran("let x = x + 1;", &x, &x));
        assert!(memo.lines("let x = x + 1;").is_some() && memo.lines("x + 1").is_some());
        // A new type, or a mutable binding, changes the state: everything is forgotten.
        memo.after_execution(&ran("let x = x as u64;", &x, &x_u64));
        assert!(memo.lines("let x = x + 1;").is_none() && memo.lines("x + 1").is_none());
        memo.after_execution(&ran("let x = 1u64;", &x_u64, &x_u64));
        memo.after_execution(&ran("let mut x = 1u64;", &x_u64, &x_u64));
        assert!(memo.lines("let x = 1u64;").is_none() && memo.lines("let mut x = 1u64;").is_none());
    }

    #[test]
    fn a_file_a_build_read_changing_makes_the_cell_build_again() {
        let dir = std::env::temp_dir().join(format!("parallax-memo-{}", std::process::id()));
        let deps = dir.join("deps");
        std::fs::create_dir_all(&deps).unwrap();
        let source = dir.join("dependency.rs");
        std::fs::write(&source, "pub fn v() -> u8 { 1 }").unwrap();
        std::fs::write(
            deps.join("dependency-1.d"),
            format!(
                "{}/deps/libdependency-1.rlib: {}\n\n# env-dep:HOME\n",
                dir.display(),
                source.display()
            ),
        )
        .unwrap();
        let line = format!(
            "LOAD_AND_RUN {}/deps/libcode_3.so run_user_code_2",
            dir.display()
        );
        let x = BTreeSet::from(["x: u32".to_owned()]);
        let mut memo = Memo::default();
        memo.after_execution(&Executed {
            lines: vec![line],
            ..ran("x + 1", &x, &x)
        });
        assert!(memo.lines("x + 1").is_some());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&source, "pub fn v() -> u8 { 2 }").unwrap();
        assert!(memo.lines("x + 1").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
