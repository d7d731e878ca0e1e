#!/usr/bin/env bash
# Builds the Linux guest from Debian packages (fetched with apt, nothing else):
#
#   guest-images/out/bzImage           Debian's cloud kernel as shipped (/boot/vmlinuz-*)
#   guest-images/out/vmlinux           the uncompressed ELF kernel, extracted from that bzImage
#   guest-images/out/initramfs.cpio.gz busybox-static plus a small /init
#   guest-images/out/kernel-release    the kernel's release string (e.g. 6.1.0-56-cloud-amd64)
#
# Downloads go to guest-images/cache/. Outputs newer than their inputs are kept, so a second run is
# quick. Run as root on Debian 12 after ci/install-deps.sh.
#
# Environment:
#   KERNEL_PKG   the versioned kernel package to use (default: what linux-image-cloud-amd64 depends on)
#   FORCE=1      rebuild the outputs even when they look up to date
#
# Booting the initramfs: /init mounts proc/sys/dev, prints "vmm-guest: init ...", then either
# runs the arguments the kernel passed to init (everything after " -- " on the kernel command line)
# with `sh -c` and powers off, or, without such arguments, starts a shell on the console.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"
out="$here/out"
self="$here/$(basename "${BASH_SOURCE[0]}")"

log() { printf '[build-linux] %s\n' "$*" >&2; }
die() { printf '[build-linux] error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb tar cpio gzip file readelf od; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: run 'bash ci/install-deps.sh' first"
done

mkdir -p "$cache" "$out"

# True when $1 exists and is newer than every other argument that exists.
up_to_date() {
    local target=$1
    shift
    [ "${FORCE:-0}" = 1 ] && return 1
    [ -s "$target" ] || return 1
    local dep
    for dep in "$@"; do
        [ "$dep" -nt "$target" ] && return 1
    done
    return 0
}

apt_lists_refreshed=0
refresh_apt_lists() {
    if [ "$apt_lists_refreshed" = 0 ]; then
        log "refreshing apt package lists (apt-get update)"
        apt-get update -q >&2 || die "apt-get update failed"
        apt_lists_refreshed=1
    fi
}

# Prints the name of the versioned kernel package (linux-image-X.Y.Z-N-cloud-amd64).
resolve_kernel_package() {
    if [ -n "${KERNEL_PKG:-}" ]; then
        printf '%s\n' "$KERNEL_PKG"
        return
    fi
    local name attempt
    for attempt in 1 2; do
        name=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
        if [ -n "$name" ]; then
            printf '%s\n' "$name"
            return
        fi
        [ "$attempt" = 1 ] && refresh_apt_lists
    done
    # Offline fallback: a package already in the cache.
    name=$(find "$cache" -maxdepth 1 -name 'linux-image-*-cloud-amd64_*.deb' -printf '%f\n' 2>/dev/null |
        sort -V | tail -n 1 | cut -d_ -f1)
    [ -n "$name" ] || die "apt-cache cannot resolve linux-image-cloud-amd64 to a versioned kernel package"
    log "apt cannot resolve linux-image-cloud-amd64; using the cached $name"
    printf '%s\n' "$name"
}

# Downloads package $1 into the cache unless a .deb of it is there already; prints the .deb's path.
fetch_deb() {
    local pkg=$1 deb
    deb=$(find "$cache" -maxdepth 1 -name "${pkg}_*.deb" 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$deb" ]; then
        log "downloading $pkg with apt-get download"
        if ! (cd "$cache" && apt-get download -q "$pkg" >&2 2>/dev/null); then
            refresh_apt_lists
            (cd "$cache" && apt-get download -q "$pkg" >&2) ||
                die "apt-get download $pkg failed"
        fi
        deb=$(find "$cache" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n 1)
        [ -n "$deb" ] || die "apt-get download $pkg left no ${pkg}_*.deb in $cache"
    fi
    printf '%s\n' "$deb"
}

# Unpacks .deb $1 into directory $2 (fresh) unless $2 is newer than the .deb. With $3 (a path in
# the package, like ./boot), unpacks only that part (the kernel's modules are not needed).
unpack_deb() {
    local deb=$1 dir=$2 part=${3:-}
    if [ -d "$dir" ] && [ "$dir/.unpacked" -nt "$deb" ]; then
        return
    fi
    log "unpacking ${part:-everything} from $(basename "$deb")"
    rm -rf "$dir"
    mkdir -p "$dir"
    if [ -n "$part" ]; then
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" "$part" ||
            die "unpacking $part from $deb failed"
    else
        dpkg-deb -x "$deb" "$dir" || die "dpkg-deb -x $deb failed"
    fi
    touch "$dir/.unpacked"
}

# Reads an unsigned little-endian integer of $3 bytes at offset $2 of file $1.
read_le() {
    od -An -tu"$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' '
}

# Names the compression format whose magic starts file $1 (or prints nothing).
payload_format() {
    local head
    head=$(od -An -tx1 -N 6 "$1" | tr -d ' \n')
    case "$head" in
        fd377a585a00*) echo xz ;;
        28b52ffd*) echo zstd ;;
        1f8b08* | 1f8b09*) echo gzip ;;
        02214c18*) echo lz4 ;;
        425a68*) echo bzip2 ;;
        5d0000*) echo lzma ;;
        *) ;;
    esac
}

