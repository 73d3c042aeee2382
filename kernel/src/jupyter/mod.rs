//! The Jupyter side: the five channels of the messaging protocol and what answers them.
//! `server` binds them and serves control and heartbeat; `wire` frames and signs messages;
//! `iopub` builds and publishes outgoing ones (and `CellOut`, a cell's place to write);
//! `shell` answers requests in turn; `stdin` asks the frontend for input; `completeness` and
//! `history` answer their requests.

pub mod completeness;
pub mod history;
pub mod iopub;
pub mod server;
pub mod shell;
pub mod stdin;
pub mod wire;
