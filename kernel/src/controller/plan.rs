//! Who compiles for whom: the engines of one host whose states are the same share a cell,
//! compiled once by one of them (the leader) and run by all. Pure functions over what the pool
//! knows of each engine, so that the policy can be read and tested apart from the sockets.

use crate::text::engine_list;
use std::collections::BTreeMap;

/// What an engine's state is known as: its history's fingerprint, once it reported with nothing
/// queued, or the shared cell it was last sent, which leaves every engine of that cell's group
/// in one state unless their outcomes differ (they report that later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKey {
    Reported(u64),
    After(u64),
}

/// The fingerprint of an engine that has executed nothing.
pub const EMPTY_HISTORY: u64 = 0;

/// What the planner needs to know of a live engine.
#[derive(Debug, Clone)]
pub struct Standing {
    pub host: String,
    pub state: StateKey,
    /// It holds a compiling context for its state.
    pub compiler: bool,
    /// Why its state left the others', if it did, in words.
    pub divergence: Option<String>,
}

/// One shared cell of a plan: the engines that run it, and the leader among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub cell: u64,
    pub leader: u32,
    pub followers: Vec<u32>,
    /// Live engines in the same state that do not get the cell: they part from the group.
    pub left_out: Vec<u32>,
}

impl Group {
    pub fn members(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.leader).chain(self.followers.iter().copied())
    }

    /// Why each engine's state leaves the others' with this cell, when some are left out.
    pub fn divergences(&self) -> Vec<(u32, String)> {
        if self.left_out.is_empty() {
            return Vec::new();
        }
        let mut members: Vec<u32> = self.members().collect();
        members.sort_unstable();
        let cell = self.cell;
        let ran = members.iter().map(|&m| {
            let why = format!(
                "it ran a cell (shared cell {cell}) that engines {} did not",
                engine_list(&self.left_out)
            );
            (m, why)
        });
        let missed = self.left_out.iter().map(|&o| {
            let why = format!(
                "engines {} ran a cell (shared cell {cell}) that it did not",
                engine_list(&members)
            );
            (o, why)
        });
        ran.chain(missed).collect()
    }
}

