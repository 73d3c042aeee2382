//! `%cluster`'s subcommands, and the launch options of `start` and `add`: flags, or a named
//! profile of them from the profiles file, with flags overriding the profile.

use crate::words::split_words;

/// `%cluster` subcommands.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterCommand {
    /// Start engines (default: as many as this host has cores, here).
    Start(LaunchOptions),
    /// Start more engines.
    Add(LaunchOptions),
    Status,
    Stop,
    Restart,
    /// Time `count` round trips of a no-op message to every ready engine.
    Ping {
        count: u32,
    },
    /// Write what engines started by hand need (address and key) to `path`, or to the default
    /// place; `ip` is where the controller listens, if it is to change.
    ConnectionFile {
        path: Option<String>,
        ip: Option<String>,
    },
}

/// How engines are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherKind {
    Local,
    Ssh,
    Mpi,
    Slurm,
}

/// The options of `%cluster start` and `add`, each unset unless given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LaunchOptions {
    pub engines: Option<u32>,
    pub launcher: Option<LauncherKind>,
    /// ssh: `host1:4,host2:2`, engines per host; mpi: mpiexec's `--host` list.
    pub hosts: Option<String>,
    pub hostfile: Option<String>,
    pub ssh_config: Option<String>,
    /// The path of `parallax` on the other hosts.
    pub remote_parallax: Option<String>,
    pub mpi_args: Vec<String>,
    pub partition: Option<String>,
    pub time: Option<String>,
    pub account: Option<String>,
    pub nodes: Option<u32>,
    pub sbatch_args: Vec<String>,
    /// The address the controller listens on (and tells engines).
    pub ip: Option<String>,
    pub heartbeat_timeout: Option<f64>,
    /// How long engines have to register once their launch runs.
    pub start_timeout: Option<f64>,
    pub profile: Option<String>,
    /// `--noblock`: return once launched; engines join as they register.
    pub noblock: bool,
    /// `--no-restart`: a dead engine stays dead (by default it is started again).
    pub no_restart: bool,
}

pub const CLUSTER_HELP: &str = "\
start: start engines (default: one per core, here) and wait until they can run a cell; a Slurm job's state shows while it waits, and the stop button cancels it. With --noblock it returns at once and engines join as they start.\n\
add: start more, with the same options. status: one row per engine (id, pid, host, state, uptime), the batch jobs, and who shares compiled cells.\n\
stop: stop every engine on every host (and cancel the Slurm job). restart: stop them and start as many again, here.\n\
ping: time COUNT (default 100) round trips of a no-op message to every ready engine and back.\n\
connection-file [PATH]: write what `parallax engine --connect PATH` needs on another machine (address and key; mode 0600).\n\
Every engine has PARALLAX_ENGINE_ID, PARALLAX_ENGINES and PARALLAX_HOST in its environment.\n\
Options of start and add:\n\
-n N: how many engines (ssh: the sum of --hosts' counts).\n\
--launcher local|ssh|mpi|slurm: how to start them (default local).\n\
--hosts host1:4,host2:2: ssh: engines per host; mpi: mpiexec's --host list. --hostfile FILE: mpi.\n\
--ssh-config FILE: another ssh configuration (ssh, and mpiexec's ssh). --remote-parallax PATH: parallax on the other hosts (default: the one on their PATH).\n\
--mpi-arg ARG: one more mpiexec argument (repeat it).\n\
--partition P, --time T, --account A, --nodes N, --sbatch-arg ARG (repeat it): the Slurm job.\n\
--ip ADDRESS: where the controller listens for engines (default 127.0.0.1, or PARALLAX_CONTROLLER_IP).\n\
--heartbeat-timeout SECS: an engine silent this long is dead (default 5). --start-timeout SECS: how long engines have to register once launched (default 30).\n\
--no-restart: a dead engine stays dead (by default it comes back by itself, same id and host, with its functions, types and dependencies but not its variables; at most 3 times a minute).\n\
--profile NAME: the options of profile NAME in ~/.parallax/profiles.toml (or PARALLAX_PROFILES), under [profile.NAME], keys named as the flags; flags override it.";

