//! Rust cell evaluation with evcxr, shared by the kernel's own context and every engine: one
//! evcxr context on a thread of its own, output streamed to a per-cell sink while the cell runs,
//! panics reported with the variables that survived, and interrupts that work.

pub mod cell_build;
pub mod cells;
mod context;
pub mod crate_cache;
pub mod dataport;
pub mod diagnostics;
pub mod display;
pub mod evalproto;
mod evaluator;
pub mod gateway;
pub mod history;
pub mod interrupt;
pub mod ipc;
pub mod memo;
mod notebook;
mod outputs;
pub mod places;
pub mod relay;
pub mod runtime;
pub mod stateless;
pub mod store;
pub mod supervisor;
pub mod transaction;
pub mod usage;

pub use dataport::{DataPort, MapInput, MapOutput, MapSession};
pub use diagnostics::result_of_run;
pub use diagnostics::CellError;
pub use evaluator::Evaluator;
pub use gateway::Compiling;
pub use interrupt::{Interrupter, Interruption};
pub use outputs::{CellOutput, InputAsker, StreamSink};
pub use places::private_base;
