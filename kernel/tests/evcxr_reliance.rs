//! What compiling a cell once per machine relies on in evcxr 0.22.0 (pinned in the workspace):
//! a context can be given its own evaluation process (`EvalContext::with_subprocess_command`);
//! that process is told `LOAD_AND_RUN <shared object> <function>` for each compiled cell; and a
//! second evaluation process that is sent the same lines, in the same order, rebuilds the same
//! variables and prints the same results, without compiling anything. The first context runs
//! on Parallax's own evaluation process, which records those lines; the replay on evcxr's. If an evcxr upgrade
//! changes any of this, this test says so.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const PARALLAX: &str = env!("CARGO_BIN_EXE_parallax");

#[test]
fn compiled_cells_replay_in_a_second_evaluation_process() {
    let dir = std::env::temp_dir().join(format!("parallax-reliance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let log = dir.join("load-and-run.log");
    // The context's evaluation process is Parallax's own, which records what evcxr tells it.
    let mut runtime = Command::new(PARALLAX);
    runtime.env("PARALLAX_RUNTIME_REPORT", &log);
    let (mut context, _outputs) =
        evcxr::EvalContext::with_subprocess_command(runtime).expect("an evcxr context");
    let cells = [
        "let x = 40u64;",
        "fn add(a: u64, b: u64) -> u64 { a + b }",
        "let y = add(x, 2);",
        "let greeting = format!(\"{} and {}\", x, y);",
        "greeting",
    ];
    let mut last = None;
    for cell in cells {
        let outputs = context.eval(cell).expect("the cell runs");
        last = outputs.content_by_mime_type.get("text/plain").cloned();
    }
    assert_eq!(last.as_deref(), Some("\"40 and 42\""));

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("the log")
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        lines.len() >= cells.len() - 1 && lines.iter().all(|l| l.starts_with("LOAD_AND_RUN ")),
        "{lines:?}"
    );

    // A fresh evaluation process (evcxr's own), fed the same lines: no compiler involved.
    let mut replay = Command::new(PARALLAX)
        .env("EVCXR_IS_RUNTIME", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("a second evaluation process");
    let mut stdin = replay.stdin.take().expect("its stdin");
    let mut stdout = BufReader::new(replay.stdout.take().expect("its stdout"));
    let mut printed = Vec::new();
    for line in &lines {
        writeln!(stdin, "{line}").expect("sent");
        loop {
            let mut out = String::new();
            assert!(stdout.read_line(&mut out).expect("read") > 0, "it exited");
            if out.trim_end() == "EVCXR_EXECUTION_COMPLETE" {
                break;
            }
            printed.push(out.trim_end().to_owned());
        }
    }
    drop(stdin);
    let _ = replay.wait();
    let shown = printed.join("\n");
    assert!(
        shown.contains("EVCXR_BEGIN_CONTENT text/plain\n\"40 and 42\"\nEVCXR_END_CONTENT"),
        "{shown}"
    );
    // A cell that crashes Parallax's evaluation process is reported by evcxr as a lost process,
    // and the next cell runs in a new one.
    let crashed = context.eval("unsafe { std::ptr::null_mut::<u64>().write_volatile(1); }");
    assert!(crashed.is_err(), "a segfault must fail the cell");
    let after = context.eval("40 + 2").expect("the next cell runs");
    assert_eq!(
        after
            .content_by_mime_type
            .get("text/plain")
            .map(String::as_str),
        Some("42")
    );
    drop(context);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What sharing compiled cells relies on beyond that: a context whose evaluation process is a
/// relay to a store runs its cells there, its executions are recorded with their outcomes (a
/// panic marked by evcxr's generated code), and a second context that replays the record, told
/// the recorded outcomes instead of running anything, knows the store's variables: the ones that
/// exist and not the one the panic dropped.
#[test]
fn a_context_rebuilt_from_a_history_compiles_for_the_same_store() {
    use parallax_eval::gateway::Gateway;
    use parallax_eval::history::History;
    use parallax_eval::store::Store;
    use parallax_eval::{Compiling, Evaluator, Interrupter, StreamSink};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    let base = std::env::temp_dir().join(format!("parallax-rebuild-{}", std::process::id()));
    std::fs::create_dir_all(&base).expect("a scratch directory");
    let program = std::path::Path::new(PARALLAX);
    let store = Arc::new(Mutex::new(
        Store::start_program(program, &[]).expect("a store"),
    ));
    let history = Arc::new(Mutex::new(History::default()));
    let gateway = Gateway::open(
        &base,
        store.clone(),
        history.clone(),
        Arc::new(AtomicBool::new(false)),
    )
    .expect("a gateway");
    let compiler = |gateway: &Gateway| {
        Evaluator::start_compiling(
            Compiling {
                relay: gateway.relay_command_for(program),
                recorder: Arc::new(gateway.clone()),
                runtime: store.lock().expect("the store").handle(),
                builds: Default::default(),
            },
            Interrupter::default(),
        )
    };
    let quiet: StreamSink = Arc::new(|_, _| {});
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let text = |result: Result<parallax_eval::CellOutput, parallax_eval::CellError>| {
        result
            .map(|out| out.data.get("text/plain").cloned())
            .map_err(|e| e.evalue)
    };

    let first = compiler(&gateway);
    runtime.block_on(async {
        first.ready().await.expect("the first context");
        for cell in ["let x = 40u64;", "let y = x + 2;"] {
            first
                .execute(cell.into(), quiet.clone(), None)
                .await
                .expect("it runs");
        }
        let panicked = first
            .execute(
                "let z: u8 = if x > 1 { panic!(\"no z\") } else { 1 };".into(),
                quiet.clone(),
                None,
            )
            .await;
        assert!(panicked.is_err_and(|e| e.evalue == "no z"));
    });
    let entries = history.lock().expect("the history").entries().to_vec();
    let cells: Vec<&parallax_eval::history::Entry> = entries
        .iter()
        .filter(|e| e.code.starts_with("let "))
        .collect();
    assert_eq!(cells.len(), 3, "{entries:?}");
    assert!(cells.iter().all(|e| e.lines.len() == 1), "{entries:?}");
    assert!(!cells[1].lines[0].panicked && cells[2].lines[0].panicked);
    drop(first);

    let second = compiler(&gateway);
    runtime.block_on(async {
        second.ready().await.expect("the second context");
        second.replay(entries).await.expect("the history replays");
        assert_eq!(
            text(second.execute("x + y".into(), quiet.clone(), None).await),
            Ok(Some(serde_json::Value::String("82".into())))
        );
        let missing = second.execute("z".into(), quiet.clone(), None).await;
        assert!(missing.is_err_and(|e| e.evalue.contains("z")));
    });
    drop(second);
    let _ = std::fs::remove_dir_all(&base);
}
