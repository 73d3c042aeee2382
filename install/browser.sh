#!/usr/bin/env bash
# Installs what the browser tests need besides the venv: Debian's Chromium, driven by Playwright
# through its system executable (a browser download is never used). Needs root for apt-get.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install/browser.sh: Chromium is missing; as root run: apt-get install -y chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium
