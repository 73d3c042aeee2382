//! Hosts with no route to the internet, as compute nodes often are: their engines have cargo
//! build offline, from the registry cache of the home they share, and a crate that is not
//! there fails with a message that says why and what to do.

/// `PARALLAX_OFFLINE=1` or `0` says; otherwise a host without a default route is offline.
/// Only the host's own routing table is read: nothing is sent to find out.
pub fn is_offline() -> bool {
    match std::env::var("PARALLAX_OFFLINE").as_deref() {
        Ok("1") | Ok("true") => return true,
        Ok("0") | Ok("false") => return false,
        _ => {}
    }
    let ipv4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let ipv6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    !has_default_route(&ipv4, &ipv6)
}

fn has_default_route(ipv4: &str, ipv6: &str) -> bool {
    // IPv4: a route whose destination and mask are 0. IPv6: destination ::/0 through a device
    // other than loopback.
    let v4 = ipv4.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000"
    });
    let v6 = ipv6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 9
            && fields[0] == "00000000000000000000000000000000"
            && fields[1] == "00"
            && fields[9] != "lo"
    });
    v4 || v6
}

/// What to do about a cell that failed for want of the network, if that is why it failed.
pub fn hint_for(error: &str) -> Option<String> {
    let offline = error.contains("--offline") || error.contains("offline mode");
    let unreachable = error.contains("Could not resolve host")
        || error.contains("failed to download")
        || error.contains("spurious network error");
    if !(offline || unreachable) {
        return None;
    }
    let host = parallax_eval::places::host_name();
    Some(format!(
        "\nThis host ({}) cannot reach the crate registry, and the crate is not in its cargo \
         cache. Fetch it into the cargo home this host shares from a machine with network \
         (`cargo fetch`, or a cell with the same `:dep` on the kernel's host), then run the \
         cell again; the other hosts go on.",
        host
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4_HEAD: &str =
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n";

    #[test]
    fn a_host_without_a_default_route_is_offline() {
        let default =
            format!("{V4_HEAD}eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n");
        let subnet_only =
            format!("{V4_HEAD}veth0\t0000C80A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n");
        assert!(has_default_route(&default, ""));
        assert!(!has_default_route(&subnet_only, ""));
        let v6_default = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                          fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0";
        let v6_lo = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                     00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo";
        assert!(has_default_route(&subnet_only, v6_default));
        assert!(!has_default_route(&subnet_only, v6_lo));
    }

    #[test]
    fn network_failures_get_a_hint_and_others_do_not() {
        assert!(hint_for("error: failed to get `rand`: attempting to make an HTTP request, but --offline was specified").is_some());
        assert!(hint_for(
            "[6] Could not resolve hostname (Could not resolve host: index.crates.io)"
        )
        .is_some());
        assert!(hint_for("error[E0425]: cannot find value `x`").is_none());
    }
}
