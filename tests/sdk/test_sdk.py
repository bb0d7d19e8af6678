#!/usr/bin/env python3
"""Client compatibility: the official `anthropic` Python SDK against a running amq2api.

Environment: AMQ2API_BASE_URL (http://127.0.0.1:PORT of a daemon whose upstream is the Amazon Q
emulator) and AMQ2API_KEY (one of its client API keys). tests/it/sdk.rs starts such a daemon (three
accounts) and runs this file with PYTHONPATH pointing at one SDK version (target/pysdk/v1 or v2).

Plain `unittest`; exits non-zero on any failure. The SDK generation matters: 2.x sends
`anthropic-version: 2026-10-21` and `Authorization: Bearer`, 1.x `2023-06-01` and `x-api-key`.
"""

import asyncio
import base64
import json
import os
import sys
import time
import unittest
import urllib.request

import anthropic

BASE_URL = os.environ["AMQ2API_BASE_URL"].rstrip("/")
API_KEY = os.environ["AMQ2API_KEY"]
SDK_VERSION = anthropic.__version__
SDK_MAJOR = int(SDK_VERSION.split(".")[0])

MODEL = "claude-sonnet-4-5-20250929"
GREETING = "Hello from the Amazon Q emulator. "

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
WEATHER_ASK = (
    "What is the weather in Paris?\n"
    '#emulator: tool get_weather {"city": "Paris", "unit": "celsius"}'
)
WEATHER_INPUT = {"city": "Paris", "unit": "celsius"}

def make_client(api_key=API_KEY, max_retries=0):
    return anthropic.Anthropic(base_url=BASE_URL, api_key=api_key, max_retries=max_retries, timeout=30.0)


def health():
    with urllib.request.urlopen(BASE_URL + "/health", timeout=5) as r:
        return json.load(r)


