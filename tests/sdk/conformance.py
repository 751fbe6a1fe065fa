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


for name in sys.argv[2:]:
    globals()[name]()
    print(f"ok {name}")
