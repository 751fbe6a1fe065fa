#!/usr/bin/env bash
# bench/usage.sh: what the usage ledger costs the gateway: CPU per request with `[usage]` off
# and with the SQLite and PostgreSQL stores, same load, same run, rounds interleaved.
#
# Method:
#   * Build the release binary and the load generator (bench/lib.sh); start one
#     `mofa-gateway sim` and two gateways on free loopback ports, the same config but for
#     `[usage]`: `off`, `store = "sqlite"` (a file in the run's temp dir) and `store =
#     "postgres"` (a server of its own: Debian's postgresql, initdb + pg_ctl in the temp dir on a
#     loopback port, fsync on, as the `postgres` user when run as root).
#   * REPEATS rounds (default 3); in each, each gateway in turn gets RATE req/s (default 2000)
#     of a small non-streaming chat completion for DURATION s (default 10) after 2 s of
#     warm-up (examples/loadgen.rs, open loop). The CPU time (utime + stime, all threads) of
#     the gateway process over its run, divided by the requests sent, is its CPU per request.
#   * Reported: per gateway, CPU-µs per request (median [min..max] of the rounds), the ratio
#     sqlite / off and postgres / off per round, the PostgreSQL server's own CPU per request
#     (postmaster and its children) beside, failed requests, and for SQLite the rows written against the
#     requests sent (every one must be there) and the ledger's dropped count; then the store
#     alone: thread CPU per record of `insert` (batches of 2000) in a release-mode unit test.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/usage.sh    (env: RATE DURATION REPEATS)

set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RATE=${RATE:-2000}
DURATION=${DURATION:-10}
REPEATS=${REPEATS:-3}
for v in RATE DURATION REPEATS; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
command -v python3 >/dev/null 2>&1 || {
    echo "error: python3 is required" >&2
    exit 2
}
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

sim_ready --model m

# PostgreSQL of its own.
PG_BIN=$(dirname "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")
PG_AS=()
if [[ $(id -u) == 0 ]]; then
    chown postgres "$TMP"
    PG_AS=(runuser -u postgres --)
fi
read -r PG_PORT < <(free_ports 1)
"${PG_AS[@]}" "$PG_BIN/initdb" -D "$TMP/pg" -U mofa --auth=trust -E UTF8 >"$TMP/initdb.log"
"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$TMP/pg" -l "$TMP/pg.log" -w \
    -o "-p $PG_PORT -k $TMP -c listen_addresses=127.0.0.1" start >/dev/null
pg_stop() { "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$TMP/pg" -m immediate stop >/dev/null 2>&1 || true; }
trap 'pg_stop; cleanup' EXIT
pg_pids() {
    local pm
    pm=$(head -1 "$TMP/pg/postmaster.pid")
    echo "$pm" $(pgrep -P "$pm")
}

BODY='{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}'
declare -A GW_PORT GW_PID
KINDS=(off sqlite postgres)
for kind in "${KINDS[@]}"; do
    {
        echo '[server]'
        echo 'listen = "127.0.0.1:0"'
        if [[ $kind == sqlite ]]; then
            printf '[usage]\nstore = "sqlite"\npath = "%s"\n' "$TMP/usage.db"
        fi
        if [[ $kind == postgres ]]; then
            printf '[usage]\nstore = "postgres"\nurl = "postgres://mofa@127.0.0.1:%s/postgres"\n' "$PG_PORT"
        fi
        printf '[[models]]\nname = "m"\n[[models.deployments]]\nkind = "local"\n'
        printf 'url = "http://127.0.0.1:%s/v1"\nmax_concurrency = 1024\n' "$SIM_PORT"
    } >"$TMP/$kind.toml"
    gw_up() { start "gw-$kind" "$BIN" serve --config "$TMP/$kind.toml" --listen "127.0.0.1:$1"; }
    serve "gw-$kind" gw_up
    GW_PORT[$kind]=$PORT
    GW_PID[$kind]=$LAST_PID
    wait_ready "gw-$kind" "http://127.0.0.1:$PORT/v1/chat/completions" "$LAST_PID" "$BODY"
