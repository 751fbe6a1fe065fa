#!/usr/bin/env python3
"""bench/prefix_load.py: the load and the report of bench/prefix.sh (read its header first).

  prefix_load.py run --url http://127.0.0.1:P --out FILE.json [--mode shared|no-shared] ...
      CONVS concurrent multi-turn conversations through the gateway's chat completions,
      streamed; one JSON file of per-request records (TTFT, backend, prefix match, cut, error).
  prefix_load.py report RUNS.tsv
      the table: one row per (mode, policy), from the records and the llama servers' logs.

Standard library only (asyncio streams, HTTP/1.1, one connection per request), so that any
python3 runs it. It only talks to the URL it is given (127.0.0.1 under bench/prefix.sh).
"""

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import statistics
import sys
import time
from urllib.parse import urlsplit

# Common English words: a document is sentences of these, which Gemma's tokenizer reads as
# about one token per word (with its leading space) plus one per punctuation mark.
WORDS = """
the of and to in is was that for on with as by at from his her they this which or had
are not but be have one all were when there can more an their if time been would about
will what out some them other into only then its could new these two may first any like
now my such over our man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little
state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since
against go came right used take three small large house river city water light stone
garden market road bridge tower field forest valley harbour island winter summer morning
evening letter number paper story reason question answer system method result report
order price value level place point group family school office village engine machine
signal window table chair door wall floor roof kitchen doctor teacher farmer sailor
captain merchant soldier painter writer builder keeper clerk judge council meeting
records ledger harvest grain wool salt iron copper silver timber cloth rope barrel wagon
""".split()


