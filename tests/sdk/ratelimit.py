"""The official `openai` SDK against a key with a rate limit: without retries it raises
RateLimitError (429, with retry-after-ms); with retries it waits as told and succeeds.
Usage: ratelimit.py BASE_URL API_KEY. Prints `ok retried_429`."""
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
msgs = [{"role": "user", "content": "hi"}]
once = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
for _ in range(200):
    try:
        once.chat.completions.create(model="m", messages=msgs)
    except openai.RateLimitError as e:
        assert e.status_code == 429, e.status_code
        assert e.response.headers.get("retry-after-ms"), dict(e.response.headers)
        assert e.response.headers.get("x-ratelimit-remaining-requests") == "0"
        break
else:
    sys.exit("no 429 within 200 requests")
retrying = openai.OpenAI(base_url=base, api_key=key, max_retries=3)
raw = retrying.chat.completions.with_raw_response.create(model="m", messages=msgs)
reply = raw.parse()
assert reply.choices[0].message.content, reply
taken = getattr(raw, "retries_taken", None)
assert taken is None or taken >= 1, taken
print("ok retried_429")
