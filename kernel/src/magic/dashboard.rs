//! `%dashboard`: the first one starts the browser page's server; each starts a live block in
//! the notebook (freezing the one before); `--stop` freezes the live block as a snapshot.

use crate::controller::Controller;
use crate::dashboard::block::LiveDashboard;
use crate::dashboard::monitor::Monitor;
use crate::dashboard::usage::SharedUsage;
use crate::dashboard::web::WebDashboard;
use crate::dashboard::Watched;
use crate::jupyter::iopub::CellOut;
use std::time::Duration;

/// How often the engines' CPU and memory are sampled, for every view.
const USAGE_EVERY: Duration = Duration::from_millis(500);

pub struct Dashboards {
    watched: Watched,
    /// The live block, if one is updating.
    live: Option<LiveDashboard>,
    /// The browser page's address, once its server has started.
    web: Option<String>,
}

impl Dashboards {
    pub fn new(controller: Controller, monitor: Monitor) -> Self {
        Dashboards {
            watched: Watched {
                controller,
                monitor,
                usage: SharedUsage::new(USAGE_EVERY),
            },
            live: None,
            web: None,
        }
    }

    pub async fn toggle(&mut self, stop: bool, out: &CellOut) {
        let previous = self.live.take();
        let had_one = previous.is_some();
        if let Some(previous) = previous {
            previous.freeze().await;
        }
        if stop {
            out.stdout(if had_one {
                "The dashboard is stopped; its last state stays as a snapshot.\n"
            } else {
                "No dashboard is live; %dashboard starts one.\n"
            });
            return;
        }
        if self.web.is_none() {
            match WebDashboard::start(self.watched.clone()).await {
                Ok(web) => self.web = Some(web.url),
                // The notebook's block still works without the browser page.
                Err(e) => out.stderr(&format!("The browser dashboard could not start: {e:#}\n")),
            }
        }
        self.live = Some(LiveDashboard::start(
            self.watched.clone(),
            out.clone(),
            self.web.clone(),
        ));
    }
}
