//! The dashboards: one model, several views. The `monitor` hears from the controller what every
//! engine does (as its `Observer`) and keeps it in bounded windows, with the `jobs` and the
//! session's `timeline`; `usage` samples the engines' CPU and memory; the views are the
//! notebook's live `block` and the browser page served by `web`.

pub mod block;
pub mod jobs;
pub mod monitor;
pub mod timeline;
pub mod usage;
pub mod web;

use crate::controller::Controller;
use monitor::Monitor;
use usage::SharedUsage;

/// What every view reads: the engines' status, what they do, and what they use.
#[derive(Clone)]
pub struct Watched {
    pub controller: Controller,
    pub monitor: Monitor,
    pub usage: SharedUsage,
}