def wait_all_accounts_active(timeout=20.0):
    """Waits until no account is cooling (after a throttle), so every test starts from a healthy pool."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = health()
            if last["status"] == "ok":
                return
        except Exception as e:  # 503 while every account cools
            last = repr(e)
        time.sleep(0.1)
    raise AssertionError(f"the daemon's accounts did not all become active again: {last}")


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def user(text):
    return [{"role": "user", "content": text}]


class Base(unittest.TestCase):
    def setUp(self):
        wait_all_accounts_active()
        self.client = make_client()

    def tearDown(self):
        self.client.close()


class Dialect(Base):
    def test_sdk_speaks_its_generation(self):
        raw = self.client.models.with_raw_response.retrieve(MODEL)
        self.assertEqual(raw.status_code, 200)
        sent = raw.http_request.headers
        if SDK_MAJOR >= 2:
            self.assertEqual(sent["anthropic-version"], "2026-10-21")
            self.assertEqual(sent["authorization"], f"Bearer {API_KEY}")
            self.assertNotIn("x-api-key", sent)
        else:
            self.assertEqual(sent["anthropic-version"], "2023-06-01")
            self.assertEqual(sent["x-api-key"], API_KEY)
            self.assertNotIn("authorization", sent)
        self.assertTrue(raw.headers["request-id"].startswith("req_"), raw.headers)


class Messages(Base):
    def test_create_text(self):
        m = self.client.messages.create(model=MODEL, max_tokens=1024, messages=user("hi there"))
        self.assertEqual(m.type, "message")
        self.assertEqual(m.role, "assistant")
        self.assertEqual(m.model, MODEL)
        self.assertTrue(m.id.startswith("msg_"), m.id)
        self.assertEqual(m.stop_reason, "end_turn")
        self.assertIsNone(m.stop_sequence)
        self.assertEqual(m.content[0].type, "text")
        self.assertEqual(text_of(m), GREETING + "You said: hi there")
        self.assertGreater(m.usage.input_tokens, 0)
        self.assertGreater(m.usage.output_tokens, 0)

    def test_create_with_system_and_history(self):
        m = self.client.messages.create(
            model=MODEL,
            max_tokens=1024,
            system=[{"type": "text", "text": "You are terse."}],
            messages=[
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "second"}]},
            ],
        )
        self.assertEqual(m.stop_reason, "end_turn")
        self.assertIn("You said: second", text_of(m))

    def test_stream_helper_text(self):
        with self.client.messages.stream(model=MODEL, max_tokens=1024, messages=user("stream me")) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(streamed, GREETING + "You said: stream me")
        self.assertEqual(streamed, text_of(final))
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertGreater(final.usage.input_tokens, 0)
        self.assertGreater(final.usage.output_tokens, 0)

    def test_create_stream_raw_events(self):
        events = list(
            self.client.messages.create(model=MODEL, max_tokens=1024, messages=user("raw events"), stream=True)
        )
        types = [e.type for e in events]
        self.assertEqual(types[0], "message_start", types)
        self.assertEqual(types[-1], "message_stop", types)
        self.assertIn("content_block_start", types)
        self.assertIn("content_block_stop", types)
        self.assertIn("message_delta", types)
        text = "".join(
            e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
        )
        self.assertEqual(text, GREETING + "You said: raw events")
        delta = next(e for e in events if e.type == "message_delta")
        self.assertEqual(delta.delta.stop_reason, "end_turn")
        self.assertGreater(events[0].message.usage.input_tokens, 0)

    def test_options_and_image(self):
        # A 1x1 PNG.
        png = base64.b64encode(
            bytes.fromhex(
                "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
            )
        ).decode()
        m = self.client.messages.create(
            model=MODEL,
            max_tokens=256,
            system="You are terse.",
            metadata={"user_id": "sdk-test-user"},
            tools=[WEATHER_TOOL],
            tool_choice={"type": "auto"},
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                        {"type": "text", "text": "describe"},
                    ],
                }
            ],
        )
        self.assertEqual(m.stop_reason, "end_turn")
        self.assertIn("describe", text_of(m))

    def test_async_client(self):
        async def go():
            client = anthropic.AsyncAnthropic(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=30.0)
            try:
                m = await client.messages.create(model=MODEL, max_tokens=1024, messages=user("async one"))
                async with client.messages.stream(
                    model=MODEL, max_tokens=1024, messages=user("async two")
                ) as stream:
                    streamed = "".join([t async for t in stream.text_stream])
                    final = await stream.get_final_message()
                return m, streamed, final
            finally:
                await client.close()

        m, streamed, final = asyncio.run(go())
        self.assertEqual(text_of(m), GREETING + "You said: async one")
        self.assertEqual(streamed, GREETING + "You said: async two")
        self.assertEqual(text_of(final), streamed)

    def test_max_tokens(self):
        m = self.client.messages.create(model=MODEL, max_tokens=3, messages=user("cut me short"))
        self.assertEqual(m.stop_reason, "max_tokens")
        self.assertEqual(m.usage.output_tokens, 3)

    def test_stop_sequence(self):
        m = self.client.messages.create(
            model=MODEL, max_tokens=1024, stop_sequences=["You said"], messages=user("stop here")
        )
        self.assertEqual(m.stop_reason, "stop_sequence")
        self.assertEqual(m.stop_sequence, "You said")
        self.assertEqual(text_of(m), GREETING)

    def test_stop_sequence_streaming(self):
        with self.client.messages.stream(
            model=MODEL, max_tokens=1024, stop_sequences=["You said"], messages=user("stop here")
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(streamed, GREETING)
        self.assertEqual(final.stop_reason, "stop_sequence")
        self.assertEqual(final.stop_sequence, "You said")


class Tools(Base):
    def check_tool_use(self, m):
        self.assertEqual(m.stop_reason, "tool_use")
        calls = [b for b in m.content if b.type == "tool_use"]
        self.assertEqual(len(calls), 1, m.content)
        call = calls[0]
        self.assertEqual(call.name, "get_weather")
        self.assertTrue(call.id.startswith("toolu_"), call.id)
        self.assertEqual(call.input, WEATHER_INPUT)
        return call

    def test_tool_use(self):
        m = self.client.messages.create(
            model=MODEL, max_tokens=1024, tools=[WEATHER_TOOL], messages=user(WEATHER_ASK)
        )
        self.check_tool_use(m)

    def test_tool_use_streaming(self):
        with self.client.messages.stream(
            model=MODEL, max_tokens=1024, tools=[WEATHER_TOOL], messages=user(WEATHER_ASK)
        ) as stream:
            partial = "".join(
                e.delta.partial_json
                for e in stream
                if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
            )
            final = stream.get_final_message()
        self.assertEqual(json.loads(partial), WEATHER_INPUT)
        self.check_tool_use(final)

    def test_text_then_tool_use_streaming(self):
        ask = WEATHER_ASK + "\n#emulator: text Let me look that up."
        with self.client.messages.stream(
            model=MODEL, max_tokens=1024, tools=[WEATHER_TOOL], messages=user(ask)
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual([b.type for b in final.content], ["text", "tool_use"])
        self.assertEqual(streamed, "Let me look that up.")
        self.assertEqual(text_of(final), streamed)
        self.check_tool_use(final)

    def test_tool_choice_forced(self):
        m = self.client.messages.create(
            model=MODEL,
            max_tokens=1024,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=user(WEATHER_ASK),
        )
        self.check_tool_use(m)

    def test_tool_result_round_trip(self):
        m = self.client.messages.create(
            model=MODEL, max_tokens=1024, tools=[WEATHER_TOOL], messages=user(WEATHER_ASK)
        )
        call = self.check_tool_use(m)
        follow = self.client.messages.with_raw_response.create(
            model=MODEL,
            max_tokens=1024,
            tools=[WEATHER_TOOL],
            messages=[
                {"role": "user", "content": WEATHER_ASK},
                {"role": "assistant", "content": m.content},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}],
                },
            ],
        )
        self.assertEqual(follow.status_code, 200)
        answer = follow.parse()
        self.assertEqual(answer.stop_reason, "end_turn")
        self.assertIn("I received the tool result: Sunny, 21 C", text_of(answer))

    def test_tool_result_round_trip_streaming(self):
        with self.client.messages.stream(
            model=MODEL, max_tokens=1024, tools=[WEATHER_TOOL], messages=user(WEATHER_ASK)
        ) as stream:
            m = stream.get_final_message()
        call = self.check_tool_use(m)
        with self.client.messages.stream(
            model=MODEL,
            max_tokens=1024,
            tools=[WEATHER_TOOL],
            messages=[
                {"role": "user", "content": WEATHER_ASK},
                {"role": "assistant", "content": m.content},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": call.id,
                            "content": [{"type": "text", "text": "Rain, 12 C"}],
                        }
                    ],
                },
            ],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertIn("I received the tool result: Rain, 12 C", text)
        self.assertEqual(final.stop_reason, "end_turn")


class Thinking(Base):
    THINK = {"type": "enabled", "budget_tokens": 2048}
    ASK = "Think first, then answer.\n#emulator: thinking-tags"

    def check_thinking(self, m):
        self.assertEqual(m.content[0].type, "thinking", m.content)
        self.assertTrue(m.content[0].thinking.strip())
        self.assertTrue(m.content[0].signature)
        self.assertTrue(text_of(m))
        self.assertEqual(m.stop_reason, "end_turn")

    def test_thinking(self):
        m = self.client.messages.create(model=MODEL, max_tokens=4096, thinking=self.THINK, messages=user(self.ASK))
        self.check_thinking(m)
        # The thinking block goes back as context.
        again = self.client.messages.create(
            model=MODEL,
            max_tokens=4096,
            thinking=self.THINK,
            messages=[
                {"role": "user", "content": "Think first, then answer."},
                {"role": "assistant", "content": m.content},
                {"role": "user", "content": "And now?"},
            ],
        )
        self.assertEqual(again.stop_reason, "end_turn")

    def test_thinking_streaming(self):
        with self.client.messages.stream(
            model=MODEL, max_tokens=4096, thinking=self.THINK, messages=user(self.ASK)
        ) as stream:
            thinking = ""
            signatures = 0
            for e in stream:
                if e.type == "content_block_delta" and e.delta.type == "thinking_delta":
                    thinking += e.delta.thinking
                elif e.type == "content_block_delta" and e.delta.type == "signature_delta":
                    signatures += 1
            final = stream.get_final_message()
        self.assertTrue(thinking.strip())
        self.assertGreaterEqual(signatures, 1)
        self.check_thinking(final)
        self.assertEqual(final.content[0].thinking, thinking)

    def test_model_reasoning_streaming(self):
        # The model's own reasoning (reasoningContentEvent) with its signature, as the SDK
        # accumulates it; the signature arrives as one signature_delta.
        ask = "Why is the sky blue?\n#emulator: reasoning"
        with self.client.messages.stream(model=MODEL, max_tokens=4096, messages=user(ask)) as stream:
            signatures = [
                e.delta.signature
                for e in stream
                if e.type == "content_block_delta" and e.delta.type == "signature_delta"
            ]
            final = stream.get_final_message()
        self.check_thinking(final)
        self.assertEqual(signatures, [final.content[0].signature])

    def test_redacted_thinking(self):
        ask = "Secret plans?\n#emulator: redacted-thinking"
        m = self.client.messages.create(model=MODEL, max_tokens=4096, messages=user(ask))
        self.assertEqual(m.content[0].type, "redacted_thinking", m.content)
        self.assertTrue(base64.b64decode(m.content[0].data))
        with self.client.messages.stream(model=MODEL, max_tokens=4096, messages=user(ask)) as stream:
            final = stream.get_final_message()
        self.assertEqual(final.content[0].type, "redacted_thinking", final.content)
        self.assertTrue(text_of(final))


class Tokens(Base):
    def test_count_tokens(self):
        r = self.client.messages.count_tokens(
            model=MODEL,
            system="You are terse.",
            tools=[WEATHER_TOOL],
            messages=user("How many tokens is this sentence?"),
        )
        self.assertGreater(r.input_tokens, 0)

    def test_models_list_paginates(self):
        ids = [m.id for m in self.client.models.list(limit=2)]
        self.assertGreaterEqual(len(ids), 4, ids)
        self.assertEqual(len(ids), len(set(ids)), ids)
        # Listed under Claude-style ids (the accounts' live catalog); dated ids still retrieve.
        self.assertIn("claude-sonnet-4-5", ids)
        self.assertTrue(any(i.endswith("[1m]") for i in ids), ids)
        page = self.client.models.list(limit=2)
        self.assertEqual(len(page.data), 2)
        self.assertTrue(page.has_more)

    def test_models_list_backwards(self):
        everything = [m.id for m in self.client.models.list(limit=100)]
        back = [m.id for m in self.client.models.list(limit=2, before_id=everything[-1])]
        self.assertEqual(sorted(back), sorted(everything[:-1]))

    def test_models_retrieve(self):
        m = self.client.models.retrieve(MODEL)
        self.assertEqual(m.id, MODEL)
        self.assertEqual(m.type, "model")
        self.assertTrue(m.display_name)


class Errors(Base):
    def test_wrong_key(self):
        bad = make_client(api_key="sk-amq-wrong-key-000000000000")
        try:
            with self.assertRaises(anthropic.AuthenticationError) as cm:
                bad.messages.create(model=MODEL, max_tokens=16, messages=user("hi"))
        finally:
            bad.close()
        self.assertEqual(cm.exception.status_code, 401)

    def test_unknown_model(self):
        with self.assertRaises(anthropic.NotFoundError) as cm:
            self.client.messages.create(model="gpt-4", max_tokens=16, messages=user("hi"))
        self.assertEqual(cm.exception.status_code, 404)

    def test_unknown_model_retrieve(self):
        with self.assertRaises(anthropic.NotFoundError):
            self.client.models.retrieve("gpt-4")

    def test_empty_messages(self):
        with self.assertRaises(anthropic.BadRequestError) as cm:
            self.client.messages.create(model=MODEL, max_tokens=16, messages=[])
        self.assertEqual(cm.exception.status_code, 400)
        self.assertEqual(cm.exception.body["error"]["type"], "invalid_request_error")

    def test_temperature_by_api_version(self):
        """2026-10-21 (SDK 2.x) refuses sampling parameters; 2023-06-01 (SDK 1.x) accepts them."""
        kwargs = dict(model=MODEL, max_tokens=64, messages=user("warm"), extra_body={"temperature": 0.5})
        if SDK_MAJOR >= 2:
            with self.assertRaises(anthropic.BadRequestError) as cm:
                self.client.messages.create(**kwargs)
            self.assertIn("temperature", str(cm.exception))
        else:
            m = self.client.messages.create(**kwargs)
            self.assertEqual(m.stop_reason, "end_turn")


class Faults(Base):
    """Upstream failures. Each waits for the pool to be healthy again afterwards."""

    def tearDown(self):
        super().tearDown()
        wait_all_accounts_active()

    def test_throttled(self):
        with self.assertRaises(anthropic.RateLimitError) as cm:
            self.client.messages.create(model=MODEL, max_tokens=16, messages=user("x\n#emulator: throttled 3"))
        self.assertEqual(cm.exception.status_code, 429)
        self.assertEqual(cm.exception.response.headers.get("retry-after"), "3")

    def test_capacity(self):
        # 529: OverloadedError (1.x: its own APIStatusError subclass; 2.x: an InternalServerError).
        overloaded = tuple(
            c for c in (getattr(anthropic, "OverloadedError", None), anthropic.InternalServerError) if c
        )
        with self.assertRaises(overloaded) as cm:
            self.client.messages.create(model=MODEL, max_tokens=16, messages=user("x\n#emulator: capacity"))
        self.assertEqual(cm.exception.status_code, 529)
        self.assertEqual(cm.exception.body["error"]["type"], "overloaded_error")

    def test_error_500(self):
        with self.assertRaises(anthropic.InternalServerError) as cm:
            self.client.messages.create(model=MODEL, max_tokens=16, messages=user("x\n#emulator: error-500"))
        self.assertEqual(cm.exception.status_code, 500)
        self.assertEqual(cm.exception.body["error"]["type"], "api_error")

    def test_error_500_streaming(self):
        with self.assertRaises(anthropic.InternalServerError) as cm:
            with self.client.messages.stream(
                model=MODEL, max_tokens=16, messages=user("x\n#emulator: error-500")
            ) as stream:
                stream.get_final_message()
        self.assertEqual(cm.exception.status_code, 500)

    def test_mid_stream_exception(self):
        ask = user("hello\n#emulator: exception error MODEL_TEMPORARILY_UNAVAILABLE")
        got = ""
        with self.assertRaises(anthropic.APIError) as cm:
            with self.client.messages.stream(model=MODEL, max_tokens=1024, messages=ask) as stream:
                for text in stream.text_stream:
                    got += text
        self.assertIsInstance(cm.exception, anthropic.APIStatusError)
        self.assertEqual(cm.exception.body["error"]["type"], "overloaded_error")
        self.assertTrue(got, "some text arrives before the exception")

    def test_mid_stream_exception_raw_events(self):
        ask = user("hello\n#emulator: exception error MODEL_TEMPORARILY_UNAVAILABLE")
        seen = []
        with self.assertRaises(anthropic.APIError):
            for e in self.client.messages.create(model=MODEL, max_tokens=1024, messages=ask, stream=True):
                seen.append(e.type)
        self.assertEqual(seen[0], "message_start", seen)
        self.assertNotIn("message_stop", seen)


if __name__ == "__main__":
    print(f"anthropic SDK {SDK_VERSION} (Python {sys.version.split()[0]}) against {BASE_URL}", flush=True)
    # The SDK warns about deprecated models and options; none of that matters here.
    unittest.main(verbosity=2, warnings="ignore")
