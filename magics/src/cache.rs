//! `%cache`: the compiled-cell cache's size and use, clearing it, and its size limit.

/// What `%cache` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheCommand {
    /// `%cache`: entries, size, limit, and the builds of the notebook and of each engine.
    Show,
    /// `%cache clear`: remove every entry (the next run of each cell compiles again).
    Clear,
    /// `%cache limit SIZE`: keep the cache under SIZE bytes, evicting the least recently used.
    Limit(u64),
}

pub const CACHE_HELP: &str = "Cells whose code and state (items, variables and their types, \
dependencies, build settings, compiler) match an earlier build are not compiled again: the \
library built then is loaded and run. Each host keeps its own cache, shared by every kernel and \
engine there, in ~/.cache/parallax/cells (PARALLAX_CELL_CACHE overrides it).\n\
  %cache              entries, size, limit, hit rate; builds of the notebook and of each engine\n\
  %cache clear        remove every entry of this host's cache\n\
  %cache limit SIZE   keep it under SIZE (512M, 2G, or bytes); least recently used entries go first";

pub fn parse_cache(words: &[String]) -> Result<CacheCommand, String> {
    match words {
        [] => Ok(CacheCommand::Show),
        [word] if word == "clear" => Ok(CacheCommand::Clear),
        [word, size] if word == "limit" => parse_size(size).map(CacheCommand::Limit),
        [word] if word == "limit" => Err("%cache limit needs a size, such as 2G".into()),
        other => Err(format!("%cache does not know `{}`", other.join(" "))),
    }
}

/// `2G`, `512M`, `64K`, `1.5G` (powers of 1024, with or without `iB`), or plain bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("`{text}` is not a size (try 512M or 2G)");
    let upper = text.trim().to_ascii_uppercase();
    let number = upper
        .trim_end_matches("IB")
        .trim_end_matches('B')
        .to_owned();
    let (digits, scale) = match number.chars().last() {
        Some('K') => (&number[..number.len() - 1], 1u64 << 10),
        Some('M') => (&number[..number.len() - 1], 1 << 20),
        Some('G') => (&number[..number.len() - 1], 1 << 30),
        Some('T') => (&number[..number.len() - 1], 1 << 40),
        _ => (number.as_str(), 1),
    };
    let value: f64 = digits.parse().map_err(|_| invalid())?;
    if !value.is_finite() || value <= 0.0 || value * scale as f64 > u64::MAX as f64 {
        return Err(invalid());
    }
    Ok((value * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn cache_commands_parse_and_bad_ones_say_why() {
        assert_eq!(parse_cache(&words("")), Ok(CacheCommand::Show));
        assert_eq!(parse_cache(&words("clear")), Ok(CacheCommand::Clear));
        assert_eq!(
            parse_cache(&words("limit 2G")),
            Ok(CacheCommand::Limit(2 << 30))
        );
        assert_eq!(
            parse_cache(&words("limit 1.5GiB")),
            Ok(CacheCommand::Limit(3 << 29))
        );
        assert_eq!(
            parse_cache(&words("limit 4096")),
            Ok(CacheCommand::Limit(4096))
        );
        assert!(parse_cache(&words("limit lots"))
            .unwrap_err()
            .contains("not a size"));
        assert!(parse_cache(&words("limit 0")).is_err());
        assert!(parse_cache(&words("limit")).is_err());
        assert!(parse_cache(&words("purge")).unwrap_err().contains("purge"));
    }
}
