#!/usr/bin/env bash
# Headless Chromium for the report-rendering test (tests/jobs/test_eval_report.py).
# Idempotent: does nothing when `chromium` is already on PATH. Debian/Ubuntu (apt).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
command -v chromium >/dev/null
