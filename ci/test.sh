#!/usr/bin/env bash
# shellcheck disable=SC2317 # the functions below run indirectly, through step()
# The project's one test command (CI runs it through .ci/run), from any directory:
#
#   bash ci/test.sh
#
# 1. installs what is missing (ci/install-deps.sh)
# 2. builds the guest images (guest-images/build-all.sh)
# 3. cargo build --workspace --release
# 4. cargo fmt --all --check
# 5. cargo clippy --workspace --all-targets -- -D warnings
# 6. cargo nextest run --workspace --release --profile ci (every test, no fail-fast)
# 0. first of all, reserves the 1 GiB huge page the tests need (while memory is still unfragmented)
# 7. checks the huge page pools are as the tests found them (a test leaking pages is a failure),
#    and puts them back as the run found them
#
# Steps 1-3 stop the run when they fail; 4-7 all run and every failure is reported. Tests are
# built in release mode: the same artifacts as the demo, and VM/latency tests run at real speed.
# The last line printed is nextest's summary line. Exits non-zero if anything failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '\n[test] === %s\n' "$*" >&2; }
die() { printf '[test] error: %s\n' "$*" >&2; exit 1; }

run_start=$(date +%s)
results=()
failed=0

# Runs "$@" as step $1 (name), records its status and duration.
step() {
    local name=$1 start rc
    shift
    log "$name: $*"
    start=$(date +%s)
    set +e
    "$@"
    rc=$?
    set -e
    results+=("$(printf '%-34s %-4s %5ss' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" "$(($(date +%s) - start))")")
    if [ "$rc" -ne 0 ]; then
        failed=1
        printf '[test] %s failed with status %s\n' "$name" "$rc" >&2
    fi
    return "$rc"
}

print_summary() {
    printf '\n[test] ===== summary (%ss in all) =====\n' "$(($(date +%s) - run_start))"
    local line
    for line in "${results[@]}"; do
        printf '[test]   %s\n' "$line"
    done
}

# Each huge page pool as "nr_hugepages path=value", one per line.
pool_entries() {
    local f
    for f in /sys/kernel/mm/hugepages/hugepages-*/nr_hugepages; do
        [ -e "$f" ] && printf '%s=%s\n' "$f" "$(cat "$f")"
    done
}

# The huge page pools as the run found them: put back when the run ends, however it ends.
mapfile -t pools_found < <(pool_entries)
restore_pools() {
    local entry
    for entry in "${pools_found[@]}"; do
        echo "${entry##*=}" >"${entry%=*}" 2>/dev/null || true
    done
}

# 1 GiB pages are reserved first, before the build: the kernel needs 1 GiB of physically
# contiguous free memory for each, and after a build's worth of page cache and slab it rarely
# finds one (see docs/platform.md). The reserved pages stay in the pool, free; the
# tests find them there (vmm::memory::hugepages uses free pages before growing the pool). Tests
# that need a 1 GiB page have `1g` in their names; if the host cannot give one page even now,
# they are left out of the run and the summary says so, instead of failing on the host.
gig=/sys/kernel/mm/hugepages/hugepages-1048576kB
gig_pages=${VMM_CI_1G_PAGES:-1}
gig_note=""
reserve_gigantic() {
    [ -e "$gig/nr_hugepages" ] || { gig_note="the kernel has no 1 GiB huge page pool"; return 1; }
    local total free want try
    for try in 1 2 3; do
        total=$(cat "$gig/nr_hugepages")
        free=$(cat "$gig/free_hugepages")
        [ "$free" -ge "$gig_pages" ] && return 0
        want=$((total + gig_pages - free))
        echo "$want" >"$gig/nr_hugepages" 2>/dev/null || true
        [ "$(cat "$gig/free_hugepages")" -ge "$gig_pages" ] && return 0
        # Give back what a partial grow took, then make room and try again.
        echo "$total" >"$gig/nr_hugepages" 2>/dev/null || true
        sync
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
        echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
        sleep "$try"
    done
    gig_note="the host could not reserve $gig_pages free 1 GiB huge page(s) (nr_hugepages $(cat "$gig/nr_hugepages"), free $(cat "$gig/free_hugepages")); memory is too fragmented"
    return 1
}
trap restore_pools EXIT
if reserve_gigantic; then
    printf '[test] reserved %s free 1 GiB huge page(s) for the tests (%s/nr_hugepages is %s; put back to what it was at the end)\n' \
        "$gig_pages" "$gig" "$(cat "$gig/nr_hugepages")" >&2
    skip_gig=0
else
    printf '[test] WARNING: %s: the tests that need a 1 GiB page (names with "1g") will not run\n' "$gig_note" >&2
    skip_gig=1
fi

# The pools the tests start from (with the 1 GiB reservation): every test must give back to these.
mapfile -t pools_before < <(pool_entries)

check_pools_restored() {
    local entry f want now bad=0
    for entry in "${pools_before[@]}"; do
        f=${entry%=*}
        want=${entry##*=}
        now=$(cat "$f")
        if [ "$now" != "$want" ]; then
            printf '[test] %s is %s after the tests, was %s: a test did not give its huge pages back\n' \
                "$f" "$now" "$want" >&2
            bad=1
        fi
    done
    if pgrep -x vmm >/dev/null 2>&1; then
        printf '[test] vmm processes left running after the tests:\n' >&2
        pgrep -a -x vmm >&2 || true
        bad=1
    fi
    return "$bad"
}

fatal_step() {
    if ! step "$@"; then
        print_summary
        die "$1 failed; stopping"
    fi
}

fatal_step "install dependencies" bash ci/install-deps.sh
fatal_step "build guest images" bash guest-images/build-all.sh
fatal_step "cargo build (release)" cargo build --workspace --release

step "cargo fmt --check" cargo fmt --all --check || true
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets -- -D warnings || true

nextest_log=$(mktemp /tmp/vmm-nextest.XXXXXX.log)
trap 'rm -f "$nextest_log"; restore_pools' EXIT
filter=()
[ "$skip_gig" -eq 1 ] && filter=(-E 'not test(/1g/)')
run_nextest() {
    cargo nextest run --workspace --release --profile ci --no-fail-fast "${filter[@]}" 2>&1 | tee "$nextest_log"
}
step "cargo nextest run (release)" run_nextest || true
step "huge page pools restored" check_pools_restored || true

print_summary
if [ "$skip_gig" -eq 1 ]; then
    printf '[test] NOT RUN: the 1 GiB huge page tests: %s\n' "$gig_note"
fi
if [ "$failed" -ne 0 ]; then
    printf '[test] FAILED\n'
else
    printf '[test] all steps passed\n'
fi
# Close with the test runner's own summary line.
summary_line=$(grep -E '^ *Summary \[' "$nextest_log" | tail -n 1 || true)
if [ -n "$summary_line" ]; then
    printf '%s\n' "$summary_line"
else
    printf 'nextest printed no summary line (the tests did not run)\n'
fi
exit "$failed"
