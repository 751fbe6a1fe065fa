#!/usr/bin/env bash
# bench/redis_restart.sh: two gateway replicas sharing one rate limit through Redis, across a
# Redis restart: what they admit per window before, during and after the outage.
#
# Method:
#   * Build the release binary (bench/lib.sh), mint a key, start on free loopback ports one
#     `mofa-gateway sim`, one `redis-server` (--save '' --appendonly no: a restart forgets
#     everything, as a cache-style Redis does) and two gateways `a` and `b` with the same
#     config: the key with `rpm = RPM` (default 60), [limits] store = "redis",
#     redis_timeout_ms = 200, and `redis_failure` = MODE.
#   * A driver (python3, one request at a time, alternating a/b) sends RATE requests/s
#     (default 10) of a small non-streaming chat completion for DURATION s (default 30).
#     Redis is killed at KILL_AT s (default 10) and started again on the same port at
#     BACK_AT s (default 13). Two scenarios:
#       - `idle`:    no request during the outage (the replicas do not see it: their
#                    connections are dead when traffic resumes);
#       - `traffic`: requests throughout.
#   * Reported per scenario and MODE (local, closed): per window of WINDOW s (default 5), the
#     200s of each replica, the 429s and the 503s; the total admitted over the run against
#     the most one limit allows in it: RPM + RPM * DURATION / 60 (+1).
#   * BIN_BEFORE=path runs the same against another build (e.g. the commit before a change),
#     in the same session, after this one.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/redis_restart.sh    (env: RPM RATE DURATION KILL_AT BACK_AT WINDOW BIN_BEFORE)

set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RPM=${RPM:-60}
RATE=${RATE:-10}
DURATION=${DURATION:-30}
KILL_AT=${KILL_AT:-10}
BACK_AT=${BACK_AT:-13}
WINDOW=${WINDOW:-5}
for v in RPM RATE DURATION KILL_AT BACK_AT WINDOW; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
for tool in curl python3 redis-server; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "error: $tool is required (redis-server: Debian package redis-server)" >&2
        exit 2
    }
done
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

SECRET=$("$BIN" keys new --name bench | head -1)
HASH=$(printf '%s' "$SECRET" | "$BIN" keys hash)

sim_up() { start sim "$BIN" sim --listen "127.0.0.1:$1" --model m; }
serve sim sim_up
SIM_PORT=$PORT
REDIS_PORT=$(free_ports 1)

redis_up() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        >"$TMP/redis.log" 2>&1 &
    echo $! >"$TMP/redis.pid"
    disown  # killed by PID (the driver restarts it): no job notice
    for ((i = 0; i < 50; i++)); do
        listening "$REDIS_PORT" && return 0
        sleep 0.05
    done
    echo "error: redis-server did not listen" >&2
    exit 1
}
PID_FILES+=("$TMP/redis.pid")

# run BIN MODE SCENARIO: one run; prints its table.
run() {
    local bin=$1 mode=$2 scenario=$3 cfg="$TMP/gw-$mode.toml" gws=() pids=() n
    cat >"$cfg" <<TOML
[auth]
mode = "keys"
[[auth.keys]]
name = "bench"
hash = "$HASH"
rpm = $RPM
[limits]
store = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
redis_failure = "$mode"
redis_timeout_ms = 200
[[models]]
name = "m"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
TOML
    redis_up
    for n in a b; do
        gw_up() { start "gw-$n" "$bin" serve --config "$cfg" --listen "127.0.0.1:$1"; }
        serve "gw-$n" gw_up
        gws+=("$PORT")
        pids+=("$LAST_PID")
        READY_HEADER="authorization: Bearer $SECRET" wait_ready "gw-$n" \
            "http://127.0.0.1:$PORT/readyz" "$LAST_PID" -
    done
    python3 - "$scenario" "$mode" "${gws[@]}" <<PY
import json, os, signal, subprocess, sys, time, urllib.request, urllib.error
scenario, mode, a, b = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rate, duration, kill_at, back_at, window, rpm = $RATE, $DURATION, $KILL_AT, $BACK_AT, $WINDOW, $RPM
body = json.dumps({"model": "m", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def send(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
        headers={"content-type": "application/json", "authorization": "Bearer $SECRET"})
    try:
        with opener.open(req, timeout=5) as r:
            r.read(); return r.status
    except urllib.error.HTTPError as e:
        e.read(); return e.code
    except Exception:
        return 0
def redis(up):
    if up:
        subprocess.run(["bash", "-c", "redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no >>$TMP/redis.log 2>&1 & echo \$! > $TMP/redis.pid"], check=True)
        while subprocess.run(["redis-cli", "-p", "$REDIS_PORT", "ping"], capture_output=True).stdout.strip() != b"PONG":
            time.sleep(0.01)
    else:
        pid = int(open("$TMP/redis.pid").read())
        os.kill(pid, signal.SIGKILL)
        while True:
            try: os.kill(pid, 0); time.sleep(0.01)
            except ProcessLookupError: break
log, start, i, killed, back = [], time.monotonic(), 0, False, False
while True:
    t = time.monotonic() - start
    if t >= duration: break
    if not killed and t >= kill_at: redis(False); killed = True
    if not back and t >= back_at: redis(True); back = True
    due = i / rate
    if due > t: time.sleep(due - t); continue
    i += 1
    if scenario == "idle" and kill_at <= t < back_at: continue
    port = (a, b)[i % 2]
    log.append((t, "ab"[i % 2], send(port)))
print(f"-- {scenario}, redis_failure = \"{mode}\": redis down {kill_at}..{back_at} s")
print(f"{'window':>9} {'200 a':>6} {'200 b':>6} {'429':>5} {'503':>5} {'other':>5}")
for w0 in range(0, duration, window):
    rows = [r for r in log if w0 <= r[0] < w0 + window]
    c = lambda f: sum(1 for r in rows if f(r))
    print(f"{w0:>3}..{w0 + window:<3}s {c(lambda r: r[2] == 200 and r[1] == 'a'):>6} "
          f"{c(lambda r: r[2] == 200 and r[1] == 'b'):>6} {c(lambda r: r[2] == 429):>5} "
          f"{c(lambda r: r[2] == 503):>5} {c(lambda r: r[2] not in (200, 429, 503)):>5}")
ok = sum(1 for r in log if r[2] == 200)
bound = rpm + rpm * duration // 60 + 1
print(f"admitted {ok} in {duration} s; one limit allows at most {bound}: "
      f"{'within' if ok <= bound else 'OVER by ' + str(ok - bound)}")
PY
    for n in "${pids[@]}"; do kill -TERM "$n" 2>/dev/null || true; wait "$n" 2>/dev/null || true; done
    kill -KILL "$(<"$TMP/redis.pid")" 2>/dev/null || true
    sleep 0.2
}

for build in now before; do
    bin=$BIN
    if [[ $build == before ]]; then
        [[ -n ${BIN_BEFORE:-} ]] || break
        bin=$BIN_BEFORE
    fi
    echo "== $build ($bin, $("$bin" --version 2>/dev/null || echo '?'))"
    for mode in local closed; do
        for scenario in idle traffic; do
            run "$bin" "$mode" "$scenario"
        done
    done
done
