#!/usr/bin/env bash
# Install everything the vhost-user-net test suite needs on a Debian 12
# (bookworm) machine, as root.  Idempotent: when everything is already in place
# it touches no network and finishes in well under a second.
#
# What it provides:
#   * host tools from Debian: iproute2, busybox-static, cpio, ethtool, systemd
#     (systemd-socket-activate, systemd-analyze), util-linux (setpriv),
#     libvirt-clients and libxml2-utils (virt-xml-validate),
#     iputils-ping, socat, procps, kmod, xz-utils, zstd
#   * QEMU 10 (qemu-system-x86 from bookworm-backports), installed normally
#     (/usr/bin/qemu-system-x86_64)
#   * Debian 12's own QEMU 7.2, unpacked (not installed) into
#     $VUN_CACHE/qemu-7.2 together with a wrapper that runs it side by side
#   * a Debian 12 guest kernel (linux-image-6.1.0-*-amd64), unpacked (never
#     installed into /boot) into $VUN_CACHE/kernel
#   * a busybox guest initramfs built by tests/guest/build-initramfs.sh
#   * $VUN_CACHE/env.sh exporting the paths (see the end of this file)
#
# Environment knobs:
#   VUN_CACHE        cache directory (default /var/cache/vhost-user-net)
#   VUN_KERNEL_PKG   force a kernel package name (default: whatever
#                    linux-image-amd64 depends on)
#   VUN_FORCE=1      redo the QEMU 7.2 / kernel unpack and initramfs build
set -euo pipefail

