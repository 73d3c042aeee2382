//! Values for engines on other hosts cross each host's link once: a pushed value is carried to
//! one engine of each host and the others there store it from that host's shared memory; a
//! scattered part is carried to its own engine. Small values still travel in the messages.

use super::transfer_progress::TransferProgress;
use crate::controller::{Carried, CarryFailed, Controller};
use parallax_engine_protocol::{Payload, Region, PARTS_FROM};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// One value's bytes for one host: who receives them, and which engines there store them.
#[derive(Debug, PartialEq)]
pub struct CarryPlan {
    pub carrier: u32,
    pub engines: Vec<u32>,
}

/// The carries a transfer needs: `parts` by engine (the same payload for every engine of a
/// push), `host_of` each engine's host, or `None` for this host's engines, which read the
/// notebook's shared memory instead.
pub fn plan_carries(
    parts: &BTreeMap<u32, &Payload>,
    scatter: bool,
    host_of: impl Fn(u32) -> Option<String>,
) -> Vec<CarryPlan> {
    let mut by_host: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut plans = Vec::new();
    for (&engine, part) in parts {
        if (part.data.len() as u64) < PARTS_FROM {
            continue;
        }
        let Some(host) = host_of(engine) else {
            continue;
        };
        if scatter {
            plans.push(CarryPlan {
                carrier: engine,
                engines: vec![engine],
            });
        } else {
            by_host.entry(host).or_default().push(engine);
        }
    }
    plans.extend(by_host.into_values().map(|engines| CarryPlan {
        carrier: engines[0],
        engines,
    }));
    plans
}

/// What carrying gave: where each engine served reads its bytes, the carries to release once
/// the engines have stored them, the engines whose carry failed, with why, and whether the
/// stop button ended it.
#[derive(Default)]
pub struct Carries {
    pub regions: BTreeMap<u32, Region>,
    pub held: Vec<Carried>,
    pub failed: BTreeMap<u32, String>,
    pub interrupted: bool,
}

/// Carries what `parts` has for engines of other hosts there, showing the bytes carried so
/// far in `progress`.
pub async fn carry_to_other_hosts(
    controller: &Controller,
    parts: &BTreeMap<u32, &Payload>,
    scatter: bool,
    progress: &mut TransferProgress,
) -> Carries {
    let plans = plan_carries(parts, scatter, |e| controller.other_host(e));
    let to_carry: u64 = plans
        .iter()
        .map(|plan| parts[&plan.carrier].data.len() as u64)
        .sum();
    let carried = AtomicU64::new(0);
    let carrying = carry_all(controller, plans, parts, &carried);
    progress
        .counting("carrying to other hosts", &carried, to_carry, carrying)
        .await
}

/// Runs every plan at once; `carried` counts the bytes written on the other hosts so far.
async fn carry_all(
    controller: &Controller,
    plans: Vec<CarryPlan>,
    parts: &BTreeMap<u32, &Payload>,
    carried: &AtomicU64,
) -> Carries {
    let runs = plans.iter().map(|plan| {
        let mut last = 0;
        controller.carry(plan.carrier, parts[&plan.carrier], move |now| {
            carried.fetch_add(now - last, Ordering::Relaxed);
            last = now;
        })
    });
    let results = futures_util::future::join_all(runs).await;
    let mut carries = Carries::default();
    for (plan, result) in plans.into_iter().zip(results) {
        match result {
            Ok(held) => {
                for &engine in &plan.engines {
                    carries.regions.insert(engine, held.region.clone());
                }
                carries.held.push(held);
            }
            Err(CarryFailed::Interrupted) => carries.interrupted = true,
            // Its engines get the value in their own messages, as before carrying.
            Err(CarryFailed::NoRoom(why)) => tracing::warn!(
                "no room to carry a value to engine {}'s host ({why}); sending it to engines {:?} each",
                plan.carrier,
                plan.engines
            ),
            Err(CarryFailed::Error(why)) => {
                let why = if plan.engines.len() > 1 {
                    format!("carrying the value to engine {}: {why}", plan.carrier)
                } else {
                    why
                };
                for &engine in &plan.engines {
                    carries.failed.insert(engine, why.clone());
                }
            }
        }
    }
    carries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(bytes: usize) -> Payload {
        Payload::usizes(&vec![7; bytes / 8])
    }

    #[test]
    fn a_push_crosses_to_each_other_host_once() {
        let big = payload(1 << 20);
        let parts: BTreeMap<u32, &Payload> = (0..6).map(|e| (e, &big)).collect();
        // Engines 0-1 here, 2-3 on host a, 4-5 on host b.
        let host_of = |e: u32| (e >= 2).then(|| if e < 4 { "a" } else { "b" }.to_owned());
        let plans = plan_carries(&parts, false, host_of);
        let expected = vec![
            CarryPlan {
                carrier: 2,
                engines: vec![2, 3],
            },
            CarryPlan {
                carrier: 4,
                engines: vec![4, 5],
            },
        ];
        assert_eq!(plans, expected);
    }

    #[test]
    fn scattered_parts_go_each_to_its_engine_and_small_values_in_messages() {
        let (big, small) = (payload(1 << 20), payload(64));
        let parts: BTreeMap<u32, &Payload> = [(0, &big), (1, &big), (2, &small)].into();
        let plans = plan_carries(&parts, true, |_| Some("a".to_owned()));
        let carriers: Vec<u32> = plans.iter().map(|p| p.carrier).collect();
        assert_eq!(carriers, vec![0, 1]);
    }
}
