//! Parallax magics: splitting a cell into Rust code and magic lines, parsing each magic into a
//! typed [`Command`], and the help text for every magic. Pure: no I/O.

mod cache;
mod cluster;
pub mod data;
pub mod px;
pub mod scan;
mod words;

use std::fmt;

pub use cache::CacheCommand;
pub use cluster::{host_counts, profile_options, ClusterCommand, LaunchOptions, LauncherKind};
pub use data::{Collect, Distribute, Movement, Pmap, PmapFlags};
pub use px::{GroupOutputs, PxFlags, Targets};
pub use words::split_words;

/// A parsed magic, ready for the kernel to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `%lsmagic`: list every magic.
    Lsmagic,
    /// `%magic NAME` or `%NAME?`: show the help of one magic.
    Help { name: String },
    /// `%cluster start|status|stop|restart|add`.
    Cluster(ClusterCommand),
    /// `%px CODE` or a `%%px` cell: run code on the engines.
    Px { flags: PxFlags, code: String },
    /// `%pxresult`: show the outputs of the last non-blocking `%px`, waiting if needed.
    PxResult,
    /// `%autopx`: toggle sending every following cell to the engines.
    Autopx,
    /// `%pxconfig FLAGS`: set the default `%px` flags (no flags: show them).
    PxConfig { flags: PxFlags },
    /// `%pmap FUNC INPUT` or a `%%pmap INPUT` cell with a closure: map across the engines.
    Pmap(Pmap),
    /// `%scatter` or `%push`: notebook values to the engines.
    Distribute(Distribute),
    /// `%gather` or `%pull`: engine values to the notebook.
    Collect(Collect),
    /// `%dashboard`: a live view of the engines; `--stop` freezes it.
    Dashboard { stop: bool },
    /// `%cache`: the compiled-cell cache.
    Cache(CacheCommand),
}

/// Whether a magic is used as a line (`%name`) or as a whole cell (`%%name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MagicKind {
    Line,
    Cell,
}

/// The description of one magic: how to call it and what it does.
#[derive(Debug, Clone, Copy)]
pub struct MagicSpec {
    pub name: &'static str,
    pub kind: MagicKind,
    pub usage: &'static str,
    pub summary: &'static str,
    pub details: &'static str,
}

impl MagicSpec {
    fn sigil(&self) -> &'static str {
        match self.kind {
            MagicKind::Line => "%",
            MagicKind::Cell => "%%",
        }
    }

    /// The full help text: usage, summary and details.
    pub fn help(&self) -> String {
        let mut text = format!("Usage: {}\n\n{}\n", self.usage, self.summary);
        if !self.details.is_empty() {
            text.push('\n');
            text.push_str(self.details);
            text.push('\n');
        }
        text
    }
}

