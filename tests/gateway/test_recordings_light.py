"""The light gateway answers a recordings request with a 404 that says why (issue 18,
item 10). picows refuses any method but GET itself, before the gateway sees it."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("picows")

from nlsstream.gateway.light import LightGateway


@pytest.mark.parametrize("path", ["/stream/v1/FlashRecognizer", "/stream/v1/asr", "/"])
async def test_a_recordings_request_gets_a_404_naming_the_full_gateway(path: str) -> None:
    async with LightGateway("127.0.0.1", 0) as gw:
        port = int(gw.url.rsplit(":", 1)[1].split("/", 1)[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path}?appkey=a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 404")
    assert b"serves only /ws/v1" in answer and b"without --light" in answer
