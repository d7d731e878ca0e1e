#!/usr/bin/env bash
# Shows the hugetlb pools, or runs a command with the pools grown and gives the pages back after.
#
#   bash ci/hugepages.sh status
#   bash ci/hugepages.sh with 2M=COUNT [1G=COUNT] -- command [args...]
#
# `with` grows each named pool until it has at least COUNT free pages, runs the command, and then
# shrinks the pool again by exactly the number of pages it added, whatever happens (normal exit,
# failure, SIGINT/SIGTERM/SIGHUP). It exits with the command's status. It fails before running the
# command if the kernel cannot provide the pages (memory too fragmented, 1 GiB pages especially:
# only about 2 can be had on the project's machines).
#
# Tests do not need this: they reserve what they need themselves and give it back. This script is
# for running the VMM by hand or from ci/demo.sh. Adjustments of the pools are made while holding
# the lock the tests use ($LOCK_FILE), so they do not interleave with a test's own reservation.
set -euo pipefail

SYSFS=/sys/kernel/mm/hugepages
LOCK_FILE=/run/lock/vmm-tests-hugepages.lock

log() { printf '[hugepages] %s\n' "$*" >&2; }
die() { printf '[hugepages] error: %s\n' "$*" >&2; exit 2; }

usage() {
    cat >&2 <<'EOF'
usage: ci/hugepages.sh status
       ci/hugepages.sh with 2M=COUNT [1G=COUNT] -- command [args...]
EOF
    exit 2
}

# Maps a size name (2M, 1G) to its sysfs directory.
pool_dir() {
    case "$1" in
        2M | 2m | 2048kB) echo "$SYSFS/hugepages-2048kB" ;;
        1G | 1g | 1048576kB) echo "$SYSFS/hugepages-1048576kB" ;;
        *) die "unknown huge page size '$1' (use 2M or 1G)" ;;
    esac
}

read_pool() { cat "$(pool_dir "$1")/$2"; }

status() {
    [ -d "$SYSFS" ] || die "$SYSFS does not exist: this kernel has no hugetlb support"
    local dir size
    printf '%-10s %8s %8s %8s %8s\n' size total free reserved surplus
    for dir in "$SYSFS"/hugepages-*; do
        size=${dir##*/hugepages-}
        printf '%-10s %8s %8s %8s %8s\n' "$size" "$(cat "$dir/nr_hugepages")" \
            "$(cat "$dir/free_hugepages")" "$(cat "$dir/resv_hugepages")" \
            "$(cat "$dir/surplus_hugepages")"
    done
}

# Sets pool $1's nr_hugepages to $2 (never fails the script: the kernel may refuse or give fewer).
set_pool() {
    local file
    file="$(pool_dir "$1")/nr_hugepages"
    if ! echo "$2" >"$file" 2>/dev/null; then
        log "writing $2 to $file failed"
    fi
}

# Sizes whose pools `with` grew, and by how many pages.
added_sizes=()
added_counts=()

# Grows pool $1 until it has at least $2 free pages; records how many pages were added.
grow_pool() {
    local size=$1 want=$2 nr free need target got
    nr=$(read_pool "$size" nr_hugepages)
    free=$(read_pool "$size" free_hugepages)
    need=$((want - free))
    if [ "$need" -le 0 ]; then
        log "$size pool already has $free free pages (want $want)"
        return 0
    fi
    target=$((nr + need))
    log "growing the $size pool from $nr to $target pages"
    set_pool "$size" "$target"
    got=$(read_pool "$size" nr_hugepages)
    if [ "$got" -lt "$target" ]; then
        # Fragmented memory: compact and try once more.
        log "the kernel gave $got of $target $size pages; compacting memory and retrying"
        sync
        echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
        set_pool "$size" "$target"
        got=$(read_pool "$size" nr_hugepages)
    fi
    if [ "$got" -gt "$nr" ]; then
        added_sizes+=("$size")
        added_counts+=("$((got - nr))")
    fi
    if [ "$got" -lt "$target" ]; then
        log "could get only $got of $target $size pages ($((got - nr)) of $need new ones)"
        return 1
    fi
    return 0
}

# Gives back what grow_pool added: each pool shrinks by the pages this run added.
restore_pools() {
    local i size count nr target
    for i in "${!added_sizes[@]}"; do
        size=${added_sizes[$i]}
        count=${added_counts[$i]}
        nr=$(read_pool "$size" nr_hugepages)
        target=$((nr - count))
        [ "$target" -lt 0 ] && target=0
        log "restoring the $size pool: $nr -> $target pages"
        set_pool "$size" "$target"
        nr=$(read_pool "$size" nr_hugepages)
        if [ "$nr" -gt "$target" ]; then
            log "warning: the $size pool is still $nr pages (wanted $target): pages in use; " \
                "the kernel frees them as they are released"
        fi
    done
    added_sizes=()
    added_counts=()
}

grow_all() {
    local spec size count
    for spec in "$@"; do
        size=${spec%%=*}
        count=${spec#*=}
        if ! grow_pool "$size" "$count"; then
            return 1
        fi
    done
}

with() {
    local specs=() spec size count
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
        spec=$1
        shift
        case "$spec" in
            *=*) ;;
            *) die "expected SIZE=COUNT (like 2M=512), got '$spec'" ;;
        esac
        size=${spec%%=*}
        count=${spec#*=}
        pool_dir "$size" >/dev/null
        [[ "$count" =~ ^[0-9]+$ ]] || die "page count '$count' in '$spec' is not a number"
        [ -w "$(pool_dir "$size")/nr_hugepages" ] ||
            die "cannot write $(pool_dir "$size")/nr_hugepages (run as root)"
        specs+=("$size=$count")
    done
    [ "${1:-}" = "--" ] || usage
    shift
    [ "$#" -gt 0 ] || usage

    # Grow in this shell (not in a subshell) so restore_pools sees what was added.
    mkdir -p "$(dirname "$LOCK_FILE")"
    exec 9>>"$LOCK_FILE"
    trap 'locked_restore' EXIT
    flock -x 9
    if ! grow_all "${specs[@]}"; then
        flock -u 9
        status >&2
        die "not enough huge pages for: ${specs[*]}"
    fi
    flock -u 9
    status >&2

    # Run the command as a child so signals can be passed on and the pools restored afterwards.
    # Explicit <&0: a background command would otherwise get /dev/null as its standard input.
    local child rc
    trap '[ -n "${child:-}" ] && kill -TERM "$child" 2>/dev/null' TERM
    trap '[ -n "${child:-}" ] && kill -INT "$child" 2>/dev/null' INT
    trap '[ -n "${child:-}" ] && kill -HUP "$child" 2>/dev/null' HUP
    log "running: $*"
    "$@" <&0 &
    child=$!
    set +e
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"
    done
    wait "$child"
    rc=$?
    set -e
    log "command exited with status $rc"
    exit "$rc"
}

locked_restore() {
    local rc=$?
    flock -x 9 2>/dev/null || true
    restore_pools
    flock -u 9 2>/dev/null || true
    return "$rc"
}

[ "$#" -gt 0 ] || usage
mode=$1
shift
case "$mode" in
    status) status ;;
    with) with "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