/// Every magic Parallax knows, in the order `%lsmagic` lists them.
pub const MAGICS: &[MagicSpec] = &[
    MagicSpec {
        name: "lsmagic",
        kind: MagicKind::Line,
        usage: "%lsmagic",
        summary: "List every available magic with a one-line summary.",
        details: "",
    },
    MagicSpec {
        name: "magic",
        kind: MagicKind::Line,
        usage: "%magic NAME",
        summary: "Show the help of the magic NAME (with or without its % sign).",
        details: "`%NAME?` and `%%NAME?` show the same help.",
    },
    MagicSpec {
        name: "cluster",
        kind: MagicKind::Line,
        usage: "%cluster start [-n N] [--launcher local|ssh|mpi|slurm] [OPTIONS] | add -n K [OPTIONS] | status | stop | restart | ping [-n COUNT] | connection-file [PATH] [--ip ADDRESS]",
        summary: "Start, grow, inspect, stop, restart or time the pool of engines, here or on other hosts.",
        details: cluster::CLUSTER_HELP,
    },
    MagicSpec {
        name: "px",
        kind: MagicKind::Line,
        usage: "%px [--targets T] [--block|--noblock] [--timeout SECS] [--group-outputs engine|order|type] [--local] [--progress-after SECS] CODE",
        summary: "Run one line of Rust on the engines.",
        details: PX_FLAGS_HELP,
    },
    MagicSpec {
        name: "px",
        kind: MagicKind::Cell,
        usage: "%%px [--targets T] [--block|--noblock] [--timeout SECS] [--group-outputs engine|order|type] [--local] [--progress-after SECS]",
        summary: "Run the rest of the cell on the engines.",
        details: PX_FLAGS_HELP,
    },
    MagicSpec {
        name: "pxresult",
        kind: MagicKind::Line,
        usage: "%pxresult",
        summary: "Show the outputs of the last non-blocking %px, waiting for it if it is still running.",
        details: "",
    },
    MagicSpec {
        name: "autopx",
        kind: MagicKind::Line,
        usage: "%autopx",
        summary: "Toggle sending every following cell to the engines, as if it began with %%px.",
        details: "Run %autopx again to go back to running cells in the notebook's own context.",
    },
    MagicSpec {
        name: "pxconfig",
        kind: MagicKind::Line,
        usage: "%pxconfig [--targets T] [--block|--noblock] [--timeout SECS] [--group-outputs engine|order|type] [--local|--no-local] [--progress-after SECS]",
        summary: "Set the default flags of %px, %%px and %autopx (with no flags: show them).",
        details: "",
    },
    MagicSpec {
        name: "pmap",
        kind: MagicKind::Line,
        usage: "%pmap [-o NAME] [--chunk N] [--targets T] [--unordered] [--timeout SECS] [--skip-errors] FUNC INPUT",
        summary: "Apply FUNC to every item of INPUT across the engines; the results land in a local Vec.",
        details: PMAP_HELP,
    },
    MagicSpec {
        name: "pmap",
        kind: MagicKind::Cell,
        usage: "%%pmap [-o NAME] [--chunk N] [--targets T] [--unordered] [--timeout SECS] [--skip-errors] INPUT",
        summary: "Apply the cell's closure to every item of INPUT across the engines.",
        details: PMAP_HELP,
    },
    MagicSpec {
        name: "scatter",
        kind: MagicKind::Line,
        usage: "%scatter [--targets T] NAME = EXPR",
        summary: "Split the items of a local EXPR into contiguous parts, one per engine, as NAME: Vec<T> there.",
        details: DATA_HELP,
    },
    MagicSpec {
        name: "gather",
        kind: MagicKind::Line,
        usage: "%gather [--targets T] NAME [-o LOCAL]",
        summary: "Concatenate the engines' NAME vectors, in engine order, into a local Vec (LOCAL, default NAME).",
        details: DATA_HELP,
    },
    MagicSpec {
        name: "push",
        kind: MagicKind::Line,
        usage: "%push [--targets T] NAME = EXPR",
        summary: "Give every engine the same value: a local EXPR, as NAME there.",
        details: DATA_HELP,
    },
    MagicSpec {
        name: "pull",
        kind: MagicKind::Line,
        usage: "%pull [--targets T] NAME [-o LOCAL]",
        summary: "Bring each engine's NAME back as a local Vec, one value per engine (LOCAL, default NAME).",
        details: DATA_HELP,
    },
    MagicSpec {
        name: "dashboard",
        kind: MagicKind::Line,
        usage: "%dashboard [--stop]",
        summary: "Show a live view of the engines and their tasks, updated in place; --stop freezes it.",
        details: "The block shows engines alive, busy and dead; tasks queued, running, done and failed; \
the rate; one row per engine (host, pid, state, current task and for how long, tasks done, CPU, \
memory); the task stream of the last minute (a lane per engine, failures in red); the latest \
errors. It updates twice a second while other cells run. A new %dashboard freezes the previous \
one. In jupyter console, which does not show updates, it prints the text table once.",
    },
    MagicSpec {
        name: "cache",
        kind: MagicKind::Line,
        usage: "%cache [clear | limit SIZE]",
        summary: "Show the compiled-cell cache (size, hit rate, builds per engine), clear it, or set its size limit.",
        details: cache::CACHE_HELP,
    },
];

const PMAP_HELP: &str = "FUNC names a function or closure defined on the engines (with %%px, say); the cell \
form takes a closure as its body. INPUT is a Rust expression of the notebook: a range, a Vec, \
anything iterable whose items serde can serialize. Each engine compiles the map once and then \
streams chunks of items through it; chunks go to whichever engine is free.\n\
  -o NAME, --out NAME  the local variable for the results, a Vec<R> in input order (default pmap_out)\n\
  --chunk N            items per chunk (default: chosen from the measured cost of an item)\n\
  --targets T, -t T    engines to use (default: all)\n\
  --unordered          results in completion order\n\
  --timeout SECS       stop the map after SECS\n\
  --skip-errors        go on past items whose call panics; their indices go to NAME_failed\n\
Example: %%px then `fn square(x: u64) -> u64 { x * x }`, then %pmap -o sq square 0..1000u64";

