#!/usr/bin/env bash
# The real services the tests talk to, on loopback ports, state under
# target/services/. Idempotent: `up` installs what is missing and starts what
# is not running; `down` stops them; `status` says what runs.
#
#   scripts/services.sh up|down|status [service…]     (default: all)
#
# One file per service in scripts/services/<name>.sh defines
# <name>_up, <name>_down and <name>_status. Ports and URLs are in
# scripts/services/ports.sh, which the tests' support code mirrors.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
export SERVICES_DIR="${SERVICES_DIR:-$root/target/services}"
mkdir -p "$SERVICES_DIR"
# shellcheck source=services/ports.sh
source "$here/services/ports.sh"

all=()
for f in "$here"/services/*.sh; do
  name=$(basename "$f" .sh)
  [ "$name" = ports ] && continue
  # shellcheck disable=SC1090
  source "$f"
  all+=("$name")
done

action="${1:-status}"; shift || true
selected=("$@"); [ ${#selected[@]} -eq 0 ] && selected=("${all[@]}")
case "$action" in
  up|down|status) ;;
  *) echo "usage: $0 up|down|status [${all[*]}]" >&2; exit 2 ;;
esac
for s in "${selected[@]}"; do
  if ! declare -F "${s}_${action}" >/dev/null; then
    echo "services: unknown service $s (known: ${all[*]})" >&2; exit 2
  fi
  "${s}_${action}"
done
