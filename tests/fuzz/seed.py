#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/ (git-ignored).

- request_translate: every tests/fixtures/claude/*.json body, minified, behind a control byte
  (0 = anthropic-version 2023-06-01, /v1/messages), plus a few small hand-written bodies.
- eventstream_decode: Amazon Q-shaped event-stream frames (text, tool use, exception, every
  header type) behind control bytes choosing chunk sizes and the CRC fix-up mode.
- response_state_machine: none needed (its input is decoded with `arbitrary`).

Run from the repository root: python3 tests/fuzz/seed.py
"""

import json
import pathlib
import struct
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


SMALL_BODIES = {
    "tool_roundtrip": {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]},
        ],
    },
    "image": {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    {"type": "text", "text": "what?"},
                ],
            }
        ],
    },
    "thinking_prefill": {
        "model": "claude-opus-4-1",
        "max_tokens": 3000,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tool_choice": {"type": "none"},
        "system": [{"type": "text", "text": "S"}],
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "D"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "x"}, {"type": "text", "text": "A"}]},
        ],
    },
}


def request_seeds():
    for path in sorted((ROOT / "tests" / "fixtures" / "claude").glob("*.json")):
        body = json.dumps(json.loads(path.read_text()), separators=(",", ":"), ensure_ascii=False)
        write("request_translate", path.stem, b"\x00" + body.encode())
    for name, body in SMALL_BODIES.items():
        write("request_translate", name, b"\x00" + json.dumps(body, separators=(",", ":")).encode())


def header(name, type_code, value=b""):
    n = name.encode()
    return bytes([len(n)]) + n + bytes([type_code]) + value


def string_header(name, value):
    v = value.encode()
    return header(name, 7, struct.pack(">H", len(v)) + v)


def frame(headers, payload):
    h = b"".join(headers)
    total = 12 + len(h) + len(payload) + 4
    prelude = struct.pack(">II", total, len(h))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + h + payload
    return body + struct.pack(">I", zlib.crc32(body))


def event(event_type, payload):
    return frame(
        [
            string_header(":event-type", event_type),
            string_header(":content-type", "application/json"),
            string_header(":message-type", "event"),
        ],
        json.dumps(payload).encode(),
    )


def eventstream_seeds():
    text = event("assistantResponseEvent", {"content": "Hello"})
    tool = event("toolUseEvent", {"toolUseId": "tooluse_1", "name": "t", "input": "{\"a\":", "stop": False})
    stop = event("toolUseEvent", {"toolUseId": "tooluse_1", "name": "t", "stop": True})
    exception = frame(
        [
            string_header(":exception-type", "ThrottlingException"),
            string_header(":content-type", "application/json"),
            string_header(":message-type", "exception"),
        ],
        b'{"message":"slow down"}',
    )
    every_type = frame(
        [
            header("t", 0),
            header("f", 1),
            header("b", 2, b"\x7f"),
            header("s", 3, b"\x01\x02"),
            header("i", 4, b"\x01\x02\x03\x04"),
            header("l", 5, b"\x01" * 8),
            header("y", 6, b"\x00\x03abc"),
            string_header("str", "é"),
            header("ts", 8, b"\x00" * 8),
            header("u", 9, bytes(range(16))),
        ],
        b"\xff\x00payload",
    )
    empty = frame([], b"")
    # The longest value the format allows (32767 bytes): the limit's edge.
    longest = frame([string_header("v", "a" * 32767)], b"{}")
    stream = text + tool + stop + text
    for ctl, name in [(0x00, "whole"), (0x01, "bytewise"), (0x07, "chunk7"), (0x41, "copy_bytewise")]:
        write("eventstream_decode", f"stream_{name}", bytes([ctl]) + stream)
    write("eventstream_decode", "exception", bytes([0x80]) + exception)
    write("eventstream_decode", "every_type", bytes([0x85]) + every_type)
    write("eventstream_decode", "empty_frames", bytes([0x83]) + empty + empty)
    write("eventstream_decode", "truncated", bytes([0x0c]) + text[:-3])
    write("eventstream_decode", "longest_value", bytes([0x80]) + longest)


if __name__ == "__main__":
    request_seeds()
    eventstream_seeds()
    print(f"seeds written under {CORPUS}")