# Decompresses stdin in format $1 to stdout. The kernel appends the uncompressed size after the
# compressed stream, so decompressors may complain about trailing bytes: their status is not
# trusted; the caller checks the result instead.
decompress() {
    case "$1" in
        xz) xz -dc --single-stream ;;
        zstd) zstd -dcq ;;
        gzip) gzip -dcq ;;
        lz4) lz4 -dcq ;;
        bzip2) bzip2 -dcq ;;
        lzma) xz -dc --format=lzma ;;
        *) return 1 ;;
    esac
}

# True when $1 is an x86-64 ELF executable.
is_elf_kernel() {
    [ -s "$1" ] || return 1
    file -b "$1" | grep -q '^ELF 64-bit LSB executable, x86-64' || return 1
    readelf -h "$1" >/dev/null 2>&1
}

# Tries to decompress the payload starting at byte $2 of bzImage $1 into $3; true on an ELF.
try_payload_at() {
    local image=$1 offset=$2 dest=$3 fmt
    local chunk="$dest.payload"
    tail -c "+$((offset + 1))" "$image" >"$chunk"
    fmt=$(payload_format "$chunk")
    if [ -z "$fmt" ]; then
        rm -f "$chunk"
        return 1
    fi
    decompress "$fmt" <"$chunk" >"$dest" 2>/dev/null || true
    rm -f "$chunk"
    if is_elf_kernel "$dest"; then
        log "payload at offset $offset is $fmt; decompressed to $(stat -c %s "$dest") bytes"
        return 0
    fi
    return 1
}

# Extracts the uncompressed kernel ELF from bzImage $1 into $2.
extract_vmlinux() {
    local image=$1 dest=$2 tmp="$2.tmp"
    # x86 boot protocol: "HdrS" at 0x202; setup_sects at 0x1f1 (0 means 4); the protected-mode
    # kernel starts after (setup_sects + 1) sectors; payload_offset (0x248) is relative to it.
    local magic setup_sects version payload_offset
    magic=$(od -An -c -j 514 -N 4 "$image" | tr -d ' ')
    [ "$magic" = "HdrS" ] || die "$image is not a bzImage (no HdrS boot header at 0x202)"
    version=$(read_le "$image" 518 2)
    setup_sects=$(read_le "$image" 497 1)
    [ "$setup_sects" -eq 0 ] && setup_sects=4
    if [ "$version" -ge $((0x208)) ]; then
        payload_offset=$(read_le "$image" 584 4)
        local start=$(((setup_sects + 1) * 512 + payload_offset))
        log "bzImage boot protocol $((version >> 8)).$((version & 0xff)), payload at $start"
        if try_payload_at "$image" "$start" "$tmp"; then
            # The build appends the uncompressed size (le32) to the payload: check it.
            local payload_length expected
            payload_length=$(read_le "$image" 588 4)
            expected=$(read_le "$image" $((start + payload_length - 4)) 4)
            local got
            got=$(stat -c %s "$tmp")
            if [ "$expected" != "$got" ]; then
                rm -f "$tmp"
                die "vmlinux decompressed from $image is $got bytes; the payload says $expected"
            fi
            mv "$tmp" "$dest"
            return 0
        fi
        log "the header's payload offset did not decompress to an ELF; scanning for magic numbers"
    fi
    # Fallback: try every place a known compression magic appears.
    local pattern offset
    for pattern in '\xfd\x37\x7a\x58\x5a\x00' '\x28\xb5\x2f\xfd' '\x1f\x8b\x08' '\x02\x21\x4c\x18' \
        '\x42\x5a\x68' '\x5d\x00\x00'; do
        while IFS= read -r offset; do
            if try_payload_at "$image" "$offset" "$tmp"; then
                mv "$tmp" "$dest"
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$pattern" "$image" 2>/dev/null | cut -d: -f1 | head -n 8)
    done
    rm -f "$tmp"
    die "no compressed payload in $image decompressed to an x86-64 ELF"
}