def document(key, n_tokens):
    """A deterministic document of about n_tokens tokens, seeded by key (a string)."""
    rng = random.Random(key)
    sentences, tokens, i = [], 0, 0
    while tokens < n_tokens:
        i += 1
        n = rng.randint(8, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        sentences.append(f"({i}) " + " ".join(words) + ".")
        tokens += (n + 4) * 1.06  # the words, "(", the number, ")", "." (Gemma: ~6% more)
    return " ".join(sentences), i


def question(rng, n_sentences, turn):
    s = rng.randint(1, n_sentences)
    ask = rng.choice(["What does sentence {s} say", "Which people or things appear in sentence {s}",
                      "Rewrite sentence {s} in plain words", "What is the main word of sentence {s}"])
    return f"Question {turn}: {ask.format(s=s)}? Answer in one short sentence."


def first_message(key, doc_tokens):
    doc, n = document(key, doc_tokens)
    # No system message: llama-cpp-python's `gemma` chat format drops it (see bench/prefix.sh).
    # It starts with a digest of the key: two documents share no token after the chat template's
    # first few (else the server's RAM cache may restore a state for a prefix of a few tokens).
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    head = f"{tag}: document {key}. Read it, then answer the questions about it.\n\n{doc}\n\n"
    return head, n


# --- HTTP/1.1 over asyncio streams ------------------------------------------------------------


async def _body_chunks(reader, headers):
    """The response body as it arrives (chunked, content-length or until close)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the empty trailer
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF
            yield data
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise ConnectionError("connection closed inside the body")
            left -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def chat_stream(host, port, body, t_send):
    """POSTs body (dict) to /v1/chat/completions with stream on; returns a record."""
    rec = {"status": None, "backend": None, "prefix_match": None, "ttft_s": None,
           "total_s": None, "finish_reason": None, "done": False, "content": "", "error": None}
    raw = json.dumps(body, separators=(",", ":")).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                      f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n").encode() + raw)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("no response")
        rec["status"] = int(status_line.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        rec["backend"] = headers.get("x-mofa-backend")
        if "x-mofa-prefix-match" in headers:
            rec["prefix_match"] = float(headers["x-mofa-prefix-match"])
        buf, event, parts = b"", None, []
        async for data in _body_chunks(reader, headers):
            if rec["status"] != 200:
                parts.append(data)
                continue
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.rstrip(b"\r").decode("utf-8", "replace")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        rec["done"] = True
                        continue
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        rec["error"] = f"bad SSE data: {payload[:200]}"
                        continue
                    if event == "error" or "error" in chunk:
                        rec["error"] = f"SSE error: {payload[:300]}"
                        continue
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if rec["ttft_s"] is None:
                                rec["ttft_s"] = time.monotonic() - t_send
                            rec["content"] += text
                        if choice.get("finish_reason"):
                            rec["finish_reason"] = choice["finish_reason"]
                elif line == "":
                    event = None
        if rec["status"] != 200:
            rec["error"] = f"HTTP {rec['status']}: {b''.join(parts)[:300].decode('utf-8', 'replace')}"
        elif rec["ttft_s"] is None and rec["finish_reason"] is not None:
            # Nothing to say (an immediate stop): the first token is the finish.
            rec["ttft_s"] = time.monotonic() - t_send
    finally:
        writer.close()
    rec["total_s"] = time.monotonic() - t_send
    return rec


# --- run --------------------------------------------------------------------------------------


async def conversation(args, host, port, i, t0, records):
    rng = random.Random(f"conv-{args.seed}-{i}")
    start = rng.uniform(0, args.think_ms / 1000)
    head, n_sentences = first_message(f"{args.seed}-{i}", args.doc_tokens)
    messages = []
    await asyncio.sleep(start)
    for turn in range(1, args.turns + 1):
        q = question(rng, n_sentences, turn)
        messages.append({"role": "user", "content": head + q if turn == 1 else q})
        sent = messages
        if args.mode == "no-shared":
            # The same shape and size, but a document of its own in every request, so that no
            # request shares a prefix with any other (nor with anything a server cached).
            fresh, _ = first_message(f"{args.seed}-{i}-turn{turn}", args.doc_tokens)
            sent = [{"role": "user", "content": fresh + messages[0]["content"][len(head):]}]
            sent += messages[1:]
        body = {"model": args.model, "messages": sent, "max_tokens": args.max_tokens,
                "temperature": 0, "stream": True}
        t_send = time.monotonic()
        try:
            rec = await asyncio.wait_for(chat_stream(host, port, body, t_send), args.timeout_s)
        except Exception as e:  # noqa: BLE001 - every failure is a recorded error
            rec = {"status": None, "backend": None, "prefix_match": None, "ttft_s": None,
                   "total_s": time.monotonic() - t_send, "finish_reason": None, "done": False,
                   "content": "", "error": f"{type(e).__name__}: {e}"}
        rec.update(conv=i, turn=turn, sent_at_s=t_send - t0)
        records.append(rec)
        print(f"  conv {i:2d} turn {turn}: {rec['backend'] or '-'} ttft "
              f"{rec['ttft_s'] if rec['ttft_s'] is None else round(rec['ttft_s'], 2)} s"
              f"{' match ' + str(rec['prefix_match']) if rec['prefix_match'] is not None else ''}"
              f"{' ERROR ' + rec['error'] if rec['error'] else ''}", file=sys.stderr, flush=True)
        messages.append({"role": "assistant", "content": rec["content"]})
        if turn < args.turns:
            await asyncio.sleep(rng.uniform(0, 2 * args.think_ms / 1000))


async def run(args):
    u = urlsplit(args.url)
    host, port = u.hostname, u.port or 80
    records = []
    t0 = time.monotonic()
    await asyncio.gather(*(conversation(args, host, port, i, t0, records)
                           for i in range(args.convs)))
    wall = time.monotonic() - t0
    with open(args.out, "w") as f:
        json.dump({"wall_s": wall, "mode": args.mode, "convs": args.convs, "turns": args.turns,
                   "records": sorted(records, key=lambda r: (r["conv"], r["turn"]))}, f)
    errors = sum(1 for r in records if r["error"])
    print(f"   {len(records)} requests in {wall:.1f} s, {errors} errors")


# --- report -----------------------------------------------------------------------------------

HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")
PERF = re.compile(r"llama_perf_context_print: prompt eval time = +([\d.]+) ms / +(\d+) tokens")
NO_RM = re.compile(r"Llama\.generate: (\d+) prefix-match found but partial kv removal not supported")


def server_log(path, offset):
    """What a llama-cpp-python server's verbose log says about the completions after offset.

    Per completion it prints llama.cpp's timings (reset at each completion):
    `llama_perf_context_print: prompt eval time = X ms / N tokens`: N is the prompt tokens it
    evaluated (a one-token suffix is counted as a generated token by llama.cpp, not here). When
    it kept part of the prompt: `Llama.generate: K prefix-match hit, remaining M prompt tokens to
    eval` (K reused from the live context, or from a state the RAM cache restored just before,
    `Llama._create_completion: cache hit`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    s = {"evaluated": 0, "eval_s": 0.0, "completions": 0, "reused": 0, "remaining": 0,
         "ram_hits": text.count("Llama._create_completion: cache hit"),
         "full_reeval": len(NO_RM.findall(text))}
    for m in PERF.finditer(text):
        s["eval_s"] += float(m.group(1)) / 1000
        s["evaluated"] += int(m.group(2))
        s["completions"] += 1
    for m in HIT.finditer(text):
        s["reused"] += int(m.group(1))
        s["remaining"] += int(m.group(2))
    return s


def pct(v, p):
    """The p-th percentile of v, nearest rank."""
    v = sorted(v)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)] if v else None


