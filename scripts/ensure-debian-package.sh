#!/usr/bin/env bash
# Installs a Debian package that some tests need and pip cannot provide, when one of its
# commands is missing and we can: root with apt-get. Otherwise it only says so; those
# tests then skip (or fail under CI=true).
#
#   scripts/ensure-debian-package.sh PACKAGE COMMAND...
#
# Used by `make tools`: prometheus (prometheus, promtool) for tests/test_prometheus.py,
# chromium for tests/test_browser_chromium.py (driven by Playwright; no browser is ever
# downloaded, `playwright install` is never run).
set -uo pipefail

package=$1
shift
missing=0
for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 || missing=1
done
[ "$missing" = 0 ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-debian-package: $package not found and cannot install it" \
        "(needs root and apt-get); the tests that need it will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-debian-package: installing Debian's $package package (for tests)" >&2
# Try with the package lists we have; update them only when that fails. Where systemd
# runs, a package's post-install may start a service; the tests run their own processes.
if ! apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    if ! apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
        echo "ensure-debian-package: apt-get install $package failed" >&2
        exit 0
    fi
fi
for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 || echo "ensure-debian-package: $command still missing" >&2
done
exit 0
