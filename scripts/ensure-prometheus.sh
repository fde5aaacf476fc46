#!/usr/bin/env bash
# Installs Debian's `prometheus` package (prometheus + promtool) for the tests that
# run a real Prometheus, when it is missing and we can: root with apt-get.
# Otherwise it only says so; those tests skip (or fail under CI=true).
set -uo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: prometheus/promtool not found and cannot install them" \
        "(needs root and apt-get); the real-Prometheus tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-prometheus: installing Debian's prometheus package (for tests)" >&2
# The package's post-install starts a service where systemd runs; in a container
# there is none and nothing starts: the tests run their own Prometheus.
if ! apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    if ! apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
        echo "ensure-prometheus: apt-get install prometheus failed" >&2
        exit 0
    fi
fi
command -v promtool >/dev/null 2>&1 || echo "ensure-prometheus: promtool still missing" >&2
exit 0
