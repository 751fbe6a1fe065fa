#!/usr/bin/env bash
# bench/overload.sh: what admission control keeps under a 10x overload.
#
# Method:
#   * Build the release binary and the open-loop load generator (examples/loadgen.rs), then
#     start two processes on free loopback ports:
#       - `mofa-gateway sim`: the simulated model server, --max-concurrency 8 (a 9th concurrent
#         request gets a 503 from the sim itself), --tokens-per-sec 200, no time to first token;
#         every request asks for max_tokens 20, which the sim paces over 19 intervals of 5 ms,
#         so a request holds a slot for ~95 ms and the nominal capacity is
#         C_nominal = 8 / 0.095 s = ~84 requests/s;
#       - `mofa-gateway serve`: one model `mofa-sim` whose one local deployment is the sim with
#         max_concurrency 8, and [admission] max_queue 32, max_queue_wait_ms 2000.
#   * Capacity is measured, not assumed: the load generator offers CAL_X (default 2) x C_nominal
#     to the gateway for CAL_DURATION seconds (default 10, after WARMUP seconds) without a
#     priority header; the goodput of that run (2xx completed in the window, per second) is the
#     measured capacity C. The sim's own count of completed requests per second over the same
#     run is printed next to it as a cross-check.
#   * Overload: the load generator offers OVERLOAD_X (default 10) x C for DURATION seconds
#     (default 30, after WARMUP seconds), open loop (one request every 1/rate s, whatever the
#     answers), with the priority mix MIX (default low=70,normal=20,high=8,critical=2, sent as
#     `x-mofa-priority`). Every request's outcome (status; for a 503 its x-mofa-reject-reason;
#     transport errors apart) and latency (send to last body byte) is recorded.
#   * Reported: C, goodput, goodput / C, the share of every outcome, p99 time-to-reject (the
#     latency of the 503s, all together, per reason and per priority, and the share of 503s
#     answered within 5 ms), p99 latency of the successes, the success rate per priority, the
#     largest queue depth and in-flight count seen on /admin/orchestrator (sampled every
#     0.5 s), the CPU seconds used by each process, and the sim's peak_in_flight and rejected
#     from /sim/stats: the gateway must never send the sim more than 8 requests at once, so
#     these must be <= 8 and 0 (the script exits 1 otherwise).
#   * Targets: goodput >= 95% of C under the overload; p99 time-to-reject < 5 ms.
#   * The sim, the gateway and the load generator run on the same machine and share its cores;
#     on a small box the load generator's own CPU use competes with the gateway's.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/overload.sh   (env: OVERLOAD_X DURATION CAL_X CAL_DURATION WARMUP MIX
#                                  MAX_OUTSTANDING)

set -euo pipefail

OVERLOAD_X=${OVERLOAD_X:-10}
DURATION=${DURATION:-30}
CAL_X=${CAL_X:-2}
CAL_DURATION=${CAL_DURATION:-10}
WARMUP=${WARMUP:-3}
MIX=${MIX:-low=70,normal=20,high=8,critical=2}
MAX_OUTSTANDING=${MAX_OUTSTANDING:-4096}

SIM_CONCURRENCY=8
SIM_TPS=200
MAX_TOKENS=20

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BODY="{\"model\":\"mofa-sim\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":$MAX_TOKENS}"

for v in DURATION CAL_DURATION MAX_OUTSTANDING; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
for v in OVERLOAD_X CAL_X WARMUP; do
    if ! [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        echo "error: $v must be a number >= 0 (got '${!v}')" >&2
        exit 2
    fi
done
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 2; }
done

