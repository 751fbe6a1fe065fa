#!/usr/bin/env bash
# bench/proxy.sh: what the gateway costs as a proxy, against nginx (the floor for one HTTP hop)
# and against calling the backend directly, side by side in one run.
#
# Method:
#   * One upstream for everyone: `mofa-gateway sim --ttft-ms 0 --tokens-per-sec 0` (answers at
#     once). In front of it, on free loopback ports:
#       - nginx (Debian package `nginx`, installed with apt-get when missing and running as
#         root), config generated here under the temp dir: 1 worker, upstream keepalive 64,
#         HTTP/1.1 to the upstream, proxy_buffering off, no access log, pid and temp paths in
#         the temp dir;
#       - the gateway: one model `mofa-sim`, one local deployment (the sim), max_concurrency
#         64 (the default). GATEWAY_BIN (default: this checkout's release build) and
#         GATEWAY_ARGS (default `serve --config {config} --listen {listen}`; {config} and
#         {listen} are replaced) choose the build; GW_WORKERS sets server.worker_threads;
#       - optionally a second gateway build in the same run: GATEWAY_B_BIN (+ GATEWAY_B_ARGS),
#         reported as `gateway-b`;
#       - the floor (WITH_FLOOR=1, the default): examples/floor_proxy.rs, a bare proxy on the
#         gateway's own HTTP stack (tokio, hyper, hyper-util's pooled client, mimalloc) that
#         reads the body, forwards it and streams the reply, and does nothing else (no JSON,
#         admission, routing, logs or metrics), on FLOOR_LANES lanes (default: as many as the
#         gateway). gateway/floor is the cost of the gateway's own work; floor/nginx that of
#         the stack;
#       - optionally (WITH_LITELLM=1) LiteLLM LITELLM_VERSION (pinned) from PyPI in a venv
#         under ~/.cache/mofa-gateway, 1 worker, LITELLM_LOCAL_MODEL_COST_MAP=True (offline).
#         It is ~100x slower, so its open-loop points run at LITELLM_RATE (non-streaming) and
#         LITELLM_STREAM_RATE (streaming) instead, and its 5000/s point is skipped.
#   * Requests: POST /v1/chat/completions {"model":"mofa-sim","messages":[...],"max_tokens":N};
#     non-streaming (`ns`, 16 tokens) and streaming (`st`, 20 tokens: 20 content chunks).
#   * Points (POINTS, default "ns-1000 ns-5000 ns-closed st-1000 st-closed"):
#       - `KIND-RATE`: open loop, examples/loadgen.rs at RATE requests/s for DURATION s after
#         LOADGEN_WARMUP s (loadgen paces with tokio's 1 ms timer: bursts of ~RATE/1000);
#       - `KIND-closed`: closed loop, wrk -t1 -c32 for DURATION s.
#   * REPEATS rounds (default 3), interleaved: every round runs every point against every
#     target (direct, nginx, gateway, ...) in turn, so slow drifts of the machine hit all alike.
#   * Per run: CPU ticks (utime+stime from /proc/PID/stat, all threads; nginx: master + worker)
#     of each proxy and of the sim, over the requests sent in that run (loadgen: warm-up
#     included, as its CPU is; wrk: all it sent) -> CPU-µs per request; req/s (loadgen:
#     goodput; wrk: its rate); p50/p99 latency (send to last body byte); failures (anything
#     but a 200, socket errors); RSS idle (after start-up and one request) and after the load.
#   * Reported per point and proxy, as the median over the repeats with the spread [min..max]:
#     CPU-µs/request, the ratio gateway/nginx of CPU-µs/request (per round, then median),
#     added p50/p99 against direct (same round), req/s and its ratio to direct.
#   * Everything shares the machine's cores (client, sim, proxies). CPU per request of each
#     process is the robust figure; latencies and closed-loop rates move with other load.
#     The share of the machine's CPU used by processes not started here is printed per point.
#
# Traffic goes to 127.0.0.1 only. Every process started here is stopped (by PID) on exit.
# Usage: bench/proxy.sh
#   env: REPEATS=3 DURATION=10 POINTS=... CONNS=32 LOADGEN_WARMUP=2 GW_WORKERS=
#        GATEWAY_BIN= GATEWAY_ARGS= GATEWAY_B_BIN= GATEWAY_B_ARGS= RESULTS_OUT=FILE (raw runs)
#        WITH_FLOOR=1 FLOOR_LANES= WITH_LITELLM=1 LITELLM_VERSION=1.108.7 LITELLM_RATE=20 LITELLM_STREAM_RATE=5
#        HEADERS='NAME:VALUE|NAME:VALUE' (extra request headers, e.g. an API key, sent by
#        loadgen and wrk to every target)

