"""The official OpenAI Python SDK against mofa-gateway, unchanged.

Run by tests/sdk.rs as: python conformance.py BASE_URL CHECK...
Each CHECK is a function below; it raises on any difference from what the SDK user expects.
"""

import sys

import openai
from openai import OpenAI

BASE = sys.argv[1]
client = OpenAI(base_url=BASE, api_key="sk-client-test", max_retries=0, timeout=20)


def models():
    ids = [m.id for m in client.models.list()]
    assert "mofa-sim" in ids, ids
    assert client.models.retrieve("mofa-sim").id == "mofa-sim"


def chat():
    raw = client.chat.completions.with_raw_response.create(
        model="mofa-sim", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert raw.headers["x-mofa-backend"] == "local(mofa-sim)", raw.headers
    assert raw.headers.get("x-request-id")
    r = raw.parse()
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content.split()) == 4, r
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def stream():
    s = client.chat.completions.create(
        model="mofa-sim",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in s:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert len(text.split()) == 6, text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 6


def embeddings():
    # The SDK asks for base64 and decodes it itself.
    r = client.embeddings.create(model="mofa-sim", input=["a", "b"])
    assert len(r.data) == 2
    assert len(r.data[0].embedding) == 16
    assert abs(sum(x * x for x in r.data[0].embedding) - 1.0) < 1e-3
    r = client.embeddings.create(model="mofa-sim", input="a", encoding_format="float")
    assert len(r.data[0].embedding) == 16


def not_found():
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.code == "model_not_found", e.body
        assert e.response.headers["x-mofa-backend"] == "gateway"
        return
    raise AssertionError("no NotFoundError")


def bad_request():
    try:
        client.chat.completions.create(model="mofa-sim", messages=[])
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.param == "messages", e.body
        return
    raise AssertionError("no BadRequestError")


def stream_cut():
    s = client.chat.completions.create(
        model="cut", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    seen = 0
    try:
        for _ in s:
            seen += 1
    except openai.APIError as e:
        assert "closed the stream" in e.message or "broke off" in e.message, e.message
        assert seen >= 1
        return
    raise AssertionError(f"a cut stream ended without an error after {seen} chunks")


def hold_busy(tokens):
    """Occupies the single slot of model `busy` (10 tokens/s) from a thread; returns the thread."""
    import threading
    import time

    def run():
        OpenAI(base_url=BASE, api_key="k", max_retries=0).chat.completions.create(
            model="busy", messages=[{"role": "user", "content": "x"}], max_tokens=tokens
        )

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    return t


def rejected_503():
    # No retries: the rejection surfaces as a 503 status error with the envelope.
    holder = hold_busy(10)
    try:
        client.chat.completions.create(
            model="busy", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    except openai.InternalServerError as e:
        assert e.status_code == 503
        assert e.code == "capacity_exceeded", e.body
        assert e.response.headers["x-mofa-backend"] == "rejected"
        assert 1 <= int(e.response.headers["retry-after"]) <= 60
        holder.join()
        return
    raise AssertionError("no InternalServerError")


def retry_503():
    # The SDK's own retries honour Retry-After and succeed once the slot frees.
    import time

    holder = hold_busy(15)
    retrying = OpenAI(base_url=BASE, api_key="sk-client-test", max_retries=3, timeout=20)
    start = time.monotonic()
    raw = retrying.chat.completions.with_raw_response.create(
        model="busy", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    waited = time.monotonic() - start
    assert raw.http_response.status_code == 200
    assert raw.retries_taken >= 1, raw.retries_taken
    # Each retry waited Retry-After (>= 1 s), not the SDK's 0.5 s default backoff.
    assert waited >= raw.retries_taken * 1.0, (waited, raw.retries_taken)
    holder.join()
    print(f"retries_taken={raw.retries_taken} waited={waited:.2f}s")


for name in sys.argv[2:]:
    globals()[name]()
    print(f"ok {name}")
