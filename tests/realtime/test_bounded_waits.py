"""Every wait is bounded: a gateway that stops reading, or stops answering, ends the
session with GatewayConnectionError in bounded time, whichever call the user is in."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import (
    TOKEN,
    client_frame,
    raw_ws_server,
    read_client_frame,
    server_frame,
    start,
    upgrade_request,
    wait_until,
)

from nlsstream import GatewayConnectionError, Reconnect, Transcriber
from nlsstream.gateway import Gateway, Transcript
from nlsstream.gateway.light import LightGateway
from nlsstream.realtime import protocol as p

TEN_MINUTES = b"\x00\x01" * 16000 * 600  # far more than loopback's socket buffers hold


async def started_then_deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A gateway that answers Start with Started, then reads nothing more (the socket
    stays open, so the client's writes back up and its pings go unanswered)."""
    opcode, text = await read_client_frame(reader)
    assert opcode == 0x1
    task_id = json.loads(text)["header"]["task_id"]
    started = p.build_event("SpeechTranscriber", "TranscriptionStarted", task_id)
    writer.write(server_frame(0x1, p.encode(started).encode()))
    await asyncio.Event().wait()  # deaf until the server closes


@pytest.mark.parametrize(
    ("ping_interval", "ping_timeout", "why"),
    # Bounds well under a second: the server is deaf for good, so a busy machine can only
    # make the failure later, never wrong.
    [(0.25, 0.5, "keepalive ping|accepted no data"), (None, 0.5, "accepted no data")],
    ids=["keepalive", "no-keepalive"],
)
@pytest.mark.parametrize(
    ("pace", "reconnect"),
    [(None, False), (50.0, False), (None, Reconnect(attempts=2, backoff=0.01))],
    ids=["unpaced", "paced", "unpaced-resuming"],
)
async def test_a_gateway_that_stops_reading_fails_stream_and_stop(
    ping_interval: float | None,
    ping_timeout: float,
    why: str,
    pace: float | None,
    reconnect: Reconnect | bool,
) -> None:
    """Also when the session resumes: each new task goes deaf again, and the attempts
    (counted since the last final sentence) run out."""
    async with raw_ws_server(started_then_deaf) as port:
        t = Transcriber(
            "app",
            "tok",
            url=f"ws://127.0.0.1:{port}/",
            proxy=None,
            stop_timeout=3,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            reconnect=reconnect,
        )
        with pytest.raises(GatewayConnectionError, match=why):
            async with t:
                # The bound under test is about a second; 60 s only catches a hang.
                await asyncio.wait_for(t.stream(TEN_MINUTES, pace=pace), 60)
        with pytest.raises(GatewayConnectionError, match=why):
            await asyncio.wait_for(t.stop(), 60)


class _BigHypotheses:
    """A speech engine whose every hypothesis is 64 KB: partial results then make far
    more bytes than a client that reads nothing can buffer."""

    name = "big"

    def open(self, sample_rate: int, offset_ms: int) -> Any:
        return self

    def feed(self, pcm: bytes) -> str:
        return "x" * 65536

    def finish(self) -> Transcript:
        return Transcript("x" * 65536)

    def close(self) -> None:
        pass


async def _flood_without_reading(url: str, start_text: str, gone: Callable[[], bool]) -> None:
    """Upgrade on a raw socket with a tiny receive buffer, start a task, then send loud
    audio without ever reading, until the gateway has dropped the connection."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(upgrade_request(key, f"X-NLS-Token: {TOKEN}\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    writer.write(client_frame(0x1, start_text.encode()))
    loud = np.random.default_rng(1).integers(-20000, 20000, 320, dtype=np.int16).tobytes()
    frame = client_frame(0x2, loud)
    try:
        while not gone():
            writer.write(frame * 50)  # one second of audio
            await writer.drain()
    except ConnectionError:
        pass  # the gateway dropped us
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["full", "light"])
async def test_a_client_that_never_reads_is_dropped(kind: str) -> None:
    task_id = p.new_id()
    if kind == "full":
        gw: Any = Gateway(tokens=[TOKEN], recognizer=_BigHypotheses(), send_timeout=0.5)
        text = start(task_id, enable_intermediate_result=True)
    else:
        gw = LightGateway(token=TOKEN, sentence_ms=20, send_timeout=0.5)
        text = start(task_id)
    async with gw:
        opened = False

        def gone() -> bool:
            nonlocal opened
            opened = opened or bool(gw._connections)
            return opened and not gw._connections

        await asyncio.wait_for(_flood_without_reading(gw.url, text, gone), 60)
        # The client may see the reset before the gateway has finished with the
        # connection: wait for that (bounded), then check it really went.
        await wait_until(gone, 30)
        assert opened and gone()
