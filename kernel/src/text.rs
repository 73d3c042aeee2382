//! Words and markup shared by everything that shows the engines' work: lists of engine ids,
//! sizes, rates and HTML escaping.

/// Engine ids as a reader sees them: `0, 2, 3`.
pub fn engine_list(engines: &[u32]) -> String {
    engines
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A byte count in B, KiB, MiB or GiB.
pub fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.1} MiB", b / KIB / KIB)
    } else {
        format!("{:.2} GiB", b / KIB / KIB / KIB)
    }
}

/// Items per second, in M, k or plain.
pub fn rate(items: u64, elapsed: std::time::Duration) -> String {
    let per_second = items as f64 / elapsed.as_secs_f64().max(1e-9);
    if per_second >= 1e6 {
        format!("{:.2} M", per_second / 1e6)
    } else if per_second >= 1e3 {
        format!("{:.1} k", per_second / 1e3)
    } else {
        format!("{per_second:.1}")
    }
}

/// Text made safe inside HTML elements and attribute values.
pub fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_engines_sizes_and_markup() {
        assert_eq!(engine_list(&[0, 2, 3]), "0, 2, 3");
        assert_eq!(engine_list(&[]), "");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(100 << 20), "100.0 MiB");
        assert_eq!(rate(2_000_000, std::time::Duration::from_secs(1)), "2.00 M");
        assert_eq!(
            html_escape(r#"<a href="x">&</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
