#!/usr/bin/env bash
# bench/prefix.sh: the `prefix-aware` routing policy against real model servers. Two
# llama-cpp-python servers (the same Gemma-3-270M GGUF, each with its prompt cache on) are two
# deployments of one model; multi-turn conversations with a long document each run through the
# gateway under `prefix-aware`, `least-load`, `round-robin` and `local-first` (the default), in
# the same run: does sending a conversation back to the server that holds its prefix cut the
# time to first token, and does it cost anything when nothing is shared?
#
# Method:
#   * Build the release binary (bench/lib.sh); make the llama env (scripts/setup-llama-env: the
#     venv's python and the model; minutes the first time, then instant).
#   * For each MODE and each POLICY, from cold: start two servers on free loopback ports,
#       python -m llama_cpp.server --model M --host 127.0.0.1 --port P --n_ctx N_CTX
#         --cache CACHE --cache_type ram --cache_size CACHE_SIZE --logits_all false
#         --n_batch N_BATCH --n_threads THREADS --n_threads_batch THREADS
#         --chat_format gemma --interrupt_requests false --verbose true
#     (`--chat_format gemma`: llama-cpp-python 0.3.36 finds no chat template in this GGUF and
#     falls back to `llama-2`, as tests/real_model.rs knows;
#     `--interrupt_requests false`: by default a streaming reply is cut, ending with [DONE]
#     but no finish_reason, as soon as another request waits for the model: with several
#     conversations per server every stream would be cut); one tiny request to each directly
#     (warm-up, not measured); then a gateway with one model `gemma` whose deployments are the
#     two servers' URLs (`kind = "local"`, `variant = "a"` / `"b"`, so that `x-mofa-backend`
#     says which: `local(gemma@a)`), `[routing] policy = POLICY`. After the run, the gateway and
#     both servers are stopped: every policy starts with empty caches.
#   * The load (bench/prefix_load.py, stdlib asyncio, HTTP/1.1): CONVS concurrent conversations
#     of TURNS turns, each starting after a seeded random delay in [0, THINK_MS) and pausing a
#     seeded random [0, 2*THINK_MS) between turns (mean THINK_MS). Conversation i's document
#     (~DOC_TOKENS tokens of seeded sentences, distinct per conversation) opens its first user
#     message, followed by a question; each later turn resends the whole history (the replies as
#     received) plus a new question. The document is in the first *user* message, not a system
#     message: llama-cpp-python's `gemma` chat format drops system messages. max_tokens MAX_TOKENS, temperature 0, stream on. The same seed gives
#     every policy the same conversations and the same pauses.
#     Mode `shared` is that; mode `no-shared` sends requests of the same shape and size, but each
#     with a document of its own (fresh content from the first bytes): nothing to reuse.
#   * Measured by the driver: TTFT (from sending the request to its first content chunk), the
#     wall time of the whole load, per request `x-mofa-backend` and `x-mofa-prefix-match`, cut
#     streams (200 but no finish_reason: an interrupted one), errors.
#   * The ground truth of cache hits is the servers' own verbose log (stderr). Every completion
#     prints llama.cpp's timings, reset per completion: `llama_perf_context_print: prompt eval
#     time = X ms / N tokens`: the prompt tokens evaluated per server are the sum of N after the
#     warm-up (and the prompt-eval seconds the sum of X). Beside it, `Llama.generate: K
#     prefix-match hit, remaining M prompt tokens to eval` says what was kept: K tokens from the
#     live context, or from a state the RAM cache restored just before (`Llama._create_completion:
#     cache hit`, counted). A server whose completions do not match the requests the gateway sent
#     it, or whose two counts disagree, gets a note below the table.
#   * Reported, a table per mode: policy, TTFT p50 and p99 (s, nearest rank), wall (s), prompt
#     tokens evaluated per server and in total, the servers' prompt-eval seconds, RAM-cache
#     hits, turns 2..TURNS that ran on the same backend as the conversation's turn 1, the mean
#     `x-mofa-prefix-match` of those turns (prefix-aware only), cut streams, errors; then TTFT
#     p50 of the others over prefix-aware.
#     Target (the issue): shared, p50 at least 2x lower than round-robin and least-load;
#     no-shared, no worse than least-load.
#
# Traffic goes to 127.0.0.1 only. Every process started here is stopped on exit, by PID.
# Usage: bench/prefix.sh
#   env: CONVS (16) TURNS (4) DOC_TOKENS (1500) THINK_MS (1000) MAX_TOKENS (32) SEED (1)
#        POLICIES ("prefix-aware least-load round-robin local-first") MODES ("shared no-shared")
#        CACHE (true: the servers' RAM prompt cache) CACHE_SIZE (450000000 bytes, per server)
#        N_CTX (4096) N_BATCH (128) THREADS (1, per server) MAX_CONCURRENCY (64, per deployment)
#        RESULTS=1 (also write bench/results/prefix-<short sha>.txt) VERBOSE=1 (each request's
#        line as it ends) KEEP_TMP=1 (keep the logs) SKIP_BUILD=1 CARGO_TARGET_DIR
#   A full run (16 x 4, four policies, two modes) takes about 35 minutes on 2 quiet cores: a
#   shared run 1.5-3 min per policy, a no-shared one ~6 (every prompt evaluated in full, ~170
#   tokens/s per server). MODES=no-shared POLICIES="prefix-aware least-load" is the no-shared
#   target alone.

