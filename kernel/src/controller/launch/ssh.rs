//! Engines on other hosts over `ssh`, with the user's own configuration and keys: one ssh
//! session per engine, whose stdin carries the connection and whose stderr brings back what
//! went wrong on the other side.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Ssh {
    /// Each host and how many engines it runs.
    pub hosts: Vec<(String, u32)>,
    /// Another ssh configuration file than the user's (`ssh -F`).
    pub config: Option<PathBuf>,
}

impl Ssh {
    /// The host of each engine, in id order: host1's engines first.
    pub fn placement(&self) -> Vec<String> {
        self.hosts
            .iter()
            .flat_map(|(host, count)| std::iter::repeat_n(host.clone(), *count as usize))
            .collect()
    }

    /// `ssh HOST exec PARALLAX engine --connect - --id ID`: the remote side reads the
    /// connection from the session's stdin.
    pub fn command(&self, host: &str, parallax: &str, id: u32) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ssh");
        if let Some(config) = &self.config {
            command.arg("-F").arg(config);
        }
        // Never a password prompt: the kernel has no terminal to ask on.
        command.args(["-o", "BatchMode=yes", "-T", "--", host]);
        command.arg(format!(
            "exec {} engine --connect - --id {id}",
            shell_quote(parallax)
        ));
        // SAFETY: as for local engines: prctl between fork and exec. A dead kernel's ssh
        // clients go with it; the engines on the other side exit once they stop hearing it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        command
    }
}

/// Quotes a word for the remote shell.
pub(super) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_engines_host_by_host_and_quotes_the_remote_path() {
        let ssh = Ssh {
            hosts: vec![("host1".into(), 2), ("host2".into(), 1)],
            config: Some("/etc/cfg".into()),
        };
        assert_eq!(ssh.placement(), ["host1", "host1", "host2"]);
        let command = ssh.command("host2", "/opt/my tools/parallax", 2);
        let args: Vec<String> = command
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-F",
                "/etc/cfg",
                "-o",
                "BatchMode=yes",
                "-T",
                "--",
                "host2",
                "exec '/opt/my tools/parallax' engine --connect - --id 2"
            ]
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
