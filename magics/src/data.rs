//! The data magics' arguments: `%pmap` and `%%pmap`, and `%scatter`, `%gather`, `%push`,
//! `%pull`.

use crate::px::Targets;
use crate::words::{leading_flags, split_word};

/// The variable `%pmap` stores its results in when `-o` is not given.
pub const DEFAULT_PMAP_OUT: &str = "pmap_out";

/// `%pmap` flags.
#[derive(Debug, Clone, PartialEq)]
pub struct PmapFlags {
    /// The notebook variable that receives the results.
    pub out: String,
    /// Items per chunk; `None` picks it from the measured cost of an item.
    pub chunk: Option<u64>,
    pub targets: Option<Targets>,
    /// Results in completion order instead of input order.
    pub unordered: bool,
    pub timeout: Option<f64>,
    /// Go on past panicking items and report their indices.
    pub skip_errors: bool,
}

impl Default for PmapFlags {
    fn default() -> Self {
        PmapFlags {
            out: DEFAULT_PMAP_OUT.to_owned(),
            chunk: None,
            targets: None,
            unordered: false,
            timeout: None,
            skip_errors: false,
        }
    }
}

/// A parsed `%pmap FUNC INPUT` or `%%pmap INPUT` with a closure body.
#[derive(Debug, Clone, PartialEq)]
pub struct Pmap {
    pub flags: PmapFlags,
    /// What the engines call for each item: a function's name, or the cell's closure.
    pub func: String,
    /// A Rust expression of the notebook's context that yields the items.
    pub input: String,
}

/// Which way values go, and whether they are split (`%scatter`, `%gather`) or whole (`%push`,
/// `%pull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    Scatter,
    Push,
    Gather,
    Pull,
}

/// `%scatter NAME = EXPR` and `%push NAME = EXPR`: the notebook's `EXPR` to the engines' `NAME`.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribute {
    pub movement: Movement,
    pub targets: Option<Targets>,
    pub name: String,
    pub expr: String,
}

/// `%gather NAME [-o LOCAL]` and `%pull NAME [-o LOCAL]`: the engines' `NAME` to the notebook's
/// `LOCAL` (by default `NAME`).
#[derive(Debug, Clone, PartialEq)]
pub struct Collect {
    pub movement: Movement,
    pub targets: Option<Targets>,
    pub name: String,
    pub local: String,
}

fn targets_flag(
    name: &str,
    value: &mut dyn FnMut(&str) -> Result<String, String>,
    targets: &mut Option<Targets>,
) -> Result<bool, String> {
    if name == "--targets" || name == "-t" {
        *targets = Some(Targets::parse(&value("a target list")?)?);
        return Ok(true);
    }
    Ok(false)
}

/// A Rust identifier that can name a variable.
fn check_identifier(name: &str, what: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
    if starts_well && chars.all(|c| c.is_alphanumeric() || c == '_') && name != "_" {
        Ok(())
    } else {
        Err(format!("{what} must be a Rust variable name, not `{name}`"))
    }
}

