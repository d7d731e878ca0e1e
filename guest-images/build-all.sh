#!/usr/bin/env bash
# Builds every guest image into guest-images/out/:
#   workload.elf                          (build-workload.sh: the freestanding ring-3 workload guest)
#   vmlinux, bzImage, initramfs.cpio.gz   (build-linux.sh: Debian's cloud kernel + busybox)
# Each script skips work whose outputs are up to date.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[build-all] %s\n' "$*" >&2; }
die() { printf '[build-all] error: %s\n' "$*" >&2; exit 1; }

if [ -f "$here/build-workload.sh" ]; then
    log "building the workload guest"
    bash "$here/build-workload.sh" || die "guest-images/build-workload.sh failed"
else
    log "warning: guest-images/build-workload.sh not found; skipping the workload guest"
fi

log "building the Linux guest"
bash "$here/build-linux.sh" || die "guest-images/build-linux.sh failed"

log "guest images in $here/out:"
ls -l "$here/out" >&2
