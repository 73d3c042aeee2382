//! A small Rust lexer that knows only what is needed to tell where code is "at the top level":
//! brackets, strings, char literals and comments. It decides whether a cell is finished
//! (`is_complete`) and which lines of a cell are magic lines rather than Rust.

/// What scanning a piece of Rust source found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Brackets still open at the end, outermost first, with their byte offsets.
    pub open_brackets: Vec<(char, usize)>,
    /// The source ends inside a string, char literal or block comment.
    pub unterminated: Option<Unterminated>,
    /// The first closing bracket that does not match the open one, with its byte offset.
    pub mismatched_close: Option<(char, usize)>,
    /// For every line, whether it starts at the top level (outside brackets, strings and
    /// comments).
    pub line_starts_top_level: Vec<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unterminated {
    String,
    BlockComment,
}

impl Scan {
    /// True when more input could finish the code: an open bracket, string or comment.
    pub fn is_open(&self) -> bool {
        self.mismatched_close.is_none()
            && (!self.open_brackets.is_empty() || self.unterminated.is_some())
    }
}

fn closing_for(open: char) -> char {
    match open {
        '(' => ')',
        '[' => ']',
        _ => '}',
    }
}

/// Scans `source` and reports its bracket and literal structure.
pub fn scan(source: &str) -> Scan {
    let chars: Vec<(usize, char)> = source.char_indices().collect();
    let mut open_brackets: Vec<(char, usize)> = Vec::new();
    let mut mismatched_close = None;
    let mut unterminated = None;
    let mut line_starts_top_level = vec![true];
    let mut i = 0;

    // Records line starts inside a literal or comment that spans lines.
    let mark_lines_inside = |from: usize, to: usize, starts: &mut Vec<bool>| {
        for &(_, c) in &chars[from..to.min(chars.len())] {
            if c == '\n' {
                starts.push(false);
            }
        }
    };

    while i < chars.len() {
        let (offset, c) = chars[i];
        let next = chars.get(i + 1).map(|&(_, c)| c);
        match c {
            '\n' => {
                line_starts_top_level.push(open_brackets.is_empty());
                i += 1;
            }
            '/' if next == Some('/') => {
                while i < chars.len() && chars[i].1 != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let start = i;
                let mut depth = 0usize;
                let mut closed = false;
                while i < chars.len() {
                    let c = chars[i].1;
                    let n = chars.get(i + 1).map(|&(_, c)| c);
                    if c == '/' && n == Some('*') {
                        depth += 1;
                        i += 2;
                    } else if c == '*' && n == Some('/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            closed = true;
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                mark_lines_inside(start, i, &mut line_starts_top_level);
                if !closed {
                    unterminated = Some(Unterminated::BlockComment);
                }
            }
            '"' => {
                let start = i;
                let (end, closed) = skip_quoted(&chars, i + 1, '"');
                mark_lines_inside(start, end, &mut line_starts_top_level);
                i = end;
                if !closed {
                    unterminated = Some(Unterminated::String);
                }
            }
            'r' | 'b' | 'c' if is_raw_string_start(&chars, i) => {
                let start = i;
                let (end, closed) = skip_raw_string(&chars, i);
                mark_lines_inside(start, end, &mut line_starts_top_level);
                i = end;
                if !closed {
                    unterminated = Some(Unterminated::String);
                }
            }
            '\'' => {
                // A char literal is `'x'` or `'\…'`; anything else is a lifetime or label.
                let after = chars.get(i + 2).map(|&(_, c)| c);
                if next == Some('\\') {
                    let (end, closed) = skip_quoted(&chars, i + 1, '\'');
                    i = end;
                    if !closed {
                        unterminated = Some(Unterminated::String);
                    }
                } else if after == Some('\'') && next.is_some() {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            '(' | '[' | '{' => {
                open_brackets.push((c, offset));
                i += 1;
            }
            ')' | ']' | '}' => {
                match open_brackets.last() {
                    Some(&(open, _)) if closing_for(open) == c => {
                        open_brackets.pop();
                    }
                    _ => {
                        if mismatched_close.is_none() {
                            mismatched_close = Some((c, offset));
                        }
                    }
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    Scan {
        open_brackets,
        unterminated,
        mismatched_close,
        line_starts_top_level,
    }
}

/// Skips a `"…"` or `'…'` body starting just after the opening quote. Returns the index after
/// the closing quote and whether it was found.
fn skip_quoted(chars: &[(usize, char)], mut i: usize, quote: char) -> (usize, bool) {
    while i < chars.len() {
        match chars[i].1 {
            '\\' => i += 2,
            c if c == quote => return (i + 1, true),
            _ => i += 1,
        }
    }
    (chars.len(), false)
}

/// `r"`, `r#"`, `br"`, `cr#"` and so on, but not an identifier that merely ends in r.
fn is_raw_string_start(chars: &[(usize, char)], i: usize) -> bool {
    if i > 0 {
        let prev = chars[i - 1].1;
        if prev.is_alphanumeric() || prev == '_' {
            return false;
        }
    }
    let mut j = i;
    if matches!(chars[j].1, 'b' | 'c') {
        j += 1;
        if chars.get(j).map(|&(_, c)| c) == Some('"') {
            return true;
        }
    }
    if chars.get(j).map(|&(_, c)| c) != Some('r') {
        return false;
    }
    j += 1;
    while chars.get(j).map(|&(_, c)| c) == Some('#') {
        j += 1;
    }
    chars.get(j).map(|&(_, c)| c) == Some('"')
}

fn skip_raw_string(chars: &[(usize, char)], mut i: usize) -> (usize, bool) {
    if matches!(chars[i].1, 'b' | 'c') {
        i += 1;
        if chars[i].1 == '"' {
            return skip_quoted(chars, i + 1, '"');
        }
    }
    i += 1; // the `r`
    let mut hashes = 0;
    while chars[i].1 == '#' {
        hashes += 1;
        i += 1;
    }
    i += 1; // the opening quote
    while i < chars.len() {
        if chars[i].1 == '"' {
            let closing = (1..=hashes).all(|k| chars.get(i + k).map(|&(_, c)| c) == Some('#'));
            if closing {
                return (i + 1 + hashes, true);
            }
        }
        i += 1;
    }
    (chars.len(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_code_is_closed() {
        let s = scan("fn f() -> i32 { [1, 2][0] }");
        assert!(!s.is_open());
        assert!(s.mismatched_close.is_none());
    }

    #[test]
    fn open_block_is_open() {
        let s = scan("fn f() {\n    let x = (1,");
        assert!(s.is_open());
        assert_eq!(
            s.open_brackets.iter().map(|b| b.0).collect::<String>(),
            "{("
        );
    }

    #[test]
    fn brackets_inside_strings_comments_and_chars_do_not_count() {
        let s = scan("let s = \"{(\"; // {\nlet c = '{'; /* ( /* nested */ ) */ let e = '\\'';");
        assert!(!s.is_open(), "{s:?}");
    }

    #[test]
    fn lifetimes_are_not_char_literals() {
        let s = scan("fn f<'a>(x: &'a str) -> &'a str { x }");
        assert!(!s.is_open(), "{s:?}");
    }

    #[test]
    fn raw_strings_with_hashes() {
        let s = scan("let r = r#\"a \" { \"#; let b = br\"}\";");
        assert!(!s.is_open(), "{s:?}");
        assert!(s.mismatched_close.is_none());
        let open = scan("let r = r##\"still \"# open");
        assert_eq!(open.unterminated, Some(Unterminated::String));
    }

    #[test]
    fn identifier_ending_in_r_is_not_a_raw_string() {
        let s = scan("let bar = 1; let br = \"x\";");
        assert!(!s.is_open(), "{s:?}");
    }

    #[test]
    fn unterminated_literals() {
        assert_eq!(
            scan("let s = \"abc").unterminated,
            Some(Unterminated::String)
        );
        assert_eq!(
            scan("/* abc").unterminated,
            Some(Unterminated::BlockComment)
        );
    }

    #[test]
    fn mismatched_close_is_found() {
        let s = scan("let x = (1];");
        assert_eq!(s.mismatched_close, Some((']', 10)));
        assert!(!s.is_open());
        assert_eq!(scan("}").mismatched_close, Some(('}', 0)));
    }

    #[test]
    fn line_starts_track_nesting() {
        let s = scan("a\nfn f() {\n%x\n}\n\"s\n%y\"\n%z");
        assert_eq!(
            s.line_starts_top_level,
            vec![true, true, false, false, true, false, true]
        );
    }
}
