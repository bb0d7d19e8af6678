#!/usr/bin/env bash
# Installs the two generations of the official `anthropic` Python SDK that tests/it/sdk.rs drives,
# each into its own directory (used as PYTHONPATH): target/pysdk/v2 (2.x, anthropic-version
# 2026-10-21, Bearer auth) and target/pysdk/v1 (1.x, 2023-06-01, x-api-key).
# Idempotent: a directory that already holds a matching version is left alone.
# Needs only python3 with pip. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."

install() {
    local dir="$1" spec="$2" prefix="$3"
    local have
    # The version in $dir itself, not one installed elsewhere on the machine.
    have=$(PYTHONPATH="$dir" python3 -c '
import os, sys, anthropic
if os.path.realpath(anthropic.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep):
    print(anthropic.__version__)' "$dir" 2>/dev/null || true)
    if [[ -n "$have" && "$have" == "$prefix"* ]]; then
        echo "tests/sdk/install.sh: anthropic $have already in $dir"
        return
    fi
    echo "tests/sdk/install.sh: installing $spec into $dir"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --no-input --no-warn-conflicts --target "$dir" "$spec"
    PYTHONPATH="$dir" python3 -c 'import anthropic; print("tests/sdk/install.sh: anthropic", anthropic.__version__, "in", "'"$dir"'")'
}

install target/pysdk/v2 'anthropic==2.14.*' '2.14.'
install target/pysdk/v1 'anthropic==1.17.*' '1.17.'