CACHE=${VUN_CACHE:-/var/cache/vhost-user-net}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FORCE=${VUN_FORCE:-0}
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-deps] %s\n' "$*" >&2; }
die() { printf '[install-deps] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v apt-get >/dev/null || die "needs a Debian system (apt-get)"

APT_PKGS=(iproute2 busybox-static cpio ethtool iputils-ping socat procps kmod systemd util-linux
          libvirt-clients libxml2-utils
          dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-net-tap23 librte-net-null23
          xz-utils zstd gzip ca-certificates debian-archive-keyring)
BACKPORTS_FILE=/etc/apt/sources.list.d/bookworm-backports.sources

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

APT_UPDATED=0
apt_update() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# bookworm_mirror: the Debian mirror this machine's apt sources already use.
# shellcheck source=.ci/apt-sources.sh
source "$REPO_ROOT/.ci/apt-sources.sh"

ensure_backports_source() {
    if grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local mirror
    mirror=$(bookworm_mirror | head -n1)
    if [[ -z $mirror ]]; then
        mirror=http://deb.debian.org/debian
        log "no bookworm source found in /etc/apt; using $mirror for backports"
    fi
    log "adding $BACKPORTS_FILE (bookworm-backports from $mirror)"
    cat >"$BACKPORTS_FILE" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=0
}

# newest version of $1 in the apt cache whose archive line does NOT match
# $2 (extended regex) and whose version matches $3 (extended regex)
pick_version() {
    local pkg=$1 exclude=$2 want=$3
    apt-cache madison "$pkg" |
        awk -F' *\\| *' -v ex="$exclude" -v want="$want" \
            '!found && $3 !~ ex && $2 ~ want { print $2; found = 1 }'
}

# apt-get download "$pkg=$ver" into $dir; echoes the .deb path
download_deb() {
    local pkg=$1 ver=$2 dir=$3
    mkdir -p "$dir"
    (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null)
    local f
    f=$(ls -1t "$dir"/"${pkg}"_*.deb | head -n1)
    [[ -f $f ]] || die "download of $pkg=$ver failed"
    echo "$f"
}

# --------------------------------------------------------------------------
# 1. Debian packages + QEMU 10 from bookworm-backports
# --------------------------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    apt_update
    log "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

qemu10_ok() {
    pkg_installed qemu-system-x86 && [[ $(pkg_version qemu-system-x86) == 1:10.* ]] &&
        [[ -x /usr/bin/qemu-system-x86_64 ]]
}
if ! qemu10_ok; then
    ensure_backports_source
    apt_update
    log "installing qemu-system-x86 from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-system-data >/dev/null
    qemu10_ok || die "qemu-system-x86 10.x not installed (got '$(pkg_version qemu-system-x86)')"
fi

mkdir -p "$CACHE"
# serialise concurrent runs (several test binaries may call this script)
exec 9>"$CACHE/.lock"
flock 9

# --------------------------------------------------------------------------
# 2. QEMU 7.2 (Debian 12) unpacked side by side
# --------------------------------------------------------------------------
# Needs qemu-system-common too: in 7.2 the TCG accelerator is a loadable
# module (accel-tcg-x86_64.so) shipped there, found through QEMU_MODULE_DIR.
Q72=$CACHE/qemu-7.2
if [[ $FORCE == 1 || ! -f $Q72/.stamp || ! -x $Q72/qemu-system-x86_64 ]]; then
    apt_update
    v_x86=$(pick_version qemu-system-x86 backports '^1:7\.2')
    v_common=$(pick_version qemu-system-common backports '^1:7\.2')
    v_data=$(pick_version qemu-system-data backports '^1:7\.2')
    v_bios=$(pick_version seabios backports '.')
    v_ipxe=$(pick_version ipxe-qemu backports '.')
    [[ -n $v_x86 && -n $v_common && -n $v_data && -n $v_bios && -n $v_ipxe ]] ||
        die "could not find bookworm versions of qemu 7.2 packages (x86='$v_x86' common='$v_common' data='$v_data' seabios='$v_bios' ipxe='$v_ipxe')"
    log "unpacking QEMU $v_x86 (seabios $v_bios, ipxe-qemu $v_ipxe) into $Q72"
    dl=$CACHE/debs
    rm -rf "$dl" "$Q72.tmp"
    mkdir -p "$Q72.tmp/root"
    for pv in "qemu-system-x86=$v_x86" "qemu-system-common=$v_common" \
              "qemu-system-data=$v_data" "seabios=$v_bios" "ipxe-qemu=$v_ipxe"; do
        deb=$(download_deb "${pv%%=*}" "${pv#*=}" "$dl")
        dpkg-deb -x "$deb" "$Q72.tmp/root"
    done
    rm -rf "$dl" "$Q72.tmp/root/usr/share/doc" "$Q72.tmp/root/usr/share/man"
    # Wrapper: private module dir (otherwise 7.2 would look into QEMU 10's
    # /usr/lib/x86_64-linux-gnu/qemu and have no TCG) and private firmware dirs
    # (otherwise it would pick QEMU 10's seabios/option ROMs).  -L directories
    # are searched before the compiled-in ones; repeating -L is harmless.
    cat >"$Q72.tmp/qemu-system-x86_64" <<EOF
#!/bin/sh
# Debian 12 QEMU 7.2, unpacked by .ci/install-deps.sh; runs with the host's
# (bookworm) shared libraries, which the backports QEMU 10 also uses.
d=\$(dirname "\$(readlink -f "\$0")")/root
export QEMU_MODULE_DIR="\$d/usr/lib/x86_64-linux-gnu/qemu"
exec "\$d/usr/bin/qemu-system-x86_64" -L "\$d/usr/share/qemu" -L "\$d/usr/share/seabios" -L "\$d/usr/lib/ipxe/qemu" "\$@"
EOF
    chmod +x "$Q72.tmp/qemu-system-x86_64"
    if ldd "$Q72.tmp/root/usr/bin/qemu-system-x86_64" | grep -q 'not found'; then
        ldd "$Q72.tmp/root/usr/bin/qemu-system-x86_64" | grep 'not found' >&2
        die "QEMU 7.2 is missing shared libraries"
    fi
    "$Q72.tmp/qemu-system-x86_64" --version | grep -q 'version 7\.2' ||
        die "unpacked QEMU 7.2 does not run"
    printf 'qemu-system-x86=%s\nseabios=%s\nipxe-qemu=%s\n' "$v_x86" "$v_bios" "$v_ipxe" \
        >"$Q72.tmp/.stamp"
    rm -rf "$Q72"
    mv "$Q72.tmp" "$Q72"
fi

# --------------------------------------------------------------------------
# 3. Guest kernel (Debian 12 linux-image-6.1.0-*-amd64), unpacked only
# --------------------------------------------------------------------------
KDIR=$CACHE/kernel
if [[ $FORCE == 1 || ! -f $KDIR/.stamp ]]; then
    apt_update
    kpkg=${VUN_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 |
        awk '!f && /Depends: linux-image-[0-9]/ { print $2; f = 1 }')}
    [[ -n $kpkg ]] || die "cannot resolve linux-image-amd64's kernel package"
    kver=$(pick_version "$kpkg" backports '.')
    [[ -n $kver ]] || die "no version of $kpkg available"
    log "unpacking $kpkg $kver into $KDIR"
    dl=$CACHE/debs
    rm -rf "$dl" "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    deb=$(download_deb "$kpkg" "$kver" "$dl")
    dpkg-deb -x "$deb" "$KDIR.tmp"
    rm -rf "$dl" "$KDIR.tmp/usr/share/doc"
    printf '%s=%s\n' "$kpkg" "$kver" >"$KDIR.tmp/.stamp"
    rm -rf "$KDIR"
    mv "$KDIR.tmp" "$KDIR"
    rm -f "$CACHE/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz.hash"