/// Splits `targets` into groups that share compiled cells (one host, one state), numbering their
/// cells from `next_cell`. A group's leader is an engine that already holds a compiling context
/// for that state if there is one, else its lowest id. A target that is not live runs alone.
pub fn plan(live: &BTreeMap<u32, Standing>, targets: &[u32], next_cell: u64) -> Vec<Group> {
    let mut by_state: BTreeMap<(&str, StateKey), Vec<u32>> = BTreeMap::new();
    for &engine in targets {
        let key = match live.get(&engine) {
            Some(standing) => (standing.host.as_str(), standing.state),
            // Dead or unknown: it will not run the cell; alone, no one waits for it.
            None => ("", StateKey::After(u64::MAX - u64::from(engine))),
        };
        by_state.entry(key).or_default().push(engine);
    }
    let mut groups = Vec::with_capacity(by_state.len());
    for (cell, ((host, state), members)) in (next_cell..).zip(by_state) {
        let left_out = live
            .iter()
            .filter(|(id, s)| s.host == host && s.state == state && !members.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let leader = members
            .iter()
            .copied()
            .find(|m| live.get(m).is_some_and(|s| s.compiler))
            .or_else(|| members.iter().copied().min())
            .unwrap_or_default();
        groups.push(Group {
            cell,
            leader,
            followers: members.into_iter().filter(|m| *m != leader).collect(),
            left_out,
        });
    }
    groups
}

/// Which live engines share compiled cells and which compile their own, and why: a line each,
/// for `%cluster status`.
pub fn sharing_report(live: &BTreeMap<u32, Standing>) -> Vec<String> {
    let mut groups: BTreeMap<(&str, StateKey), Vec<u32>> = BTreeMap::new();
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, standing) in live {
        groups
            .entry((standing.host.as_str(), standing.state))
            .or_default()
            .push(*id);
        *per_host.entry(standing.host.as_str()).or_default() += 1;
    }
    let mut lines = Vec::new();
    for ((host, _), members) in groups {
        if members.len() > 1 {
            let compiling = members
                .iter()
                .copied()
                .find(|m| live.get(m).is_some_and(|s| s.compiler));
            let ids = engine_list(&members);
            lines.push(match compiling {
                Some(leader) => format!(
                    "engines {ids} on {host} share compiled cells: engine {leader} compiles them"
                ),
                None => format!(
                    "engines {ids} on {host} share compiled cells: engine {} will compile the next",
                    members[0]
                ),
            });
            continue;
        }
        let id = members[0];
        let why = if per_host.get(host) == Some(&1) {
            format!("it is the only engine on {host}")
        } else {
            live.get(&id)
                .and_then(|s| s.divergence.clone())
                .unwrap_or_else(|| "no other engine is in its state".to_owned())
        };
        lines.push(format!(
            "engine {id} on {host} compiles its own cells: {why}"
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(host: &str, state: StateKey, compiler: bool) -> Standing {
        Standing {
            host: host.into(),
            state,
            compiler,
            divergence: None,
        }
    }

    fn pool(engines: &[(u32, &str, StateKey, bool)]) -> BTreeMap<u32, Standing> {
        engines
            .iter()
            .map(|&(id, host, state, compiler)| (id, standing(host, state, compiler)))
            .collect()
    }

    const FRESH: StateKey = StateKey::Reported(EMPTY_HISTORY);

    #[test]
    fn engines_of_a_host_in_one_state_share_one_cell_led_by_the_lowest_id() {
        let live = pool(&[
            (0, "a", FRESH, false),
            (1, "a", FRESH, false),
            (2, "a", FRESH, false),
        ]);
        let groups = plan(&live, &[2, 0, 1], 7);
        let expected = Group {
            cell: 7,
            leader: 0,
            followers: vec![2, 1],
            left_out: vec![],
        };
        assert_eq!(groups, [expected]);
    }

    #[test]
    fn an_engine_that_already_compiles_for_the_state_leads() {
        let live = pool(&[(0, "a", FRESH, false), (1, "a", FRESH, true)]);
        let groups = plan(&live, &[0, 1], 0);
        assert_eq!(
            (groups[0].leader, groups[0].followers.clone()),
            (1, vec![0])
        );
    }

    #[test]
    fn hosts_and_states_split_groups_and_each_gets_its_own_cell() {
        let live = pool(&[
            (0, "a", FRESH, false),
            (1, "a", StateKey::After(3), false),
            (2, "b", FRESH, false),
            (3, "b", FRESH, false),
        ]);
        let groups = plan(&live, &[0, 1, 2, 3], 10);
        let summary: Vec<(u64, u32, Vec<u32>)> = groups
            .iter()
            .map(|g| (g.cell, g.leader, g.followers.clone()))
            .collect();
        assert_eq!(
            summary,
            [(10, 0, vec![]), (11, 1, vec![]), (12, 2, vec![3])]
        );
    }

    #[test]
    fn a_dead_or_unknown_target_runs_alone() {
        let live = pool(&[(0, "a", FRESH, false), (1, "a", FRESH, false)]);
        let groups = plan(&live, &[0, 1, 5], 0);
        assert_eq!(groups.len(), 2);
        let alone = groups.iter().find(|g| g.leader == 5).expect("5 planned");
        assert!(alone.followers.is_empty() && alone.left_out.is_empty());
    }

    #[test]
    fn engines_left_out_of_a_cell_part_and_both_sides_say_why() {
        let live = pool(&[
            (0, "a", FRESH, false),
            (1, "a", FRESH, false),
            (2, "a", FRESH, false),
        ]);
        let groups = plan(&live, &[0, 2], 4);
        assert_eq!(groups[0].left_out, vec![1]);
        let why: BTreeMap<u32, String> = groups[0].divergences().into_iter().collect();
        assert_eq!(
            why[&0],
            "it ran a cell (shared cell 4) that engines 1 did not"
        );
        assert_eq!(
            why[&1],
            "engines 0, 2 ran a cell (shared cell 4) that it did not"
        );
        assert!(plan(&live, &[0, 1, 2], 5)[0].divergences().is_empty());
    }

    #[test]
    fn the_report_names_groups_leaders_and_why_an_engine_is_alone() {
        let mut live = pool(&[
            (0, "vm", FRESH, true),
            (1, "vm", StateKey::After(9), false),
            (2, "vm", FRESH, false),
            (3, "other", FRESH, false),
        ]);
        if let Some(one) = live.get_mut(&1) {
            one.divergence = Some("in cell 2, it panicked here".into());
        }
        let report = sharing_report(&live);
        assert_eq!(
            report,
            [
                "engine 3 on other compiles its own cells: it is the only engine on other",
                "engines 0, 2 on vm share compiled cells: engine 0 compiles them",
                "engine 1 on vm compiles its own cells: in cell 2, it panicked here",
            ]
        );
    }
}
