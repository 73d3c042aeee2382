#!/usr/bin/env bash
# Installs the toolchain pieces evcxr needs and builds the release binary once.
set -euo pipefail
source "$(dirname "$0")/env.sh"
# evcxr's rust-analyzer reads the standard library's sources; without rust-src it would try to
# download them in the middle of the first cell.
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src
fi
cd "$PARALLAX_ROOT"
cargo build --release --locked -p parallax
