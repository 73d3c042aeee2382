#!/usr/bin/env bash
# Data movement to engines on other hosts, Parallax against ipyparallel 9.2 in one run: 2 hosts
# (network namespaces of this machine with real sshd, tests/testbed.py) with 2 engines each.
# Needs root. Prints a table with the ratios and the bytes each push sent each host.
# Usage: bench/data_hosts.sh [--runs N]
set -euo pipefail
source "$(dirname "$0")/peers_env.sh"
"$PARALLAX_ROOT/install/cluster-tools.sh"
PARALLAX_LOG=warn "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/data_hosts_bench.py" "$@"
