#!/usr/bin/env bash
# Engines on other hosts: per launcher (ssh, mpiexec, Slurm), 4 engines on 2 hosts that are
# network namespaces of this machine (tests/testbed.py, with real sshd and Slurm): time until
# ready, %cluster ping, a trivial %px against 4 local engines, and how long a cut link takes to
# be reported. Needs root. Prints a table.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
"$PARALLAX_ROOT/install/build.sh" >/dev/null
"$PARALLAX_ROOT/install/venv.sh"
"$PARALLAX_ROOT/install/cluster-tools.sh"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
"$PARALLAX_BIN" install --prefix "$data" >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
JUPYTER_PATH="$data/share/jupyter" PARALLAX_LOG=warn \
    "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/multihost_bench.py" "$@"