/// Parses `%pmap`'s arguments. `body` is the cell form's closure.
pub fn parse_pmap(args: &str, body: Option<&str>) -> Result<Pmap, String> {
    let mut flags = PmapFlags::default();
    let rest = leading_flags(args, |name, value| {
        if targets_flag(name, value, &mut flags.targets)? {
            return Ok(());
        }
        match name {
            "--out" | "-o" => {
                let out = value("a variable name")?;
                check_identifier(&out, "-o")?;
                flags.out = out;
            }
            "--chunk" => {
                let text = value("a number of items")?;
                match text.parse::<u64>() {
                    Ok(n) if n > 0 => flags.chunk = Some(n),
                    _ => return Err(format!("--chunk takes a positive number, not `{text}`")),
                }
            }
            "--unordered" => flags.unordered = true,
            "--skip-errors" => flags.skip_errors = true,
            "--timeout" => {
                let text = value("a number of seconds")?;
                match text.parse::<f64>() {
                    Ok(secs) if secs > 0.0 && secs.is_finite() => flags.timeout = Some(secs),
                    _ => return Err(format!("--timeout takes positive seconds, not `{text}`")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
        Ok(())
    })?;
    let (func, input) = match body {
        Some(body) => {
            if body.trim().is_empty() {
                return Err("%%pmap needs a closure in the cell, such as `|x: u64| x * x`".into());
            }
            (body.trim().to_owned(), rest.trim().to_owned())
        }
        None => {
            let (func, input) = split_word(rest);
            if func.is_empty() {
                return Err("%pmap needs a function and an input".into());
            }
            if func.starts_with('|') {
                return Err(
                    "put a closure in a %%pmap cell, or define it with %%px and name it".into(),
                );
            }
            (func.to_owned(), input.trim().to_owned())
        }
    };
    if input.is_empty() {
        return Err("%pmap needs an input: a Rust expression that yields the items".into());
    }
    Ok(Pmap { flags, func, input })
}

/// Parses `%scatter` or `%push`: `[-t T] NAME = EXPR`.
pub fn parse_send(movement: Movement, args: &str) -> Result<Distribute, String> {
    let mut targets = None;
    let rest = leading_flags(args, |name, value| {
        if targets_flag(name, value, &mut targets)? {
            Ok(())
        } else {
            Err(format!("unknown flag {name}"))
        }
    })?;
    let Some((name, expr)) = rest.split_once('=') else {
        return Err("expected NAME = EXPR".into());
    };
    let (name, expr) = (name.trim(), expr.trim());
    if expr.starts_with('=') {
        return Err("expected NAME = EXPR, not a comparison".into());
    }
    check_identifier(name, "NAME")?;
    if expr.is_empty() {
        return Err(format!("no expression to give `{name}`"));
    }
    Ok(Distribute {
        movement,
        targets,
        name: name.to_owned(),
        expr: expr.to_owned(),
    })
}

/// Parses `%gather` or `%pull`: `NAME [-o LOCAL]`, flags anywhere.
pub fn parse_fetch(movement: Movement, words: &[String]) -> Result<Collect, String> {
    let mut targets = None;
    let mut local = None;
    let mut names = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) if flag.starts_with('-') => (flag, Some(value.to_owned())),
            _ => (word.as_str(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| words.next().cloned())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag {
            "--targets" | "-t" => targets = Some(Targets::parse(&value("a target list")?)?),
            "--out" | "-o" => {
                let name = value("a variable name")?;
                check_identifier(&name, "-o")?;
                local = Some(name);
            }
            other if other.starts_with('-') => return Err(format!("unknown flag {other}")),
            name => names.push(name.to_owned()),
        }
    }
    let name = match names.as_slice() {
        [name] => name.clone(),
        [] => return Err("which engine variable? give its NAME".into()),
        _ => return Err(format!("expected one NAME, got `{}`", names.join(" "))),
    };
    check_identifier(&name, "NAME")?;
    Ok(Collect {
        movement,
        targets,
        local: local.unwrap_or_else(|| name.clone()),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn pmap_line_form() {
        let pmap = parse_pmap("square 0..1000u64", None).unwrap();
        assert_eq!(pmap.func, "square");
        assert_eq!(pmap.input, "0..1000u64");
        assert_eq!(pmap.flags, PmapFlags::default());
        let pmap = parse_pmap(
            "-o out --chunk 10 -t 0,1 --unordered --timeout 2.5 --skip-errors f v.iter().map(|x| x + 1)",
            None,
        )
        .unwrap();
        assert_eq!(pmap.flags.out, "out");
        assert_eq!(pmap.flags.chunk, Some(10));
        assert_eq!(pmap.flags.targets, Some(Targets::Ids(vec![0, 1])));
        assert!(pmap.flags.unordered && pmap.flags.skip_errors);
        assert_eq!(pmap.flags.timeout, Some(2.5));
        assert_eq!(pmap.input, "v.iter().map(|x| x + 1)");
    }

    #[test]
    fn pmap_cell_form_takes_the_closure_from_the_body() {
        let pmap = parse_pmap("-o squares 0..1000u64", Some("|x: u64| x * x\n")).unwrap();
        assert_eq!(pmap.func, "|x: u64| x * x");
        assert_eq!(pmap.input, "0..1000u64");
        assert_eq!(pmap.flags.out, "squares");
        let pmap = parse_pmap("-5..5i64", Some("|x: i64| x")).unwrap();
        assert_eq!(pmap.input, "-5..5i64");
    }

    #[test]
    fn pmap_errors() {
        for (args, body, expected) in [
            ("", None, "needs a function"),
            ("f", None, "needs an input"),
            ("--chunk 0 f v", None, "positive number"),
            ("--chunk x f v", None, "positive number"),
            ("-o 1x f v", None, "variable name"),
            ("--timeout -1 f v", None, "positive seconds"),
            ("--bogus f v", None, "unknown flag --bogus"),
            ("|x| x 0..3", None, "%%pmap"),
            ("0..3", Some("  "), "needs a closure"),
            ("", Some("|x: u64| x"), "needs an input"),
        ] {
            let err = parse_pmap(args, body).unwrap_err();
            assert!(err.contains(expected), "{args}: {err}");
        }
    }

    #[test]
    fn send_forms() {
        let send = parse_send(
            Movement::Scatter,
            "-t 1: data = (0..10u64).collect::<Vec<_>>()",
        )
        .unwrap();
        assert_eq!(send.name, "data");
        assert_eq!(send.expr, "(0..10u64).collect::<Vec<_>>()");
        assert!(send.targets.is_some());
        let err = parse_send(Movement::Push, "k == b").unwrap_err();
        assert!(err.contains("comparison"), "{err}");
        let ok = parse_send(Movement::Push, "k = (a == b)").unwrap();
        assert_eq!(ok.expr, "(a == b)");
        for (args, expected) in [
            ("x", "NAME = EXPR"),
            ("x =", "no expression"),
            ("1x = 2", "variable name"),
            ("--bogus x = 1", "unknown flag"),
        ] {
            let err = parse_send(Movement::Push, args).unwrap_err();
            assert!(err.contains(expected), "{args}: {err}");
        }
    }

    #[test]
    fn fetch_forms() {
        let fetch = parse_fetch(Movement::Gather, &words("part -o whole -t ::2")).unwrap();
        assert_eq!(
            (fetch.name.as_str(), fetch.local.as_str()),
            ("part", "whole")
        );
        assert!(fetch.targets.is_some());
        let fetch = parse_fetch(Movement::Pull, &words("x")).unwrap();
        assert_eq!(fetch.local, "x");
        for (args, expected) in [
            ("", "give its NAME"),
            ("a b", "one NAME"),
            ("a -o", "needs a variable name"),
            ("a --frob", "unknown flag"),
            ("a.b", "variable name"),
        ] {
            let err = parse_fetch(Movement::Pull, &words(args)).unwrap_err();
            assert!(err.contains(expected), "{args}: {err}");
        }
    }
}
