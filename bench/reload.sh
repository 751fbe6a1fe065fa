#!/usr/bin/env bash
# bench/reload.sh: live configuration under load. A reload every second, alternating two
# configs, while 2000 requests/s run through the gateway: does any request fail, how much
# latency does a reload add, and how long does a reload take to apply?
#
# Method:
#   * Build the release binary and the load generator (bench/lib.sh); start on free loopback
#     ports one `mofa-gateway sim` (models `m` and `extra`, TTFT SIM_TTFT_MS, default 2 ms)
#     and one gateway with `--config FILE`.
#   * The two configs differ in a key (`alice` in A, `bob` in B), in `m`'s deployment
#     `max_concurrency` (512 in A, 256 in B) and in a model (`extra` in A only). The load uses
#     a third key, `bench`, present in both.
#   * Load, open loop (examples/loadgen.rs), for DURATION s (default 60) after 3 s of warm-up:
#     RATE/2 req/s non-streaming and RATE/2 req/s streaming (20 tokens) to `m` (RATE default
#     2000), and 20 req/s to `extra`, whose documented answers are 200 while it is configured,
#     404 `model_not_found` once it is not, and 503 `no_healthy_backend` for a request queued
#     on it when it is removed.
#   * During the window, every second: the other config is renamed over the file (the atomic
#     way), then `POST /admin/reload` (admin key) is timed by curl: the reply comes once the
#     new generation serves, so its time is the reload's latency (file read, validation, diff,
#     swap). Each reload's start is logged (Unix ms).
#   * Reported: the outcomes of each load (a failed request is anything but 200 on `m`, or
#     anything but 200/404/503 no_healthy_backend on `extra`); p50/p99 latency of `m`'s
#     requests launched within RELOAD_WINDOW_MS (default 200) after a reload began against
#     the others; reload latency p50/p99/max; the same load with no reload (`baseline`), in
#     the same run, for the ratio.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/reload.sh    (env: RATE DURATION SIM_TTFT_MS RELOAD_WINDOW_MS)

set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RATE=${RATE:-2000}
DURATION=${DURATION:-60}
SIM_TTFT_MS=${SIM_TTFT_MS:-2}
RELOAD_WINDOW_MS=${RELOAD_WINDOW_MS:-200}
for v in RATE DURATION RELOAD_WINDOW_MS; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "error: $tool is required" >&2
        exit 2
    }
done
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

hash_of() { printf '%s' "$1" | "$BIN" keys hash; }
BENCH_KEY=sk-bench-reload-load
ADMIN_KEY=sk-bench-reload-admin
BENCH_HASH=$(hash_of "$BENCH_KEY")
ADMIN_HASH=$(hash_of "$ADMIN_KEY")
ALICE_HASH=$(hash_of sk-bench-alice)
BOB_HASH=$(hash_of sk-bench-bob)

sim_ready --model m --model extra --ttft-ms "$SIM_TTFT_MS"

# config NAME OTHER_KEY OTHER_HASH MAX_CONCURRENCY WITH_EXTRA
config() {
    {
        cat <<EOF
[server]
listen = "127.0.0.1:0"

[admission]
max_queue = 4096

[auth]
mode = "keys"
admin_keys = ["$ADMIN_HASH"]

[[auth.keys]]
name = "bench"
hash = "$BENCH_HASH"

[[auth.keys]]
name = "$2"
hash = "$3"

[[models]]
name = "m"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
max_concurrency = $4
EOF
        if [[ $5 == 1 ]]; then
            cat <<EOF

[[models]]
name = "extra"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
EOF
        fi
    } >"$TMP/$1.toml"
}
config a alice "$ALICE_HASH" 512 1
config b bob "$BOB_HASH" 256 0
cp "$TMP/a.toml" "$TMP/gateway.toml"

gw_up() { start gateway "$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$1"; }
serve gateway gw_up
GW_PORT=$PORT
GW_PID=$LAST_PID
URL="http://127.0.0.1:$GW_PORT/v1/chat/completions"
READY_HEADER="authorization: Bearer $BENCH_KEY"
wait_ready gateway "$URL" "$GW_PID" '{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'

NS_BODY='{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}'
ST_BODY='{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":20,"stream":true}'
EX_BODY='{"model":"extra","messages":[{"role":"user","content":"hello there"}],"max_tokens":5}'
HALF=$((RATE / 2))

