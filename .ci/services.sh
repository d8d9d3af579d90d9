#!/usr/bin/env bash
# Debian packages for the grid's infrastructure tests: a single-node Slurm
# (slurm-wlm + munge), PostgreSQL, and headless Chromium. Installs only what is missing;
# the tests start and stop the services themselves, on loopback, in temp dirs.
# Needs root (CI runs as root). psycopg2-binary comes from pyproject's `test` extra.
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ "${#need[@]}" -eq 0 ]; then
  echo "services: slurm-wlm, munge, postgresql, chromium already installed"
  exit 0
fi
echo "services: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101: install the packages without starting their system services
# (the tests run their own daemons; a container has no init to start them anyway).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
status=0
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || status=$?
[ "$created_policy" -eq 1 ] && rm -f "$policy"
exit "$status"
