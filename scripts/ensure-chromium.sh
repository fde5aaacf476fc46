#!/usr/bin/env bash
# Installs Debian's `chromium` package for the real-browser test
# (tests/test_browser_chromium.py), when it is missing and we can: root with apt-get.
# Playwright drives this system Chromium; no browser is ever downloaded
# (`playwright install` is never run). Otherwise it only says so; the test then
# skips (or fails under CI=true).
set -uo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: chromium not found and cannot install it" \
        "(needs root and apt-get); the real-browser test will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-chromium: installing Debian's chromium package (for tests)" >&2
# Try with the package lists we have; update them only when that fails.
if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
        echo "ensure-chromium: apt-get install chromium failed" >&2
        exit 0
    fi
fi
command -v chromium >/dev/null 2>&1 || echo "ensure-chromium: chromium still missing" >&2
exit 0
