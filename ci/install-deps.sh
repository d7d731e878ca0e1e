#!/usr/bin/env bash
# Installs what building and testing this project needs on a bare Debian 12 machine (as root).
#
# Idempotent: when every tool and package is already present it does nothing (no apt-get update),
# so it is cheap to call from every other script.
#
#   bash ci/install-deps.sh
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*" >&2; }
die() { printf '[install-deps] error: %s\n' "$*" >&2; exit 1; }

# Debian packages the build, the guest images and the tests need:
# - libclang-dev: userfaultfd-sys runs bindgen at build time.
# - iproute2: tests build network namespaces and veth pairs (`ip`, `tc`).
# - busybox-static: the Linux guest's initramfs userland.
# - cpio, gzip: packing the initramfs.
# - xz-utils, zstd, lz4, bzip2, gzip: unpacking the kernel payload out of a bzImage.
# - binutils, file: readelf/objcopy and type checks on the kernel and the workload guest.
# - ca-certificates: apt's https mirrors on some machines.
# - curl: the API tests talk to the VMM's socket with the real curl.
# - qemu-system-x86: the peer the harness measures beside ours (QEMU scenarios, its tests).
# The workload guest links with rust-lld, which ships with the Rust toolchain (no package needed).
PACKAGES=(
    libclang-dev
    iproute2
    busybox-static
    cpio
    gzip
    xz-utils
    zstd
    lz4
    bzip2
    binutils
    file
    python3
    ca-certificates
    curl
    qemu-system-x86
)

if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (it installs Debian packages with apt-get)"
fi
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script expects a Debian-based machine"

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    log "all ${#PACKAGES[@]} Debian packages already installed"
else
    log "installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The Rust toolchain comes with the machine (rustup); it cannot be fetched here.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found (PATH=$PATH): install the Rust toolchain with rustup first"

# rustfmt and clippy are part of the test command.
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            log "adding rustup component $comp"
            rustup component add "$comp"
        else
            die "cargo $comp is missing and rustup is not available to add it"
        fi
    fi
done

if cargo nextest --version >/dev/null 2>&1; then
    log "cargo-nextest present: $(cargo nextest --version 2>/dev/null | head -n 1)"
else
    log "cargo-nextest missing: building it from crates.io (takes a few minutes)"
    cargo install cargo-nextest --locked
fi

log "done"