impl LaunchOptions {
    /// These options, with `profile`'s where these leave one unset.
    pub fn over(self, profile: LaunchOptions) -> LaunchOptions {
        let list = |mine: Vec<String>, theirs: Vec<String>| {
            if mine.is_empty() {
                theirs
            } else {
                mine
            }
        };
        LaunchOptions {
            engines: self.engines.or(profile.engines),
            launcher: self.launcher.or(profile.launcher),
            hosts: self.hosts.or(profile.hosts),
            hostfile: self.hostfile.or(profile.hostfile),
            ssh_config: self.ssh_config.or(profile.ssh_config),
            remote_parallax: self.remote_parallax.or(profile.remote_parallax),
            mpi_args: list(self.mpi_args, profile.mpi_args),
            partition: self.partition.or(profile.partition),
            time: self.time.or(profile.time),
            account: self.account.or(profile.account),
            nodes: self.nodes.or(profile.nodes),
            sbatch_args: list(self.sbatch_args, profile.sbatch_args),
            ip: self.ip.or(profile.ip),
            heartbeat_timeout: self.heartbeat_timeout.or(profile.heartbeat_timeout),
            start_timeout: self.start_timeout.or(profile.start_timeout),
            profile: self.profile,
            noblock: self.noblock,
            no_restart: self.no_restart,
        }
    }

    /// Reads one flag (`name` with `--`, or `-n`) and its value.
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let text = || Some(value.to_owned());
        match name {
            "-n" | "--engines" => self.engines = Some(positive(name, value)?),
            "--launcher" => {
                self.launcher = Some(match value {
                    "local" => LauncherKind::Local,
                    "ssh" => LauncherKind::Ssh,
                    "mpi" => LauncherKind::Mpi,
                    "slurm" => LauncherKind::Slurm,
                    other => {
                        return Err(format!(
                            "--launcher is local, ssh, mpi or slurm, not `{other}`"
                        ))
                    }
                })
            }
            "--hosts" => self.hosts = text(),
            "--hostfile" => self.hostfile = text(),
            "--ssh-config" => self.ssh_config = text(),
            "--remote-parallax" => self.remote_parallax = text(),
            "--mpi-arg" => self.mpi_args.push(value.to_owned()),
            "--partition" => self.partition = text(),
            "--time" => self.time = text(),
            "--account" => self.account = text(),
            "--nodes" => self.nodes = Some(positive(name, value)?),
            "--sbatch-arg" => self.sbatch_args.push(value.to_owned()),
            "--ip" => self.ip = text(),
            "--heartbeat-timeout" => self.heartbeat_timeout = Some(seconds(name, value)?),
            "--start-timeout" => self.start_timeout = Some(seconds(name, value)?),
            "--profile" => self.profile = text(),
            other => return Err(format!("unknown option {other}")),
        }
        Ok(())
    }
}

fn positive(name: &str, value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{name} takes a positive number, not `{value}`")),
    }
}

fn seconds(name: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!(
            "{name} takes a positive number of seconds, not `{value}`"
        )),
    }
}

/// Reads `--flag value` and `--flag=value` pairs.
fn launch_options(words: &[String]) -> Result<LaunchOptions, String> {
    let mut options = LaunchOptions::default();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        if !word.starts_with('-') {
            return Err(format!("unexpected `{word}`"));
        }
        if word == "--noblock" {
            options.noblock = true;
            continue;
        }
        if word == "--no-restart" {
            options.no_restart = true;
            continue;
        }
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, value.to_owned()),
            None => match words.next() {
                Some(value) => (word.as_str(), value.clone()),
                None => return Err(format!("{word} needs a value")),
            },
        };
        options.set(name, &value)?;
    }
    Ok(options)
}

