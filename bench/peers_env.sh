# Sourced by the benchmarks that compare with peers: installs ipyparallel 9.2 and
# evcxr_jupyter 0.22 into the benchmark's own cache once (~/.cache/parallax/bench, or
# PARALLAX_BENCH_CACHE), and kernelspecs for Parallax and both peers into a temporary
# directory removed on exit. Sets PEERS_PYTHON and JUPYTER_PATH, prints the machine and peers.
source "$(dirname "${BASH_SOURCE[0]}")/../install/env.sh"
"$PARALLAX_ROOT/install/build.sh" >/dev/null
"$PARALLAX_ROOT/install/venv.sh"
bench_cache="${PARALLAX_BENCH_CACHE:-$HOME/.cache/parallax/bench}"
mkdir -p "$bench_cache"
evcxr="$bench_cache/bin/evcxr_jupyter"
if [ ! -x "$evcxr" ]; then
    # --locked uses evcxr_jupyter's own lock file, which avoids the salsa release that breaks a
    # fresh resolve of evcxr 0.22.
    cargo install evcxr_jupyter --version 0.22.0 --locked --root "$bench_cache"
fi
peers="$bench_cache/peers-venv"
if [ ! -x "$peers/bin/python" ]; then
    python3 -m venv "$peers"
fi
"$peers/bin/python" -m pip install --quiet --disable-pip-version-check \
    "ipyparallel==9.2.0" "ipykernel" "numpy"
export PEERS_PYTHON="$peers/bin/python"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
"$PARALLAX_BIN" install --prefix "$data" >/dev/null
"$peers/bin/python" -m ipykernel install --prefix "$data" --name bench-ipython >/dev/null 2>&1
mkdir -p "$data/share/jupyter/kernels/bench-evcxr"
cat > "$data/share/jupyter/kernels/bench-evcxr/kernel.json" <<JSON
{"argv": ["$evcxr", "--control_file", "{connection_file}"], "display_name": "evcxr", "language": "rust"}
JSON
export JUPYTER_PATH="$data/share/jupyter"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
echo "peers: ipyparallel $("$peers/bin/python" -c 'import ipyparallel; print(ipyparallel.__version__)'), evcxr_jupyter 0.22.0"