done

: >"$TMP/results.txt"
for ((round = 1; round <= REPEATS; round++)); do
    for kind in "${KINDS[@]}"; do
        echo "== round $round, $kind" >&2
        pid=${GW_PID[$kind]}
        before=$(stat_sum '$12 + $13' "$pid")
        # shellcheck disable=SC2046
        pg_before=$(stat_sum '$12 + $13' $(pg_pids))
        "$LOADGEN" --url "http://127.0.0.1:${GW_PORT[$kind]}/v1/chat/completions" \
            --rate "$RATE" --duration-s "$DURATION" --warmup-s 2 --body "$BODY" \
            >"$TMP/$kind-$round.json"
        after=$(stat_sum '$12 + $13' "$pid")
        # shellcheck disable=SC2046
        pg_after=$(stat_sum '$12 + $13' $(pg_pids))
        alive "gw-$kind" "$pid"
        echo "$round $kind $((after - before)) $TICK $TMP/$kind-$round.json $((pg_after - pg_before))" >>"$TMP/results.txt"
    done
done
# The ledger's own count, before the gateways stop (it flushes at least every second).
sleep 2
for kind in sqlite postgres; do
    curl --noproxy '*' -s "http://127.0.0.1:${GW_PORT[$kind]}/metrics" | grep '^mofa_gateway_usage' | sed "s/^/$kind: /" >>"$TMP/usage-metrics.txt" || true
done
PG_ROWS=$(psql -h 127.0.0.1 -p "$PG_PORT" -U mofa -d postgres -Atc 'SELECT count(*) FROM usage_records' 2>/dev/null || echo '?')
echo "$PG_ROWS" >"$TMP/pg-rows.txt"

python3 - "$TMP" <<'PY'
import json, sys, statistics
tmp = sys.argv[1]
rows = [l.split() for l in open(f"{tmp}/results.txt")]
kinds = ("off", "sqlite", "postgres")
per = {k: [] for k in kinds}
failed = {k: 0 for k in kinds}
sent = {k: 0 for k in kinds}
pg_cpu = []
for rnd, kind, ticks, tick, path, pg_ticks in rows:
    r = json.load(open(path))
    n = r["launched_all"]
    sent[kind] += n
    failed[kind] += sum(v for k, v in r["outcomes"].items() if k != "200")
    per[kind].append(int(ticks) / int(tick) * 1e6 / n)
    if kind == "postgres":
        pg_cpu.append(int(pg_ticks) / int(tick) * 1e6 / n)
def fmt(v):
    return f"{statistics.median(v):.1f} [{min(v):.1f}..{max(v):.1f}]"
print("CPU-us per request of the gateway process (utime+stime over the requests sent, warm-up included)")
for k in kinds:
    print(f"  {k:8} {fmt(per[k]):24} requests sent {sent[k]:8d} failed {failed[k]}")
for k in ("sqlite", "postgres"):
    ratios = [s / o for s, o in zip(per[k], per["off"])]
    print(f"  {k} / off per round: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
print(f"  the PostgreSQL server's own CPU-us per request (its rounds): {fmt(pg_cpu)}")
print(f"  ledger rows expected: sqlite {sent['sqlite']}, postgres {sent['postgres']} sent, + the readiness probe each")
print(f"  postgres usage_records rows: {open(f'{tmp}/pg-rows.txt').read().strip()}")
PY
cat "$TMP/usage-metrics.txt"

echo
echo "the store alone (an ignored release-mode unit test, thread CPU time):"
(cd "$ROOT" && cargo test --release --quiet --lib usage::sqlite::tests::insert_cost_per_record \
    -- --ignored --nocapture 2>/dev/null | grep 'SQLite insert')
