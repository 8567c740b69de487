"""The client connection: frames written by the pacer, flow control, the audio gate,
keepalive and handshake failures, against real servers on loopback."""

from __future__ import annotations

import asyncio
import random

import pytest
from helpers import raw_ws_server, server_frame
from websockets.asyncio.server import ServerConnection, serve

from nlsstream.errors import AuthenticationError, GatewayConnectionError
from nlsstream.realtime.connection import Connection, client_frame, client_frames, connect


def unmask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


async def open_to(port: int, **kwargs: object) -> tuple[Connection, list[str], asyncio.Event]:
    messages: list[str] = []
    lost = asyncio.Event()
    conn = await connect(
        f"ws://127.0.0.1:{port}/ws/v1",
        "secret-token",
        on_message=messages.append,
        on_lost=lost.set,
        proxy=None,
        **kwargs,  # type: ignore[arg-type]
    )
    return conn, messages, lost


async def test_frames_written_by_the_pacer_arrive_and_the_gate_closes() -> None:
    """Frames made by client_frames()/client_frame() and written with write_frames
    arrive intact at a websockets server (which checks the masking); the connection
    stops being writable once the transport is backed up, and after it is lost."""
    received: list[bytes] = []
    hold = asyncio.Event()
    rng = random.Random(7)
    pcm = rng.randbytes(640 * 30 + 100)
    expected = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    all_received = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        for _ in expected:
            received.append(await ws.recv())  # type: ignore[arg-type]
        all_received.set()
        await hold.wait()  # then stop reading: the client's buffers fill up

    async with serve(
        handler, "127.0.0.1", 0, max_queue=1, max_size=None, close_timeout=0.1
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        conn, _, lost = await open_to(port)
        assert conn.writable
        frames = client_frames(pcm, 640)
        assert len(frames) == len(expected)
        assert len({f[4:8] for f in frames}) == len(frames)  # a fresh key per frame
        conn.write_frames(b"".join(frames[:10]))  # a backlog goes out in one write
        for frame in frames[10:]:
            conn.write_frames(frame)
        await asyncio.wait_for(all_received.wait(), 10)
        assert received == expected
        # Keep writing without awaiting until the transport crosses its high-water mark.
        big = client_frame(b"\x00" * 65536)
        for _ in range(5000):
            if not conn.writable:
                break
            conn.write_frames(big)
            await asyncio.sleep(0)
        assert not conn.writable
        hold.set()
        conn.abort()
        await asyncio.wait_for(lost.wait(), 10)
        assert not conn.writable and conn.closed


@pytest.mark.parametrize("size", [640, 320, 100, 7, 65536])
def test_client_frames_match_client_frame(size: int) -> None:
    pcm = random.Random(size).randbytes(size * 9 + size // 2)
    frames = client_frames(pcm, size)
    assert len(frames) == 10
    for i, frame in enumerate(frames):
        piece = pcm[i * size : (i + 1) * size]
        header = len(client_frame(piece)) - len(piece)
        assert frame[: header - 4] == client_frame(piece)[: header - 4]
        assert unmask(frame[header:], frame[header - 4 : header]) == piece


def test_client_frames_rejects_bad_frame_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        client_frames(b"\x00" * 10, 0)


async def test_a_gateway_that_stops_answering_pings_is_cut_off() -> None:
    """A server that never reads (so never answers a ping) ends the connection within
    the keepalive bound, with the reason."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()  # reads nothing more: the pings go unanswered

    async with raw_ws_server(deaf) as port:
        conn, _, lost = await open_to(port, ping_interval=0.05, ping_timeout=0.2)
        await asyncio.wait_for(lost.wait(), 10)
        assert isinstance(conn.failure, GatewayConnectionError)
        assert "keepalive ping" in str(conn.failure)


async def test_a_gateway_that_keeps_talking_is_alive_while_its_pong_waits() -> None:
    """A gateway working through a backlog of audio reads nothing new (so its pong waits
    behind the audio) but keeps sending results: the connection lives as long as it
    talks, and ends ping_timeout after it falls silent (on main before this, a 10-minute
    recording at pace 0 through the local gateway was cut off after 20 s)."""
    done_talking = asyncio.Event()

    async def talking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(12):  # 0.6 s of results, three times the ping timeout
            writer.write(server_frame(0x1, b"{}"))
            await asyncio.sleep(0.05)  # the pace of the results: the scenario itself
        done_talking.set()
        await asyncio.Event().wait()  # then silence, until the server closes

    async with raw_ws_server(talking) as port:
        conn, messages, lost = await open_to(port, ping_interval=0.05, ping_timeout=0.2)
        await asyncio.wait_for(done_talking.wait(), 10)
        assert not lost.is_set() and len(messages) == 12
        await asyncio.wait_for(lost.wait(), 10)
        assert isinstance(conn.failure, GatewayConnectionError)
        assert "sent nothing for 0.2 s" in str(conn.failure)


async def test_handshake_refusals_are_typed_and_never_name_the_token() -> None:
    from websockets.http11 import Response

    def refuse(connection: ServerConnection, request: object) -> Response:
        token = "secret-token"
        if connection.request is not None:
            token = connection.request.headers.get("X-NLS-Token", "")
        return connection.respond(403, f"Meta:ACCESS_DENIED:The token '{token}' is invalid!")

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=refuse) as s:
        port = next(iter(s.sockets)).getsockname()[1]
        with pytest.raises(AuthenticationError, match="HTTP 403") as info:
            await open_to(port)
        assert "secret-token" not in str(info.value)
        assert info.value.http_status == 403


async def test_a_redirect_is_not_followed_and_says_where_it_pointed() -> None:
    from websockets.http11 import Response

    def redirect(connection: ServerConnection, request: object) -> Response:
        response = connection.respond(302, "moved\n")
        response.headers["Location"] = "ws://elsewhere.example/ws/v1"
        return response

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=redirect) as s:
        port = next(iter(s.sockets)).getsockname()[1]
        with pytest.raises(GatewayConnectionError, match=r"elsewhere\.example") as info:
            await open_to(port)
        assert "not followed" in str(info.value)


async def test_connection_refused_is_a_gateway_connection_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(GatewayConnectionError, match="cannot connect"):
        await open_to(port)


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on loopback that counts the tunnels it opens."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ")[1].decode()
        host, port = target.rsplit(":", 1)
        self.tunnels.append(target)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_sessions_go_through_a_proxy_given_or_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``proxy=URL`` tunnels through that proxy; ``proxy=True`` (the default) finds it in
    ``ws_proxy``; ``no_proxy`` and ``proxy=None`` connect directly; a loopback gateway is
    never proxied by the environment (it is by ``proxy=URL``)."""
    import socket

    from nlsstream import Transcriber
    from nlsstream.gateway import Gateway
    from nlsstream.realtime.connection import proxy_for

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # a route lookup: nothing is sent
        except OSError:
            pytest.skip("no address besides loopback")
        address = probe.getsockname()[0]
    async with Gateway("0.0.0.0", 0, recognizer="span") as gw:
        url = gw.url.replace("0.0.0.0", address)
        loopback = gw.url.replace("0.0.0.0", "127.0.0.1")
        proxy = ConnectProxy()
        async with proxy as proxy_url:
            for setting in (proxy_url, True, None):
                monkeypatch.setenv("ws_proxy", proxy_url)
                monkeypatch.delenv("no_proxy", raising=False)
                monkeypatch.delenv("NO_PROXY", raising=False)
                proxy_for.cache_clear()
                async with Transcriber(gw.appkey, gw.token, url=url, proxy=setting) as t:
                    await t.send_audio(b"\x00" * 640)
            assert proxy.tunnels == [f"{address}:{gw.port}"] * 2
            async with Transcriber(gw.appkey, gw.token, url=loopback) as t:
                await t.send_audio(b"\x00" * 640)
            assert len(proxy.tunnels) == 2
            monkeypatch.setenv("no_proxy", address)
            proxy_for.cache_clear()
            async with Transcriber(gw.appkey, gw.token, url=url) as t:
                await t.send_audio(b"\x00" * 640)
            assert len(proxy.tunnels) == 2
    proxy_for.cache_clear()


def test_a_session_on_uvloop() -> None:
    """uvloop's transports implement asyncio's interface without subclassing it: a whole
    session, paced and unpaced audio included, runs on its loop."""
    uvloop = pytest.importorskip("uvloop")
    from nlsstream import Transcriber
    from nlsstream.gateway import Gateway

    async def main() -> tuple[str, int]:
        async with Gateway(recognizer="span") as gw:
            async with Transcriber(gw.appkey, gw.token, url=gw.url) as t:
                await t.send_audio(b"\x00" * 640)
                await t.stream(b"\x10\x00" * 16000, pace=8.0)  # 1 s of audio in 1/8 s
                result = await t.stop()
            return type(asyncio.get_running_loop()).__module__, result.duration

    loop = uvloop.new_event_loop()
    try:
        module, duration = loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()
    assert module.startswith("uvloop")
    assert duration == 1020  # 640 bytes (20 ms) + 1 s
