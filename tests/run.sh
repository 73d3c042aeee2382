#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust unit tests, then the integration tests through
# real Jupyter clients (and JupyterLab in Debian's Chromium) against the release binary built once
# for the run.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
cd "$PARALLAX_ROOT"
"$PARALLAX_ROOT/install/build.sh"
"$PARALLAX_ROOT/install/venv.sh" --ui
"$PARALLAX_ROOT/install/browser.sh"
"$PARALLAX_ROOT/install/cluster-tools.sh"
cargo fmt --all --check
cargo clippy --release --locked --all-targets -- -D warnings
# The Rust tests' evcxr contexts keep their crate directories in a scratch directory of the run's
# (a test process can end before a context's thread has removed its own).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
TMPDIR="$scratch" cargo test --release --locked
# The slowest tests are listed at the end, to see where the suite's time goes.
# pytest exits 5 when it collects nothing: that is a failure here too.
"$PARALLAX_ROOT/.venv/bin/python" -m pytest -p no:cacheprovider -v --durations=25 tests "$@"
