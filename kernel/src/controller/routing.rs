//! Routing what engines say: each `FromEngine` message has a function here that updates the
//! pool and passes the news to the job that owns the task (or to a shared cell's followers).
//! A message from an engine that does not own what it speaks for is dropped and logged.

use super::events::{TaskEvent, TaskKey};
use super::link::Address;
use super::liveness::heard;
use super::pool::{Engine, EngineState, Launch, Registry};
use super::Controller;
use bytes::Bytes;
use parallax_engine_protocol::{
    DataMeta, FromEngine, Outcome, Payload, Region, StateReport, Step, StreamName, ToEngine,
};
use std::path::Path;
use std::time::Duration;

impl Controller {
    /// Handles one verified message from the engine whose socket identity is `identity`.
    pub(super) fn route(&self, identity: Bytes, message: FromEngine, buffers: Vec<Bytes>) {
        let mut registry = self.registry();
        let sender = registry.engine_at(&identity);
        if let Some(engine) = sender.and_then(|id| registry.engines.get_mut(&id)) {
            if engine.is_dead() {
                // Declared dead (silent too long): what it says now is too late.
                tracing::debug!("engines: ignored {message:?} from a dead engine");
                return;
            }
            heard(engine);
        }
        match message {
            FromEngine::Register { engine, pid, host } => {
                drop(registry);
                self.register(identity, engine, pid, &host);
            }
            FromEngine::Ready { engine } if sender == Some(engine) => {
                if let Some(record) = registry.engines.get_mut(&engine) {
                    if record.state == EngineState::Starting {
                        record.state = EngineState::Idle;
                    }
                }
                drop(registry);
                self.notify();
            }
            FromEngine::Stream { task, name, text } => {
                self.streamed(&registry, sender, task, name, text)
            }
            FromEngine::Done {
                task,
                outcome,
                state,
            } => self.done(&mut registry, sender, task, outcome, state),
            FromEngine::Share { cell, to, step } => self.share(&registry, sender, cell, to, step),
            FromEngine::Pong { nonce, usage } => {
                if let (Some(usage), Some(record)) =
                    (usage, sender.and_then(|id| registry.engines.get_mut(&id)))
                {
                    record.usage = Some((usage, std::time::Instant::now()));
                }
                drop(registry);
                if let Some(engine) = sender {
                    self.answered(engine, nonce);
                }
            }
            message @ (FromEngine::Fetched { .. }
            | FromEngine::FetchedPart { .. }
            | FromEngine::Carried { .. }) => self.values(registry, sender, message, buffers),
            FromEngine::MapReady {
                task,
                arg_type,
                result_type,
            } => forward(
                &registry,
                sender,
                task,
                Ok(|engine| TaskEvent::MapReady {
                    engine,
                    arg_type,
                    result_type,
                }),
            ),
            FromEngine::ChunkDone {
                task,
                chunk,
                elapsed_ns,
                failures,
                meta,
            } => {
                let done = ChunkDone {
                    task,
                    chunk,
                    elapsed_ns,
                    failures,
                };
                self.chunk_done(&registry, sender, done, meta, buffers)
            }
            FromEngine::ChunkRefused {
                task,
                chunk,
                message,
            } => {
                self.observer
                    .finished(TaskKey::Chunk { task, chunk }, Some(message.clone()), None);
                forward(
                    &registry,
                    sender,
                    task,
                    Ok(|engine| TaskEvent::ChunkRefused {
                        engine,
                        chunk,
                        message,
                    }),
                );
            }
            FromEngine::ResultType { task, type_src } => forward(
                &registry,
                sender,
                task,
                Ok(|_| TaskEvent::ResultType { type_src }),
            ),
            other => tracing::warn!("engines: unexpected {other:?} from {sender:?}"),
        }
    }