# Build (sets BIN, LOADGEN), process handling (start, wait_ready, cleanup on exit by PID),
# free ports and /proc readings: bench/lib.sh.
source "$ROOT/bench/lib.sh"
# Both on free ports, started again on another one if the port is taken meanwhile (lib.sh).
start_sim() {
    start sim "$BIN" sim --listen "127.0.0.1:$1" --model mofa-sim --ttft-ms 0 \
        --tokens-per-sec "$SIM_TPS" --max-concurrency "$SIM_CONCURRENCY"
}
start_gw() { start gateway "$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$1"; }
serve sim start_sim
SIM_PID=$LAST_PID
SIM_BASE="http://127.0.0.1:$PORT"
cat >"$TMP/gateway.toml" <<EOF
[admission]
max_queue = 32
max_queue_wait_ms = 2000

[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "$SIM_BASE/v1"
max_concurrency = $SIM_CONCURRENCY
EOF
serve gateway start_gw
GW_PID=$LAST_PID
GW_BASE="http://127.0.0.1:$PORT"
wait_ready sim "$SIM_BASE/v1/chat/completions" "$SIM_PID"
wait_ready gateway "$GW_BASE/v1/chat/completions" "$GW_PID"

# --- measurement helpers ----------------------------------------------------------------------
# TICK and proc_ticks PID (CPU clock ticks used so far): bench/lib.sh.
# CPU seconds used so far by this shell's finished children (the load generator), into file
# $1. `times` must run in this shell, not in a $(...) subshell, hence the file.
child_secs() {
    times >"$TMP/times"
    awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                   printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$TMP/times" >"$1"
}
# CPU time (clock ticks, all processes) the machine spent busy so far: /proc/stat minus idle, iowait.
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
secs() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { printf "%.2f", (b - a) / t }'; }
sim_stats() { curl --noproxy '*' -sf --max-time 5 "$SIM_BASE/sim/stats"; }
# json FILE EXPR: evaluates the Python expression EXPR on the JSON object in FILE (as `j`).
json() { python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# Samples /admin/orchestrator every 0.5 s into $TMP/$1.samples until killed.
sampler() {
    while true; do
        curl --noproxy '*' -s --max-time 1 "$GW_BASE/admin/orchestrator" >>"$TMP/$1.samples" || true
        echo >>"$TMP/$1.samples"
        sleep 0.5
    done
}

# run NAME RATE SECONDS [MIX]: one load generator run against the gateway; its JSON report goes
# to $TMP/NAME.json, the sim's stats before and after to $TMP/NAME.sim0/.sim1, CPU seconds to
# $TMP/NAME.cpu.
run() {
    local name=$1 rate=$2 dur=$3 mix=${4:-} be0 gw0 be1 gw1 m0 m1 sp
    local args=(--url "$GW_BASE/v1/chat/completions" --rate "$rate" --duration-s "$dur"
        --warmup-s "$WARMUP" --max-outstanding "$MAX_OUTSTANDING" --body "$BODY")
    [[ -n $mix ]] && args+=(--priority-mix "$mix")
    echo "== $name: ${rate} req/s for ${dur}s (+${WARMUP}s warm-up)${mix:+, priorities $mix}" >&2
    sim_stats >"$TMP/$name.sim0"
    : >"$TMP/$name.samples"
    sampler "$name" &
    sp=$!
    PIDS+=("$sp")
    # The sim's counters at the start and the end of the measurement window.
    (sleep "$WARMUP" && sim_stats >"$TMP/$name.w0" && sleep "$dur" && sim_stats >"$TMP/$name.w1") &
    PIDS+=("$!")
    child_secs "$TMP/lg0"
    be0=$(proc_ticks "$SIM_PID")
    gw0=$(proc_ticks "$GW_PID")
    m0=$(machine_ticks)
    if ! "$LOADGEN" "${args[@]}" >"$TMP/$name.json" 2>"$TMP/$name.err"; then
        cat "$TMP/$name.err" >&2
        echo "error: loadgen failed" >&2
        exit 1
    fi
    m1=$(machine_ticks)
    be1=$(proc_ticks "$SIM_PID")
    gw1=$(proc_ticks "$GW_PID")
    child_secs "$TMP/lg1"
    kill "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
    wait "${PIDS[-1]}" 2>/dev/null || true
    sim_stats >"$TMP/$name.sim1"
    printf 'sim=%s gateway=%s loadgen=%s machine=%s\n' "$(secs "$be0" "$be1" "$TICK")" \
        "$(secs "$gw0" "$gw1" "$TICK")" "$(secs "$(<"$TMP/lg0")" "$(<"$TMP/lg1")" 1)" \
        "$(secs "$m0" "$m1" "$TICK")" >"$TMP/$name.cpu"
}

# --- runs -------------------------------------------------------------------------------------
C_NOMINAL=$(awk -v c="$SIM_CONCURRENCY" -v t="$SIM_TPS" -v n="$MAX_TOKENS" \
    'BEGIN { printf "%.1f", c * t / (n - 1) }')
CAL_RATE=$(awk -v c="$C_NOMINAL" -v x="$CAL_X" 'BEGIN { printf "%.1f", c * x }')
run calibration "$CAL_RATE" "$CAL_DURATION"
C=$(json "$TMP/calibration.json" 'j["goodput_rps"]')
# sim_rate NAME SECONDS: requests/s the sim completed in the measurement window of run NAME.
sim_rate() {
    python3 -c 'import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
print("%.1f" % ((b["completed"] - a["completed"]) / float(sys.argv[3])))' \
        "$TMP/$1.w0" "$TMP/$1.w1" "$2"
}
C_SIM=$(sim_rate calibration "$CAL_DURATION")
if ! awk -v c="$C" 'BEGIN { exit !(c > 0) }'; then
    echo "error: the calibration run had no successes; its report:" >&2
    cat "$TMP/calibration.json" >&2
    exit 1
fi
OVER_RATE=$(awk -v c="$C" -v x="$OVERLOAD_X" 'BEGIN { printf "%.1f", c * x }')
run overload "$OVER_RATE" "$DURATION" "$MIX"
OVER_SIM=$(sim_rate overload "$DURATION")

# --- summary ----------------------------------------------------------------------------------
python3 - "$TMP" "$C_NOMINAL" "$C" "$C_SIM" "$CAL_RATE" "$OVERLOAD_X" "$SIM_CONCURRENCY" \
    "$(nproc)" "$OVER_SIM" <<'EOF'
import json, sys

tmp, c_nom, c, c_sim, cal_rate, x, sim_max, ncpu, over_sim = sys.argv[1:10]
c_nom, c, c_sim, cal_rate, sim_max = float(c_nom), float(c), float(c_sim), float(cal_rate), int(sim_max)
over_sim = float(over_sim)
load = lambda name: json.load(open(f"{tmp}/{name}"))
cal, ov = load("calibration.json"), load("overload.json")
stats_end = load("overload.sim1")
cpu = dict(kv.split("=") for kv in open(f"{tmp}/overload.cpu").read().split())
cpu = {k: float(v) for k, v in cpu.items()}

max_q = max_inflight = 0
for line in open(f"{tmp}/overload.samples"):
    line = line.strip()
    if not line:
        continue
    try:
        m = json.loads(line)["models"]["mofa-sim"]
    except (ValueError, KeyError):
        continue
    max_q = max(max_q, m["queue"]["depth"])
    max_inflight = max(max_inflight, sum(d["in_flight"] for d in m["deployments"]))

print()
print(f"mofa-gateway overload benchmark: {ncpu} CPUs shared by the sim, the gateway and the load generator")
print(f"capacity: nominal {c_nom:.1f} req/s (8 slots x 200 tok/s / 19 token intervals);"
      f" measured through the gateway at {cal_rate:.0f} req/s offered: {c:.1f} req/s"
      f" (the sim completed {c_sim:.1f}/s in that window)")
good = ov["goodput_rps"]
print(f"overload: {x}x measured capacity = {ov['offered_rps']:.1f} req/s offered for {ov['duration_s']:.0f} s,"
      f" launched {ov['launched_rps']:.1f}/s, launch lag p99 {ov['launch_lag_ms'].get('p99', 0)} ms")
print(f"goodput: {good:.1f} req/s = {good / c:.3f} of measured capacity ({good / c_nom:.3f} of nominal);"
      f" the sim completed {over_sim:.1f}/s in the window")
print("outcomes (share of offered):")
lat = ov["latency_ms"]
for k, n in ov["outcomes"].items():
    l = lat.get(k, {})
    extra = f"  latency ms p50 {l['p50']} p90 {l['p90']} p99 {l['p99']} max {l['max']}" if "p99" in l else ""
    print(f"  {k:<22} {n:>7}  {ov['outcome_shares'][k]:>6.3f}{extra}")
rej = ov["rejections_503_latency_ms"]
ok = lat.get("200", {})
print(f"p99 time-to-reject (all 503s): {rej.get('p99', 'n/a')} ms (p50 {rej.get('p50', 'n/a')}, max {rej.get('max', 'n/a')})")
print(f"p99 latency of successes: {ok.get('p99', 'n/a')} ms (p50 {ok.get('p50', 'n/a')})")
fast = ov["rejections_503_fast"]
print(f"503s answered within {fast['within_ms']} ms: {fast['count']} of {rej.get('count', 0)}"
      f" ({fast['count'] / max(rej.get('count', 0), 1):.3f})")
if ov.get("priorities"):
    print("per priority (of the requests sent):")
    for p, v in ov["priorities"].items():
        ol, rl = v["ok_latency_ms"], v["rejections_503_latency_ms"]
        okl = f"ok p50/p99 {ol['p50']}/{ol['p99']} ms" if "p99" in ol else "ok -"
        rjl = f"503 p50/p99 {rl['p50']}/{rl['p99']} ms" if "p99" in rl else "503 -"
        print(f"  {p:<8} {v['ok']:>6}/{v['sent']:<6} ok ({v['success_rate']:.3f};"
              f" {v['share_of_successes']:.3f} of successes)  {okl}  {rjl}")
print(f"gateway, sampled every 0.5 s: max queue depth {max_q}, max in flight {max_inflight}")
wall = ov["schedule_took_s"]
ours = cpu["sim"] + cpu["gateway"] + cpu["loadgen"]
print(f"CPU seconds during the overload run (~{wall:.0f} s of load on {ncpu} CPUs): sim {cpu['sim']:.2f},"
      f" gateway {cpu['gateway']:.2f}, loadgen {cpu['loadgen']:.2f};"
      f" whole machine {cpu['machine']:.2f}, of which other processes ~{max(cpu['machine'] - ours, 0):.2f}")
rejected = stats_end["rejected"]
peak = stats_end["peak_in_flight"]
print(f"sim /sim/stats at the end: peak_in_flight {peak} (must be <= {sim_max}), rejected {rejected} (must be 0),"
      f" completed {stats_end['completed']}, cancelled {stats_end['cancelled']}")
non503 = {k: n for k, n in ov["outcomes"].items() if k != "200" and not k.startswith("503:")}
if non503:
    print(f"WARNING: outcomes other than 200 and 503: {non503}")
chk = ov["checks_503"]
print(f"503 contract checks: {chk['without_retry_after']} without Retry-After,"
      f" {chk['reason_header_not_body_code']} with x-mofa-reject-reason != body error.code")
print()
verdict = lambda ok: "met" if ok else "NOT met"
print(f"target goodput >= 0.95 x capacity: {good / c:.3f} -> {verdict(good >= 0.95 * c)}")
if "p99" in rej:
    print(f"target p99 time-to-reject < 5 ms: {rej['p99']} ms -> {verdict(rej['p99'] < 5)}")
print(f"no over-commit (sim peak_in_flight <= {sim_max}, sim rejected 0): {verdict(peak <= sim_max and rejected == 0)}")
sys.exit(0 if peak <= sim_max and rejected == 0 else 1)
EOF
