//! The answer to `is_complete_request`: is a cell finished, does it need more lines, or can no
//! more input make it valid Rust? `jupyter console` asks after every Enter and gives up on a
//! kernel that takes over a second, so this is pure syntax: no evcxr, no compilation.

use parallax_magics::scan;
use ra_ap_syntax::{Edition, SourceFile};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    Complete,
    /// More input is needed; the indent suggested for the next line.
    Incomplete(String),
    Invalid,
}

const WRAPPER_OPEN: &str = "fn __parallax_cell() {\n";

pub fn check(cell: &str) -> Completeness {
    let trimmed = cell.trim();
    if trimmed.is_empty() {
        return Completeness::Complete;
    }
    if trimmed.starts_with("%%") {
        return match trimmed.split_once('\n') {
            Some((_magic, body)) if !body.trim().is_empty() => check_rust(body),
            // A cell magic without its body yet: the body comes on the next lines.
            _ => Completeness::Incomplete(String::new()),
        };
    }
    check_rust(cell)
}

fn check_rust(cell: &str) -> Completeness {
    let code = parallax_magics::blank_non_rust(cell);
    let scanned = scan::scan(&code);
    if scanned.mismatched_close.is_some() {
        return Completeness::Invalid;
    }
    if scanned.is_open() {
        let depth = scanned.open_brackets.len();
        return Completeness::Incomplete("    ".repeat(depth));
    }
    let body = code.trim_end();
    if body.trim().is_empty() {
        return Completeness::Complete;
    }
    let wrapped = format!("{WRAPPER_OPEN}{body}\n}}");
    let end_of_code = WRAPPER_OPEN.len() + body.len();
    let parse = SourceFile::parse(&wrapped, Edition::Edition2021);
    let mut needs_more = false;
    for error in parse.errors() {
        let at = usize::from(error.range().start());
        if at < end_of_code {
            return Completeness::Invalid;
        }
        // evcxr accepts a last statement without its semicolon; anything else missing at
        // the very end (an operand after `+`, say) can still be typed.
        if !error.to_string().contains("expected SEMICOLON") {
            needs_more = true;
        }
    }
    if needs_more {
        Completeness::Incomplete(String::new())
    } else {
        Completeness::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incomplete(code: &str) -> bool {
        matches!(check(code), Completeness::Incomplete(_))
    }

    #[test]
    fn complete_cells() {
        for code in [
            "let a = 1;",
            "fn f() -> i32 { 1 }",
            "1 + 1",
            "let x = 1",
            "struct P { x: u8 }\nimpl P { fn get(&self) -> u8 { self.x } }",
            "use std::collections::HashMap;",
            ":dep regex = \"1\"",
            "%lsmagic",
            "%%px\nlet a = 1;",
            "",
        ] {
            assert_eq!(check(code), Completeness::Complete, "{code}");
        }
    }

    #[test]
    fn incomplete_cells() {
        for code in [
            "fn f() {",
            "let v = vec![1,",
            "let s = \"abc",
            "/* open",
            "1 +",
            "%%px",
        ] {
            assert!(incomplete(code), "{code}: {:?}", check(code));
        }
        assert_eq!(
            check("fn f() {\n    if true {"),
            Completeness::Incomplete("        ".into())
        );
    }

    #[test]
    fn invalid_cells() {
        for code in [
            "let = ;",
            "fn f() { )",
            "let x = (1];",
            "}",
            "%%px\nlet = ;",
        ] {
            assert_eq!(check(code), Completeness::Invalid, "{code}");
        }
    }
}
