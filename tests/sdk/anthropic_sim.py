"""The official Anthropic Python SDK against the simulator's own Messages mode
(`mofa-gateway sim --api anthropic`), no gateway between: the SDK is the oracle of the protocol.

Run by tests/anthropic_sdk.rs as: python anthropic_sim.py BASE_URL CHECK...
(BASE_URL without /v1: the SDK adds it). The simulator requires the key `sk-ant-sim-test` in
`x-api-key` or as a bearer token (as this SDK sends it). Each CHECK is a function below; it
raises on any difference from what the SDK user expects.
"""

import sys

import anthropic
from anthropic import Anthropic

BASE = sys.argv[1]
KEY = "sk-ant-sim-test"
client = Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=20)
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
TOOL_PROMPT = [{"role": "user", "content": "say:Let me check. call:get_weather,get_time"}]


def check_usage(usage, output_tokens):
    assert usage.input_tokens == 1, usage
    assert usage.output_tokens == output_tokens, usage
    assert usage.cache_creation_input_tokens == 0, usage
    assert usage.cache_read_input_tokens == 0, usage


def create_text():
    m = client.messages.create(model="mofa-sim", max_tokens=1024, messages=USER)
    assert m.id.startswith("msg_"), m.id
    assert m.type == "message" and m.role == "assistant" and m.model == "mofa-sim", m
    assert [b.type for b in m.content] == ["text"], m.content
    assert len(m.content[0].text.split(" ")) == 16, m.content
    assert m.stop_reason == "end_turn" and m.stop_sequence is None, m
    check_usage(m.usage, 16)
    again = client.messages.create(model="mofa-sim", max_tokens=1024, messages=USER)
    assert again.content == m.content, "not deterministic"


def create_max_tokens():
    m = client.messages.create(model="mofa-sim", max_tokens=4, messages=USER)
    assert len(m.content[0].text.split(" ")) == 4, m.content
    assert m.stop_reason == "max_tokens", m.stop_reason
    check_usage(m.usage, 4)


def create_stop_sequence():
    full = client.messages.create(model="mofa-sim", max_tokens=64, messages=USER).content[0].text
    stop = " " + full.split(" ")[5]
    m = client.messages.create(model="mofa-sim", max_tokens=64, messages=USER, stop_sequences=[stop])
    assert m.content[0].text == full[: full.index(stop)], (m.content, full, stop)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop, m


def stream_text():
    whole = client.messages.create(model="mofa-sim", max_tokens=1024, messages=USER)
    with client.messages.stream(model="mofa-sim", max_tokens=1024, messages=USER) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text, (text, whole.content)
    # (The stream's blocks are ParsedTextBlocks, the whole message's TextBlocks.)
    assert [(b.type, b.text) for b in final.content] == [("text", whole.content[0].text)], final.content
    assert final.stop_reason == "end_turn" and final.stop_sequence is None, final
    check_usage(final.usage, 16)
    with client.messages.stream(model="mofa-sim", max_tokens=3, messages=USER) as s:
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens", final.stop_reason
    check_usage(final.usage, 3)


def check_tool_message(m):
    assert [b.type for b in m.content] == ["text", "tool_use", "tool_use"], m.content
    assert m.content[0].text == "Let me check."
    weather, time = m.content[1], m.content[2]
    assert weather.id.startswith("toolu_") and time.id.startswith("toolu_"), m.content
    assert weather.id != time.id
    assert weather.name == "get_weather" and weather.input == {"city": "Paris"}, weather
    assert time.name == "get_time" and time.input == {"tz": "Paris"}, time
    assert m.stop_reason == "tool_use", m.stop_reason


def create_tools():
    m = client.messages.create(model="mofa-sim", max_tokens=64, tools=TOOLS, messages=TOOL_PROMPT)
    check_tool_message(m)


def stream_tools():
    events = []
    with client.messages.stream(model="mofa-sim", max_tokens=64, tools=TOOLS, messages=TOOL_PROMPT) as s:
        for ev in s:
            events.append(ev)
        final = s.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start", kinds
    assert kinds[-1] == "message_stop", kinds
    assert kinds.count("content_block_start") == 3 and kinds.count("content_block_stop") == 3, kinds
    assert kinds.count("input_json") >= 6, kinds
    check_tool_message(final)
    assert final.usage.output_tokens > 3, final.usage


def tool_round_trip():
    m = client.messages.create(
        model="mofa-sim",
        max_tokens=64,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert m.stop_reason == "tool_use", m
    call = m.content[0]
    assert call.type == "tool_use" and call.input == {"city": "Paris"}, m.content
    reply = client.messages.create(
        model="mofa-sim",
        max_tokens=64,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
        ],
    )
    assert [b.type for b in reply.content] == ["text"], reply
    assert reply.stop_reason == "end_turn", reply


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
        return
    raise AssertionError("no NotFoundError")


def auth_401():
    wrong = Anthropic(base_url=BASE, api_key="sk-ant-wrong", max_retries=0, timeout=20)
    try:
        wrong.messages.create(model="mofa-sim", max_tokens=5, messages=USER)
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401
        assert e.body["error"]["type"] == "authentication_error", e.body
        return
    raise AssertionError("no AuthenticationError")


def overloaded_529():
    # The simulator runs with --fail-rate 1: every request is a 529.
    for stream in (False, True):
        try:
            if stream:
                with client.messages.stream(model="mofa-sim", max_tokens=5, messages=USER) as s:
                    s.get_final_message()
            else:
                client.messages.create(model="mofa-sim", max_tokens=5, messages=USER)
        except anthropic.APIStatusError as e:
            assert e.status_code == 529, e.status_code
            assert isinstance(e, (anthropic.InternalServerError, getattr(anthropic, "OverloadedError", ()))), type(e)
            assert e.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, e.body
            continue
        raise AssertionError(f"no 529 (stream={stream})")


def stream_cut():
    # The simulator runs with --die-after-tokens 3: the stream ends with an `error` event.
    seen = []
    try:
        with client.messages.stream(model="mofa-sim", max_tokens=20, messages=USER) as s:
            for ev in s:
                seen.append(ev.type)
    except anthropic.APIStatusError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "overloaded_error", e.body
        assert seen.count("text") == 3, seen
        assert "message_stop" not in seen and "content_block_stop" not in seen, seen
        return
    raise AssertionError(f"a cut stream ended without an error after {seen}")


for name in sys.argv[2:]:
    globals()[name]()
    print(f"ok {name}")