/// The launch options of profile `name` in the profiles file's text (TOML): its table
/// `[profile.NAME]`, whose keys are the flags' names without dashes.
pub fn profile_options(text: &str, name: &str) -> Result<LaunchOptions, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("the profiles file is not valid TOML: {e}"))?;
    let profiles = table.get("profile").and_then(|p| p.as_table());
    let Some(profile) = profiles
        .and_then(|p| p.get(name))
        .and_then(|p| p.as_table())
    else {
        let known: Vec<&str> = profiles
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        return Err(if known.is_empty() {
            format!("there is no profile `{name}`: the profiles file has none")
        } else {
            format!(
                "there is no profile `{name}`; there are {}",
                known.join(", ")
            )
        });
    };
    let mut options = LaunchOptions::default();
    for (key, value) in profile {
        let flag = format!("--{key}");
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for value in values {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                other => return Err(format!("profile `{name}`: {key} = {other} is not a value")),
            };
            options
                .set(&flag, &text)
                .map_err(|e| format!("profile `{name}`: {e}"))?;
        }
    }
    Ok(options)
}

/// `host1:4,host2:2` (a host alone runs one engine) as hosts and counts.
pub fn host_counts(spec: &str) -> Result<Vec<(String, u32)>, String> {
    spec.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let part = part.trim();
            match part.rsplit_once(':') {
                Some((host, count)) if !host.is_empty() => {
                    Ok((host.to_owned(), positive(&format!("host {host}"), count)?))
                }
                Some(_) => Err(format!("`{part}` names no host")),
                None => Ok((part.to_owned(), 1)),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|hosts| {
            if hosts.is_empty() {
                Err("--hosts names no host".to_owned())
            } else {
                Ok(hosts)
            }
        })
}

