"""The official Anthropic Python SDK against mofa-gateway's `POST /v1/messages`, unchanged.

Run by tests/anthropic_sdk.rs as: python anthropic_conformance.py BASE_URL CHECK...
(BASE_URL without /v1: the SDK adds it). Each CHECK is a function below; it raises on any
difference from what the SDK user expects.
"""

import sys
import threading
import time

import anthropic
from anthropic import Anthropic

BASE = sys.argv[1]
client = Anthropic(base_url=BASE, api_key="sk-ant-client-test", max_retries=0, timeout=20)
USER = [{"role": "user", "content": "hello"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather of a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
    {
        "name": "get_time",
        "input_schema": {
            "type": "object",
            "properties": {"tz": {"type": "string"}},
            "required": ["tz"],
        },
    },
]


def create():
    raw = client.messages.with_raw_response.create(model="mofa-sim", max_tokens=4, messages=USER)
    assert raw.headers["x-mofa-backend"] == "local(mofa-sim)", raw.headers
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    m = raw.parse()
    assert m._request_id == raw.headers["request-id"], m._request_id
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text"
    assert len(m.content[0].text.split()) == 4, m
    assert m.stop_reason == "max_tokens", m.stop_reason
    assert m.usage.output_tokens == 4 and m.usage.input_tokens > 0, m.usage


def stream_text():
    with client.messages.stream(model="mofa-sim", max_tokens=6, messages=USER) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert len(text.split()) == 6, text
    assert final.content[0].text == text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6, final.usage


def stream_tools():
    events = []
    with client.messages.stream(
        model="mofa-sim",
        max_tokens=64,
        tools=TOOLS,
        messages=[{"role": "user", "content": "say:Let me check. call:get_weather,get_time"}],
    ) as s:
        for ev in s:
            events.append(ev)
        final = s.get_final_message()
    json_parts = [e for e in events if e.type == "input_json"]
    assert len(json_parts) >= 6, [e.type for e in events]
    stops = [e for e in events if e.type == "content_block_stop"]
    assert len(stops) == 3, [e.type for e in events]
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"], final.content
    assert final.content[0].text == "Let me check."
    assert final.content[1].name == "get_weather" and final.content[1].input == {"city": "Paris"}
    assert final.content[2].name == "get_time" and final.content[2].input == {"tz": "Paris"}
    assert final.stop_reason == "tool_use", final.stop_reason


def tool_round_trip():
    m = client.messages.create(
        model="mofa-sim",
        max_tokens=64,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert m.stop_reason == "tool_use", m
    call = next(b for b in m.content if b.type == "tool_use")
    assert call.input == {"city": "Paris"}
    reply = client.messages.create(
        model="mofa-sim",
        max_tokens=3,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
        ],
    )
    assert reply.content[0].type == "text", reply


def count_tokens():
    r = client.messages.count_tokens(model="mofa-sim", messages=USER, system="abcd")
    assert r.input_tokens == 3, r


def bad_request():
    try:
        client.messages.create(model="mofa-sim", max_tokens=0, messages=USER)
    except anthropic.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
        assert "max_tokens" in e.message
        return
    raise AssertionError("no BadRequestError")


def not_found():
    try:
        client.messages.create(model="nope", max_tokens=5, messages=USER)
    except anthropic.NotFoundError as e:
        assert e.status_code == 404
        assert e.body["error"]["type"] == "not_found_error", e.body
        assert e.request_id == e.response.headers["x-request-id"]
        return
    raise AssertionError("no NotFoundError")


def auth_401():
    # The deployment's key is refused by its backend: a 401 the SDK names.
    try:
        client.messages.create(model="keyed", max_tokens=5, messages=USER)
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401
        assert e.body["error"]["type"] == "authentication_error", e.body
        return
    raise AssertionError("no AuthenticationError")


def rate_limited_429():
    # Model `limited` allows 1 request per minute.
    client.messages.create(model="limited", max_tokens=1, messages=USER)
    try:
        client.messages.create(model="limited", max_tokens=1, messages=USER)
    except anthropic.RateLimitError as e:
        assert e.status_code == 429
        assert e.body["error"]["type"] == "rate_limit_error", e.body
        assert 1 <= int(e.response.headers["retry-after"]) <= 60
        return
    raise AssertionError("no RateLimitError")


def stream_cut():
    seen = 0
    try:
        with client.messages.stream(model="cut", max_tokens=20, messages=USER) as s:
            for _ in s:
                seen += 1
    except anthropic.APIStatusError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "api_error", e.body
        assert "closed the stream" in str(e.body) or "broke off" in str(e.body), e.body
        assert seen >= 1
        return
    raise AssertionError(f"a cut stream ended without an error after {seen} events")


def hold_busy(tokens):
    """Occupies the single slot of model `busy` (10 tokens/s) from a thread; returns the thread."""

    def run():
        Anthropic(base_url=BASE, api_key="k", max_retries=0).messages.create(
            model="busy", max_tokens=tokens, messages=USER
        )

    t = threading.Thread(target=run)
    t.start()
    wait_in_flight("busy")
    return t


def wait_in_flight(model):
    """Polls the gateway's admin view until a request of `model` holds a slot."""
    import json
    import urllib.request

    end = time.monotonic() + 10
    while time.monotonic() < end:
        with urllib.request.urlopen(f"{BASE}/admin/orchestrator", timeout=5) as r:
            view = json.load(r)
        if sum(d["in_flight"] for d in view["models"][model]["deployments"]) >= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"no request of {model} in flight")


def overloaded_529():
    holder = hold_busy(10)
    try:
        client.messages.create(model="busy", max_tokens=1, messages=USER)
    except anthropic.OverloadedError as e:
        assert e.status_code == 529
        assert e.body["error"]["type"] == "overloaded_error", e.body
        assert e.response.headers["x-mofa-backend"] == "rejected"
        assert 1 <= int(e.response.headers["retry-after"]) <= 60
        holder.join()
        return
    raise AssertionError("no OverloadedError")


def retry_529():
    # The SDK's own retries honour Retry-After and succeed once the slot frees.
    holder = hold_busy(15)
    retrying = Anthropic(base_url=BASE, api_key="k", max_retries=3, timeout=20)
    start = time.monotonic()
    raw = retrying.messages.with_raw_response.create(model="busy", max_tokens=1, messages=USER)
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
