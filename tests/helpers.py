"""Helpers shared by the gateway tests: directives as text, raw RFC 6455 frames and a
raw-socket WebSocket client (for probes a well-behaved client library will not send)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from typing import Any

from nlsstream.protocol import RECOGNIZER, TRANSCRIBER, build_directive, encode

FRAME = b"\x01\x00" * 320  # 640 bytes = 20 ms at 16 kHz
APPKEY = "app"


def directive(
    ns: str, name: str, task_id: str, payload: dict[str, Any] | None = None, appkey: str = APPKEY
) -> str:
    return encode(build_directive(ns, name, task_id=task_id, appkey=appkey, payload=payload))


def start(task_id: str, ns: str = TRANSCRIBER.name, appkey: str = APPKEY, **payload: Any) -> str:
    name = TRANSCRIBER.start if ns == TRANSCRIBER.name else RECOGNIZER.start
    return directive(
        ns, name, task_id, {"format": "pcm", "sample_rate": 16000, **payload}, appkey=appkey
    )


async def recv_json(ws: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return data


async def events_until(ws: Any, last: str) -> list[dict[str, Any]]:
    out = []
    while True:
        event = await recv_json(ws)
        out.append(event)
        if event["header"]["name"] in (last, "TaskFailed"):
            return out


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame, masked unless ``masked=False`` (a protocol error)."""
    mask = os.urandom(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def accept_value(key: str) -> bytes:
    digest = hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


async def http_request(
    host: str, port: int, request: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a raw HTTP request; return the stream and the response head."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


def upgrade_request(
    key: str, extra: str = "", path: str = "/ws/v1", version: str = "HTTP/1.1"
) -> str:
    return (
        f"GET {path} {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )


async def raw_upgrade(
    host: str, port: int, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw-socket WebSocket connection (the 101 and its accept value checked)."""
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer, head = await http_request(host, port, upgrade_request(key, extra))
    assert head.startswith(b"HTTP/1.1 101"), head
    assert accept_value(key) in head
    return reader, writer


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next server frame."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def close_code_after(reader: asyncio.StreamReader) -> int:
    """Read server frames up to its close frame; return the close code."""
    while True:
        opcode, body = await read_server_frame(reader)
        if opcode == 0x8:
            return int.from_bytes(body[:2], "big")