const DATA_HELP: &str = "Values travel in a compact binary encoding (serde); numbers and vectors of \
numbers as raw bytes. EXPR is evaluated in the notebook's own context and never moved. The type \
of the engines' variable is the type of the values sent; --targets picks the engines (default all).";

const PX_FLAGS_HELP: &str = "Each engine keeps its own state across cells. Output is shown live, prefixed with \
the engine: [stdout:2], [stderr:0], Out[1:5].\n\
  --targets T, -t T   engines to run on: all, 3, 0,2, 1:3, ::2 (default: all)\n\
  --block, --noblock  wait for the result (default), or return at once and see it with %pxresult\n\
  --timeout SECS      stop the cell on engines still running after SECS; keep the others' results\n\
  --group-outputs G   order (live, as they come), engine (engine by engine) or type (stdout, stderr, results)\n\
  --local             also run the code in the notebook's own context\n\
  --progress-after S  a blocking cell still running after S seconds shows which engines are done (default 2; -1: never)";

/// Finds a magic by name and kind.
pub fn lookup(name: &str, kind: MagicKind) -> Option<&'static MagicSpec> {
    MAGICS.iter().find(|m| m.name == name && m.kind == kind)
}

/// Finds a magic by name alone, as `%magic NAME` does: a leading `%` or `%%` picks the kind.
fn lookup_any(name: &str) -> Option<&'static MagicSpec> {
    if let Some(cell_name) = name.strip_prefix("%%") {
        return lookup(cell_name, MagicKind::Cell);
    }
    let bare = name.strip_prefix('%').unwrap_or(name);
    lookup(bare, MagicKind::Line).or_else(|| lookup(bare, MagicKind::Cell))
}

/// The help text of a magic named as a user would name it (`px`, `%px`, `%%px`).
pub fn help_for(name: &str) -> Option<String> {
    lookup_any(name).map(MagicSpec::help)
}

/// The `%lsmagic` listing.
pub fn listing() -> String {
    let mut text = String::from("Available magics:\n");
    for kind in [MagicKind::Line, MagicKind::Cell] {
        for magic in MAGICS.iter().filter(|m| m.kind == kind) {
            let name = format!("{}{}", magic.sigil(), magic.name);
            text.push_str(&format!("  {name:<14}{}\n", magic.summary));
        }
    }
    text.push_str("\nUse `%magic NAME` or `%NAME?` for the details of one magic.\n");
    text
}

/// Why a magic could not be parsed. Its `Display` is what the user sees: the problem, then the
/// usage of the magic when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MagicError {
    pub message: String,
    pub usage: Option<&'static str>,
}

impl MagicError {
    fn new(message: impl Into<String>, usage: Option<&'static str>) -> Self {
        MagicError {
            message: message.into(),
            usage,
        }
    }
}

