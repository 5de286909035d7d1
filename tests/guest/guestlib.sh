# shellcheck shell=bash
# Bash client for the test guest's control channel (see README.md).
# Source it, then:
#   guest_attach IN_FD OUT_FD      fds writing to / reading from the channel
#   guest_wait_ready [TIMEOUT]     wait for __VUN_READY__ (channel connected
#                                  from QEMU start, e.g. -chardev pipe)
#   guest_sync [TIMEOUT]           resync when the channel may have been
#                                  connected late (socket chardev)
#   guest_run TIMEOUT CMD...       run a shell command line in the guest; its
#                                  output goes to stdout, returns its rc
#                                  (255 on timeout / protocol error)
# Output of guest_run is exact: the protocol's extra "\n" before
# __VUN_DONE__ is removed.

GUEST_IN=
GUEST_OUT=
GUEST_SEQ=0
_GUEST_PART=

guest_attach() { GUEST_IN=$1; GUEST_OUT=$2; _GUEST_PART=; }

# _guest_readline: one full line into GUEST_LINE (0), or 1 after ~1 s without
# one.  bash's read -t hands back a partial line on timeout; keep it.
_guest_readline() {
    local l
    if IFS= read -r -t 1 -u "$GUEST_OUT" l; then
        GUEST_LINE=$_GUEST_PART$l
        _GUEST_PART=
        return 0
    fi
    _GUEST_PART+=$l
    return 1
}

guest_wait_ready() {
    local end=$((SECONDS + ${1:-120}))
    while ((SECONDS < end)); do
        _guest_readline || continue
        [[ $GUEST_LINE == *__VUN_READY__* ]] && return 0
    done
    echo "guest_wait_ready: timeout" >&2
    return 255
}

guest_sync() {
    local end=$((SECONDS + ${1:-120})) tag until
    while ((SECONDS < end)); do
        GUEST_SEQ=$((GUEST_SEQ + 1))
        tag=sync$GUEST_SEQ
        printf '\nVUN %s true\n' "$tag" >&"$GUEST_IN"
        until=$((SECONDS + 2))
        while ((SECONDS < until)); do
            _guest_readline || continue
            [[ $GUEST_LINE == "__VUN_DONE__ $tag rc=0" ]] && return 0
        done
    done
    echo "guest_sync: timeout" >&2
    return 255
}

# guest_run TIMEOUT COMMAND-LINE...
guest_run() {
    local timeout=$1 end tag started=0 prev='' have_prev=0
    shift
    GUEST_SEQ=$((GUEST_SEQ + 1))
    tag=c$GUEST_SEQ
    end=$((SECONDS + timeout))
    if [[ $* == *$'\n'* ]]; then
        printf 'VUNB %s %s\n' "$tag" "$(printf '%s' "$*" | base64 -w0)" >&"$GUEST_IN"
    else
        printf 'VUN %s %s\n' "$tag" "$*" >&"$GUEST_IN"
    fi
    while ((SECONDS < end)); do
        _guest_readline || continue
        if ((started == 0)); then
            [[ $GUEST_LINE == "__VUN_BEGIN__ $tag" ]] && started=1
            continue
        fi
        if [[ $GUEST_LINE == "__VUN_DONE__ $tag rc="* ]]; then
            # the last line before the marker lost its "\n" to the protocol
            ((have_prev)) && printf '%s' "$prev"
            return "${GUEST_LINE##*rc=}"
        fi
        ((have_prev)) && printf '%s\n' "$prev"
        prev=$GUEST_LINE
        have_prev=1
    done
    echo "guest_run: timeout after ${timeout}s running: $*" >&2
    return 255
}
