"""The gateway's HTTP side tried as an attacker would (issue 18), over loopback: audio
bombs, token bypass, tenants, replays, malformed requests, slow and stalled requests,
uploads in flight, downloads that never end, leaky error texts.

Every case is small and fast (the bomb is 10 KB); waits are bounded by conditions.
The gateway runs the ``span`` recogniser: these tests are about limits, not words.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from helpers import AK_ID, AK_SECRET, APPKEY, FIXTURES, TOKEN, clean_env, readline_within
from yarl import URL

from nlsstream import FileTranscriber, FlashRecognizer, RestRecognizer, TaskFailedError, auth
from nlsstream.errors import TokenError
from nlsstream.gateway import Gateway, HttpLimits
from nlsstream.gateway.pop import PopGuard, PopRefusal

AK_B, SECRET_B = "LTAI5tTenantB000002", "another-secret"
QUICK = HttpLimits(header_timeout=0.5, body_timeout=1.5, log_interval=60.0)


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(
        tokens=[TOKEN],
        appkeys=[APPKEY],
        access_keys={AK_ID: AK_SECRET, AK_B: SECRET_B},
        recognizer="span",
        http_limits=QUICK,
    ) as g:
        yield g


def wav_bytes(payload: bytes, *, rate: int, bits: int = 8, channels: int = 1) -> bytes:
    """A RIFF/WAVE file around ``payload`` whose header says what it is told to."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


async def post(gw: Gateway, path: str, body: bytes, **query: str) -> tuple[int, dict[str, Any]]:
    params = {"appkey": APPKEY, "token": TOKEN, **query}
    async with (
        ClientSession() as http,
        http.post(gw.http_url + path, params=params, data=body) as r,
    ):
        return r.status, await r.json()


def pop_url(gw: Gateway, params: dict[str, str]) -> URL:
    return URL(f"{gw.http_url}/?{auth.canonical_query(params)}", encoded=True)