impl fmt::Display for MagicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(usage) = self.usage {
            write!(f, "\nUsage: {usage}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MagicError {}

/// One piece of a cell, in the order it appears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Rust code (and evcxr colon commands) to evaluate as one unit.
    Rust(String),
    /// A `%` line magic, without its newline.
    LineMagic(String),
    /// A `%%` cell magic: its first line, and the rest of the cell as its body.
    CellMagic { line: String, body: String },
}

/// Splits a cell into Rust code and magics. A cell whose first non-blank line starts with `%%`
/// is one cell magic. Otherwise every line that starts with `%` outside any bracket, string or
/// comment is a line magic, and the Rust between magic lines is kept together.
pub fn split_cell(cell: &str) -> Vec<Segment> {
    let trimmed = cell.trim_start();
    if trimmed.starts_with("%%") {
        let (line, body) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
        return vec![Segment::CellMagic {
            line: line.trim_end().to_owned(),
            body: body.to_owned(),
        }];
    }
    let starts = scan::scan(cell).line_starts_top_level;
    let mut segments = Vec::new();
    let mut rust = String::new();
    for (index, line) in cell.split('\n').enumerate() {
        let top_level = starts.get(index).copied().unwrap_or(false);
        if top_level && line.trim_start().starts_with('%') {
            if !rust.trim().is_empty() {
                segments.push(Segment::Rust(std::mem::take(&mut rust)));
            }
            rust.clear();
            segments.push(Segment::LineMagic(line.trim().to_owned()));
        } else {
            if !rust.is_empty() {
                rust.push('\n');
            }
            rust.push_str(line);
        }
    }
    if !rust.trim().is_empty() {
        segments.push(Segment::Rust(rust));
    }
    segments
}

/// The cell with every line that is not Rust (magic lines, evcxr `:` commands, `!` shell
/// lines) blanked out with spaces, so that byte offsets into the cell stay valid for tools that
/// only understand Rust (the parser, rust-analyzer).
pub fn blank_non_rust(cell: &str) -> String {
    let starts = scan::scan(cell).line_starts_top_level;
    cell.split('\n')
        .enumerate()
        .map(|(i, line)| {
            let head = line.trim_start();
            let top = starts.get(i).copied().unwrap_or(false);
            if top && (head.starts_with('%') || head.starts_with(':') || head.starts_with('!')) {
                " ".repeat(line.len())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses one magic line (`%name args`) or the first line of a cell magic (`%%name args`) with
/// its body.
pub fn parse(line: &str, body: Option<&str>) -> Result<Command, MagicError> {
    let (kind, rest) = match line.trim().strip_prefix("%%") {
        Some(rest) => (MagicKind::Cell, rest),
        None => match line.trim().strip_prefix('%') {
            Some(rest) => (MagicKind::Line, rest),
            None => {
                return Err(MagicError::new(
                    format!("not a magic: `{}` does not start with %", line.trim()),
                    None,
                ))
            }
        },
    };
    let (name, args) = match rest.find(char::is_whitespace) {
        Some(at) => (&rest[..at], rest[at..].trim()),
        None => (rest, ""),
    };
    if name.is_empty() {
        return Err(MagicError::new(
            "a magic needs a name after the % sign; `%lsmagic` lists them",
            None,
        ));
    }
    if let Some(asked) = name.strip_suffix('?') {
        return if lookup_any(asked).is_some() && args.is_empty() {
            Ok(Command::Help {
                name: asked.to_owned(),
            })
        } else {
            Err(unknown(asked, kind))
        };
    }
    let spec = lookup(name, kind).ok_or_else(|| unknown(name, kind))?;
    let words = split_words(args).map_err(|e| MagicError::new(e, Some(spec.usage)))?;
    match spec.name {
        "lsmagic" => {
            no_arguments(spec, &words)?;
            Ok(Command::Lsmagic)
        }
        "cluster" => cluster::parse_cluster(args)
            .map(Command::Cluster)
            .map_err(|e| MagicError::new(e, Some(spec.usage))),
        "px" => px_command(spec, kind, args, body),
        "pxresult" => {
            no_arguments(spec, &words)?;
            Ok(Command::PxResult)
        }
        "autopx" => {
            no_arguments(spec, &words)?;
            Ok(Command::Autopx)
        }
        "pxconfig" => pxconfig_command(spec, args),
        "pmap" => {
            let body = if kind == MagicKind::Cell {
                Some(body.unwrap_or(""))
            } else {
                None
            };
            data::parse_pmap(args, body)
                .map(Command::Pmap)
                .map_err(|e| MagicError::new(e, Some(spec.usage)))
        }
        "scatter" | "push" => {
            let movement = if spec.name == "scatter" {
                Movement::Scatter
            } else {
                Movement::Push
            };
            data::parse_send(movement, args)
                .map(Command::Distribute)
                .map_err(|e| MagicError::new(e, Some(spec.usage)))
        }
        "gather" | "pull" => {
            let movement = if spec.name == "gather" {
                Movement::Gather
            } else {
                Movement::Pull
            };
            data::parse_fetch(movement, &words)
                .map(Command::Collect)
                .map_err(|e| MagicError::new(e, Some(spec.usage)))
        }
        "dashboard" => match words.as_slice() {
            [] => Ok(Command::Dashboard { stop: false }),
            [flag] if flag == "--stop" => Ok(Command::Dashboard { stop: true }),
            other => Err(MagicError::new(
                format!("%dashboard takes only --stop, not `{}`", other.join(" ")),
                Some(spec.usage),
            )),
        },
        "cache" => cache::parse_cache(&words)
            .map(Command::Cache)
            .map_err(|e| MagicError::new(e, Some(spec.usage))),
        "magic" => help_command(spec, &words),
        other => unreachable!("magic `{other}` is registered but has no parser"),
    }
}

/// `%px CODE` or `%%px` with the code in the cell's body.
fn px_command(
    spec: &MagicSpec,
    kind: MagicKind,
    args: &str,
    body: Option<&str>,
) -> Result<Command, MagicError> {
    let (flags, code) =
        px::parse_px_flags(args).map_err(|e| MagicError::new(e, Some(spec.usage)))?;
    let code = match (kind, body) {
        (MagicKind::Cell, Some(body)) => {
            if !code.trim().is_empty() {
                return Err(MagicError::new(
                    format!(
                        "%%px takes only flags on its first line, not `{}`",
                        code.trim()
                    ),
                    Some(spec.usage),
                ));
            }
            body
        }
        _ => code,
    };
    if code.trim().is_empty() {
        return Err(MagicError::new(
            "no code to run on the engines",
            Some(spec.usage),
        ));
    }
    Ok(Command::Px {
        flags,
        code: code.to_owned(),
    })
}

fn pxconfig_command(spec: &MagicSpec, args: &str) -> Result<Command, MagicError> {
    let (flags, rest) =
        px::parse_px_flags(args).map_err(|e| MagicError::new(e, Some(spec.usage)))?;
    if !rest.trim().is_empty() {
        return Err(MagicError::new(
            format!("%pxconfig takes only flags, not `{}`", rest.trim()),
            Some(spec.usage),
        ));
    }
    Ok(Command::PxConfig { flags })
}

/// `%magic NAME`: one magic's help.
fn help_command(spec: &MagicSpec, words: &[String]) -> Result<Command, MagicError> {
    match words {
        [name] if lookup_any(name).is_some() => Ok(Command::Help { name: name.clone() }),
        [name] => Err(MagicError::new(
            format!("no magic named `{name}`; `%lsmagic` lists them"),
            Some(spec.usage),
        )),
        [] => Err(MagicError::new(
            "%magic needs the name of a magic",
            Some(spec.usage),
        )),
        _ => Err(MagicError::new(
            "%magic takes exactly one name",
            Some(spec.usage),
        )),
    }
}

fn no_arguments(spec: &MagicSpec, words: &[String]) -> Result<(), MagicError> {
    if words.is_empty() {
        Ok(())
    } else {
        Err(MagicError::new(
            format!(
                "%{} takes no arguments, got `{}`",
                spec.name,
                words.join(" ")
            ),
            Some(spec.usage),
        ))
    }
}

fn unknown(name: &str, kind: MagicKind) -> MagicError {
    let sigil = match kind {
        MagicKind::Line => "%",
        MagicKind::Cell => "%%",
    };
    let other = match kind {
        MagicKind::Line => lookup(name, MagicKind::Cell).map(|_| {
            format!(" (there is a cell magic %%{name}: put it on the first line of the cell)")
        }),
        MagicKind::Cell => {
            lookup(name, MagicKind::Line).map(|_| format!(" (there is a line magic %{name})"))
        }
    };
    MagicError::new(
        format!(
            "unknown magic {sigil}{name}{}; `%lsmagic` lists the available magics",
            other.unwrap_or_default()
        ),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsmagic_parses_and_lists_every_magic() {
        assert_eq!(parse("%lsmagic", None), Ok(Command::Lsmagic));
        let listing = listing();
        for magic in MAGICS {
            assert!(listing.contains(magic.name), "{listing}");
        }
    }

    #[test]
    fn lsmagic_rejects_arguments_with_usage() {
        let err = parse("%lsmagic now", None).unwrap_err();
        assert!(err.message.contains("takes no arguments"), "{err}");
        assert_eq!(err.usage, Some("%lsmagic"));
        assert!(err.to_string().contains("Usage: %lsmagic"));
    }

    #[test]
    fn help_forms() {
        let expected = Ok(Command::Help {
            name: "lsmagic".into(),
        });
        assert_eq!(parse("%magic lsmagic", None), expected);
        assert_eq!(
            parse("%magic %lsmagic", None),
            Ok(Command::Help {
                name: "%lsmagic".into()
            })
        );
        assert_eq!(parse("%lsmagic?", None), expected);
        assert!(help_for("%lsmagic").unwrap().starts_with("Usage: %lsmagic"));
        assert!(help_for("nope").is_none());
    }

    #[test]
    fn magic_errors_carry_usage() {
        let missing = parse("%magic", None).unwrap_err();
        assert!(missing.message.contains("needs the name"));
        assert_eq!(missing.usage, Some("%magic NAME"));
        let too_many = parse("%magic a b", None).unwrap_err();
        assert!(too_many.message.contains("exactly one"));
        let unknown_name = parse("%magic frobnicate", None).unwrap_err();
        assert!(unknown_name.message.contains("no magic named `frobnicate`"));
        assert_eq!(unknown_name.usage, Some("%magic NAME"));
    }

    #[test]
    fn unknown_and_malformed_magics() {
        let err = parse("%frobnicate 1 2", None).unwrap_err();
        assert!(err.message.contains("unknown magic %frobnicate"), "{err}");
        assert!(err.message.contains("%lsmagic"));
        let err = parse("%%lsmagic", Some("")).unwrap_err();
        assert!(err.message.contains("unknown magic %%lsmagic"), "{err}");
        assert!(err.message.contains("line magic %lsmagic"), "{err}");
        let err = parse("%", None).unwrap_err();
        assert!(err.message.contains("needs a name"));
        let err = parse("%   ", None).unwrap_err();
        assert!(err.message.contains("needs a name"));
        let err = parse("%nope?", None).unwrap_err();
        assert!(err.message.contains("unknown magic %nope"));
        let err = parse("lsmagic", None).unwrap_err();
        assert!(err.message.contains("does not start with %"));
        let err = parse("%magic \"unclosed", None).unwrap_err();
        assert!(err.message.contains("unclosed quote"), "{err}");
        assert_eq!(err.usage, Some("%magic NAME"));
    }

    #[test]
    fn px_line_and_cell() {
        assert_eq!(
            parse("%px --targets 1:3 let a = 1;", None),
            Ok(Command::Px {
                flags: PxFlags {
                    targets: Some(Targets::Slice {
                        start: Some(1),
                        stop: Some(3),
                        step: None
                    }),
                    ..PxFlags::default()
                },
                code: "let a = 1;".into(),
            })
        );
        assert_eq!(
            parse("%%px --noblock", Some("let a = 1;\na")),
            Ok(Command::Px {
                flags: PxFlags {
                    block: Some(false),
                    ..PxFlags::default()
                },
                code: "let a = 1;\na".into(),
            })
        );
    }

    #[test]
    fn px_errors_print_usage() {
        for (line, body, expected) in [
            ("%px", None, "no code"),
            ("%px --targets", None, "needs a target list"),
            ("%px --frobnicate 1", None, "unknown flag --frobnicate"),
            ("%%px", Some("  \n"), "no code"),
            ("%%px let a = 1;", Some("a"), "only flags"),
            ("%px -t x 1", None, "bad engine id"),
        ] {
            let err = parse(line, body).unwrap_err();
            assert!(err.message.contains(expected), "{line}: {err}");
            assert!(err.usage.is_some_and(|u| u.contains("px")), "{line}: {err}");
        }
    }

    #[test]
    fn other_parallel_magics() {
        assert_eq!(parse("%pxresult", None), Ok(Command::PxResult));
        assert_eq!(parse("%autopx", None), Ok(Command::Autopx));
        assert_eq!(
            parse("%cluster start -n 2", None),
            Ok(Command::Cluster(ClusterCommand::Start(LaunchOptions {
                engines: Some(2),
                ..LaunchOptions::default()
            })))
        );
        assert_eq!(
            parse("%pxconfig --noblock", None),
            Ok(Command::PxConfig {
                flags: PxFlags {
                    block: Some(false),
                    ..PxFlags::default()
                }
            })
        );
        for (line, expected) in [
            ("%pxresult 3", "takes no arguments"),
            ("%autopx on", "takes no arguments"),
            ("%cluster", "needs a subcommand"),
            ("%cluster start -n -2", "positive"),
            ("%pxconfig --targets 1 extra", "only flags"),
            ("%pxconfig --bogus", "unknown flag"),
        ] {
            let err = parse(line, None).unwrap_err();
            assert!(err.message.contains(expected), "{line}: {err}");
            assert!(err.usage.is_some(), "{line}");
        }
    }

    #[test]
    fn data_magics_dispatch_and_print_usage() {
        assert!(matches!(
            parse("%%pmap -o sq 0..10u64", Some("|x: u64| x * x")),
            Ok(Command::Pmap(Pmap { ref func, .. })) if func == "|x: u64| x * x"
        ));
        assert!(matches!(
            parse("%pmap f 0..3", None),
            Ok(Command::Pmap(Pmap { ref input, .. })) if input == "0..3"
        ));
        assert!(matches!(
            parse("%scatter x = v", None),
            Ok(Command::Distribute(Distribute {
                movement: Movement::Scatter,
                ..
            }))
        ));
        assert!(matches!(
            parse("%push x = v", None),
            Ok(Command::Distribute(Distribute {
                movement: Movement::Push,
                ..
            }))
        ));
        assert!(matches!(
            parse("%gather x", None),
            Ok(Command::Collect(Collect {
                movement: Movement::Gather,
                ..
            }))
        ));
        assert!(matches!(
            parse("%pull x -o y", None),
            Ok(Command::Collect(Collect {
                movement: Movement::Pull,
                ..
            }))
        ));
        for (line, usage) in [
            ("%pmap", "%pmap ["),
            ("%scatter x", "%scatter ["),
            ("%gather", "%gather ["),
            ("%push = 1", "%push ["),
            ("%pull a b", "%pull ["),
        ] {
            let err = parse(line, None).unwrap_err();
            assert!(
                err.usage.is_some_and(|u| u.starts_with(usage)),
                "{line}: {err}"
            );
        }
        assert!(help_for("%%pmap").unwrap().contains("--skip-errors"));
        assert_eq!(
            parse("%dashboard", None),
            Ok(Command::Dashboard { stop: false })
        );
        assert_eq!(
            parse("%dashboard --stop", None),
            Ok(Command::Dashboard { stop: true })
        );
        let err = parse("%dashboard now", None).unwrap_err();
        assert!(err.message.contains("only --stop"), "{err}");
    }

    #[test]
    fn split_keeps_rust_together_and_finds_magic_lines() {
        let cell = "let a = 1;\nlet b = 2;\n%lsmagic\nprintln!(\"{}\", a + b);";
        assert_eq!(
            split_cell(cell),
            vec![
                Segment::Rust("let a = 1;\nlet b = 2;".into()),
                Segment::LineMagic("%lsmagic".into()),
                Segment::Rust("println!(\"{}\", a + b);".into()),
            ]
        );
    }

    #[test]
    fn split_ignores_percent_inside_code() {
        let cell = "let s = \"\n%not a magic\";\nlet r = (10\n% 3);";
        assert_eq!(split_cell(cell), vec![Segment::Rust(cell.into())]);
    }

    #[test]
    fn split_cell_magic_takes_the_whole_cell() {
        let cell = "\n%%px --targets 0\nlet a = 1;\n%lsmagic";
        assert_eq!(
            split_cell(cell),
            vec![Segment::CellMagic {
                line: "%%px --targets 0".into(),
                body: "let a = 1;\n%lsmagic".into(),
            }]
        );
    }

    #[test]
    fn blanking_keeps_offsets() {
        let cell = "let a = 1;\n%lsmagic\n:dep x = \"1\"\na";
        let blanked = blank_non_rust(cell);
        assert_eq!(blanked.len(), cell.len());
        assert_eq!(
            blanked,
            format!("let a = 1;\n{}\n{}\na", " ".repeat(8), " ".repeat(12))
        );
        let nested = "let s = \"\n%inside\";";
        assert_eq!(blank_non_rust(nested), nested);
    }

    #[test]
    fn split_plain_rust_and_empty() {
        assert_eq!(split_cell("1 + 1"), vec![Segment::Rust("1 + 1".into())]);
        assert!(split_cell("  \n").is_empty());
    }
}
