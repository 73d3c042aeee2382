//! Where a cell runs: usable in every engine cell without a `:dep` line, as
//! `parallax_env::engine_id()`, `parallax_env::engines()` and `parallax_env::host()`. Outside an
//! engine all are `None`.

/// This engine's id in the pool, 0 to N-1.
pub fn engine_id() -> Option<u32> {
    read("PARALLAX_ENGINE_ID")
}

/// How many engines the pool had when this engine started.
pub fn engines() -> Option<u32> {
    read("PARALLAX_ENGINES")
}

/// The host this engine runs on, as it registered with the controller.
pub fn host() -> Option<String> {
    std::env::var("PARALLAX_HOST").ok()
}

fn read(name: &str) -> Option<u32> {
    std::env::var(name).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_engine_environment() {
        // Both are set together by the controller; one test owns the variables.
        std::env::set_var("PARALLAX_ENGINE_ID", "3");
        std::env::set_var("PARALLAX_ENGINES", "4");
        assert_eq!(super::engine_id(), Some(3));
        assert_eq!(super::engines(), Some(4));
        std::env::set_var("PARALLAX_ENGINE_ID", "x");
        assert_eq!(super::engine_id(), None);
        std::env::remove_var("PARALLAX_ENGINE_ID");
        std::env::remove_var("PARALLAX_ENGINES");
        assert_eq!(super::engine_id(), None);
        assert_eq!(super::engines(), None);
    }
}