def report(args):
    """RUNS.tsv lines: mode policy records.json label_a log_a offset_a label_b log_b offset_b."""
    rows, notes = [], []
    for line in open(args.runs):
        mode, policy, path, *servers = line.rstrip("\n").split("\t")
        data = json.load(open(path))
        recs = data["records"]
        ok = [r for r in recs if r["error"] is None and r["ttft_s"] is not None]
        ttft = [r["ttft_s"] for r in ok]
        first = {r["conv"]: r["backend"] for r in recs if r["turn"] == 1}
        later = [r for r in recs if r["turn"] > 1 and r["error"] is None]
        same = sum(1 for r in later if r["backend"] is not None and r["backend"] == first.get(r["conv"]))
        match = [r["prefix_match"] for r in later if r["prefix_match"] is not None]
        cut = sum(1 for r in recs if r["status"] == 200 and r["error"] is None and not r["finish_reason"])
        errors = sum(1 for r in recs if r["error"] is not None)
        per = []
        for j in range(0, len(servers), 3):
            label, log, offset = servers[j:j + 3]
            s = server_log(log, int(offset))
            served = sum(1 for r in recs if r["backend"] == label)
            per.append(s)
            if s["completions"] != served:
                notes.append(f"{mode}/{policy}: {label}: the gateway sent {served} requests, the "
                             f"server's log shows {s['completions']} completions")
            if s["full_reeval"]:
                notes.append(f"{mode}/{policy}: {label}: {s['full_reeval']} prompts re-evaluated "
                             "in full (partial KV removal not supported)")
            if abs(s["remaining"] - s["evaluated"]) > s["completions"]:
                # Each completion may differ by one (a one-token suffix counts as generation).
                notes.append(f"{mode}/{policy}: {label}: prompt tokens evaluated "
                             f"{s['evaluated']} (timings) vs {s['remaining']} (prefix-match lines)")
        rows.append((mode, policy, ttft, data["wall_s"], per, same, len(later), match, cut, errors,
                     len(recs)))
    hdr = (f"{'policy':13} {'TTFT p50':>9} {'p99':>7} {'wall s':>7} {'prompt tok eval a':>17} "
           f"{'b':>7} {'total':>7} {'eval s':>7} {'ram hits':>8} {'t2+ same':>9} {'match':>5} {'cut':>4} {'err':>4}")
    modes = list(dict.fromkeys(r[0] for r in rows))
    rows.sort(key=lambda r: modes.index(r[0]))  # stable: the policies in the order run
    last_mode = None
    for mode, policy, ttft, wall, per, same, n_later, match, cut, errors, n in rows:
        if mode != last_mode:
            print(f"\nmode {mode}")
            print(hdr)
            last_mode = mode
        p50, p99 = pct(ttft, 50), pct(ttft, 99)
        toks = [s["evaluated"] for s in per] + [0] * (2 - len(per))
        print(f"{policy:13} {p50 if p50 is None else f'{p50:.2f}':>9} "
              f"{p99 if p99 is None else f'{p99:.2f}':>7} {wall:7.1f} {toks[0]:17,d} {toks[1]:7,d} "
              f"{sum(toks):7,d} {sum(s['eval_s'] for s in per):7.1f} {sum(s['ram_hits'] for s in per):8d} "
              f"{f'{same}/{n_later}':>9} {f'{statistics.mean(match):.2f}' if match else '-':>5} "
              f"{cut:4d} {errors:4d}")
    by = {(r[0], r[1]): r for r in rows}
    for mode in dict.fromkeys(r[0] for r in rows):
        pa = by.get((mode, "prefix-aware"))
        if not pa or not pa[2]:
            continue
        for other in ("round-robin", "least-load", "local-first"):
            o = by.get((mode, other))
            if o and o[2]:
                print(f"{mode}: TTFT p50 {other} / prefix-aware = "
                      f"{pct(o[2], 50) / pct(pa[2], 50):.2f}x")
    for note in notes:
        print(f"note: {note}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--url", required=True, help="the gateway, http://127.0.0.1:PORT")
    r.add_argument("--out", required=True)
    r.add_argument("--model", default="gemma")
    r.add_argument("--mode", choices=["shared", "no-shared"], default="shared")
    r.add_argument("--convs", type=int, default=16)
    r.add_argument("--turns", type=int, default=4)
    r.add_argument("--doc-tokens", type=int, default=1500)
    r.add_argument("--think-ms", type=int, default=1000)
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--timeout-s", type=float, default=900)
    p = sub.add_parser("report")
    p.add_argument("runs")
    args = ap.parse_args()
    if args.cmd == "run":
        asyncio.run(run(args))
    else:
        report(args)


if __name__ == "__main__":
    main()