    /// Values an engine sends back (whole, or in parts ahead of them) or says it holds for
    /// its host (a carry).
    fn values(
        &self,
        registry: std::sync::MutexGuard<'_, Registry>,
        sender: Option<u32>,
        message: FromEngine,
        buffers: Vec<Bytes>,
    ) {
        match message {
            FromEngine::Fetched {
                task,
                type_src,
                meta,
                region,
                streamed,
            } => {
                let payload = match streamed {
                    true => self.streamed_payload(task, meta, buffers),
                    false => self.fetched_payload(meta, buffers, region),
                };
                let event = payload.map(|payload| {
                    move |engine| TaskEvent::Fetched {
                        engine,
                        type_src,
                        payload,
                    }
                });
                forward(&registry, sender, task, event);
            }
            FromEngine::FetchedPart {
                task,
                offset,
                total,
            } => {
                let owner = registry.tasks.get(&task).map(|(engine, _)| *engine);
                drop(registry);
                match sender.filter(|engine| owner == Some(*engine)) {
                    Some(engine) => self.part_arrived(engine, task, offset, total, buffers),
                    None => tracing::warn!(
                        "engines: {sender:?} sent a part of task {task} it does not own"
                    ),
                }
            }
            FromEngine::Carried {
                task,
                received,
                region,
            } => forward(
                &registry,
                sender,
                task,
                Ok(|_| TaskEvent::Carried { received, region }),
            ),
            _ => {}
        }
    }

    /// The values an engine sent back: in its buffers, or in the kernel's shared memory at
    /// the path the kernel gave it (an engine may name no other file for the kernel to read
    /// and remove).
    fn fetched_payload(
        &self,
        meta: DataMeta,
        buffers: Vec<Bytes>,
        region: Option<Region>,
    ) -> Result<Payload, String> {
        match region {
            Some(region) if !self.is_shared_destination(Path::new(&region.path)) => Err(format!(
                "named shared memory it was not given: {}",
                region.path
            )),
            // The kernel's own file now: removed once the value is stored.
            region => Payload::from_message(meta, buffers, region, true),
        }
    }

    /// Answers an engine's registration: `Welcome` with its id, or `Refused` and why.
    fn register(&self, identity: Bytes, requested: Option<u32>, pid: u32, host: &str) {
        let joined = registered(&mut self.registry(), &identity, requested, pid, host);
        let answer = match &joined {
            Ok((engine, engines)) => ToEngine::Welcome {
                engine: *engine,
                engines: *engines,
            },
            Err(reason) => {
                tracing::warn!("engines: refused an engine on {host} (pid {pid}): {reason}");
                ToEngine::Refused {
                    reason: reason.clone(),
                }
            }
        };
        self.pass_to(Address::Socket(identity.clone()), answer);
        // A replacement takes over the dead engine's history before any cell reaches it.
        if let Some(inheritance) = joined.ok().and_then(|(id, _)| self.inheritance_of(id)) {
            let adopt = ToEngine::Adopt {
                history: inheritance.history,
                lost: inheritance.lost,
            };
            self.pass_to(Address::Socket(identity), adopt);
        }
        self.notify();
    }

    fn streamed(
        &self,
        registry: &Registry,
        sender: Option<u32>,
        task: u64,
        name: StreamName,
        text: String,
    ) {
        let Some((engine, events)) = registry.tasks.get(&task) else {
            return;
        };
        if sender != Some(*engine) {
            return;
        }
        let stream = match name {
            StreamName::Stdout => "stdout",
            StreamName::Stderr => "stderr",
        };
        self.observer.output(*engine, stream, &text);
        let _ = events.send(TaskEvent::Stream {
            engine: *engine,
            name,
            text,
        });
    }

    /// A task ended: the engine's record follows (idle, counted, the state it reports) and
    /// the job hears the outcome.
    fn done(
        &self,
        registry: &mut Registry,
        sender: Option<u32>,
        task: u64,
        outcome: Outcome,
        state: Option<StateReport>,
    ) {
        let owned = registry
            .tasks
            .get(&task)
            .is_some_and(|(e, _)| sender == Some(*e));
        if !owned {
            return;
        }
        let error = match &outcome {
            Outcome::Error { ename, evalue, .. } => Some(format!("{ename}: {evalue}")),
            Outcome::Ok { .. } => None,
        };
        self.observer.finished(TaskKey::Task(task), error, None);
        let Some(closed) = registry.close_task(task) else {
            return;
        };
        let mut count = 0;
        if let Some(record) = registry.engines.get_mut(&closed.engine) {
            record.task_ended(task, closed.counted, state);
            count = record.executed;
        }
        let _ = closed.events.send(TaskEvent::Done {
            engine: closed.engine,
            execution_count: count,
            outcome,
        });
    }

