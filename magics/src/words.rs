//! Splitting a magic's arguments into words, shell style: whitespace separates words, and single
//! or double quotes keep spaces inside one word.

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
