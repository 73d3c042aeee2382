//! One build per expression cell. evcxr compiles a cell ending in an expression first as
//! `(expr).evcxr_display();` and, when the value's type has no such method, compiles it again
//! printing `{:?}`: a failed type check (about 0.12 s here) before every plain value. Every
//! context gets a trait giving each `Debug` type an `evcxr_display` that prints exactly what
//! evcxr's second build would, so the first build succeeds. A type's own `evcxr_display` (an
//! inherent method) still wins, as inherent methods do over trait methods.
//!
//! The trait only stands in for evcxr's default format: after `:fmt` or `:types` changes it,
//! the trait is redefined without its impl (evcxr replaces an item by name, with the impls
//! that followed it in its cell), and evcxr's own second build prints the value again.

/// Defines the stand-in; the impl follows the trait in the same cell so that redefining the
/// trait removes both.
pub const ON: &str = r#"trait ParallaxDebugDisplay {
    fn evcxr_display(&self);
}
impl<T: ::std::fmt::Debug + ?::std::marker::Sized> ParallaxDebugDisplay for T {
    fn evcxr_display(&self) {
        use ::std::io::Write as _;
        let text = ::std::format!("{:?}", self);
        let stdout = ::std::io::stdout();
        let mut out = stdout.lock();
        let sent = out
            .write_all(b"EVCXR_BEGIN_CONTENT text/plain\n")
            .and_then(|()| out.write_all(text.as_bytes()))
            .and_then(|()| out.write_all(b"\nEVCXR_END_CONTENT\n"));
        if let ::std::result::Result::Err(error) = sent {
            ::std::eprintln!("Failed to send content to parent: {:?}", error);
            ::std::process::exit(1);
        }
    }
}"#;

/// Redefines the trait with no method and no impl: evcxr's own fallback prints values.
pub const OFF: &str = "trait ParallaxDebugDisplay {}";

/// How evcxr shows a value, as far as `:fmt` and `:types` lines in cells have set it.
#[derive(Clone, Debug, PartialEq)]
pub struct DisplaySettings {
    format: String,
    types: bool,
    /// A type of the notebook's has `evcxr_display` from a trait, which the stand-in's method
    /// of the same name makes ambiguous.
    conflict: bool,
}

impl Default for DisplaySettings {
    fn default() -> Self {
        DisplaySettings {
            format: "{:?}".to_owned(),
            types: false,
            conflict: false,
        }
    }
}

impl DisplaySettings {
    /// Whether the stand-in prints what evcxr would.
    pub fn stand_in_fits(&self) -> bool {
        *self == DisplaySettings::default()
    }

    /// The stand-in stays off from now on (see `stand_in_conflicts`).
    pub fn conflict_seen(&mut self) {
        self.conflict = true;
    }

    /// Follows the `:fmt` and `:types` lines of a cell that ran, as evcxr reads them: `:fmt`
    /// sets the format (none: the default), `:types` toggles.
    pub fn follow(&mut self, code: &str) {
        for line in code.lines().map(str::trim) {
            if line == ":fmt" || line.starts_with(":fmt ") {
                let format = line[":fmt".len()..].trim();
                self.format = if format.is_empty() { "{:?}" } else { format }.to_owned();
            } else if line == ":types" {
                self.types = !self.types;
            }
        }
    }

    /// Whether a cell may change the settings (so that they are read again after it).
    pub fn may_change(code: &str) -> bool {
        code.lines()
            .map(str::trim)
            .any(|line| line == ":fmt" || line.starts_with(":fmt ") || line == ":types")
    }
}

/// Whether a cell may have failed because the stand-in and a trait of the notebook's both
/// give the value an `evcxr_display`: rustc's E0034 (multiple applicable items), of which
/// evcxr keeps only the notes that point at the notebook's code ("candidate #1 is defined in
/// an impl of the trait `…`"). Running the cell again without the stand-in tells.
pub fn may_conflict(errors: &[evcxr::CompilationError]) -> bool {
    errors.iter().any(|error| {
        let message = error.message();
        error.code() == Some("E0034")
            || (message.starts_with("candidate #")
                && message.contains("is defined in an impl of the trait"))
    })
}

#[cfg(test)]
mod tests {
    use super::DisplaySettings;

    #[test]
    fn the_stand_in_fits_only_evcxrs_default_display() {
        let mut settings = DisplaySettings::default();
        assert!(settings.stand_in_fits());
        settings.follow(":fmt {:#?}");
        assert!(!settings.stand_in_fits());
        settings.follow(":fmt {:?}\n:types");
        assert!(!settings.stand_in_fits());
        settings.follow(":types\n:fmt {:x}");
        assert!(!settings.stand_in_fits());
        settings.follow(":fmt");
        assert!(settings.stand_in_fits());
        assert!(DisplaySettings::may_change("let a = 1;\n :types"));
        assert!(!DisplaySettings::may_change("let types = 1;"));
    }
}
