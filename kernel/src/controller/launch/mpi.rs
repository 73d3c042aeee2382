//! Engines as the ranks of one `mpiexec` (Open MPI): its `--stdin all` hands every rank the
//! connection, and each rank's id is the launch's first id plus its rank. SIGTERM to mpiexec
//! ends every rank on every host. A dead rank cannot rejoin its `mpiexec`: its replacement is
//! the one rank of an `mpiexec` of its own on the same host (`Mpi::one_rank_on`).

use super::ssh::shell_quote;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Mpi {
    /// `--host`'s list, `host1:2,host2:2` (slots per host).
    pub hosts: Option<String>,
    pub hostfile: Option<PathBuf>,
    /// mpiexec reaches other hosts with ssh; this configuration file, if given.
    pub ssh_config: Option<PathBuf>,
    /// More arguments for mpiexec, as given.
    pub args: Vec<String>,
}

impl Mpi {
    pub fn command(&self, engines: u32, parallax: &str, first: u32) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("mpiexec");
        command.args(self.arguments(engines, parallax, first, is_root()));
        // SAFETY: prctl between fork and exec; a dead kernel's mpiexec is told to end its
        // ranks (SIGTERM, which it passes on), rather than left holding them.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        command
    }

    /// The same launch for a single rank on `host`: what a dead rank's replacement runs.
    pub fn one_rank_on(&self, host: &str) -> Mpi {
        Mpi {
            hosts: Some(format!("{host}:1")),
            hostfile: None,
            ..self.clone()
        }
    }

    fn arguments(&self, engines: u32, parallax: &str, first: u32, root: bool) -> Vec<String> {
        let mut args = Vec::new();
        if root {
            // Open MPI refuses root without it; the kernel runs as whoever started Jupyter.
            args.push("--allow-run-as-root".to_owned());
        }
        args.extend([
            "--stdin".into(),
            "all".into(),
            "-n".into(),
            engines.to_string(),
        ]);
        // One engine's end is not the pool's: mpiexec would otherwise end every rank when one
        // is killed or exits with an error (cut off from the controller).
        for (name, value) in [
            ("orte_abort_on_non_zero_status", "0"),
            ("orte_enable_recovery", "1"),
        ] {
            args.extend(["--mca".into(), name.into(), value.into()]);
        }
        if let Some(hosts) = &self.hosts {
            args.extend(["--host".into(), hosts.clone()]);
        }
        if let Some(hostfile) = &self.hostfile {
            args.extend(["--hostfile".into(), hostfile.to_string_lossy().into_owned()]);
        }
        if let Some(config) = &self.ssh_config {
            let agent = format!("ssh -F {}", shell_quote(&config.to_string_lossy()));
            args.extend(["--mca".into(), "plm_rsh_agent".into(), agent]);
        }
        args.extend(self.args.iter().cloned());
        args.extend([
            parallax.to_owned(),
            "engine".into(),
            "--connect".into(),
            "-".into(),
            "--rank-offset".into(),
            first.to_string(),
        ]);
        args
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_per_engine_numbered_from_the_first_id() {
        let mpi = Mpi {
            hosts: Some("host1:2,host2:2".into()),
            hostfile: None,
            ssh_config: Some("/run/ssh config".into()),
            args: vec![
                "--mca".into(),
                "btl_tcp_if_include".into(),
                "10.0.0.0/24".into(),
            ],
        };
        assert_eq!(
            mpi.arguments(4, "/bin/parallax", 6, true).join(" "),
            "--allow-run-as-root --stdin all -n 4 --mca orte_abort_on_non_zero_status 0 \
             --mca orte_enable_recovery 1 --host host1:2,host2:2 \
             --mca plm_rsh_agent ssh -F '/run/ssh config' --mca btl_tcp_if_include 10.0.0.0/24 \
             /bin/parallax engine --connect - --rank-offset 6"
        );
        assert!(!mpi.arguments(4, "p", 0, false)[0].contains("root"));
    }

    #[test]
    fn a_replacement_is_one_rank_on_its_host_with_the_same_options() {
        let mpi = Mpi {
            hosts: None,
            hostfile: Some("/run/hosts".into()),
            ssh_config: Some("/run/ssh".into()),
            args: vec!["--oversubscribe".into()],
        };
        assert_eq!(
            mpi.one_rank_on("host2")
                .arguments(1, "parallax", 3, false)
                .join(" "),
            "--stdin all -n 1 --mca orte_abort_on_non_zero_status 0 --mca orte_enable_recovery 1 \
             --host host2:1 --mca plm_rsh_agent ssh -F /run/ssh --oversubscribe \
             parallax engine --connect - --rank-offset 3"
        );
    }
}
