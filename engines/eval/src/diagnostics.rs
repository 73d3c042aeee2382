//! Errors a cell can end with, worded for the person at the notebook: compile errors rendered
//! the way rustc renders them, panics with what survived, interrupts with what was lost.

use crate::outputs::CellOutput;
use std::collections::BTreeSet;

/// MIME type of the panic report that our panic hook prints through evcxr's content markers.
pub(crate) const PANIC_MIME: &str = "application/vnd.parallax.panic";

/// A cell's failure, as Jupyter's `error` message carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl CellError {
    pub fn new(ename: &str, evalue: impl Into<String>, traceback: Vec<String>) -> Self {
        CellError {
            ename: ename.to_owned(),
            evalue: evalue.into(),
            traceback,
        }
    }

    /// An error whose whole story is one paragraph.
    pub fn plain(ename: &str, evalue: impl Into<String>) -> Self {
        let evalue = evalue.into();
        let traceback = vec![format!("{ename}: {evalue}")];
        CellError::new(ename, evalue, traceback)
    }

    pub fn internal(message: &str) -> Self {
        CellError::plain("InternalError", message)
    }
}

fn list(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// A panic inside the cell: the message, the variables that survived, and the fact that the
/// cell's own new variables did not.
pub fn panic_error(
    message: &str,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) -> CellError {
    let mut traceback = vec![format!("panicked: {message}")];
    traceback.push(if after.is_empty() {
        "No variables survived (none were defined before this cell).".to_owned()
    } else {
        format!("Variables that survived: {}", list(after))
    });
    let lost: BTreeSet<String> = before.difference(after).cloned().collect();
    if !lost.is_empty() {
        traceback.push(format!("Variables lost: {}", list(&lost)));
    }
    traceback.push("Variables first defined in this cell were dropped.".to_owned());
    CellError::new("panic", message, traceback)
}

pub fn interrupted_while_compiling() -> CellError {
    CellError::plain(
        "Interrupted",
        "the cell was stopped while it compiled; it did not run, and nothing was lost",
    )
}

/// A shared cell was stopped after its leader compiled it but before it started on this
/// engine: it did not run here.
pub fn interrupted_before_running() -> CellError {
    CellError::plain(
        "Interrupted",
        "the cell was stopped before it ran on this engine; nothing was lost",
    )
}

/// The running cell was stopped by restarting the evaluation process, which takes every
/// variable with it.
pub fn interrupted_while_running(before: &BTreeSet<String>) -> CellError {
    let lost = if before.is_empty() {
        "no variables were defined, so none were lost".to_owned()
    } else {
        format!("variables lost: {}", list(before))
    };
    CellError::plain(
        "Interrupted",
        format!(
            "the cell was stopped by restarting the evaluation process; {lost}. Functions, types, \
             `use` items and :dep dependencies are kept"
        ),
    )
}

pub fn process_died(message: &str, before: &BTreeSet<String>) -> CellError {
    let lost = if before.is_empty() {
        String::new()
    } else {
        format!(" Variables lost: {}.", list(before))
    };
    CellError::plain(
        "ProcessDied",
        format!(
            "the evaluation process died ({}) and was restarted.{lost} Functions, types and `use` \
             items are kept",
            message.trim()
        ),
    )
}

/// The cell's fork died, stopped or crashing, and the store rolled the cell back: the store
/// holds every variable as it was before the cell. `how`: how the fork ended.
pub fn rolled_back(how: &str, interrupted: bool) -> CellError {
    let kept = "nothing was lost: every variable is as it was before the cell";
    if interrupted {
        CellError::plain(
            "Interrupted",
            format!("the cell was stopped while it ran and rolled back; {kept}"),
        )
    } else {
        CellError::plain(
            "CellCrashed",
            format!("the cell's process ended ({how}) and the cell was rolled back; {kept}"),
        )
    }
}

/// Said after a cell that left threads running: from now on a stop or a crash loses the
/// variables, named here.
pub fn threads_left_note(threads: &str, variables: &BTreeSet<String>) -> String {
    let at_stake = if variables.is_empty() {
        "restart the evaluation process".to_owned()
    } else {
        format!("lose every variable: {}", list(variables))
    };
    format!(
        "Note: this cell left {threads} thread(s) running (a thread pool or a runtime, say). A \
         process cannot be forked with its threads, so the cells after it run without a \
         transaction: a stop or a crash would {at_stake}.\n"
    )
}

/// A death's error, saying why the cell ran without a transaction when the store said so.
pub fn without_transaction(error: CellError, in_place: Option<&str>) -> CellError {
    let Some(why) = in_place else {
        return error;
    };
    let reason = match why.strip_suffix(" threads") {
        Some(threads) => format!(
            "the evaluation process runs {threads} threads, started by an earlier cell, and a \
             process cannot be forked with its threads"
        ),
        None if why == "transactions off" => "transactions are off".to_owned(),
        None => format!("the evaluation process could not fork ({why})"),
    };
    CellError::plain(
        &error.ename,
        format!(
            "{}. The cell ran without a transaction: {reason}",
            error.evalue
        ),
    )
}

pub fn type_redefined(lost: &[String]) -> CellError {
    CellError::plain(
        "TypeRedefined",
        format!(
            "a type was redefined, so variables holding the old type were dropped: {}",
            lost.join(", ")
        ),
    )
}

pub fn evaluator_message(message: &str) -> CellError {
    CellError::plain("Error", message.trim())
}

/// The parts of a rustc diagnostic that rendering needs, apart from evcxr's types so that the
/// rendering can be tested on its own.
pub struct Diagnostic {
    pub level: String,
    pub code: Option<String>,
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Vec<String>,
}

/// A labelled span: (start line, start column, end line, end column), 1-based, end column
/// exclusive.
pub struct Label {
    pub span: Option<(usize, usize, usize, usize)>,
    pub text: String,
    pub primary: bool,
}

impl From<&evcxr::CompilationError> for Diagnostic {
    fn from(error: &evcxr::CompilationError) -> Self {
        Diagnostic {
            level: error.level().to_owned(),
            code: error.code().map(str::to_owned),
            message: error.message(),
            labels: error
                .spanned_messages()
                .iter()
                .map(|m| Label {
                    span: m
                        .span
                        .as_ref()
                        .map(|s| (s.start_line, s.start_column, s.end_line, s.end_column)),
                    text: m.label.clone(),
                    primary: m.is_primary,
                })
                .collect(),
            help: error
                .help()
                .into_iter()
                .chain(error.evcxr_extra_hint().map(str::to_owned))
                .collect(),
        }
    }
}

pub fn compile_error(code: &str, errors: &[evcxr::CompilationError]) -> CellError {
    let diagnostics: Vec<Diagnostic> = errors.iter().map(Diagnostic::from).collect();
    render_diagnostics(code, &diagnostics)
}

/// Renders diagnostics as rustc does: `error[CODE]: message`, a `--> cell:line:col` pointer, the
/// source line and a caret underline with the label, then help notes.
pub fn render_diagnostics(code: &str, diagnostics: &[Diagnostic]) -> CellError {
    let lines: Vec<&str> = code.lines().collect();
    let mut traceback = Vec::new();
    for diagnostic in diagnostics {
        let mut text = match &diagnostic.code {
            Some(c) => format!("{}[{c}]: {}\n", diagnostic.level, diagnostic.message),
            None => format!("{}: {}\n", diagnostic.level, diagnostic.message),
        };
        let spans: Vec<_> = diagnostic
            .labels
            .iter()
            .filter_map(|label| label.span.map(|s| (s, &label.text, label.primary)))
            .collect();
        let width = spans
            .iter()
            .map(|((start, ..), ..)| start.to_string().len())
            .max()
            .unwrap_or(1);
        let gutter = " ".repeat(width);
        if let Some(((line, column, ..), ..)) = spans.iter().find(|s| s.2).or(spans.first()) {
            text.push_str(&format!("{gutter}--> cell:{line}:{column}\n"));
            text.push_str(&format!("{gutter} |\n"));
        }
        // One snippet per source line, with every label on that line under it, as rustc does.
        let mut lines_shown: Vec<usize> = spans.iter().map(|((line, ..), ..)| *line).collect();
        lines_shown.sort_unstable();
        lines_shown.dedup();
        for line_number in lines_shown {
            let source = lines
                .get(line_number.saturating_sub(1))
                .copied()
                .unwrap_or("");
            let source_width = source.chars().count();
            text.push_str(&format!("{line_number:>width$} | {source}\n"));
            for ((_, start_col, end_line, end_col), label, primary) in
                spans.iter().filter(|((line, ..), ..)| *line == line_number)
            {
                let first = start_col.saturating_sub(1).min(source_width);
                let last = if *end_line == line_number {
                    end_col.saturating_sub(1).min(source_width)
                } else {
                    source_width
                };
                let marker = if *primary { "^" } else { "-" };
                let underline = marker.repeat(last.saturating_sub(first).max(1));
                let label = if label.is_empty() {
                    String::new()
                } else {
                    format!(" {label}")
                };
                text.push_str(&format!(
                    "{gutter} | {}{underline}{label}\n",
                    " ".repeat(first)
                ));
            }
        }
        for help in &diagnostic.help {
            text.push_str(&format!("{gutter} = help: {help}\n"));
        }
        traceback.push(text);
    }
    let evalue = diagnostics
        .first()
        .map(|d| d.message.clone())
        .unwrap_or_else(|| "compilation failed".to_owned());
    CellError::new("CompileError", evalue, traceback)
}

/// The result of a cell evcxr executed, from what evcxr returned, the variables before and
/// after, whether an interrupt stopped it, and what the store said of its compiled cells.
pub(crate) fn result_of_execution(
    result: Result<evcxr::EvalOutputs, evcxr::Error>,
    code: &str,
    (before, after): (&BTreeSet<String>, &BTreeSet<String>),
    interruption: Option<crate::Interruption>,
    notes: &crate::evalproto::LineNotes,
) -> Result<CellOutput, CellError> {
    if let Some(how) = &notes.rolled_back {
        return Err(rolled_back(how, interruption.is_some()));
    }
    match result {
        Ok(mut outputs) => {
            if let Some(message) = outputs.content_by_mime_type.remove(PANIC_MIME) {
                return Err(panic_error(&unescape(&message), before, after));
            }
            let data = outputs
                .content_by_mime_type
                .into_iter()
                .map(|(mime, text)| (mime, serde_json::Value::String(text)))
                .collect();
            Ok(CellOutput { data })
        }
        Err(evcxr::Error::CompilationErrors(errors)) => match interruption {
            Some(_) => Err(interrupted_while_compiling()),
            None => Err(compile_error(code, &errors)),
        },
        Err(evcxr::Error::SubprocessTerminated(message)) => {
            let error = match interruption {
                Some(_) => interrupted_while_running(before),
                None => process_died(&message, before),
            };
            Err(without_transaction(error, notes.in_place.as_deref()))
        }
        Err(evcxr::Error::TypeRedefinedVariablesLost(lost)) => Err(type_redefined(&lost)),
        Err(evcxr::Error::Message(message)) => match interruption {
            Some(_) => Err(interrupted_while_compiling()),
            None => Err(evaluator_message(&message)),
        },
    }
}

/// The result of a cell for an engine that ran the compiled cell another engine's context
/// built: from its own run (its output, its panic, its death), with the variables the
/// compiling context had before and after the cell. `interrupted`: the death was an interrupt.
pub fn result_of_run(
    run: &crate::store::Run,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
    interrupted: bool,
) -> Result<CellOutput, CellError> {
    if let Some(how) = &run.notes.rolled_back {
        return Err(rolled_back(how, interrupted));
    }
    if run.outcome.died {
        let error = if interrupted {
            interrupted_while_running(before)
        } else {
            process_died(run.death.as_deref().unwrap_or("it ended"), before)
        };
        return Err(without_transaction(error, run.notes.in_place.as_deref()));
    }
    let mut contents = run.contents.clone();
    if let Some(message) = contents.remove(PANIC_MIME) {
        let message = message.as_str().map(unescape).unwrap_or_default();
        // New variables were dropped here, whatever happened on the compiling engine.
        let survived: BTreeSet<String> = before.intersection(after).cloned().collect();
        return Err(panic_error(&message, before, &survived));
    }
    if !run.outcome.changed_type.is_empty() {
        return Err(type_redefined(&run.outcome.changed_type));
    }
    Ok(CellOutput { data: contents })
}

pub(crate) fn unescape(escaped: &str) -> String {
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn renders_like_rustc() {
        let code = "let a = 1;\nlet x: i32 = \"a\";";
        let diagnostic = Diagnostic {
            level: "error".into(),
            code: Some("E0308".into()),
            message: "mismatched types".into(),
            labels: vec![
                Label {
                    span: Some((2, 14, 2, 17)),
                    text: "expected `i32`, found `&str`".into(),
                    primary: true,
                },
                Label {
                    span: Some((2, 8, 2, 11)),
                    text: "expected due to this".into(),
                    primary: false,
                },
            ],
            help: vec![],
        };
        let error = render_diagnostics(code, &[diagnostic]);
        assert_eq!(error.ename, "CompileError");
        assert_eq!(error.evalue, "mismatched types");
        assert_eq!(
            error.traceback,
            vec![concat!(
                "error[E0308]: mismatched types\n",
                " --> cell:2:14\n",
                "  |\n",
                "2 | let x: i32 = \"a\";\n",
                "  |              ^^^ expected `i32`, found `&str`\n",
                "  |        --- expected due to this\n",
            )]
        );
    }

    #[test]
    fn renders_help_and_spanless_errors() {
        let diagnostic = Diagnostic {
            level: "error".into(),
            code: None,
            message: "cannot find value `y` in this scope".into(),
            labels: vec![],
            help: vec!["a local variable with a similar name exists: `x`".into()],
        };
        let error = render_diagnostics("y", &[diagnostic]);
        assert_eq!(
            error.traceback[0],
            "error: cannot find value `y` in this scope\n  = help: a local variable with a similar name exists: `x`\n"
        );
    }

    #[test]
    fn panic_lists_survivors_and_losses() {
        let error = panic_error("boom", &names(&["a", "b"]), &names(&["a", "b"]));
        assert_eq!(error.ename, "panic");
        assert_eq!(error.evalue, "boom");
        assert!(error
            .traceback
            .contains(&"Variables that survived: a, b".to_owned()));
        let error = panic_error("boom", &names(&[]), &names(&[]));
        assert!(error.traceback[1].starts_with("No variables survived"));
    }

    #[test]
    fn a_death_without_a_transaction_says_why() {
        let died = || interrupted_while_running(&names(&["x"]));
        let threads = without_transaction(died(), Some("3 threads")).evalue;
        assert!(threads.contains("variables lost: x") && threads.contains("runs 3 threads"));
        let off = without_transaction(died(), Some("transactions off")).evalue;
        assert!(off.ends_with("transactions are off"), "{off}");
        let no_fork = without_transaction(died(), Some("no fork: Cannot allocate memory")).evalue;
        assert!(no_fork.contains("could not fork (no fork: Cannot allocate memory)"));
        assert_eq!(without_transaction(died(), None).evalue, died().evalue);
    }

    #[test]
    fn interrupt_while_running_names_lost_variables() {
        let error = interrupted_while_running(&names(&["big", "x"]));
        assert!(
            error.evalue.contains("variables lost: big, x"),
            "{}",
            error.evalue
        );
        let error = interrupted_while_running(&names(&[]));
        assert!(error.evalue.contains("none were lost"));
    }

    #[test]
    fn unescape_reverses_the_hook_encoding() {
        assert_eq!(unescape(r"line one\nline \\two"), "line one\nline \\two");
        assert_eq!(unescape(r"trailing\"), "trailing\\");
    }
}
