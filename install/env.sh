# Sourced by the scripts: where the shared cargo build lives. One target dir outside the clone,
# reused across runs, because evcxr's rust-analyzer dependencies take long to build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/parallax/target}"
PARALLAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PARALLAX_BIN="$CARGO_TARGET_DIR/release/parallax"
# rust-analyzer's crates (under evcxr) read CI when they compile (option_env!), so builds with
# and without CI set rebuild each other's dependencies (10 minutes here): the project's builds
# never see it. Nothing here reads it otherwise.
unset CI