async def pop_get(gw: Gateway, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with ClientSession() as http, http.get(pop_url(gw, params)) as r:
        return r.status, await r.json()


def signed(action: str, secret: str = AK_SECRET, key: str = AK_ID, **extra: str) -> dict[str, str]:
    return auth.signed_params(
        "GET", key, secret, action, region="cn-shanghai", version="2018-08-17", extra=extra
    )


def resign(params: dict[str, str], secret: str = AK_SECRET) -> dict[str, str]:
    params = {k: v for k, v in params.items() if k != "Signature"}
    params["Signature"] = auth.pop_signature("GET", params, secret)
    return params


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- 1. bombs


@pytest.mark.parametrize("path", ["/stream/v1/FlashRecognizer", "/stream/v1/asr"])
async def test_a_10_kb_wav_that_says_1_hz_is_refused_before_decoding(
    gw: Gateway, path: str
) -> None:
    bomb = wav_bytes(os.urandom(10_000), rate=1)
    before = peak_rss_mb()
    started = time.monotonic()
    status, body = await asyncio.wait_for(post(gw, path, bomb, format="wav"), 5)
    assert time.monotonic() - started < 1.0
    assert (status, body["status"]) == (400, 41010101), body
    assert "sample rate" in body["message"]
    assert peak_rss_mb() - before < 50  # the old gateway grew by 2.6 GB


async def test_duration_and_channels_come_from_the_header_before_any_decoding(
    gw: Gateway,
) -> None:
    # 62.5 s at 8 kHz, 8-bit: too long for REST (41010104), told by the header alone.
    long_8bit = wav_bytes(bytes(500_000), rate=8000)
    status, body = await post(gw, "/stream/v1/asr", long_8bit, format="wav")
    assert (status, body["status"]) == (400, 41010104), body
    three = wav_bytes(bytes(9600), rate=16000, bits=16, channels=3)
    status, body = await post(gw, "/stream/v1/FlashRecognizer", three, format="wav")
    assert (status, body["status"]) == (400, 40270004), body
    # Headerless PCM: the byte count is the duration (61 s > 60 s).
    status, body = await post(gw, "/stream/v1/asr", bytes(61 * 32000), format="pcm")
    assert (status, body["status"]) == (400, 41010104), body


# --------------------------------------------------------------------------- 2. tokens


async def test_a_gateway_with_tokens_and_no_access_keys_issues_no_token() -> None:
    async with Gateway(tokens=["T"], recognizer="span") as gw:
        with pytest.raises(TokenError) as caught:
            await auth.create_token("made-up", "made-up", endpoint=gw.http_url + "/")
        assert caught.value.code == "InvalidAccessKeyId.NotFound"
        async with RestRecognizer(APPKEY, "T", url=gw.http_url) as rest:
            pcm = (FIXTURES / "hello.wav").read_bytes()
            assert (await rest.recognize(pcm)).task_id


async def test_issued_tokens_work_where_the_access_keys_are_known(gw: Gateway) -> None:
    token = await auth.create_token(AK_ID, AK_SECRET, endpoint=gw.http_url + "/")
    async with RestRecognizer(APPKEY, token.value, url=gw.http_url) as rest:
        assert (await rest.recognize(FIXTURES / "hello.wav")).task_id


# --------------------------------------------------------------------------- 3. tenants


async def test_another_access_key_cannot_read_a_task(gw: Gateway) -> None:
    link = (FIXTURES / "hello.wav").as_uri()
    async with (
        FileTranscriber(AK_ID, AK_SECRET, appkey=APPKEY, endpoint=gw.http_url) as a,
        FileTranscriber(AK_B, SECRET_B, appkey=APPKEY, endpoint=gw.http_url) as b,
    ):
        task = await a.submit(link)
        with pytest.raises(TaskFailedError) as caught:
            await b.task(task.task_id).poll()
        assert caught.value.status == 41050010
        assert (await task.wait(30)).task_id == task.task_id


# --------------------------------------------------------------------------- 4. replay


async def test_a_nonce_is_single_use_and_the_timestamp_must_be_now(gw: Gateway) -> None:
    params = signed("GetTaskResult", TaskId="0" * 32)
    assert (await pop_get(gw, params))[1]["StatusCode"] == 41050010
    status, body = await pop_get(gw, params)
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    old = resign({**signed("GetTaskResult", TaskId="x"), "Timestamp": "2001-01-01T00:00:00Z"})
    status, body = await pop_get(gw, old)
    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Expired")
    garbage = resign({**signed("GetTaskResult", TaskId="x"), "Timestamp": "garbage"})
    status, body = await pop_get(gw, garbage)
    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Format")


def test_without_access_keys_no_nonce_is_kept_so_nobody_can_throttle_everyone() -> None:
    """Unsigned requests (no AccessKeys configured) can be forged at will: nonces of
    those would protect nothing, and filling their memory would throttle every client."""
    guard = PopGuard(None, max_nonces=3)
    params = {k: v for k, v in signed("GetTaskResult", TaskId="x").items()}
    for n in range(10):
        assert guard.check("GET", {**params, "SignatureNonce": f"n{n}"}) == AK_ID
    assert guard.check("GET", params) == guard.check("GET", params) == AK_ID
    signed_guard = PopGuard({AK_ID: AK_SECRET}, max_nonces=3)
    for n in range(3):
        signed_guard.check("GET", resign({**params, "SignatureNonce": f"n{n}"}))
    with pytest.raises(PopRefusal) as caught:
        signed_guard.check("GET", resign({**params, "SignatureNonce": "n3"}))
    assert caught.value.code == "Throttling.User"


async def test_a_replayed_submit_makes_one_task(gw: Gateway) -> None:
    task = json.dumps({"appkey": APPKEY, "file_link": (FIXTURES / "hello.wav").as_uri()})
    params = signed("SubmitTask", Task=task)
    answers = [await pop_get(gw, params) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 400, 400]
    assert gw.files is not None and len(gw.files.tasks) == 1


# --------------------------------------------------------------------------- 5. no 500s


async def test_malformed_pop_requests_are_4xx_with_one_log_line(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    odd = {**signed("GetTaskResult", TaskId="x"), "Signature": "ü" * 28}
    status, body = await pop_get(gw, odd)
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    for task in ("[" * 50_000 + "]" * 50_000, '{"appkey": ' + "9" * 5000 + "}"):
        params = signed("SubmitTask", Task=task)  # the Task in a form body, as SDKs send it
        form = {"Task": params.pop("Task")}
        query = {k: v for k, v in params.items()}
        query["Signature"] = auth.pop_signature("POST", {**query, **form}, AK_SECRET)
        async with ClientSession() as http, http.post(pop_url(gw, query), data=form) as r:
            assert (r.status, (await r.json())["StatusCode"]) == (200, 41050013)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------- 6. slow requests


async def test_half_sent_headers_are_closed_and_others_still_served(gw: Gateway) -> None:
    conns = [await asyncio.open_connection(gw.host, gw.port) for _ in range(20)]
    for _, writer in conns:
        writer.write(b"POST /stream/v1/asr HTTP/1.1\r\nHost: x\r\n")
    for reader, _writer in conns:
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
    status, _ = await pop_get(gw, signed("GetTaskResult", TaskId="x"))
    assert status == 200


async def test_a_body_shorter_than_its_content_length_is_answered_408(gw: Gateway) -> None:
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(
        f"POST /stream/v1/asr?appkey={APPKEY}&format=pcm HTTP/1.1\r\nHost: x\r\n"
        f"X-NLS-Token: {TOKEN}\r\nContent-Length: 10000\r\n\r\n".encode()
        + bytes(100)
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b'"status": 40000004' in answer


async def test_a_full_accept_queue_is_logged_once_per_interval(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": exc}
            )
    lines = [r for r in caplog.records if "open files" in r.getMessage()]
    assert len(lines) == 1


# --------------------------------------------------------------------------- 7. uploads


async def test_uploads_in_flight_are_bounded(gw: Gateway) -> None:
    limits = HttpLimits(max_uploads=2, header_timeout=5, body_timeout=10)
    async with Gateway(tokens=[TOKEN], recognizer="span", http_limits=limits) as g:
        stalled = []
        head = (
            f"POST /stream/v1/asr?appkey={APPKEY}&format=pcm HTTP/1.1\r\nHost: x\r\n"
            f"X-NLS-Token: {TOKEN}\r\nContent-Length: 1000000\r\n\r\n"
        ).encode()
        for _ in range(2):
            _reader, writer = await asyncio.open_connection(g.host, g.port)
            writer.write(head + bytes(1000))
            await writer.drain()
            stalled.append(writer)
        assert g.recordings is not None
        for _ in range(500):  # both bodies being received (bounded wait)
            if g.recordings.uploads.in_flight == 2:
                break
            await asyncio.sleep(0.01)
        status, body = await post(g, "/stream/v1/asr", bytes(3200), format="pcm")
        assert (status, body["status"]) == (429, 40000005)
        for writer in stalled:
            writer.close()


# --------------------------------------------------------------------------- 8. downloads


async def test_a_fifo_link_fails_fast_and_later_tasks_run(gw: Gateway, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    async with FileTranscriber(AK_ID, AK_SECRET, appkey=APPKEY, endpoint=gw.http_url) as ft:
        tasks = [await ft.submit(fifo.as_uri()) for _ in range(2)]
        good = await ft.submit((FIXTURES / "hello.wav").as_uri())
        for task in tasks:
            with pytest.raises(TaskFailedError) as caught:
                await task.wait(20)
            assert caught.value.status == 41050002
        assert (await good.wait(20)).duration > 0


async def test_file_root_allows_only_files_under_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.wav").write_bytes((FIXTURES / "hello.wav").read_bytes())
    keys = {AK_ID: AK_SECRET}
    async with (
        Gateway(recognizer="span", access_keys=keys, file_root=root) as gw,
        FileTranscriber(AK_ID, AK_SECRET, appkey=APPKEY, endpoint=gw.http_url) as ft,
    ):
        assert (await ft.transcribe((root / "hello.wav").as_uri(), timeout=20)).duration > 0
        for outside in (FIXTURES / "hello.wav", root / ".." / "root" / ".." / "x.wav"):
            with pytest.raises(TaskFailedError) as caught:
                await ft.transcribe(outside.as_uri(), timeout=20)
            assert caught.value.status == 41050002


def test_sigterm_stops_serve_while_a_fifo_task_waits(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "nlsstream", "serve", "--port", "0", "--recognizer", "span"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env()
    )
    try:
        url = readline_within(proc.stdout, 30).split()[-1]  # type: ignore[arg-type]
        http = url.replace("ws://", "http://").removesuffix("/ws/v1")

        async def submit() -> None:
            async with FileTranscriber("k", "s", appkey="a", endpoint=http) as ft:
                await ft.submit(fifo.as_uri())

        asyncio.run(submit())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- 9. leaks


async def test_audio_address_errors_say_nothing_about_the_host(gw: Gateway, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.wav"
    links = [
        (tmp_path / "missing.wav").as_uri(),
        tmp_path.as_uri(),
        closed,
        f"{gw.http_url}/nothing-here.wav",
        Path("/etc/passwd").as_uri(),
    ]
    answers = set()
    for link in links:
        status, body = await post(gw, "/stream/v1/FlashRecognizer", b"", audio_address=link)
        answers.add((status, body["status"], body["message"]))
    status, body = await post(
        gw, "/stream/v1/FlashRecognizer", b"", audio_address=links[-1], format="pcm"
    )
    answers.add((status, body["status"], body["message"]))
    assert answers == {(400, 40270006, "Gateway:FILE_DOWNLOAD_FAILED:File download failed!")}


# --------------------------------------------------------------------------- 19. request log


async def test_flash_and_rest_requests_are_logged_one_line_each(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nlsstream.gateway")
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url) as flash:
        await flash.recognize(FIXTURES / "hello.wav")
    await post(gw, "/stream/v1/asr", bytes(3200), format="pcm")
    lines = [r.getMessage() for r in caplog.records if " task=" in r.getMessage()]
    assert [line.split()[0] for line in lines] == ["flash", "rest"]
    assert "status=20000000 http=200" in lines[0] and TOKEN not in "".join(lines)
