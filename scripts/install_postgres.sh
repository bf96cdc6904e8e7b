#!/usr/bin/env bash
# PostgreSQL server binaries for the job-store tests (tests/serve/test_jobstore.py
# starts its own server: initdb into a temporary folder, `postgres` on a free
# 127.0.0.1 port). Idempotent: does nothing when Debian's server package is
# installed already. Debian/Ubuntu (apt).
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql
ls /usr/lib/postgresql/*/bin/postgres >/dev/null
