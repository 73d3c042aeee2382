//! What an engine needs to reach its controller, wherever it runs: the controller's address, the
//! key that signs every message, and how long a silence means the other side is gone. Launchers
//! hand it to engines on their stdin; `%cluster connection-file` writes it (mode 0600) for
//! engines started by hand. It is never put on a command line.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The environment variables in which MPI and Slurm tell a process its rank, in the order an
/// engine started with `--rank-offset` looks for them.
pub const RANK_VARIABLES: &[&str] = &[
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
    "PMI_RANK",
    "SLURM_PROCID",
];

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Connection {
    /// The controller's ROUTER socket, `tcp://ADDRESS:PORT`.
    pub url: String,
    /// Signs every message (HMAC-SHA256).
    pub key: String,
    pub signature_scheme: String,
    /// The controller's host name: an engine told a loopback address from another host can
    /// say at once that it cannot reach it.
    pub controller_host: String,
    /// Each side pings the other every second; this long without a word, it is gone.
    pub heartbeat_timeout_s: f64,
    /// How long an engine waits for the controller to answer its registration.
    pub register_timeout_s: f64,
    /// The id a standby engine takes when the kernel adopts it into a pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<u32>,
}

pub const SIGNATURE_SCHEME: &str = "hmac-sha256";

impl Connection {
    pub fn parse(text: &str) -> Result<Connection, String> {
        let connection: Connection =
            serde_json::from_str(text).map_err(|e| format!("not a connection file: {e}"))?;
        if connection.signature_scheme != SIGNATURE_SCHEME {
            return Err(format!(
                "signature scheme `{}` is not supported (only {SIGNATURE_SCHEME})",
                connection.signature_scheme
            ));
        }
        if connection.key.is_empty() {
            return Err("the connection file has no key".into());
        }
        if !(connection.heartbeat_timeout_s > 0.0 && connection.register_timeout_s > 0.0) {
            return Err("the connection file's timeouts must be positive".into());
        }
        Ok(connection)
    }

    pub fn to_json(&self) -> String {
        // Strings and numbers only: it always serializes.
        serde_json::to_string_pretty(self).expect("a connection serializes")
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_timeout_s)
    }

    pub fn register_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.register_timeout_s)
    }

    /// The host part of the url, when it is a loopback address (or `localhost`).
    pub fn loopback_address(&self) -> Option<&str> {
        let rest = self.url.strip_prefix("tcp://")?;
        let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        loopback.then_some(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(url: &str) -> Connection {
        Connection {
            url: url.into(),
            key: "k".into(),
            signature_scheme: SIGNATURE_SCHEME.into(),
            controller_host: "head".into(),
            heartbeat_timeout_s: 5.0,
            register_timeout_s: 30.0,
            engine: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_what_it_cannot_use() {
        let connection = sample("tcp://10.1.2.3:4000");
        assert_eq!(Connection::parse(&connection.to_json()), Ok(connection));
        assert!(Connection::parse("{}")
            .unwrap_err()
            .contains("not a connection"));
        let mut other = sample("tcp://10.1.2.3:4000");
        other.signature_scheme = "hmac-md5".into();
        assert!(Connection::parse(&other.to_json())
            .unwrap_err()
            .contains("not supported"));
        other = sample("tcp://10.1.2.3:4000");
        other.key.clear();
        assert!(Connection::parse(&other.to_json())
            .unwrap_err()
            .contains("no key"));
    }

    #[test]
    fn knows_a_loopback_address() {
        assert_eq!(
            sample("tcp://127.0.0.1:5").loopback_address(),
            Some("127.0.0.1")
        );
        assert_eq!(sample("tcp://[::1]:5").loopback_address(), Some("::1"));
        assert_eq!(
            sample("tcp://localhost:5").loopback_address(),
            Some("localhost")
        );
        assert_eq!(sample("tcp://10.200.0.1:5").loopback_address(), None);
    }
}
