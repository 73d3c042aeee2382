#!/usr/bin/env bash
# Sets everything up and runs the main job: builds Parallax, installs the kernelspec for this
# user, and runs examples/quickstart.ipynb headless, printing its outputs.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PARALLAX_ROOT/install/build.sh"
"$PARALLAX_ROOT/install/venv.sh"
"$PARALLAX_BIN" install --user
"$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/install/run_notebook.py" \
    "$PARALLAX_ROOT/examples/quickstart.ipynb"
