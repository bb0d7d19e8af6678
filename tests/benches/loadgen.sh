#!/usr/bin/env bash
# The three-path load figures of README "Performance": direct to the emulator, through HAProxy,
# through the daemon; against the emulator at full speed and slowed to a Python stand-in's
# speed. Installs HAProxy from the distribution's packages when it is missing (a bench script's
# job, never CI's). Usage: tests/benches/loadgen.sh [RUNS] [extra loadgen arguments…]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-2}
shift || true
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy
    fi
fi
cargo build --release --bin amq2api --example loadgen
for run in $(seq 1 "$runs"); do
    for work in 0 10; do
        echo "## run $run, emulator frame work ${work} µs"
        target/release/examples/loadgen --workloads short,paced,long --concurrency 1,8,32,128 \
            --accounts 32 --frame-work-us "$work" "$@"
    done
done
