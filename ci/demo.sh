#!/usr/bin/env bash
# The project's main job, from any directory:
#
#   bash ci/demo.sh
#
# Installs what is missing, builds the guest images, the VMM and the harness (release), puts `vmm`
# and `harness` on PATH (symlinks in $DEMO_BINDIR, default /usr/local/bin), then boots the workload
# guest in a VM whose RAM is on 2 MiB hugetlb pages (1 GiB, 2 vCPUs). The huge pages are reserved
# for the VM's lifetime with ci/hugepages.sh and given back afterwards. Exits with the VM's status.
#
# Environment (defaults in brackets):
#   DEMO_MEMORY [1G]            guest RAM size (a whole number of M or G)
#   DEMO_VCPUS [2]              number of vCPUs
#   DEMO_BACKING [hugetlb-2m]   anon | shmem | hugetlb-2m | hugetlb-1g | guest-memfd
#   DEMO_CMDLINE [passes=2]     the workload guest's command line
#   DEMO_TIMEOUT [900]          seconds before the VM is stopped (exit status 124)
#   DEMO_BINDIR [/usr/local/bin] where the vmm and harness symlinks go (empty: none)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

memory=${DEMO_MEMORY:-1G}
vcpus=${DEMO_VCPUS:-2}
backing=${DEMO_BACKING:-hugetlb-2m}
cmdline=${DEMO_CMDLINE:-passes=2}
timeout_s=${DEMO_TIMEOUT:-900}

log() { printf '[demo] %s\n' "$*" >&2; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (huge page pools and /dev/kvm)"
[ -c /dev/kvm ] || die "/dev/kvm is missing: this machine cannot run KVM guests"

# Guest RAM size in MiB.
case "$memory" in
    *[Gg]) mem_mib=$((${memory%[Gg]} * 1024)) ;;
    *[Mm]) mem_mib=${memory%[Mm]} ;;
    *) die "DEMO_MEMORY='$memory': give a size like 1G or 512M" ;;
esac

# Huge pages the VM needs: its RAM plus a little slack (rounding, VMM-side regions).
pool_args=()
case "$backing" in
    hugetlb-2m) pool_args=("2M=$(((mem_mib + 1) / 2 + 8))") ;;
    hugetlb-1g) pool_args=("1G=$(((mem_mib + 1023) / 1024))") ;;
    anon | shmem | guest-memfd) ;;
    *) die "DEMO_BACKING='$backing': use anon, shmem, hugetlb-2m, hugetlb-1g or guest-memfd" ;;
esac

log "step 1/4: dependencies"
bash ci/install-deps.sh

log "step 2/4: guest images"
bash guest-images/build-all.sh
kernel=guest-images/out/workload.elf
[ -f "$kernel" ] || die "$kernel was not built (guest-images/build-workload.sh)"

log "step 3/4: the VMM and the harness (cargo build --release)"
cargo build --release -p vmm --bin vmm -p harness --bin harness
vmm=target/release/vmm
[ -x "$vmm" ] || die "$vmm was not built"
[ -x target/release/harness ] || die "target/release/harness was not built"
bindir=${DEMO_BINDIR-/usr/local/bin}
if [ -n "$bindir" ]; then
    mkdir -p "$bindir"
    for b in vmm harness; do
        ln -sf "$root/target/release/$b" "$bindir/$b"
    done
    log "vmm and harness are on PATH: $bindir/vmm, $bindir/harness (symlinks into target/release)"
fi

log "platform:"
"$vmm" probe || log "warning: 'vmm probe' failed (status $?); going on"

run=("$vmm" run --kernel "$kernel" --memory "$memory" --vcpus "$vcpus" --backing "$backing"
    --cmdline "$cmdline" --serial stdout)
log "step 4/4: ${run[*]}"
if [ "${#pool_args[@]}" -gt 0 ]; then
    run=(bash ci/hugepages.sh with "${pool_args[@]}" -- timeout --foreground -k 10 "$timeout_s" "${run[@]}")
else
    run=(timeout --foreground -k 10 "$timeout_s" "${run[@]}")
fi

set +e
"${run[@]}"
rc=$?
set -e

case "$rc" in
    0) log "the VM exited with status 0" ;;
    124) log "the VM did not finish within ${timeout_s}s and was stopped (status 124)" ;;
    *) log "the VM exited with status $rc" ;;
esac
exit "$rc"
