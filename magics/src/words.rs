//! Splitting a magic's arguments into words, shell style: whitespace separates words, and single
//! or double quotes keep spaces inside one word. And reading leading flags off arguments whose
//! rest is Rust code.

/// Splits `args` into words. Fails on an unclosed quote.
pub fn split_words(args: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut chars = args.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                in_word = true;
                let quote = c;
                loop {
                    match chars.next() {
                        Some(q) if q == quote => break,
                        Some('\\') if quote == '"' => match chars.next() {
                            Some(escaped) => current.push(escaped),
                            None => return Err(format!("unclosed quote {quote} in `{args}`")),
                        },
                        Some(other) => current.push(other),
                        None => return Err(format!("unclosed quote {quote} in `{args}`")),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                current.push(c);
            }
        }
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

/// Reads leading flags off `args` with `handle`, which takes a flag and a way to read its value
/// and says whether it knew the flag. Returns the rest, untouched (it is Rust code).
pub fn leading_flags(
    args: &str,
    mut handle: impl FnMut(&str, &mut dyn FnMut(&str) -> Result<String, String>) -> Result<(), String>,
) -> Result<&str, String> {
    let mut rest = args.trim_start();
    loop {
        let (word, after) = split_word(rest);
        if word == "--" {
            return Ok(after.trim_start());
        }
        // `-1..5` is code, not a flag.
        if !word.starts_with('-')
            || word.len() < 2
            || word[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.')
        {
            return Ok(rest);
        }
        let (name, inline_value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word, None),
        };
        let mut after = after;
        let mut value = |what: &str| -> Result<String, String> {
            if let Some(v) = inline_value {
                return Ok(v.to_owned());
            }
            let (v, next) = split_word(after);
            if v.is_empty() {
                return Err(format!("{name} needs {what}"));
            }
            after = next;
            Ok(v.to_owned())
        };
        handle(name, &mut value)?;
        rest = after.trim_start();
    }
}

pub fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.find(char::is_whitespace) {
        Some(at) => (&text[..at], &text[at..]),
        None => (text, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::split_words;

    #[test]
    fn splits_on_whitespace_and_keeps_quoted_spaces() {
        assert_eq!(
            split_words(r#"-t 0,2  "a b" 'c d' e"f g"h"#).unwrap(),
            vec!["-t", "0,2", "a b", "c d", "ef gh"]
        );
        assert_eq!(split_words(r#""" x"#).unwrap(), vec!["", "x"]);
        assert!(split_words("").unwrap().is_empty());
    }

    #[test]
    fn escapes_inside_double_quotes() {
        assert_eq!(split_words(r#""a \" b""#).unwrap(), vec![r#"a " b"#]);
    }

    #[test]
    fn unclosed_quote_is_an_error() {
        assert!(split_words("'abc").unwrap_err().contains("unclosed quote"));
        assert!(split_words("\"abc\\")
            .unwrap_err()
            .contains("unclosed quote"));
    }
}