    /// A leader's step of a shared cell goes on to the followers it names.
    fn share(&self, registry: &Registry, sender: Option<u32>, cell: u64, to: Vec<u32>, step: Step) {
        let Some(shared) = registry.cells.get(&cell) else {
            return;
        };
        if sender != Some(shared.leader) {
            tracing::warn!(
                "engines: engine {sender:?} spoke for cell {cell} of engine {}",
                shared.leader
            );
            return;
        }
        for follower in to {
            if shared.followers.contains(&follower) {
                let message = ToEngine::Shared {
                    cell,
                    from: shared.leader,
                    step: step.clone(),
                };
                self.pass_on(follower, message);
            }
        }
    }

    /// A map's chunk is done; results that do not decode are a refused chunk, which the map
    /// runs again elsewhere.
    fn chunk_done(
        &self,
        registry: &Registry,
        sender: Option<u32>,
        done: ChunkDone,
        meta: DataMeta,
        buffers: Vec<Bytes>,
    ) {
        let ChunkDone {
            task,
            chunk,
            elapsed_ns,
            failures,
        } = done;
        let failed = failures
            .first()
            .map(|(index, message)| format!("item {index}: {message}"));
        self.observer.finished(
            TaskKey::Chunk { task, chunk },
            failed,
            Some(Duration::from_nanos(elapsed_ns)),
        );
        match Payload::from_wire(meta, buffers) {
            Ok(results) => forward(
                registry,
                sender,
                task,
                Ok(|engine| TaskEvent::ChunkDone {
                    engine,
                    chunk,
                    elapsed_ns,
                    failures,
                    results,
                }),
            ),
            Err(message) => forward(
                registry,
                sender,
                task,
                Ok(|engine| TaskEvent::ChunkRefused {
                    engine,
                    chunk,
                    message: format!("malformed results: {message}"),
                }),
            ),
        }
    }
}

struct ChunkDone {
    task: u64,
    chunk: u64,
    elapsed_ns: u64,
    failures: Vec<(u64, String)>,
}

/// An engine says who it is: the process we launched as `engine`, at socket `identity`.
/// Takes an engine's registration: as the engine it was launched as, or (started by hand) as
/// a new one. Returns its id and the pool's size, or why it is refused.
fn registered(
    registry: &mut Registry,
    identity: &Bytes,
    requested: Option<u32>,
    pid: u32,
    host: &str,
) -> Result<(u32, u32), String> {
    // It says it again until it hears from us.
    if let Some(engine) = registry.engine_at(identity) {
        return Ok((engine, registry.live_count()));
    }
    let id = match requested {
        Some(id) => match registry.engines.get(&id) {
            Some(record) if record.identity.is_none() && record.state == EngineState::Starting => {
                id
            }
            Some(record) => {
                return Err(format!(
                    "engine {id} is already in the pool ({})",
                    record.state
                ))
            }
            None => {
                return Err(format!(
                    "no engine {id} was launched; start engines by hand without --id"
                ))
            }
        },
        None => {
            let launch = registry.add_launch(Launch {
                kind: "by hand",
                processes: Vec::new(),
                job: None,
                running_since: Some(std::time::Instant::now()),
                ssh_config: None,
                parallax: String::new(),
                plan: None,
            });
            let id = registry.next_engine;
            registry.next_engine += 1;
            registry.engines.insert(id, Engine::launched(launch, host));
            id
        }
    };
    if let Some(record) = registry.engines.get_mut(&id) {
        record.identity = Some(identity.clone());
        record.pid = pid;
        record.host = host.to_owned();
        heard(record);
    }
    Ok((id, registry.live_count()))
}

/// Passes an event to the job that owns `task`, if `sender` is the engine running it; a
/// malformed message is dropped and logged.
fn forward<F: FnOnce(u32) -> TaskEvent>(
    registry: &Registry,
    sender: Option<u32>,
    task: u64,
    event: Result<F, String>,
) {
    let Some((engine, events)) = registry.tasks.get(&task) else {
        return;
    };
    if sender != Some(*engine) {
        tracing::warn!("engines: engine {sender:?} spoke for task {task} of engine {engine}");
        return;
    }
    match event {
        Ok(make) => {
            let _ = events.send(make(*engine));
        }
        Err(e) => tracing::warn!("engines: dropped malformed values of task {task}: {e}"),
    }
}
