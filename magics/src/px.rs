//! The parallel magics' arguments: engine targets and `%px` flags.

use crate::words::leading_flags;
use std::fmt;

/// Which engines a command addresses, as ipyparallel writes it: `all`, `3`, `0,2`, `1:3`, `::2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    All,
    /// Explicit engine ids.
    Ids(Vec<u32>),
    /// A Python-style slice over the engines in id order.
    Slice {
        start: Option<i64>,
        stop: Option<i64>,
        step: Option<i64>,
    },
}

impl Targets {
    pub fn parse(text: &str) -> Result<Targets, String> {
        let text = text.trim();
        if text == "all" {
            return Ok(Targets::All);
        }
        if text.contains(':') {
            let parts: Vec<&str> = text.split(':').collect();
            if parts.len() > 3 {
                return Err(format!("bad target slice `{text}`"));
            }
            let number = |s: &str| -> Result<Option<i64>, String> {
                let s = s.trim();
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse()
                        .map(Some)
                        .map_err(|_| format!("bad number `{s}` in target slice `{text}`"))
                }
            };
            let step = number(parts.get(2).copied().unwrap_or(""))?;
            if step == Some(0) {
                return Err(format!("target slice `{text}` has a step of 0"));
            }
            return Ok(Targets::Slice {
                start: number(parts[0])?,
                stop: number(parts[1])?,
                step,
            });
        }
        let ids = text
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("bad engine id `{}` in targets `{text}`", s.trim()))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        Ok(Targets::Ids(ids))
    }

    /// The engines selected out of `engines` (ids in ascending order). Unknown explicit ids are
    /// an error, so that a typo does not silently run on fewer engines.
    pub fn select(&self, engines: &[u32]) -> Result<Vec<u32>, String> {
        match self {
            Targets::All => Ok(engines.to_vec()),
            Targets::Ids(ids) => {
                let missing: Vec<String> = ids
                    .iter()
                    .filter(|id| !engines.contains(id))
                    .map(u32::to_string)
                    .collect();
                if missing.is_empty() {
                    Ok(ids.clone())
                } else {
                    Err(format!("no engine with id {}", missing.join(", ")))
                }
            }
            Targets::Slice { start, stop, step } => {
                let n = engines.len() as i64;
                let step = step.unwrap_or(1);
                let clamp = |v: i64, low: i64, high: i64| v.clamp(low, high);
                let resolve = |v: i64| if v < 0 { v + n } else { v };
                let mut picked = Vec::new();
                if step > 0 {
                    let mut i = clamp(start.map_or(0, resolve), 0, n);
                    let end = clamp(stop.map_or(n, resolve), 0, n);
                    while i < end {
                        picked.push(engines[i as usize]);
                        i += step;
                    }
                } else {
                    let mut i = clamp(start.map_or(n - 1, resolve), -1, n - 1);
                    let end = clamp(stop.map_or(-1, resolve), -1, n - 1);
                    while i > end {
                        picked.push(engines[i as usize]);
                        i += step;
                    }
                }
                Ok(picked)
            }
        }
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Targets::All => write!(f, "all"),
            Targets::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                write!(f, "{}", ids.join(","))
            }
            Targets::Slice { start, stop, step } => {
                let show = |v: &Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
                write!(f, "{}:{}", show(start), show(stop))?;
                if step.is_some() {
                    write!(f, ":{}", show(step))?;
                }
                Ok(())
            }
        }
    }
}

/// How the outputs of a finished `%px` cell are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupOutputs {
    /// As they arrive, streamed live (the default).
    #[default]
    Order,
    /// All of engine 0's outputs, then engine 1's, and so on.
    Engine,
    /// All stdout, then all stderr, then the results.
    Type,
}

impl GroupOutputs {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "order" => Ok(GroupOutputs::Order),
            "engine" => Ok(GroupOutputs::Engine),
            "type" => Ok(GroupOutputs::Type),
            other => Err(format!(
                "--group-outputs takes engine, order or type, not `{other}`"
            )),
        }
    }
}

/// `%px` flags as written; `None` means "use the %pxconfig default".
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PxFlags {
    pub targets: Option<Targets>,
    pub block: Option<bool>,
    pub timeout: Option<f64>,
    pub group_outputs: Option<GroupOutputs>,
    pub local: Option<bool>,
    /// Seconds before a blocking cell shows its progress block; negative: never.
    pub progress_after: Option<f64>,
}

impl PxFlags {
    /// These flags over `defaults`: what is set here wins.
    pub fn over(&self, defaults: &PxFlags) -> PxFlags {
        PxFlags {
            targets: self.targets.clone().or_else(|| defaults.targets.clone()),
            block: self.block.or(defaults.block),
            timeout: self.timeout.or(defaults.timeout),
            group_outputs: self.group_outputs.or(defaults.group_outputs),
            local: self.local.or(defaults.local),
            progress_after: self.progress_after.or(defaults.progress_after),
        }
    }
}

