//! What a process and everything it started use, read from /proc: CPU time and resident
//! memory. An engine reports its own; only its host can read them.

use std::collections::HashMap;

/// CPU seconds (user and system) and resident bytes of `root` and its descendants.
pub fn tree_usage(root: u32) -> (f64, u64) {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, (parent, _)) in crate::interrupt::process_table() {
        children.entry(parent).or_default().push(pid);
    }
    let (mut ticks, mut rss_bytes) = (0, 0);
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if let Some((t, rss)) = cpu_and_memory(pid) {
            ticks += t;
            rss_bytes += rss;
        }
        todo.extend(children.get(&pid).into_iter().flatten());
    }
    (ticks as f64 / clock_ticks(), rss_bytes)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf takes and returns plain integers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU ticks used (user + system) and resident bytes of one process.
fn cpu_and_memory(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12) ... rss(21), in pages.
    let number = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf takes and returns plain integers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some((number(11)? + number(12)?, number(21)? * page))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_tree_uses_some_memory_and_time() {
        let burn: u64 = (0..5_000_000u64).fold(0, |a, x| a.wrapping_add(x * x));
        assert!(burn > 0);
        let (cpu_seconds, rss_bytes) = super::tree_usage(std::process::id());
        assert!(rss_bytes > 1 << 20, "{rss_bytes}");
        assert!(cpu_seconds >= 0.0);
        assert_eq!(super::tree_usage(u32::MAX), (0.0, 0));
    }
}
