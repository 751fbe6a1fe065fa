# shellcheck shell=bash disable=SC2034 # BIN, LOADGEN, TICK: used by the scripts that source this
# bench/lib.sh: what every script in bench/ shares (sourced, not run).
# Owns: the one release build (the gateway binary and the load generator, in one cargo
# command), the free-port helper, the processes a script starts (tracked by PID, stopped by PID
# on exit: never by name), the readiness waits and the /proc readings (CPU ticks, RSS).
# Must not: reach anything but 127.0.0.1, or stop a process it did not start.
# Needs ROOT (the repository). Sets BIN, LOADGEN, TMP. SKIP_BUILD=1 skips the build; KEEP_TMP=1
# keeps TMP (the processes' logs) at exit. CARGO_TARGET_DIR is honoured (a relative one is taken
# from ROOT, where cargo runs).

TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN="$TARGET_DIR/release/mofa-gateway"
LOADGEN="$TARGET_DIR/release/examples/loadgen"
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    echo "== building (cargo build --release --bin mofa-gateway --example loadgen --example floor_proxy)" >&2
    (cd "$ROOT" && cargo build --release --quiet --bin mofa-gateway --example loadgen --example floor_proxy)
fi

# terminate TENTHS PID...: SIGTERM to the processes, up to TENTHS tenths of a second for them
# to exit, then SIGKILL to any left; reaps them.
terminate() {
    local tenths=$1 pid i any
    shift
    for pid; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < tenths; i++)); do
        any=0
        for pid; do kill -0 "$pid" 2>/dev/null && any=1; done
        ((any)) || break
        sleep 0.1
    done
    for pid; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid; do wait "$pid" 2>/dev/null || true; done
}

TMP=$(mktemp -d)
PIDS=()      # started by `start` (or added by a script), stopped on exit, in reverse order
PID_FILES=() # files holding the PID of a process a subshell (re)started; stopped on exit
cleanup() {
    local pid f i live=()
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do live+=("${PIDS[i]}"); done
    for f in "${PID_FILES[@]}"; do
        [[ -s $f ]] && live+=("$(<"$f")")
    done
    # Up to 5 s for a graceful exit (the gateway drains), then SIGKILL.
    terminate 50 "${live[@]}"
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "kept the run's files (logs, configs, raw results) in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background, output in $TMP/NAME.log; sets LAST_PID.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# alive NAME PID: exits the script with NAME's log if PID is gone.
alive() {
    if ! kill -0 "$2" 2>/dev/null; then
        echo "error: $1 exited; its log:" >&2
        cat "$TMP/$1.log" >&2 2>/dev/null || true
        exit 1
    fi
}

# wait_ready NAME URL PID [BODY]: waits until URL answers 200 (READY_S, default 10 s, at
# most): a POST of BODY (default: $BODY) as JSON, or a GET when BODY is `-`; READY_HEADER
# (NAME:VALUE) is sent too. Shows NAME's log and exits if the process dies or does not answer.
wait_ready() {
    local name=$1 url=$2 pid=$3 body=${4:-${BODY:-}} i code=none
    local args=(--noproxy '*' -s -o /dev/null -w '%{http_code}' --max-time 2)
    [[ $body != - ]] && args+=(-H 'content-type: application/json' -d "$body")
    [[ -n ${READY_HEADER:-} ]] && args+=(-H "$READY_HEADER")
    for ((i = 0; i < ${READY_S:-10} * 10; i++)); do
        alive "$name" "$pid"
        code=$(curl "${args[@]}" "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    echo "error: $name did not answer 200 within ${READY_S:-10} s (last status: $code); its log:" >&2
    cat "$TMP/$name.log" >&2 2>/dev/null || true
    exit 1
}

# free_ports N: N free loopback ports, bound at the same time so that they differ.
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
' "$1"
}

# listening PORT: whether something listens on 127.0.0.1:PORT (from /proc/net/tcp, no connect).
listening() {
    awk -v p="$(printf '%04X' "$1")" 'NR > 1 && $4 == "0A" && ($2 == "0100007F:" p || $2 == "00000000:" p) { f = 1 }
        END { exit !f }' /proc/net/tcp
}

# serve NAME FN: starts a server on a free loopback port. FN PORT must write what it needs and
# call `start NAME ...` with that port. A free port can be taken by someone else between the
# probe and the bind (other jobs share the machine): when the server exits at start saying its
# address is in use, it is started again on another port (5 tries). Sets PORT and LAST_PID.
serve() {
    local name=$1 fn=$2 try i
    for ((try = 1; try <= 5; try++)); do
        PORT=$(free_ports 1)
        "$fn" "$PORT"
        for ((i = 0; i < 30; i++)); do
            listening "$PORT" && return 0
            kill -0 "$LAST_PID" 2>/dev/null || break
            sleep 0.1
        done
        if ! kill -0 "$LAST_PID" 2>/dev/null && grep -qi 'in use' "$TMP/$name.log"; then
            wait "$LAST_PID" 2>/dev/null || true
            [[ ${PIDS[-1]:-} == "$LAST_PID" ]] && unset 'PIDS[-1]'
            echo "$name: port $PORT was taken meanwhile; another one" >&2
            continue
        fi
        # Alive but not listening yet (a slow start): wait_ready judges.
        alive "$name" "$LAST_PID"
        return 0
    done
    echo "error: $name: no free port after 5 tries" >&2
    exit 1
}

# sim_ready ARGS...: `mofa-gateway sim ARGS...` on a free loopback port, answering; sets
# SIM_PORT (and LAST_PID).
sim_ready() {
    SIM_ARGS=("$@")
    _sim_up() { start sim "$BIN" sim --listen "127.0.0.1:$1" "${SIM_ARGS[@]}"; }
    serve sim _sim_up
    SIM_PORT=$PORT
    wait_ready sim "http://127.0.0.1:$SIM_PORT/v1/models" "$LAST_PID" -
}

TICK=$(getconf CLK_TCK)
# stat_sum EXPR PID...: the sum over the processes of an awk EXPR of the /proc/PID/stat fields
# after the command name ($12 utime, $13 stime; 0 for a process that is gone).
stat_sum() {
    local expr=$1 pid t=0 v
    shift
    for pid in "$@"; do
        v=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk "{ print $expr }") || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
# proc_ticks PID...: CPU time (utime + stime, clock ticks, all threads) used so far by the
# processes together.
proc_ticks() { stat_sum '$12 + $13' "$@"; }
# proc_sys_ticks PID...: the kernel's share of proc_ticks (stime only).
proc_sys_ticks() { stat_sum '$13' "$@"; }
# proc_ctxsw PID...: context switches (voluntary + involuntary, all threads) so far.
proc_ctxsw() {
    local pid t=0 v
    for pid in "$@"; do
        v=$(cat /proc/"$pid"/task/*/status 2>/dev/null |
            awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
# rss_kb PID...: resident set size of the processes together, in kB.
rss_kb() {
    local pid t=0 v
    for pid in "$@"; do
        v=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status" 2>/dev/null) || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
# children PID: the PIDs whose parent is PID (by parent, never by name).
children() { pgrep -P "$1" || true; }
