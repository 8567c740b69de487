"""Every wait is bounded: a gateway that stops reading, or stops answering, ends the
session with GatewayConnectionError in bounded time, whichever call the user is in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve

from nlsstream import GatewayConnectionError, Transcriber
from nlsstream import protocol as p

TEN_MINUTES = b"\x00\x01" * 16000 * 600  # far more than loopback's socket buffers hold


def started_then_deaf(release: asyncio.Event) -> Callable[[ServerConnection], Awaitable[None]]:
    """A handler that answers Start with Started, then reads nothing (the socket stays
    open) until ``release`` is set."""

    async def handler(ws: ServerConnection) -> None:
        start = json.loads(await ws.recv())
        task_id = start["header"]["task_id"]
        started = p.build_event("SpeechTranscriber", "TranscriptionStarted", task_id)
        await ws.send(p.encode(started))
        ws.transport.pause_reading()
        await release.wait()
        ws.transport.abort()

    return handler


@pytest.mark.parametrize(
    ("ping_interval", "ping_timeout", "why"),
    [(1.0, 2.0, "keepalive ping|accepted no data"), (None, 2.0, "accepted no data")],
    ids=["keepalive", "no-keepalive"],
)
@pytest.mark.parametrize("pace", [None, 50.0], ids=["unpaced", "paced"])
async def test_a_gateway_that_stops_reading_fails_stream_and_stop(
    ping_interval: float | None, ping_timeout: float, why: str, pace: float | None
) -> None:
    release = asyncio.Event()
    async with serve(
        started_then_deaf(release), "127.0.0.1", 0, ping_interval=None, close_timeout=0.1
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        t = Transcriber(
            "app",
            "tok",
            url=f"ws://127.0.0.1:{port}/",
            proxy=None,
            stop_timeout=3,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        with pytest.raises(GatewayConnectionError, match=why):
            async with t:
                # The bound under test is a few seconds; 60 s only catches a hang.
                await asyncio.wait_for(t.stream(TEN_MINUTES, pace=pace), 60)
        with pytest.raises(GatewayConnectionError, match=why):
            await asyncio.wait_for(t.stop(), 60)
        release.set()
