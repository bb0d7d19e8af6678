#!/usr/bin/env bash
# Checks the systemd units in systemd/ (run by .ci/run after the tests):
#   1. `systemd-analyze security --offline=true --threshold=15`: the service's exposure score must
#      be 1.5 ("OK") or better; the score is printed.
#   2. `systemd-analyze verify --man=no` on a copy of amq2api.service and amq2api.socket whose
#      ExecStart= points at the built daemon (target/debug/amq2api, built when missing): any
#      output at all counts as a failure, since verify reports unknown keys without failing.
# Exits non-zero when either check fails. Needs systemd-analyze, not a running systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-units: systemd-analyze is missing (apt-get install systemd)" >&2
    exit 1
fi

status=0

# 1. Exposure score. --threshold takes tenths: 15 means 1.5.
echo "== systemd-analyze security --offline=true --threshold=15 systemd/amq2api.service"
if security=$(systemd-analyze security --offline=true --threshold=15 systemd/amq2api.service 2>&1); then
    grep -F 'Overall exposure level' <<<"$security" || true
else
    echo "$security"
    echo "check-units: exposure score above 1.5" >&2
    status=1
fi

# 2. Verify, on a copy that runs the binary this tree builds.
target_dir=${CARGO_TARGET_DIR:-target}
binary="$target_dir/debug/amq2api"
if [ ! -x "$binary" ]; then
    echo "== cargo build --bin amq2api (for the verify step)"
    cargo build --bin amq2api
fi
binary=$(realpath "$binary")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp systemd/amq2api.service systemd/amq2api.socket "$tmp/"
sed -i "s|^ExecStart=/usr/bin/amq2api\\b|ExecStart=$binary|" "$tmp/amq2api.service"
if ! grep -qF "ExecStart=$binary" "$tmp/amq2api.service"; then
    echo "check-units: ExecStart=/usr/bin/amq2api not found in systemd/amq2api.service" >&2
    exit 1
fi

echo "== systemd-analyze verify --man=no amq2api.service amq2api.socket (ExecStart=$binary)"
if verify=$(systemd-analyze verify --man=no "$tmp/amq2api.service" "$tmp/amq2api.socket" 2>&1) \
    && [ -z "$verify" ]; then
    echo "verify: clean"
else
    echo "$verify"
    echo "check-units: systemd-analyze verify is not clean" >&2
    status=1
fi

exit "$status"
