#!/usr/bin/env bash
# Debian's chromium for tests/test_report.py (the report opened in a headless browser).
# Idempotent and quiet: does nothing when /usr/bin/chromium is there; prints the version either way.
# About 25 s on a Debian 12 runner (apt-get update ~2 s, install of ~113 MB of packages ~23 s).
set -euo pipefail

if ! [ -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    # No recommends: the fonts and desktop helpers it recommends are not needed headless (DejaVu, pulled by
    # fontconfig, renders the report's text).
    $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# The Debian wrapper script warns on stderr about its shared-memory check; only the version matters here.
/usr/bin/chromium --version 2>/dev/null
