#!/usr/bin/env bash
# The full soak of issue 18: 10 minutes of %pmap and %px cells while engines and stores are
# SIGKILLed at random every 20-40 s (`.ci/run` runs the same test for 2 minutes). Prints its
# counts and the kernel's memory before and after.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
cd "$PARALLAX_ROOT"
"$PARALLAX_ROOT/install/build.sh"
"$PARALLAX_ROOT/install/venv.sh"
PARALLAX_SOAK_SECONDS="${PARALLAX_SOAK_SECONDS:-600}" \
    "$PARALLAX_ROOT/.venv/bin/python" -m pytest -p no:cacheprovider -s tests/test_soak.py "$@"
