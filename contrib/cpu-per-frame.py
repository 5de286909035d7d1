#!/usr/bin/env python3
"""The daemon worker's CPU time per frame, under netbench's saturated runs,
for several daemon builds run alternately: a per-frame cost that does not
depend on how much CPU the worker got on a shared machine.

    # as root, after `cargo bench --bench netbench --no-run`:
    NETBENCH=target/release/deps/netbench-HASH \\
        python3 contrib/cpu-per-frame.py ROUNDS tx,rx,loop OUT BIN...

Each BIN is a daemon binary in BINDIR (default /tmp/perf-bins; the
environment variable BINDIR changes it); `BIN+io` runs it with the
synthetic guest acking VIRTIO_F_IN_ORDER (NETBENCH_IN_ORDER=1). Rounds
alternate the order of the binaries. Each run is

    VUN_DAEMON_BIN=BINDIR/BIN netbench --dir DIR --size 64 --max-only \\
        --policy immediate --secs 2

and, once frames flow, the daemon's `vring_worker` thread's run time
(/proc/PID/task/TID/schedstat) and the frames the stats socket counts (RX
and TX queues together) are sampled 1.2 s apart. One line per run goes to
OUT: round, binary, direction, the run's Mpps, ns of worker CPU per frame.
"""
import glob
import os
import re
import socket
import subprocess
import sys
import time


def frames(sock):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    text = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        text += d
    s.close()
    return sum(int(m.group(1)) for m in re.finditer(
        r'vhost_user_net_frames_total\{[^}]*\} (\d+)', text.decode()))


def runtime(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def find_worker(path):
    """The daemon started from `path`: its pid, worker tid, stats socket."""
    for _ in range(200):
        pids = subprocess.run(["pgrep", "-f", "^" + path + " "],
                              capture_output=True, text=True).stdout.split()
        if pids:
            pid = pids[0]
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().split("\0")
            sock = cmd[cmd.index("--stats-socket") + 1]
            for comm in glob.glob(f"/proc/{pid}/task/*/comm"):
                with open(comm) as f:
                    if f.read().strip() == "vring_worker" and os.path.exists(sock):
                        return pid, comm.split("/")[4], sock
        time.sleep(0.05)
    raise RuntimeError(f"no worker of {path}")


def one_run(bench, bindir, entry, direction):
    name, _, flag = entry.partition("+")
    path = os.path.join(bindir, name)
    env = dict(os.environ, VUN_DAEMON_BIN=path,
               NETBENCH_IN_ORDER="1" if flag == "io" else "0")
    p = subprocess.Popen([bench, "--dir", direction, "--size", "64", "--max-only",
                          "--policy", "immediate", "--secs", "2", "--bench"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ns = None
    try:
        pid, tid, sock = find_worker(path)
        f0 = frames(sock)
        for _ in range(100):
            time.sleep(0.05)
            if frames(sock) > f0 + 1000:
                break
        time.sleep(0.2)
        r0, f0 = runtime(pid, tid), frames(sock)
        time.sleep(1.2)
        r1, f1 = runtime(pid, tid), frames(sock)
        ns = (r1 - r0) / max(1, f1 - f0)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"{entry} {direction}: {e}", file=sys.stderr)
    out = p.communicate()[0].decode()
    m = re.search(r"max: ([0-9.]+) Mpps", out)
    return (m.group(1) if m else "?"), ("?" if ns is None else f"{ns:.0f}")


def main():
    rounds, dirs, out, entries = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4:]
    bench = os.environ["NETBENCH"]
    bindir = os.environ.get("BINDIR", "/tmp/perf-bins")
    with open(out, "a") as f:
        for r in range(rounds):
            for entry in entries if r % 2 == 0 else entries[::-1]:
                for d in dirs:
                    mpps, ns = one_run(bench, bindir, entry, d)
                    print(f"{r + 1} {entry} {d} mpps={mpps} ns_per_frame={ns}", file=f, flush=True)


if __name__ == "__main__":
    main()