set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONVS=${CONVS:-16}
TURNS=${TURNS:-4}
DOC_TOKENS=${DOC_TOKENS:-1500}
THINK_MS=${THINK_MS:-1000}
MAX_TOKENS=${MAX_TOKENS:-32}
SEED=${SEED:-1}
POLICIES=${POLICIES:-prefix-aware least-load round-robin local-first}
MODES=${MODES:-shared no-shared}
CACHE=${CACHE:-true}
CACHE_SIZE=${CACHE_SIZE:-450000000}
N_CTX=${N_CTX:-4096}
N_BATCH=${N_BATCH:-128}
THREADS=${THREADS:-1}
MAX_CONCURRENCY=${MAX_CONCURRENCY:-64}
for v in CONVS TURNS DOC_TOKENS THINK_MS MAX_TOKENS SEED CACHE_SIZE N_CTX N_BATCH THREADS MAX_CONCURRENCY; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
[[ $CACHE == true || $CACHE == false ]] || {
    echo "error: CACHE must be true or false (got '$CACHE')" >&2
    exit 2
}
for p in $POLICIES; do
    case $p in
    prefix-aware | least-load | round-robin | local-first | session | latency) ;;
    *)
        echo "error: POLICIES: '$p' is not a policy this benchmark runs" >&2
        exit 2
        ;;
    esac
done
for m in $MODES; do
    [[ $m == shared || $m == no-shared ]] || {
        echo "error: MODES: '$m' is neither shared nor no-shared" >&2
        exit 2
    }
done
# The longest prompt: the document, then per turn a question (~25 tokens), a reply and the
# chat template's markers (~10); the server refuses a prompt that does not fit.
NEED=$((DOC_TOKENS * 11 / 10 + TURNS * (MAX_TOKENS + 40) + MAX_TOKENS))
if ((NEED > N_CTX)); then
    echo "error: N_CTX $N_CTX is too small for DOC_TOKENS $DOC_TOKENS and $TURNS turns (about $NEED tokens)" >&2
    exit 2
fi
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "error: $tool is required" >&2
        exit 2
    }
done
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

echo "== the llama env (scripts/setup-llama-env; the first time it compiles llama.cpp)" >&2
ENV_OUT=$(bash "$ROOT/scripts/setup-llama-env")
PY=$(sed -n 1p <<<"$ENV_OUT")
MODEL=$(sed -n 2p <<<"$ENV_OUT")
[[ -x $PY && -f $MODEL ]] || {
    echo "error: scripts/setup-llama-env gave no python or model: $ENV_OUT" >&2
    exit 1
}
export HF_HUB_OFFLINE=1 # the model is a local file: nothing to fetch

