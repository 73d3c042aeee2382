//! Local evaluation: the `Evaluator` handle the kernel and each engine hold, cheap to clone and
//! usable from async code; its jobs run on the context's own thread (`crate::context`).

use crate::cell_build::BuildCounter;
use crate::context::{run, Job, Role};
use crate::dataport::DataPort;
use crate::diagnostics::CellError;
use crate::gateway::Compiling;
use crate::history::Entry;
use crate::interrupt::Interrupter;
use crate::outputs::{CellOutput, InputAsker, StreamSink};
use crossbeam_channel::Sender;
use parallax_engine_protocol::BuildCounts;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::oneshot;

/// The handle the kernel holds: cheap to clone, usable from async code.
#[derive(Clone)]
pub struct Evaluator {
    jobs: Sender<Job>,
    interrupter: Interrupter,
    /// The notebook's data socket, opened before its context so that its evaluation process
    /// finds it in its environment, as an engine's store does (an engine's context has none).
    data: Arc<Result<DataPort, String>>,
    builds: BuildCounter,
}

impl Evaluator {
    /// Starts the evaluation thread. The evcxr context is built there, in the background, so
    /// that the kernel answers `kernel_info` at once; the first job waits for it.
    pub fn start() -> Evaluator {
        // In the kernel's own temporary directory, which goes with the kernel.
        let data = DataPort::open(&std::env::temp_dir())
            .map_err(|e| format!("opening the notebook's data socket: {e}"));
        let environment = match &data {
            Ok(port) => vec![
                (
                    parallax_data::SOCKET_VAR.to_owned(),
                    port.socket().to_owned(),
                ),
                (parallax_data::TOKEN_VAR.to_owned(), port.token().to_owned()),
            ],
            Err(e) => {
                tracing::warn!("{e}");
                Vec::new()
            }
        };
        Self::start_with(Role::Notebook(environment), Interrupter::default(), data)
    }

    /// An evaluator that compiles for an engine's store through its gateway.
    pub fn start_compiling(compiling: Compiling, interrupter: Interrupter) -> Evaluator {
        let no_port = Err("an engine's context uses its engine's data socket".to_owned());
        Self::start_with(Role::Engine(Box::new(compiling)), interrupter, no_port)
    }

    fn start_with(
        role: Role,
        interrupter: Interrupter,
        data: Result<DataPort, String>,
    ) -> Evaluator {
        let (jobs, job_rx) = crossbeam_channel::unbounded();
        let thread_interrupter = interrupter.clone();
        let builds = match &role {
            Role::Engine(compiling) => compiling.builds.clone(),
            Role::Notebook(_) => BuildCounter::default(),
        };
        let counted = builds.clone();
        std::thread::Builder::new()
            .name("evaluator".into())
            .spawn(move || run(job_rx, thread_interrupter, role, counted))
            .expect("spawning the evaluator thread");
        Evaluator {
            jobs,
            interrupter,
            data: Arc::new(data),
            builds,
        }
    }

    /// What this evaluator's context has built so far (updated after each job).
    pub fn builds(&self) -> BuildCounts {
        self.builds.get()
    }

    pub fn interrupter(&self) -> &Interrupter {
        &self.interrupter
    }

    /// Runs a cell; what it prints goes to `sink` as it is printed.
    pub async fn execute(
        &self,
        code: String,
        sink: StreamSink,
        ask_input: Option<InputAsker>,
    ) -> Result<CellOutput, CellError> {
        let (done, result) = oneshot::channel();
        self.send(Job::Execute {
            code,
            sink,
            ask_input,
            done,
        });
        result
            .await
            .unwrap_or_else(|_| Err(CellError::internal("the evaluator stopped")))
    }

    pub async fn complete(
        &self,
        code: String,
        cursor: usize,
    ) -> Result<evcxr::Completions, String> {
        let (done, result) = oneshot::channel();
        self.send(Job::Complete { code, cursor, done });
        result
            .await
            .unwrap_or_else(|_| Err("the evaluator stopped".into()))
    }

    pub async fn inspect(&self, code: String, cursor: usize) -> Result<(String, String), String> {
        let (done, result) = oneshot::channel();
        self.send(Job::Inspect { code, cursor, done });
        result
            .await
            .unwrap_or_else(|_| Err("the evaluator stopped".into()))
    }

    /// Waits until the evcxr context is built. Errors if it could not be.
    pub async fn ready(&self) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        self.send(Job::Ready { done });
        result
            .await
            .unwrap_or_else(|_| Err("the evaluator stopped".into()))
    }

    /// The type of variable `name`, if the context has it.
    pub async fn variable_type(&self, name: &str) -> Option<String> {
        let (done, result) = oneshot::channel();
        self.send(Job::VariableType {
            name: name.to_owned(),
            done,
        });
        result.await.ok().flatten()
    }

    /// Executes `entries` again to rebuild the context state they left, without running
    /// anything: the gateway answers with their recorded outcomes. Fails if evcxr did not ask
    /// for exactly the recorded compiled cells.
    pub async fn replay(&self, entries: Vec<Entry>) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        self.send(Job::Replay { entries, done });
        result
            .await
            .unwrap_or_else(|_| Err("the evaluator stopped".into()))
    }

    /// The names of the context's variables.
    pub async fn variables(&self) -> BTreeSet<String> {
        self.variables_of(false).await
    }

    /// The context's variables as `name: type`: what the memo compares before and after a cell.
    pub async fn typed_variables(&self) -> BTreeSet<String> {
        self.variables_of(true).await
    }

    async fn variables_of(&self, typed: bool) -> BTreeSet<String> {
        let (done, result) = oneshot::channel();
        self.send(Job::Variables { typed, done });
        result.await.unwrap_or_default()
    }

    /// The data socket of this context, with the `parallax_data` crate ready for its cells.
    /// The first call builds the crate (from evcxr's dependency cache once any context of this
    /// user has built it); a failure is returned and the next call tries again.
    pub async fn data_port(&self) -> Result<DataPort, CellError> {
        self.data
            .as_ref()
            .clone()
            .map_err(|e| CellError::internal(&e))
    }

    fn send(&self, job: Job) {
        // The evaluator thread lives as long as the process; if it died, the oneshot reports it.
        let _ = self.jobs.send(job);
    }
}