# Writes the initramfs's /init script to $1.
write_init() {
    cat >"$1" <<'INIT'
#!/bin/busybox sh
# /init of the vmm Linux guest (built by guest-images/build-linux.sh).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
echo "vmm-guest: init running on Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu(s), $(sed -n 's/^MemTotal: *//p' /proc/meminfo)"
if [ "$#" -gt 0 ]; then
    # Arguments after " -- " on the kernel command line: run them, then power off.
    sh -c "$*"
    echo "vmm-guest: command exited with status $?"
else
    echo "vmm-guest: no command given (append ' -- CMD' to the kernel command line); starting a shell"
    setsid cttyhack sh
fi
echo "vmm-guest: powering off"
sync
poweroff -f
INIT
    chmod 0755 "$1"
}

# Builds the initramfs $2 from the unpacked busybox-static tree $1.
build_initramfs() {
    local bbroot=$1 dest=$2
    local busybox="$bbroot/bin/busybox"
    [ -x "$busybox" ] || die "busybox-static's package has no executable /bin/busybox ($busybox)"
    file -b "$busybox" | grep -q 'statically linked' || die "$busybox is not statically linked"
    local root="$cache/initramfs-root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,root,etc}
    cp "$busybox" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    write_init "$root/init"
    # The kernel opens /dev/console before running /init: give it one (needs root for mknod).
    if [ "$(id -u)" -eq 0 ]; then
        mknod -m 600 "$root/dev/console" c 5 1
        mknod -m 666 "$root/dev/null" c 1 3
    else
        log "warning: not root, so no /dev/console node in the initramfs (early console output may be lost)"
    fi
    log "packing $(basename "$dest")"
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9n >"$dest.tmp"
    mv "$dest.tmp" "$dest"
}

kernel_pkg=$(resolve_kernel_package)
log "kernel package: $kernel_pkg"
kernel_deb=$(fetch_deb "$kernel_pkg")
busybox_deb=$(fetch_deb busybox-static)

kroot="$cache/kernel-root"
unpack_deb "$kernel_deb" "$kroot" ./boot
vmlinuz=$(find "$kroot/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)
[ -n "$vmlinuz" ] || die "$(basename "$kernel_deb") has no /boot/vmlinuz-*"
release=${vmlinuz##*/vmlinuz-}

if up_to_date "$out/bzImage" "$kernel_deb" "$self"; then
    log "out/bzImage is up to date"
else
    cp "$vmlinuz" "$out/bzImage.tmp"
    mv "$out/bzImage.tmp" "$out/bzImage"
    log "wrote out/bzImage ($(stat -c %s "$out/bzImage") bytes, $release)"
fi
printf '%s\n' "$release" >"$out/kernel-release"

if up_to_date "$out/vmlinux" "$out/bzImage" "$self"; then
    log "out/vmlinux is up to date"
else
    log "extracting vmlinux from bzImage"
    extract_vmlinux "$out/bzImage" "$out/vmlinux"
fi
is_elf_kernel "$out/vmlinux" || die "out/vmlinux is not an x86-64 ELF: $(file -b "$out/vmlinux")"
log "out/vmlinux: $(file -b "$out/vmlinux" | cut -d, -f1-2)"

bbroot="$cache/busybox-root"
unpack_deb "$busybox_deb" "$bbroot"
if up_to_date "$out/initramfs.cpio.gz" "$busybox_deb" "$self"; then
    log "out/initramfs.cpio.gz is up to date"
else
    build_initramfs "$bbroot" "$out/initramfs.cpio.gz"
fi
gzip -dc "$out/initramfs.cpio.gz" | cpio --list --quiet 2>/dev/null | grep -qx init ||
    die "out/initramfs.cpio.gz has no /init"
log "out/initramfs.cpio.gz: $(stat -c %s "$out/initramfs.cpio.gz") bytes"

log "done: $out/{bzImage,vmlinux,initramfs.cpio.gz} (Linux $release)"