fi
KERNEL=$(ls -1 "$KDIR"/boot/vmlinuz-* | head -n1)
KREL=${KERNEL##*/vmlinuz-}
MODDIR=$KDIR/lib/modules/$KREL
[[ -f $KERNEL && -d $MODDIR ]] || die "kernel unpack in $KDIR is broken; rerun with VUN_FORCE=1"

# --------------------------------------------------------------------------
# 4. Guest initramfs (rebuilt when the builder or its inputs changed)
# --------------------------------------------------------------------------
INITRD=$CACHE/initramfs.cpio.gz
BUILDER=$REPO_ROOT/tests/guest/build-initramfs.sh
if [[ -x $BUILDER ]]; then
    # content hash of everything that goes in (mtimes are useless in a fresh
    # clone): builder, guest scripts, busybox, ethtool, kernel package
    want=$({ cat "$BUILDER" "$REPO_ROOT"/tests/guest/rootfs/*
             cat /bin/busybox "$(command -v ethtool || echo /dev/null)" "$KDIR/.stamp"; } |
           sha256sum | cut -d' ' -f1)
    have=$(cat "$INITRD.hash" 2>/dev/null || true)
    if [[ $FORCE == 1 || ! -s $INITRD || $want != "$have" ]]; then
        log "building $INITRD"
        "$BUILDER" --modules "$MODDIR" --output "$INITRD"
        echo "$want" >"$INITRD.hash"
    fi
else
    log "warning: $BUILDER not found; no initramfs built"
fi

# --------------------------------------------------------------------------
# 5. env file
# --------------------------------------------------------------------------
ENV_FILE=$CACHE/env.sh
Q72_ROOT=$Q72/root
tmp_env=$(mktemp "$CACHE/.env.XXXXXX")
cat >"$tmp_env" <<EOF
# Generated by .ci/install-deps.sh.  One 'export NAME='value'' per line.
export VUN_CACHE='$CACHE'
export VUN_QEMU10='/usr/bin/qemu-system-x86_64'
export VUN_QEMU10_VERSION='$(pkg_version qemu-system-x86)'
# QEMU 7.2 wrapper: sets QEMU_MODULE_DIR and the -L flags itself.
export VUN_QEMU72='$Q72/qemu-system-x86_64'
export VUN_QEMU72_VERSION='$(sed -n 's/^qemu-system-x86=//p' "$Q72/.stamp")'
# The raw 7.2 binary needs both of these (the wrapper already applies them):
export VUN_QEMU72_BIN='$Q72_ROOT/usr/bin/qemu-system-x86_64'
export VUN_QEMU72_ARGS='-L $Q72_ROOT/usr/share/qemu -L $Q72_ROOT/usr/share/seabios -L $Q72_ROOT/usr/lib/ipxe/qemu'
export VUN_QEMU72_MODULE_DIR='$Q72_ROOT/usr/lib/x86_64-linux-gnu/qemu'
export VUN_KERNEL='$KERNEL'
export VUN_KERNEL_RELEASE='$KREL'
export VUN_MODULES_DIR='$MODDIR'
export VUN_INITRAMFS='$INITRD'
EOF
chmod 644 "$tmp_env"
mv "$tmp_env" "$ENV_FILE"

log "done; environment in $ENV_FILE:"
grep '^export' "$ENV_FILE" >&2
