#!/usr/bin/env bash
# Builds the freestanding workload guest and copies the ELF to guest-images/out/workload.elf.
# Idempotent; prints the path of the ELF.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate="$here/workload"
out="$here/out"
target_dir="${CARGO_TARGET_DIR:-$crate/target}"
# cargo resolves a relative CARGO_TARGET_DIR against the directory it runs in (the crate).
[[ "$target_dir" == /* ]] || target_dir="$crate/$target_dir"

(cd "$crate" && cargo build --release --quiet)

elf="$target_dir/x86_64-unknown-linux-gnu/release/workload"
if [[ ! -f "$elf" ]]; then
    echo "build-workload.sh: built ELF not found at $elf" >&2
    exit 1
fi
mkdir -p "$out"
cp -f "$elf" "$out/workload.elf.tmp"
mv -f "$out/workload.elf.tmp" "$out/workload.elf"
echo "$out/workload.elf"