set -euo pipefail
export LC_ALL=C

REPEATS=${REPEATS:-3}
DURATION=${DURATION:-10}
POINTS=${POINTS:-ns-1000 ns-5000 ns-closed st-1000 st-closed}
CONNS=${CONNS:-32}
LOADGEN_WARMUP=${LOADGEN_WARMUP:-2}
GW_WORKERS=${GW_WORKERS:-}
WITH_LITELLM=${WITH_LITELLM:-0}
WITH_FLOOR=${WITH_FLOOR:-1}
LITELLM_VERSION=${LITELLM_VERSION:-1.108.7}
LITELLM_RATE=${LITELLM_RATE:-20}
LITELLM_STREAM_RATE=${LITELLM_STREAM_RATE:-5}
HEADERS=${HEADERS:-}
HEADER_ARGS=()
IFS='|' read -r -a HEADER_LIST <<<"$HEADERS"
for h in "${HEADER_LIST[@]}"; do
    if ! [[ $h =~ ^[A-Za-z0-9-]+:[^\'\"]*$ ]]; then
        echo "error: HEADERS: '$h' is not NAME:VALUE (no quotes or backslashes)" >&2
        exit 2
    fi
    HEADER_ARGS+=(--header "$h")
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BODY='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
BODY_ST='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":20,"stream":true}'

for v in REPEATS DURATION CONNS LITELLM_RATE LITELLM_STREAM_RATE; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
if ! [[ $LOADGEN_WARMUP =~ ^[0-9]+$ ]]; then
    echo "error: LOADGEN_WARMUP must be an integer >= 0 (got '$LOADGEN_WARMUP')" >&2
    exit 2
fi
if [[ -n $GW_WORKERS ]] && ! [[ $GW_WORKERS =~ ^[0-9]+$ ]]; then
    echo "error: GW_WORKERS must be an integer >= 0 (got '$GW_WORKERS')" >&2
    exit 2
fi
for p in $POINTS; do
    if ! [[ $p =~ ^(ns|st)-([1-9][0-9]*|closed)$ ]]; then
        echo "error: POINTS: '$p' is not ns-RATE, st-RATE, ns-closed or st-closed" >&2
        exit 2
    fi
done
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 2; }
done

# need CMD PACKAGE: installs Debian's PACKAGE when CMD is missing (as root), or exits.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "$1 not found; installing the Debian package $2 with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >&2 ||
            { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >&2; }
        hash -r
    fi
    command -v "$1" >/dev/null 2>&1 && return 0
    [[ -x /usr/sbin/$1 ]] && return 0
    echo "error: $1 is not installed (Debian/Ubuntu: sudo apt-get install $2)" >&2
    exit 2
}
need wrk wrk
need nginx nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# Build, free ports, process tracking and /proc readings: bench/lib.sh.
source "$ROOT/bench/lib.sh"
GATEWAY_BIN=${GATEWAY_BIN:-$BIN}
FLOOR_BIN="$ROOT/target/release/examples/floor_proxy"
# The floor serves on as many lanes as the gateway (GW_WORKERS, else one per core).
FLOOR_LANES=${FLOOR_LANES:-$([[ -n $GW_WORKERS && $GW_WORKERS != 0 ]] && echo "$GW_WORKERS" || nproc)}
DEFAULT_GW_ARGS='serve --config {config} --listen {listen}'
GATEWAY_ARGS=${GATEWAY_ARGS:-$DEFAULT_GW_ARGS}
GATEWAY_B_BIN=${GATEWAY_B_BIN:-}
GATEWAY_B_ARGS=${GATEWAY_B_ARGS:-$DEFAULT_GW_ARGS}

# --- processes --------------------------------------------------------------------------------
TARGETS=(direct)
declare -A URL PROCS RSS_IDLE MAIN_PID TARGET_HEADER

start_sim() { start sim "$BIN" sim --listen "127.0.0.1:$1" --model mofa-sim --ttft-ms 0 --tokens-per-sec 0; }
serve sim start_sim
SIM_PORT=$PORT
SIM_BASE="http://127.0.0.1:$SIM_PORT"
URL[direct]="$SIM_BASE/v1/chat/completions"
SIM_PID=$LAST_PID
MAIN_PID[direct]=$SIM_PID
wait_ready sim "${URL[direct]}" "$SIM_PID"

# nginx: all its paths inside $TMP/nginx; the worker (user nobody when run as root) must be
# able to enter it.
mkdir -p "$TMP/nginx"
chmod 755 "$TMP" "$TMP/nginx"
start_nginx() {
    cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream sim {
        server 127.0.0.1:$SIM_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$1;
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
    start nginx "$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
}
serve nginx start_nginx
MAIN_PID[nginx]=$LAST_PID
URL[nginx]="http://127.0.0.1:$PORT/v1/chat/completions"
TARGETS+=(nginx)

# floor: examples/floor_proxy.rs, the gateway's HTTP stack (tokio, hyper server, hyper-util
# pooled client, mimalloc) with nothing of the gateway on it: what any proxy on that stack pays.
if [[ $WITH_FLOOR == 1 ]]; then
    start_floor() {
        start floor "$FLOOR_BIN" --listen "127.0.0.1:$1" --upstream "$SIM_BASE" --lanes "$FLOOR_LANES"
    }
    serve floor start_floor
    MAIN_PID[floor]=$LAST_PID
    URL[floor]="http://127.0.0.1:$PORT/v1/chat/completions"
    TARGETS+=(floor)
fi

{
    if [[ -n $GW_WORKERS ]]; then
        printf '[server]\nworker_threads = %s\n\n' "$GW_WORKERS"
    fi
    cat <<EOF
[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "$SIM_BASE/v1"
max_concurrency = 64
EOF
} >"$TMP/gateway.toml"
# start_gateway NAME BIN ARGS: a gateway build on a free port.
start_gateway() {
    GW_NAME=$1 GW_BIN=$2 GW_WORDS=$3
    serve "$1" gateway_on
    MAIN_PID[$1]=$LAST_PID
    URL[$1]="http://127.0.0.1:$PORT/v1/chat/completions"
    TARGETS+=("$1")
}
gateway_on() {
    local words=$GW_WORDS
    words=${words//'{config}'/$TMP/gateway.toml}
    words=${words//'{listen}'/127.0.0.1:$1}
    # shellcheck disable=SC2086 # ARGS is a word list by design
    start "$GW_NAME" "$GW_BIN" $words
}
start_gateway gateway "$GATEWAY_BIN" "$GATEWAY_ARGS"
if [[ -n $GATEWAY_B_BIN ]]; then
    start_gateway gateway-b "$GATEWAY_B_BIN" "$GATEWAY_B_ARGS"
fi

if [[ $WITH_LITELLM == 1 ]]; then
    VENV="${XDG_CACHE_HOME:-$HOME/.cache}/mofa-gateway/litellm-$LITELLM_VERSION"
    if [[ ! -x $VENV/bin/litellm ]]; then
        echo "== installing litellm[proxy]==$LITELLM_VERSION into $VENV" >&2
        python3 -m venv "$VENV" >&2
        "$VENV/bin/pip" install --quiet "litellm[proxy]==$LITELLM_VERSION" >&2
    fi
    cat >"$TMP/litellm.yaml" <<EOF
model_list:
  - model_name: mofa-sim
    litellm_params:
      model: openai/mofa-sim
      api_base: $SIM_BASE/v1
      api_key: unused
litellm_settings:
  telemetry: false
EOF
    # LiteLLM refuses to start without a master key (and then checks it on every request, as
    # in production): a random one for this run, sent only to LiteLLM, never printed.
    LL_KEY="sk-$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
    TARGET_HEADER[litellm]="authorization:Bearer $LL_KEY"
    start_litellm() {
        start litellm env LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_MASTER_KEY="$LL_KEY" \
            "$VENV/bin/litellm" --config "$TMP/litellm.yaml" --host 127.0.0.1 --port "$1" \
            --num_workers 1
    }
    serve litellm start_litellm
    MAIN_PID[litellm]=$LAST_PID
    URL[litellm]="http://127.0.0.1:$PORT/v1/chat/completions"
    TARGETS+=(litellm)
fi

for t in "${TARGETS[@]}"; do
    READY_S=$([[ $t == litellm ]] && echo 180 || echo 10) READY_HEADER=${TARGET_HEADER[$t]:-} \
        wait_ready "$t" "${URL[$t]}" "${MAIN_PID[$t]}"
    # The process and its direct children (nginx: master + worker; litellm: its workers).
    PROCS[$t]="${MAIN_PID[$t]} $(children "${MAIN_PID[$t]}" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    RSS_IDLE[$t]=$(rss_kb ${PROCS[$t]})
done

# --- wrk scripts (one per kind and target: LiteLLM gets its key) -----------------------------
# lua_header NAME:VALUE: one wrk.headers line.
lua_header() {
    local v=${1#*:}
    printf 'wrk.headers["%s"] = "%s"\n' "${1%%:*}" "${v# }"
}
for t in "${TARGETS[@]}"; do
    for kind in ns st; do
        body=$([[ $kind == ns ]] && echo "$BODY" || echo "$BODY_ST")
        {
            printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            printf "wrk.body = '%s'\n" "$body"
            for h in "${HEADER_LIST[@]}" ${TARGET_HEADER[$t]:+"${TARGET_HEADER[$t]}"}; do
                lua_header "$h"
            done
            cat <<'EOF'
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d rps=%.1f p50_us=%d p99_us=%d failed=%d\n",
        summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50),
        latency:percentile(99), e.status + e.connect + e.read + e.write + e.timeout))
end
EOF
        } >"$TMP/$kind-$t.lua"
    done
done

# --- one run ----------------------------------------------------------------------------------
machine_busy() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }

# run ROUND POINT TARGET: one load run; appends one JSON line to $TMP/results.jsonl.
run() {
    local round=$1 point=$2 target=$3 kind=${2%%-*} rate=${2#*-} body out p0 s0 p1 s1 b0 i0 b1 i1 client
    body=$([[ $kind == ns ]] && echo "$BODY" || echo "$BODY_ST")
    if [[ $target == litellm && $rate != closed ]]; then
        # LiteLLM runs only its own low rate, once per kind (the first open-loop point).
        [[ " $LL_DONE " == *" $round-$kind "* ]] && return 0
        LL_DONE+=" $round-$kind"
        rate=$([[ $kind == ns ]] && echo "$LITELLM_RATE" || echo "$LITELLM_STREAM_RATE")
    fi
    out="$TMP/run.out"
    echo "== round $round, $point, $target${rate:+ ($rate)}" >&2
    # shellcheck disable=SC2086
    p0=$(proc_ticks ${PROCS[$target]})
    # shellcheck disable=SC2086
    k0=$(proc_sys_ticks ${PROCS[$target]})
    # shellcheck disable=SC2086
    c0=$(proc_ctxsw ${PROCS[$target]})
    s0=$(proc_ticks "$SIM_PID")
    read -r b0 i0 < <(machine_busy)
    # In a subshell whose only child is the client, so that `times` there gives its CPU time.
    if [[ $rate == closed ]]; then
        (wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s -s "$TMP/$kind-$target.lua" "${URL[$target]}" \
            >"$out" 2>&1 && times >"$TMP/client.times") ||
            { cat "$out" >&2; echo "error: wrk failed" >&2; exit 1; }
    else
        ("$LOADGEN" --url "${URL[$target]}" --rate "$rate" --duration-s "$DURATION" \
            --warmup-s "$LOADGEN_WARMUP" --timeout-s 5 --body "$body" "${HEADER_ARGS[@]}" \
            ${TARGET_HEADER[$target]:+--header "${TARGET_HEADER[$target]}"} \
            >"$out" 2>"$TMP/run.err" &&
            times >"$TMP/client.times") ||
            { cat "$TMP/run.err" >&2; echo "error: loadgen failed" >&2; exit 1; }
    fi
    client=$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                   printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$TMP/client.times")
    # shellcheck disable=SC2086
    p1=$(proc_ticks ${PROCS[$target]})
    # shellcheck disable=SC2086
    k1=$(proc_sys_ticks ${PROCS[$target]})
    # shellcheck disable=SC2086
    c1=$(proc_ctxsw ${PROCS[$target]})
    s1=$(proc_ticks "$SIM_PID")
    read -r b1 i1 < <(machine_busy)
    for t in "${TARGETS[@]}"; do alive "$t" "${MAIN_PID[$t]}"; done
    python3 - "$out" "$round" "$point" "$target" "$rate" "$((p1 - p0))" "$((s1 - s0))" \
        "$((b1 - b0))" "$((i1 - i0))" "$TICK" "$client" "$((k1 - k0))" "$((c1 - c0))" \
        >>"$TMP/results.jsonl" <<'EOF'
import json, sys
out, rnd, point, target, rate, proc, sim, busy, idle, tick, client, ksys, ctxsw = sys.argv[1:14]
text = open(out).read()
r = {"round": int(rnd), "point": point, "target": target, "rate": rate}
if rate == "closed":
    line = next(l for l in text.splitlines() if l.startswith("RESULT "))
    kv = dict(w.split("=") for w in line.split()[1:])
    r.update(requests=int(kv["requests"]), rps=float(kv["rps"]), p50_us=int(kv["p50_us"]),
             p99_us=int(kv["p99_us"]), failed=int(kv["failed"]))
else:
    j = json.loads(text)
    ok = j["latency_ms"].get("200", {})
    r.update(requests=j["launched_all"], rps=j["goodput_rps"],
             p50_us=round(ok.get("p50", 0) * 1000), p99_us=round(ok.get("p99", 0) * 1000),
             failed=sum(n for k, n in j["outcomes"].items() if k != "200"),
             lag_p99_ms=j["launch_lag_ms"].get("p99", 0), outcomes=j["outcomes"])
us = 1e6 / float(tick)
n = max(r["requests"], 1)
r["cpu_us"] = int(proc) * us / n          # the target process(es) (direct: the sim)
r["sim_cpu_us"] = int(sim) * us / n
r["sys_us"] = int(ksys) * us / n          # the kernel's share of cpu_us
r["ctxsw"] = int(ctxsw) / n               # context switches per request
r["machine_busy_s"] = int(busy) / float(tick)
r["machine_idle_s"] = int(idle) / float(tick)
r["proc_s"] = int(proc) / float(tick)
r["sim_s"] = int(sim) / float(tick)
r["client_s"] = float(client)
print(json.dumps(r))
EOF
}

# --- warm-up and rounds -----------------------------------------------------------------------
for t in "${TARGETS[@]}"; do
    for kind in ns st; do
        wrk -t1 -c8 -d2s -s "$TMP/$kind-$t.lua" "${URL[$t]}" >/dev/null 2>&1 || true
    done
done
LL_DONE=""
for ((round = 1; round <= REPEATS; round++)); do
    for point in $POINTS; do
        for t in "${TARGETS[@]}"; do
            run "$round" "$point" "$t"
        done
    done
done
for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    echo "$t ${RSS_IDLE[$t]} $(rss_kb ${PROCS[$t]})"
done >"$TMP/rss"
[[ -n ${RESULTS_OUT:-} ]] && cp "$TMP/results.jsonl" "$RESULTS_OUT"

# --- summary ----------------------------------------------------------------------------------
python3 - "$TMP/results.jsonl" "$TMP/rss" "$REPEATS" "$DURATION" "$(nproc)" \
    "${GW_WORKERS:-default}" "$GATEWAY_BIN" <<'EOF'
import json, statistics, sys
from collections import defaultdict
path, rss_path, repeats, duration, ncpu, workers, gwbin = sys.argv[1:8]
rows = [json.loads(l) for l in open(path)]
by = defaultdict(dict)  # (point, target) -> round -> row
for r in rows:
    by[(r["point"], r["target"])][r["round"]] = r
points = list(dict.fromkeys(r["point"] for r in rows))
targets = list(dict.fromkeys(r["target"] for r in rows))

def ms(v, f="%.1f"):
    return "[" + ("-" if not v else "..".join(f % x for x in (min(v), max(v)))) + "]"

def stat(vals, f="%.1f"):
    if not vals:
        return "-"
    return (f % statistics.median(vals)) + " " + ms(vals, f)

print()
print(f"mofa-gateway proxy benchmark: {ncpu} CPUs shared by the client, the sim and the proxies;"
      f" {duration}s per run, {repeats} interleaved rounds; median [min..max] over the rounds")
print(f"gateway: {gwbin} (worker_threads {workers})")
warn = []
for p in points:
    kind, rate = p.split("-")
    print()
    load = "closed loop, wrk -t1 -c32" if rate == "closed" else f"open loop, {rate} req/s (loadgen)"
    print(f"== {p}: {'streaming, 20 chunks' if kind == 'st' else 'non-streaming'}, {load}")
    print(f"{'target':10} {'CPU-us/req':>18} {'x nginx':>16} {'req/s':>20} {'x direct':>16}"
          f" {'+p50 ms':>18} {'+p99 ms':>18} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}"
          f" {'sim us/req':>10} {'other%':>6} {'x floor':>16} {'sys us/req':>10} {'cs/req':>6}")
    direct = by.get((p, "direct"), {})
    nginx = by.get((p, "nginx"), {})
    floor = by.get((p, "floor"), {})
    for t in targets:
        runs = by.get((p, t), {})
        if not runs:
            continue
        rr = sorted(runs)
        cpu = [runs[i]["cpu_us"] for i in rr]
        ratio = [runs[i]["cpu_us"] / nginx[i]["cpu_us"] for i in rr
                 if t not in ("direct", "nginx") and i in nginx and nginx[i]["cpu_us"] > 0
                 and runs[i]["rate"] == nginx[i]["rate"]]
        xfloor = [runs[i]["cpu_us"] / floor[i]["cpu_us"] for i in rr
                  if t.startswith("gateway") and i in floor and floor[i]["cpu_us"] > 0
                  and runs[i]["rate"] == floor[i]["rate"]]
        sys_us = statistics.median(runs[i].get("sys_us", 0) for i in rr)
        cs = statistics.median(runs[i].get("ctxsw", 0) for i in rr)
        rps = [runs[i]["rps"] for i in rr]
        xd = [runs[i]["rps"] / direct[i]["rps"] for i in rr if i in direct and direct[i]["rps"] > 0
              and runs[i]["rate"] == direct[i]["rate"]] if t != "direct" else []
        same = lambda i: i in direct and runs[i]["rate"] == direct[i]["rate"]
        a50 = [(runs[i]["p50_us"] - direct[i]["p50_us"]) / 1000 for i in rr if t != "direct" and same(i)]
        a99 = [(runs[i]["p99_us"] - direct[i]["p99_us"]) / 1000 for i in rr if t != "direct" and same(i)]
        p50 = statistics.median(runs[i]["p50_us"] for i in rr) / 1000
        p99 = statistics.median(runs[i]["p99_us"] for i in rr) / 1000
        failed = sum(runs[i]["failed"] for i in rr)
        sim = statistics.median(runs[i]["sim_cpu_us"] for i in rr)
        # Machine CPU used by what this script did not start: busy - target - sim - client.
        other = [max(runs[i]["machine_busy_s"] - runs[i]["proc_s"] - runs[i]["client_s"]
                     - (runs[i]["sim_s"] if t != "direct" else 0), 0)
                 / max(runs[i]["machine_busy_s"] + runs[i]["machine_idle_s"], 1e-9) * 100 for i in rr]
        name = t if runs[rr[0]]["rate"] == rate else f"{t}@{runs[rr[0]]['rate']}"
        print(f"{name:10} {stat(cpu, '%.0f'):>18} {stat(ratio, '%.2f'):>16} {stat(rps, '%.0f'):>20}"
              f" {stat(xd, '%.3f'):>16} {stat(a50, '%.3f'):>18} {stat(a99, '%.3f'):>18}"
              f" {p50:8.3f} {p99:8.3f} {failed:6d} {sim:10.0f} {statistics.median(other):6.0f}"
              f" {stat(xfloor, '%.2f'):>16} {sys_us:10.0f} {cs:6.2f}")
        lag = max(runs[i].get("lag_p99_ms", 0) for i in rr)
        if failed or lag > 5:
            kinds = defaultdict(int)
            for i in rr:
                for k, n in runs[i].get("outcomes", {}).items():
                    if k != "200":
                        kinds[k] += n
            warn.append(f"{p} {t}: {failed} failed{' ' + str(dict(kinds)) if kinds else ''},"
                        f" loadgen launch lag p99 up to {lag} ms"
                        " (the client or the target fell behind: latency and CPU-us/req of this"
                        " point are not comparable)")
for w in warn:
    print("warning:", w)
print()
print("RSS (MB): idle after start-up / after the load")
for line in open(rss_path):
    t, idle, after = line.split()
    print(f"  {t:10} {int(idle) / 1024:6.1f} / {int(after) / 1024:6.1f}")
print()
print("CPU-us/req: utime+stime of the process(es) over the requests sent in that run (direct: the sim).")
print("x nginx: per round, the target's CPU-us/req divided by nginx's; +p50/+p99: minus direct, same round.")
print("x floor: per round, a gateway's CPU-us/req divided by the floor's (floor_proxy: the same HTTP")
print("        stack doing nothing but the proxying): the cost of the gateway's own work.")
print("sys us/req: the kernel's share (stime) of CPU-us/req; cs/req: context switches per request.")
print("other%: share of the machine's CPU (all cores) used by processes this script did not start")
print("        (not the target, the sim or the client): other jobs sharing the machine.")
EOF
