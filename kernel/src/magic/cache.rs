//! `%cache`: this host's compiled-cell cache (its entries, size, limit and hits), what the
//! notebook and each engine built, clearing it, and its size limit.

use crate::controller::Controller;
use crate::jupyter::iopub::CellOut;
use crate::text::human_bytes;
use parallax_engine_protocol::BuildCounts;
use parallax_eval::cell_build::cache::CellCache;
use parallax_eval::{CellError, CellOutput, Evaluator};
use parallax_magics::CacheCommand;

pub fn cache(
    evaluator: &Evaluator,
    controller: &Controller,
    command: CacheCommand,
    out: &CellOut,
) -> Result<CellOutput, CellError> {
    let cache = CellCache::of_host();
    let host = parallax_eval::places::host_name();
    let failed = |what: &str, e: std::io::Error| {
        CellError::plain(
            "CacheError",
            format!("{what} the cache in {}: {e}", cache.dir().display()),
        )
    };
    match command {
        CacheCommand::Show => out.stdout(&summary(&cache, evaluator, controller)),
        CacheCommand::Clear => {
            let stats = cache.stats();
            let freed = cache.clear().map_err(|e| failed("clearing", e))?;
            out.stdout(&format!(
                "Cleared the compiled-cell cache on {host}: {} entries, {}. Engines on other \
                 hosts keep their hosts' caches.\n",
                stats.entries,
                human_bytes(freed)
            ));
        }
        CacheCommand::Limit(bytes) => {
            cache.set_limit(bytes).map_err(|e| failed("limiting", e))?;
            let stats = cache.stats();
            out.stdout(&format!(
                "The compiled-cell cache on {host} is kept under {}; it holds {} in {} entries.\n",
                human_bytes(bytes),
                human_bytes(stats.bytes),
                stats.entries
            ));
        }
    }
    Ok(CellOutput::default())
}

/// The cache's line, then a table of builds: the notebook's, then each engine's.
fn summary(cache: &CellCache, evaluator: &Evaluator, controller: &Controller) -> String {
    let stats = cache.stats();
    let uses = stats.hits + stats.builds;
    let mut text = format!(
        "Compiled-cell cache on {}: {} entries, {} of {}; {} hits and {} builds since it was \
         cleared ({}).\n",
        parallax_eval::places::host_name(),
        stats.entries,
        human_bytes(stats.bytes),
        human_bytes(stats.limit),
        stats.hits,
        stats.builds,
        hit_rate(stats.hits, uses),
    );
    let mut rows = vec![("notebook".to_owned(), evaluator.builds())];
    for engine in controller.status() {
        rows.push((
            format!("engine {} ({})", engine.id, engine.host),
            engine.builds,
        ));
    }
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    text.push_str(&format!(
        "{:width$}  compiled  cached  failed  hit rate\n",
        "builds"
    ));
    for (name, builds) in rows {
        text.push_str(&row(&name, builds, width));
    }
    text
}

fn row(name: &str, builds: BuildCounts, width: usize) -> String {
    format!(
        "{name:width$}  {:>8}  {:>6}  {:>6}  {:>8}\n",
        builds.compiled,
        builds.cached,
        builds.failed,
        hit_rate(
            builds.cached,
            builds.cached + builds.compiled + builds.failed
        )
    )
}

fn hit_rate(hits: u64, of: u64) -> String {
    if of == 0 {
        "-".to_owned()
    } else {
        format!("{:.0}%", 100.0 * hits as f64 / of as f64)
    }
}