/// Reads leading `%px`-style flags from `args`. Returns the flags and the rest of the text,
/// untouched (it is Rust code for `%px`). `--` ends the flags.
pub fn parse_px_flags(args: &str) -> Result<(PxFlags, &str), String> {
    let mut flags = PxFlags::default();
    let rest = leading_flags(args, |name, value| {
        match name {
            "--targets" | "-t" => flags.targets = Some(Targets::parse(&value("a target list")?)?),
            "--block" => flags.block = Some(true),
            "--noblock" => flags.block = Some(false),
            "--timeout" => {
                let text = value("a number of seconds")?;
                let secs: f64 = text
                    .parse()
                    .map_err(|_| format!("--timeout takes seconds, not `{text}`"))?;
                if !(secs > 0.0 && secs.is_finite()) {
                    return Err(format!("--timeout must be positive, not `{text}`"));
                }
                flags.timeout = Some(secs);
            }
            "--group-outputs" => {
                flags.group_outputs = Some(GroupOutputs::parse(&value("engine, order or type")?)?)
            }
            "--local" => flags.local = Some(true),
            "--no-local" => flags.local = Some(false),
            "--progress-after" => {
                let text = value("a number of seconds")?;
                let secs: f64 = text
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite())
                    .ok_or_else(|| {
                        format!("--progress-after takes seconds (-1: never), not `{text}`")
                    })?;
                flags.progress_after = Some(secs);
            }
            other => return Err(format!("unknown flag {other}")),
        }
        Ok(())
    })?;
    Ok((flags, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINES: &[u32] = &[0, 1, 2, 3];

    #[test]
    fn target_forms() {
        assert_eq!(
            Targets::parse("all").unwrap().select(ENGINES).unwrap(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(
            Targets::parse("3").unwrap().select(ENGINES).unwrap(),
            vec![3]
        );
        assert_eq!(
            Targets::parse("0,2").unwrap().select(ENGINES).unwrap(),
            vec![0, 2]
        );
        assert_eq!(
            Targets::parse("1:3").unwrap().select(ENGINES).unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            Targets::parse("::2").unwrap().select(ENGINES).unwrap(),
            vec![0, 2]
        );
        assert_eq!(
            Targets::parse("-2:").unwrap().select(ENGINES).unwrap(),
            vec![2, 3]
        );
        assert_eq!(
            Targets::parse("::-1").unwrap().select(ENGINES).unwrap(),
            vec![3, 2, 1, 0]
        );
        assert_eq!(
            Targets::parse("5:").unwrap().select(ENGINES).unwrap(),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn target_errors() {
        assert!(Targets::parse("a,b")
            .unwrap_err()
            .contains("bad engine id `a`"));
        assert!(Targets::parse("1:2:3:4")
            .unwrap_err()
            .contains("bad target slice"));
        assert!(Targets::parse("::0").unwrap_err().contains("step of 0"));
        assert!(Targets::parse("x:").unwrap_err().contains("bad number `x`"));
        let err = Targets::parse("1,7").unwrap().select(ENGINES).unwrap_err();
        assert_eq!(err, "no engine with id 7");
    }

    #[test]
    fn px_flags_then_code() {
        let (flags, code) = parse_px_flags("--targets 0,2 --noblock println!(\"a b\")").unwrap();
        assert_eq!(flags.targets, Some(Targets::Ids(vec![0, 2])));
        assert_eq!(flags.block, Some(false));
        assert_eq!(code, "println!(\"a b\")");
        let (flags, code) =
            parse_px_flags("-t ::2 --timeout=1.5 --group-outputs engine --local x").unwrap();
        assert_eq!(flags.timeout, Some(1.5));
        assert_eq!(flags.group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(flags.local, Some(true));
        assert_eq!(code, "x");
        let (flags, code) = parse_px_flags("-- --x").unwrap();
        assert_eq!(flags, PxFlags::default());
        assert_eq!(code, "--x");
        let (_, code) = parse_px_flags("-1 + 2").unwrap();
        assert_eq!(code, "-1 + 2");
    }

    #[test]
    fn px_flag_errors() {
        assert_eq!(
            parse_px_flags("--bogus x").unwrap_err(),
            "unknown flag --bogus"
        );
        assert_eq!(
            parse_px_flags("--targets").unwrap_err(),
            "--targets needs a target list"
        );
        assert!(parse_px_flags("--timeout soon x")
            .unwrap_err()
            .contains("seconds"));
        assert!(parse_px_flags("--timeout -1 x")
            .unwrap_err()
            .contains("positive"));
        assert!(parse_px_flags("--group-outputs color x")
            .unwrap_err()
            .contains("engine, order or type"));
        assert!(parse_px_flags("-t x,y 1")
            .unwrap_err()
            .contains("bad engine id"));
    }

    #[test]
    fn flags_over_defaults() {
        let defaults = PxFlags {
            block: Some(false),
            timeout: Some(3.0),
            ..PxFlags::default()
        };
        let flags = PxFlags {
            block: Some(true),
            ..PxFlags::default()
        };
        let merged = flags.over(&defaults);
        assert_eq!(merged.block, Some(true));
        assert_eq!(merged.timeout, Some(3.0));
        let (never, code) = parse_px_flags("--progress-after -1 x").expect("parses");
        assert_eq!((never.progress_after, code), (Some(-1.0), "x"));
        assert!(parse_px_flags("--progress-after soon x")
            .unwrap_err()
            .contains("--progress-after takes seconds"));
    }
}