pub fn parse_cluster(args: &str) -> Result<ClusterCommand, String> {
    let words = split_words(args)?;
    let no_more = |rest: &[String], command: ClusterCommand| {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(format!("unexpected `{}`", rest.join(" ")))
        }
    };
    match words.as_slice() {
        [] => Err(
            "%cluster needs a subcommand: start, add, status, stop, restart, ping or \
                   connection-file"
                .to_owned(),
        ),
        [sub, rest @ ..] => match sub.as_str() {
            "start" => Ok(ClusterCommand::Start(launch_options(rest)?)),
            "add" => {
                let options = launch_options(rest)?;
                if options.engines.is_none() && options.hosts.is_none() && options.profile.is_none()
                {
                    return Err("add needs -n K (or --hosts, or --profile)".to_owned());
                }
                Ok(ClusterCommand::Add(options))
            }
            "status" => no_more(rest, ClusterCommand::Status),
            "ping" => {
                let options = launch_options(rest)?;
                let count = options.engines.unwrap_or(100);
                if options
                    != (LaunchOptions {
                        engines: options.engines,
                        ..LaunchOptions::default()
                    })
                {
                    return Err("ping takes only -n COUNT".to_owned());
                }
                Ok(ClusterCommand::Ping { count })
            }
            "stop" => no_more(rest, ClusterCommand::Stop),
            "restart" => no_more(rest, ClusterCommand::Restart),
            "connection-file" => {
                let (path, flags) = match rest {
                    [path, flags @ ..] if !path.starts_with('-') => (Some(path.clone()), flags),
                    flags => (None, flags),
                };
                let options = launch_options(flags)?;
                if options.clone().over(LaunchOptions::default())
                    != (LaunchOptions {
                        ip: options.ip.clone(),
                        ..LaunchOptions::default()
                    })
                {
                    return Err("connection-file takes a path and --ip only".to_owned());
                }
                Ok(ClusterCommand::ConnectionFile {
                    path,
                    ip: options.ip,
                })
            }
            other => Err(format!("unknown %cluster subcommand `{other}`")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_and_their_arguments() {
        let start = parse_cluster("start -n 3").unwrap();
        assert_eq!(
            start,
            ClusterCommand::Start(LaunchOptions {
                engines: Some(3),
                ..LaunchOptions::default()
            })
        );
        assert_eq!(parse_cluster("status"), Ok(ClusterCommand::Status));
        assert_eq!(
            parse_cluster("ping"),
            Ok(ClusterCommand::Ping { count: 100 })
        );
        assert_eq!(
            parse_cluster("ping -n 7"),
            Ok(ClusterCommand::Ping { count: 7 })
        );
        assert_eq!(parse_cluster("stop"), Ok(ClusterCommand::Stop));
        assert_eq!(parse_cluster("restart"), Ok(ClusterCommand::Restart));
        assert_eq!(
            parse_cluster("connection-file /tmp/c.json --ip 10.0.0.1"),
            Ok(ClusterCommand::ConnectionFile {
                path: Some("/tmp/c.json".into()),
                ip: Some("10.0.0.1".into())
            })
        );
        let errors = [
            ("", "needs a subcommand"),
            ("start -n 0", "positive"),
            ("start -n x", "positive"),
            ("start -n", "needs a value"),
            ("add", "needs -n"),
            ("status now", "unexpected"),
            ("launch", "unknown"),
            ("start --launcher pbs", "local, ssh, mpi or slurm"),
            ("start --colour red", "unknown option"),
            ("ping --ip 1.2.3.4", "only -n"),
            ("start --heartbeat-timeout -1", "seconds"),
        ];
        for (args, says) in errors {
            let error = parse_cluster(args).unwrap_err();
            assert!(error.contains(says), "{args}: {error}");
        }
    }

    #[test]
    fn launch_options_of_every_launcher() {
        let ClusterCommand::Start(options) = parse_cluster(
            "start --launcher slurm -n 4 --nodes=2 --partition debug --time 10:00 --noblock \
             --sbatch-arg --exclusive --sbatch-arg '--comment=a b' --ip 10.0.0.1 \
             --heartbeat-timeout 2.5 --no-restart",
        )
        .unwrap() else {
            panic!("not a start")
        };
        assert_eq!(options.launcher, Some(LauncherKind::Slurm));
        assert_eq!(options.nodes, Some(2));
        assert_eq!(options.sbatch_args, ["--exclusive", "--comment=a b"]);
        assert_eq!(options.heartbeat_timeout, Some(2.5));
        assert!(options.noblock && options.no_restart);
        assert_eq!(
            host_counts("host1:4, host2,host3:1").unwrap(),
            [
                ("host1".into(), 4),
                ("host2".into(), 1),
                ("host3".into(), 1)
            ]
        );
        assert!(host_counts("host1:0").unwrap_err().contains("positive"));
        assert!(host_counts(":3").unwrap_err().contains("no host"));
        assert!(host_counts(",").unwrap_err().contains("no host"));
    }

    #[test]
    fn a_profile_fills_in_what_the_flags_leave_out() {
        let text = r#"
            [profile.gpu-nodes]
            launcher = "slurm"
            engines = 8
            partition = "gpu"
            sbatch-arg = ["--gres=gpu:1", "--exclusive"]
            heartbeat-timeout = 3.0

            [profile.lab]
            launcher = "ssh"
            hosts = "a:2,b:2"
        "#;
        let profile = profile_options(text, "gpu-nodes").unwrap();
        assert_eq!(profile.engines, Some(8));
        assert_eq!(profile.sbatch_args, ["--gres=gpu:1", "--exclusive"]);
        let ClusterCommand::Start(flags) =
            parse_cluster("start --profile gpu-nodes -n 2 --partition debug").unwrap()
        else {
            panic!("not a start")
        };
        let merged = flags.over(profile);
        assert_eq!(merged.engines, Some(2));
        assert_eq!(merged.partition.as_deref(), Some("debug"));
        assert_eq!(merged.launcher, Some(LauncherKind::Slurm));
        assert_eq!(merged.heartbeat_timeout, Some(3.0));
        assert!(profile_options(text, "cpu")
            .unwrap_err()
            .contains("there are gpu-nodes, lab"));
        assert!(profile_options("[profile.x]\ncolour = \"red\"", "x")
            .unwrap_err()
            .contains("unknown option --colour"));
        assert!(profile_options("not toml [", "x")
            .unwrap_err()
            .contains("not valid TOML"));
    }
}
