#!/usr/bin/env bash
# Build the busybox test-guest initramfs (newc cpio, gzip).
#
#   build-initramfs.sh --modules /path/lib/modules/<release> --output out.cpio.gz
#       [--busybox /bin/busybox] [--no-ethtool] [--extra-module NAME]...
#
# --modules defaults to $VUN_MODULES_DIR.  The module chain for virtio-net
# (virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
# failover net_failover virtio_net, plus any dependency modinfo reports) is
# copied flat into /lib/modules/NAME.ko, decompressed if the kernel ships
# .ko.xz/.ko.zst/.ko.gz (busybox insmod only takes plain .ko), and loaded by
# /init in the order written to /lib/modules/load-order.
# The host's ethtool (+ the shared libraries ldd reports) is added when present.
# Guest-side scripts come from tests/guest/rootfs/ (init, vun-agent, ...).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODDIR=${VUN_MODULES_DIR:-}
OUT=
BUSYBOX=/bin/busybox
ETHTOOL=1
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net)

die() { echo "build-initramfs: $*" >&2; exit 1; }

while (($#)); do
    case "$1" in
    --modules) MODDIR=$2; shift 2 ;;
    --output | -o) OUT=$2; shift 2 ;;
    --busybox) BUSYBOX=$2; shift 2 ;;
    --no-ethtool) ETHTOOL=0; shift ;;
    --extra-module) MODULES+=("$2"); shift 2 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
done
[[ -n $OUT ]] || die "--output is required"
[[ -d $MODDIR ]] || die "modules dir '$MODDIR' not found (--modules or VUN_MODULES_DIR)"
[[ -x $BUSYBOX ]] || die "busybox '$BUSYBOX' not found (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; use busybox-static"
fi
command -v cpio >/dev/null || die "cpio not installed"

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib/modules}
cp "$BUSYBOX" "$STAGE/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [[ -e $STAGE/$applet || -L $STAGE/$applet ]] && continue
    mkdir -p "$STAGE/$(dirname "$applet")"
    ln -s /bin/busybox "$STAGE/$applet"
done
# /dev/console must exist before devtmpfs is mounted, or init starts with no
# stdio.  Needs root; /init re-opens /dev/console after mounting devtmpfs.
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$STAGE/dev/null" c 1 3 2>/dev/null || true

# ------------------------------------------------------------------ modules
declare -A FILE_OF=()
while IFS= read -r -d '' f; do
    b=${f##*/}
    b=${b%.ko*}
    FILE_OF[${b//-/_}]=$f
done < <(find "$MODDIR" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)

declare -A SEEN=()
ORDER=()
add_module() { # depth-first: dependencies first
    local m=${1//-/_} dep f
    [[ -n ${SEEN[$m]:-} ]] && return 0
    SEEN[$m]=1
    f=${FILE_OF[$m]:-}
    if [[ -z $f ]]; then
        echo "build-initramfs: module $m not found (built in?), skipped" >&2
        return 0
    fi
    if command -v modinfo >/dev/null; then
        for dep in $(modinfo -F depends "$f" 2>/dev/null | tr ',' ' '); do
            add_module "$dep"
        done
    fi
    case "$f" in
    *.ko.xz) xz -dc "$f" >"$STAGE/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$STAGE/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$STAGE/lib/modules/$m.ko" ;;
    *) cp "$f" "$STAGE/lib/modules/$m.ko" ;;
    esac
    ORDER+=("$m")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$STAGE/lib/modules/load-order"
[[ -n ${SEEN[virtio_net]:-} && -f $STAGE/lib/modules/virtio_net.ko ]] ||
    echo "build-initramfs: warning: no virtio_net.ko (built into the kernel?)" >&2

# ------------------------------------------------------------------ ethtool
copy_with_libs() { # absolute path of a dynamic executable
    local bin=$1 lib
    mkdir -p "$STAGE/usr/sbin"
    cp -L "$bin" "$STAGE/usr/sbin/${bin##*/}"
    for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
        [[ -f $lib ]] || continue
        mkdir -p "$STAGE$(dirname "$lib")"
        cp -L "$lib" "$STAGE$lib"
    done
}
if [[ $ETHTOOL == 1 ]]; then
    if e=$(command -v ethtool 2>/dev/null || ls /usr/sbin/ethtool /sbin/ethtool 2>/dev/null | head -n1) && [[ -n $e ]]; then
        rm -f "$STAGE/usr/sbin/ethtool"
        copy_with_libs "$e"
    else
        echo "build-initramfs: ethtool not on the host; guest will have none" >&2
    fi
fi

# ------------------------------------------------------------------ scripts
install -m 755 "$HERE/rootfs/init" "$STAGE/init"
for s in "$HERE"/rootfs/*; do
    [[ ${s##*/} == init ]] && continue
    install -m 755 "$s" "$STAGE/bin/${s##*/}"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$STAGE/etc/passwd"
echo 'root:x:0:' >"$STAGE/etc/group"
printf '127.0.0.1 localhost\n' >"$STAGE/etc/hosts"

# ------------------------------------------------------------------ archive
mkdir -p "$(dirname "$OUT")"
tmp_out=$(mktemp "$OUT.XXXXXX")
(cd "$STAGE" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n >"$tmp_out"
chmod 644 "$tmp_out"
mv "$tmp_out" "$OUT"
echo "build-initramfs: wrote $OUT ($(stat -c %s "$OUT") bytes; modules: ${ORDER[*]})" >&2