# stop PID...: stops these processes (SIGTERM, up to 10 s, then SIGKILL) and forgets them.
stop() {
    local pid keep=()
    terminate 100 "$@"
    for pid in "${PIDS[@]}"; do
        [[ " $* " == *" $pid "* ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

LLAMA_NAME=
llama_up() {
    start "$LLAMA_NAME" "$PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$1" \
        --n_ctx "$N_CTX" --cache "$CACHE" --cache_type ram --cache_size "$CACHE_SIZE" \
        --logits_all false --n_batch "$N_BATCH" --n_threads "$THREADS" \
        --n_threads_batch "$THREADS" --chat_format gemma --interrupt_requests false --verbose true
}
GW_NAME=
gw_up() { start "$GW_NAME" "$BIN" serve --config "$TMP/$GW_NAME.toml" --listen "127.0.0.1:$1"; }

WARM='{"model":"gemma","messages":[{"role":"user","content":"Hello"}],"max_tokens":1,"temperature":0}'
: >"$TMP/runs.tsv"
for mode in $MODES; do
    for policy in $POLICIES; do
        run="$mode-$policy"
        echo "== $run: two llama servers, a gateway, $CONVS conversations x $TURNS turns" >&2
        declare -A LPORT=() LPID=() LOFF=()
        for s in a b; do
            LLAMA_NAME="llama-$s-$run"
            serve "$LLAMA_NAME" llama_up
            LPORT[$s]=$PORT
            LPID[$s]=$LAST_PID
        done
        for s in a b; do
            READY_S=300 wait_ready "llama-$s-$run" "http://127.0.0.1:${LPORT[$s]}/v1/models" "${LPID[$s]}" -
            curl --noproxy '*' -sf --max-time 300 -H 'content-type: application/json' -d "$WARM" \
                "http://127.0.0.1:${LPORT[$s]}/v1/chat/completions" >/dev/null || {
                echo "error: the warm-up request to llama-$s-$run failed; its log:" >&2
                cat "$TMP/llama-$s-$run.log" >&2
                exit 1
            }
            LOFF[$s]=$(stat -c %s "$TMP/llama-$s-$run.log")
        done
        GW_NAME="gw-$run"
        {
            printf '[server]\nlisten = "127.0.0.1:0"\n\n[routing]\npolicy = "%s"\n\n' "$policy"
            printf '[[models]]\nname = "gemma"\n'
            for s in a b; do
                printf '\n[[models.deployments]]\nkind = "local"\nvariant = "%s"\n' "$s"
                printf 'url = "http://127.0.0.1:%s/v1"\nmax_concurrency = %s\n' "${LPORT[$s]}" "$MAX_CONCURRENCY"
                # A server works through its queue one request at a time: a long wait is normal.
                printf 'first_byte_timeout_ms = 1800000\nidle_timeout_ms = 1800000\n'
            done
        } >"$TMP/$GW_NAME.toml"
        serve "$GW_NAME" gw_up
        GW_PORT=$PORT
        GW_PID=$LAST_PID
        wait_ready "$GW_NAME" "http://127.0.0.1:$GW_PORT/v1/models" "$GW_PID" -

        out="$TMP/$run.json"
        load() {
            python3 "$ROOT/bench/prefix_load.py" run --url "http://127.0.0.1:$GW_PORT" --out "$out" \
                --mode "$mode" --convs "$CONVS" --turns "$TURNS" --doc-tokens "$DOC_TOKENS" \
                --think-ms "$THINK_MS" --max-tokens "$MAX_TOKENS" --seed "$SEED"
        }
        # stdout: the run's one-line summary; stderr: a line per request (shown with VERBOSE=1).
        if [[ ${VERBOSE:-0} == 1 ]]; then
            load >&2 2> >(tee "$TMP/$run.progress" >&2)
        else
            load >&2 2>"$TMP/$run.progress"
        fi || {
            echo "error: the load of $run failed:" >&2
            cat "$TMP/$run.progress" >&2
            exit 1
        }
        for s in a b; do alive "llama-$s-$run" "${LPID[$s]}"; done
        alive "$GW_NAME" "$GW_PID"
        stop "$GW_PID" "${LPID[a]}" "${LPID[b]}"
        printf '%s\t%s\t%s' "$mode" "$policy" "$out" >>"$TMP/runs.tsv"
        for s in a b; do
            printf '\tlocal(gemma@%s)\t%s\t%s' "$s" "$TMP/llama-$s-$run.log" "${LOFF[$s]}" >>"$TMP/runs.tsv"
        done
        echo >>"$TMP/runs.tsv"
    done
done

SHA=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    echo "mofa-gateway prefix-aware routing benchmark, commit $SHA: two llama-cpp-python servers"
    echo "(Gemma-3-270M Q4_K_M, $THREADS thread(s) each, n_ctx $N_CTX, n_batch $N_BATCH, RAM cache $CACHE"
    echo "$CACHE_SIZE B) on $(nproc) CPUs; $CONVS conversations x $TURNS turns, document ~$DOC_TOKENS tokens,"
    echo "think ${THINK_MS} ms mean, max_tokens $MAX_TOKENS, seed $SEED. TTFT in s; prompt tokens evaluated from"
    echo "the servers' logs; 't2+ same': turns 2..$TURNS on turn 1's backend; 'match': mean x-mofa-prefix-match."
    python3 "$ROOT/bench/prefix_load.py" report "$TMP/runs.tsv"
} >"$TMP/report.txt"
cat "$TMP/report.txt"
if [[ ${RESULTS:-0} == 1 ]]; then
    mkdir -p "$ROOT/bench/results"
    cp "$TMP/report.txt" "$ROOT/bench/results/prefix-$SHA.txt"
    echo "written: bench/results/prefix-$SHA.txt" >&2
fi
