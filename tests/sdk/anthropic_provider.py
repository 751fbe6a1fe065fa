"""The official OpenAI Python SDK against mofa-gateway whose model `claude` is served by
Anthropic's Messages API (the simulator in its Messages mode, `api = "anthropic"`), unchanged.

The oracle is the model `oracle`: the same simulator in its OpenAI mode (it is deterministic), so
whatever `claude` says, translated both ways by the gateway, must be what `oracle` says.
Run by tests/sdk.rs as: python anthropic_provider.py BASE_URL CHECK...
Each CHECK is a function below; it raises on any difference from what the SDK user expects.
"""

import json
import sys

import openai
from openai import OpenAI

BASE = sys.argv[1]
client = OpenAI(base_url=BASE, api_key="sk-client-test", max_retries=0, timeout=20)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]


def create(model, **kw):
    return client.chat.completions.with_raw_response.create(model=model, **kw)


def accumulate(stream):
    """Content, finish_reason, usage and tool calls, as an SDK user accumulates a stream."""
    text, finish, usage, calls, first = "", None, None, {}, True
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if first:
                assert c.delta.role == "assistant", chunk
                first = False
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert call["id"] is None, "a second id for one call"
                    call["id"] = tc.id
                    assert tc.type == "function"
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    assert call["id"] is not None, "arguments before the call's id"
                    call["arguments"] += tc.function.arguments
    return text, finish, usage, [calls[i] for i in sorted(calls)]


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]


def chat():
    raw = create("claude", messages=MESSAGES)
    assert raw.headers["x-mofa-backend"] == "cloud(anthropic)", raw.headers
    assert raw.headers.get("x-request-id")
    r = raw.parse()
    want = create("oracle", messages=MESSAGES).parse()
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.choices[0].message.content, (r, want)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == want.usage.prompt_tokens, r.usage
    assert r.usage.completion_tokens == want.usage.completion_tokens == 16, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # A small max_tokens: cut, `length`.
    r = create("claude", messages=MESSAGES, max_tokens=4).parse()
    want = create("oracle", messages=MESSAGES, max_tokens=4).parse()
    assert r.choices[0].message.content == want.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def stream():
    whole = create("claude", messages=MESSAGES, max_tokens=6).parse()
    s = client.chat.completions.create(
        model="claude",
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, calls = accumulate(s)
    assert text == whole.choices[0].message.content, (text, whole)
    assert finish == "length"
    assert calls == []
    assert usage is not None
    assert usage.completion_tokens == 6 and usage.prompt_tokens == whole.usage.prompt_tokens
    # Without include_usage: no usage chunk.
    s = client.chat.completions.create(model="claude", messages=MESSAGES, stream=True)
    text, finish, usage, _ = accumulate(s)
    assert usage is None
    assert finish == "stop"
    assert len(text.split()) == 16, text


def check_calls(calls, names):
    assert [c["name"] for c in calls] == names, calls
    assert len({c["id"] for c in calls}) == len(calls), calls
    for c in calls:
        assert c["id"].startswith("toolu_"), c
        args = json.loads(c["arguments"])
        if c["name"] == "get_weather":
            assert args == {"city": "Paris", "unit": "celsius"}, args
        else:
            assert args == {"zone": "Paris"}, args


def tools():
    msgs = [{"role": "user", "content": "say:Let me look. call:get_weather,get_time"}]
    raw = create("claude", messages=msgs, tools=TOOLS)
    r = raw.parse()
    want = create("oracle", messages=msgs, tools=TOOLS).parse()
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", r
    assert m.content == "Let me look.", m
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in m.tool_calls
    ]
    assert all(c.type == "function" for c in m.tool_calls)
    check_calls(calls, ["get_weather", "get_time"])
    assert [json.loads(c.function.arguments) for c in m.tool_calls] == [
        json.loads(c.function.arguments) for c in want.choices[0].message.tool_calls
    ]
    # The round trip: the results of both calls go back; the model answers in text.
    msgs.append(m.model_dump(exclude_none=True))
    for c in m.tool_calls:
        msgs.append({"role": "tool", "tool_call_id": c.id, "content": f"result of {c.function.name}"})
    r = create("claude", messages=msgs, tools=TOOLS).parse()
    assert r.choices[0].finish_reason == "stop", r
    assert r.choices[0].message.content, r
    assert not r.choices[0].message.tool_calls


def stream_tools():
    msgs = [{"role": "user", "content": "call:get_weather,get_time"}]
    s = client.chat.completions.create(
        model="claude",
        messages=msgs,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, calls = accumulate(s)
    assert finish == "tool_calls"
    assert text == ""
    check_calls(calls, ["get_weather", "get_time"])
    whole = create("claude", messages=msgs, tools=TOOLS).parse()
    assert usage.completion_tokens == whole.usage.completion_tokens, (usage, whole.usage)
    # One named tool.
    s = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "what time is it"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
    )
    _, finish, _, calls = accumulate(s)
    assert finish == "tool_calls"
    check_calls(calls, ["get_time"])


def refused():
    for kw, param in [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            "response_format",
        ),
    ]:
        try:
            client.chat.completions.create(model="claude", messages=MESSAGES, **kw)
        except openai.BadRequestError as e:
            assert e.status_code == 400
            assert e.param == param, e.body
            continue
        raise AssertionError(f"{kw} was not refused")


for name in sys.argv[2:]:
    globals()[name]()
    print(f"ok {name}")