# run NAME RELOADS: the three loads for DURATION s; with RELOADS=1, a reload every second.
run() {
    local name=$1 reloads=$2 pids=() i next
    cp "$TMP/a.toml" "$TMP/gateway.toml.new" && mv "$TMP/gateway.toml.new" "$TMP/gateway.toml"
    curl --noproxy '*' -s -o /dev/null -X POST -H "authorization: Bearer $ADMIN_KEY" \
        "http://127.0.0.1:$GW_PORT/admin/reload"
    local loads=("ns:$HALF:$NS_BODY" "st:$HALF:$ST_BODY" "ex:20:$EX_BODY")
    for load in "${loads[@]}"; do
        local kind=${load%%:*} rest=${load#*:}
        local rate=${rest%%:*} body=${rest#*:}
        "$LOADGEN" --url "$URL" --rate "$rate" --duration-s "$DURATION" --warmup-s 3 \
            --timeout-s 30 --header "authorization:Bearer $BENCH_KEY" --body "$body" \
            --latencies "$TMP/$name-$kind.lat" >"$TMP/$name-$kind.json" &
        pids+=($!)
    done
    : >"$TMP/$name-reloads.txt"
    if [[ $reloads == 1 ]]; then
        sleep 3
        for ((i = 0; i < DURATION; i++)); do
            next=$([[ $((i % 2)) == 0 ]] && echo b || echo a)
            cp "$TMP/$next.toml" "$TMP/gateway.toml.new"
            mv "$TMP/gateway.toml.new" "$TMP/gateway.toml"
            local t0
            t0=$(date +%s%3N)
            curl --noproxy '*' -s -o "$TMP/reload-reply.json" -w "$t0 %{http_code} %{time_total}\n" \
                -X POST -H "authorization: Bearer $ADMIN_KEY" \
                "http://127.0.0.1:$GW_PORT/admin/reload" >>"$TMP/$name-reloads.txt"
            sleep 1
        done
    fi
    for p in "${pids[@]}"; do wait "$p"; done
    alive gateway "$GW_PID"
}

echo "== baseline: the same load, no reload" >&2
run baseline 0
echo "== reloads: one a second, alternating two configs" >&2
run reload 1

python3 - "$TMP" "$RELOAD_WINDOW_MS" <<'PY'
import json, sys
tmp, window = sys.argv[1], float(sys.argv[2])

def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]

def lat(name, kind):
    rows = []
    with open(f"{tmp}/{name}-{kind}.lat") as f:
        for line in f:
            start, ms, outcome = line.rstrip("\n").split("\t")
            rows.append((float(start), float(ms), outcome))
    return rows

reloads = []
with open(f"{tmp}/reload-reloads.txt") as f:
    for line in f:
        t, code, secs = line.split()
        reloads.append((float(t), int(code), float(secs) * 1000))

ok_extra = {"200", "404", "503:no_healthy_backend"}
print(f"{'run':10} {'load':6} {'requests':>9} {'failed':>7}  outcomes")
for name in ["baseline", "reload"]:
    for kind in ["ns", "st", "ex"]:
        rows = lat(name, kind)
        counts = {}
        for _, _, o in rows:
            counts[o] = counts.get(o, 0) + 1
        good = ok_extra if kind == "ex" else {"200"}
        failed = sum(n for o, n in counts.items() if o not in good)
        print(f"{name:10} {kind:6} {len(rows):9d} {failed:7d}  {json.dumps(counts, sort_keys=True)}")

starts = [t for t, _, _ in reloads]
def near(t):
    # a request launched within `window` ms after a reload began
    import bisect
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and t - starts[i] < window

print()
print(f"latency of m's 200s (ms), launched within {window:.0f} ms after a reload began vs the rest:")
print(f"{'load':6} {'baseline p50':>13} {'p99':>8} {'reload-near p50':>16} {'p99':>8} {'n':>6} {'others p50':>11} {'p99':>8}")
for kind in ["ns", "st"]:
    base = [ms for _, ms, o in lat("baseline", kind) if o == "200"]
    rows = [(t, ms) for t, ms, o in lat("reload", kind) if o == "200"]
    during = [ms for t, ms in rows if near(t)]
    others = [ms for t, ms in rows if not near(t)]
    print(f"{kind:6} {pct(base,50):13.2f} {pct(base,99):8.2f} {pct(during,50):16.2f} {pct(during,99):8.2f} {len(during):6d} {pct(others,50):11.2f} {pct(others,99):8.2f}")

times = [ms for _, code, ms in reloads]
codes = {}
for _, code, _ in reloads:
    codes[code] = codes.get(code, 0) + 1
print()
print(f"reloads: {len(reloads)} {json.dumps(codes)}; POST /admin/reload to the new config serving (ms): "
      f"p50 {pct(times,50):.2f} p99 {pct(times,99):.2f} max {max(times) if times else float('nan'):.2f}")
PY
grep -c "config reloaded" "$TMP/gateway.log" | sed 's/^/gateway log lines "config reloaded": /'
