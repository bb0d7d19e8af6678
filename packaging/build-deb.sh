#!/usr/bin/env bash
# Builds the Debian package: target/debian/amq2api_<version>-1_<arch>.deb (under
# $CARGO_TARGET_DIR when set). Layout and maintainer scripts: [package.metadata.deb] in
# Cargo.toml and packaging/debian/.
#
# 1. installs libsqlite3-dev and pkg-config when they are missing (apt, as root; otherwise it
#    says so and stops), and cargo-deb (from crates.io);
# 2. builds the release binaries;
# 3. generates the man pages of amq2api and amqctl (`amq2api man`, `amqctl man`) and amqctl's
#    bash/zsh/fish completions from their clap definitions into target/packaging/ (the asset
#    paths Cargo.toml names; cargo generate-rpm uses them too);
# 4. runs cargo deb and prints the path of the package.
set -euo pipefail
cd "$(dirname "$0")/.."

# amq2api is edition 2024: Rust 1.85 or newer (Debian 12's packaged rustc is 1.63). Say so first,
# not after a page of compiler errors.
min_rust=1.85
if ! rustc_version=$(rustc --version 2>/dev/null | awk '{print $2}'); then
    echo "build-deb.sh: no rustc found: amq2api needs Rust $min_rust or newer; install it with rustup (https://rustup.rs): curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    exit 1
fi
if [ "$(printf '%s\n%s\n' "$min_rust" "${rustc_version%%-*}" | sort -V | head -n 1)" != "$min_rust" ]; then
    echo "build-deb.sh: rustc $rustc_version is too old: amq2api (edition 2024) needs Rust $min_rust or newer; install a current toolchain with rustup (https://rustup.rs), then: rustup default stable" >&2
    exit 1
fi
echo "== rustc $rustc_version (>= $min_rust)"

# amqctl links the system SQLite (libsqlite3-dev to build; the package then depends on
# libsqlite3-0 through cargo-deb's $auto).
if ! dpkg -s libsqlite3-dev pkg-config >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-deb.sh: needs libsqlite3-dev and pkg-config: sudo apt install libsqlite3-dev pkg-config" >&2
        exit 1
    fi
    echo "== apt-get install libsqlite3-dev pkg-config"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y libsqlite3-dev pkg-config
fi

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== cargo install cargo-deb --locked"
    cargo install cargo-deb --locked
fi

echo "== cargo build --release --bins"
cargo build --release --bins

target_dir=${CARGO_TARGET_DIR:-target}
amq2api="$target_dir/release/amq2api"
amqctl="$target_dir/release/amqctl"
generated=target/packaging
mkdir -p "$generated"
echo "== generating the man pages and completions into $generated/"
"$amq2api" man >"$generated/amq2api.1"
"$amqctl" man >"$generated/amqctl.1"
"$amqctl" completions bash >"$generated/amqctl.bash"
"$amqctl" completions zsh >"$generated/_amqctl"
"$amqctl" completions fish >"$generated/amqctl.fish"

echo "== cargo deb"
# The binaries are built; cargo deb strips them and assembles the package. Its last line of
# output is the path of the .deb.
deb=$(cargo deb --no-build | tail -n 1)
echo "$deb"
