#!/usr/bin/env bash
# End-to-end check of the test guest with a plain kernel tap (no vhost-user):
# boots the guest under QEMU inside a private network namespace and checks
# virtio_net, ping both ways and a TCP transfer both ways with md5 checks.
#
#   smoke-tap.sh [--qemu 10|7.2|/path/to/qemu-system-x86_64] [--vectors0]
#                [--memfd] [--accel tcg|kvm] [--mib N] [--keep-logs]
#
# Needs root and .ci/install-deps.sh (reads $VUN_CACHE/env.sh).  Uses only
# 198.18.0.0/24 inside a namespace it creates and removes again.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
source "${VUN_CACHE:-/var/cache/vhost-user-net}/env.sh"
# shellcheck source=guestlib.sh
source "$HERE/guestlib.sh"

QEMU_SEL=10 VECTORS0=0 MEMFD=0 ACCEL=tcg MIB=16 KEEP=0
while (($#)); do
    case "$1" in
    --qemu) QEMU_SEL=$2; shift 2 ;;
    --vectors0) VECTORS0=1; shift ;;
    --memfd) MEMFD=1; shift ;;
    --accel) ACCEL=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --keep-logs) KEEP=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$QEMU_SEL" in
10) QEMU=$VUN_QEMU10 ;;
7.2) QEMU=$VUN_QEMU72 ;;
*) QEMU=$QEMU_SEL ;;
esac

NS=vun-smoke-$$
TAP=vuntest0
HOST_IP=198.18.0.1
GUEST_IP=198.18.0.2
W=$(mktemp -d /tmp/vun-smoke.XXXXXX)
QPID='' SPID=''
FAIL=0

cleanup() {
    local rc=$?
    set +e
    ((rc == 0)) || FAIL=1
    [[ -n $SPID ]] && kill "$SPID" 2>/dev/null
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID"
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$QPID" 2>/dev/null
    fi
    wait 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    if ((FAIL || KEEP)); then
        echo "--- console log (tail) ---"
        tail -n 40 "$W/console.log" 2>/dev/null
        echo "logs kept in $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT

step() { printf '\n### %s\n' "$*"; }
ok() { printf 'OK: %s\n' "$*"; }
bad() { printf 'FAIL: %s\n' "$*"; FAIL=1; exit 1; }
ms() { date +%s%3N; }

step "network namespace $NS with tap $TAP ($HOST_IP/24)"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add dev "$TAP" mode tap
ip -n "$NS" addr add "$HOST_IP/24" dev "$TAP"
ip -n "$NS" link set "$TAP" up

step "boot: $("$QEMU" --version | head -n1)"
dev="virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"
((VECTORS0)) && dev+=",vectors=0"
mem=(-m 512)
((MEMFD)) && mem+=(-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem)
mkfifo "$W/ctl.in" "$W/ctl.out"
exec {CIN}<>"$W/ctl.in" {COUT}<>"$W/ctl.out"
guest_attach "$CIN" "$COUT"
t0=$(ms)
ip netns exec "$NS" "$QEMU" -accel "$ACCEL" -machine q35 -smp 1 "${mem[@]}" \
    -display none -no-reboot -nodefaults \
    -kernel "$VUN_KERNEL" -initrd "$VUN_INITRAMFS" \
    -append "console=ttyS0 panic=-1 vun.ip=$GUEST_IP/24 vun.peer=$HOST_IP vun.ctl=ttyS1" \
    -serial "file:$W/console.log" -chardev "pipe,id=ctl,path=$W/ctl" -serial chardev:ctl \
    -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" -device "$dev" \
    >"$W/qemu.log" 2>&1 &
QPID=$!
guest_wait_ready 300 || bad "guest did not come up"
t1=$(ms)
ok "guest ready after $((t1 - t0)) ms (QEMU start to __VUN_READY__)"

step "virtio_net in the guest"
out=$(guest_run 30 'grep -E "^(virtio_net|virtio_pci) " /proc/modules | cut -d" " -f1; ls -1 /sys/class/net') ||
    bad "guest command failed"
echo "$out"
grep -qx virtio_net <<<"$out" || bad "virtio_net not loaded"
grep -qx eth0 <<<"$out" || bad "no eth0"
guest_run 30 'vun-features eth0; grep virtio /proc/interrupts; ip addr show eth0' || bad "guest info"
ok "virtio_net loaded, eth0 present"

step "ping both ways"
guest_run 60 "ping -c 3 -W 10 $HOST_IP" || bad "guest -> host ping"
ip netns exec "$NS" ping -c 3 -W 10 "$GUEST_IP" || bad "host -> guest ping"
ok "ping works both ways"

step "TCP guest -> host, $MIB MiB"
ip netns exec "$NS" socat -u "TCP-LISTEN:5001,bind=$HOST_IP,reuseaddr" "OPEN:$W/rx.bin,creat,trunc" &
SPID=$!
gsum=$(guest_run 120 "dd if=/dev/urandom of=/tmp/tx bs=1M count=$MIB 2>/dev/null && md5sum /tmp/tx | cut -d' ' -f1") ||
    bad "guest dd/md5sum"
sleep 0.3
t0=$(ms)
guest_run 600 "nc $HOST_IP 5001 < /tmp/tx" || bad "guest nc send"
wait "$SPID" || bad "host socat receive"
SPID=
t1=$(ms)
hsum=$(md5sum "$W/rx.bin" | cut -d' ' -f1)
echo "guest md5 $gsum host md5 $hsum, $((t1 - t0)) ms"
[[ $gsum == "$hsum" ]] || bad "md5 mismatch guest -> host"
ok "guest -> host $MIB MiB in $((t1 - t0)) ms"

step "TCP host -> guest, $MIB MiB"
head -c $((MIB << 20)) /dev/urandom >"$W/tx.bin"
hsum=$(md5sum "$W/tx.bin" | cut -d' ' -f1)
guest_run 30 'nc -l -p 5002 >/tmp/rx 2>/tmp/nc.err & echo $! >/tmp/nc.pid' || bad "guest nc listen"
t0=$(ms)
sent=0
for _ in $(seq 1 50); do
    if ip netns exec "$NS" socat -u "OPEN:$W/tx.bin" "TCP:$GUEST_IP:5002,connect-timeout=2" 2>/dev/null; then
        sent=1
        break
    fi
    sleep 0.2
done
((sent)) || bad "host could not connect to guest"
gsum=$(guest_run 600 'while kill -0 $(cat /tmp/nc.pid) 2>/dev/null; do sleep 0.1; done; md5sum /tmp/rx | cut -d" " -f1') ||
    bad "guest md5sum"
t1=$(ms)
echo "host md5 $hsum guest md5 $gsum, $((t1 - t0)) ms"
[[ $gsum == "$hsum" ]] || bad "md5 mismatch host -> guest"
ok "host -> guest $MIB MiB in $((t1 - t0)) ms"

step "guest info"
guest_run 30 'vun-info eth0' | head -n 100 || true

step "poweroff"
printf 'VUN off poweroff -f\n' >&"$CIN"
for _ in $(seq 1 100); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$QPID" 2>/dev/null; then
    bad "QEMU still running after poweroff"
fi
wait "$QPID" || true
QPID=
ok "guest powered off, QEMU exited"
echo
echo "SMOKE PASSED ($QEMU_SEL, vectors0=$VECTORS0, memfd=$MEMFD, accel=$ACCEL)"
