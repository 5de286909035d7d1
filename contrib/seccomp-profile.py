#!/usr/bin/env python3
"""What each thread of vhost-user-net asked of the kernel, from `strace -ff`.

Regenerates the measurements behind the per-thread seccomp allowlists in
src/host/seccomp/ (see docs/robustness.md, "Least privilege"):

    DIR=$(mktemp -d)
    VUN_DAEMON_WRAP="strace -ff -o $DIR/t" cargo test --test traffic --test hostile \
        --test lifecycle --test observability --test privileges --test ring_lifecycle --test qemu \
        -- --include-ignored --test-threads=1
    python3 contrib/seccomp-profile.py $DIR

Each trace file is one thread. Rust names its threads with
prctl(PR_SET_NAME) as they start, which maps a file to a thread; the file
with the execve is the main thread. A thread's calls are split at its own
seccomp(SECCOMP_SET_MODE_FILTER): the calls before it ran under the filter
it inherited (the `frontends` thread's, for the threads it creates), the
calls after it under its own. For ioctl, socket, prctl, fcntl,
openat, write and mmap/mprotect, the argument the filters look at is shown too.

Tests that fail under strace are expected: those that signal or inspect the
daemon's PID reach strace instead (run them without the wrapper).
"""

import collections
import os
import re
import sys

CALL = re.compile(r"^(?:\d+ +)?([a-z_0-9]+)\((.*)")
NAME = re.compile(r'prctl\(PR_SET_NAME, "([^"]*)"')


def detail(name, args):
    """The argument a filter rule looks at, as strace decoded it."""
    parts = [a.strip() for a in args.split(",")]
    if name == "ioctl" and len(parts) > 1:
        return parts[1]
    if name in ("socket", "socketpair") and parts:
        return parts[0]
    if name == "prctl" and parts:
        return parts[0]
    if name == "fcntl" and len(parts) > 1:
        return parts[1].split(")")[0]
    if name == "openat" and len(parts) > 2:
        return "O_DIRECTORY" if "O_DIRECTORY" in parts[2] else "not a directory"
    if name == "write" and parts:
        return "stderr" if parts[0] == "2" else None
    if name in ("mmap", "mprotect") and len(parts) > 2:
        return "PROT_EXEC" if "PROT_EXEC" in parts[2] else None
    if name == "seccomp" and parts:
        return parts[0]
    return None


def profile(path):
    """(thread name, {phase: Counter of 'syscall' or 'syscall arg'})."""
    name = None
    phase = "startup"
    seen = {"startup": collections.Counter(), "own": collections.Counter()}
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("---", "+++")) or "resumed>" in line:
                continue
            m = CALL.match(line)
            if not m:
                continue
            call, args = m.group(1), m.group(2)
            if call == "execve":
                name = "main"
                # The program's set-up, before the service threads exist,
                # needs no filter: count only what follows the first
                # thread creation as "startup".
                phase = "setup"
                seen.setdefault("setup", collections.Counter())
            n = NAME.match(line)
            if n and name is None:
                name = n.group(1)
            if name == "main" and phase == "setup" and call in ("clone", "clone3"):
                phase = "startup"
            d = detail(call, args)
            seen[phase][call if d is None else f"{call} {d}"] += 1
            if call == "seccomp" and "SECCOMP_SET_MODE_FILTER" in args and "= 0" in line:
                phase = "own"
    return name or "?", seen


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    threads = collections.defaultdict(
        lambda: {"files": 0, "startup": collections.Counter(), "own": collections.Counter()}
    )
    for d in sys.argv[1:]:
        for entry in os.scandir(d):
            if not entry.is_file():
                continue
            name, seen = profile(entry.path)
            t = threads[name]
            t["files"] += 1
            t["startup"].update(seen["startup"])
            t["own"].update(seen["own"])
    for name in sorted(threads):
        t = threads[name]
        print(f"== {name} ({t['files']} threads)")
        for phase, title in (("startup", "before its own filter"), ("own", "under its own filter")):
            if t[phase]:
                calls = ", ".join(f"{c} ({n})" for c, n in sorted(t[phase].items()))
                print(f"  {title}: {calls}")
        print()


if __name__ == "__main__":
    main()
