"""The recording clients against malformed, hostile answers (issue 18, items 11-14) and
their proxy settings (issue 20): every answer is validated into the typed results or
refused with a typed error naming the field; CreateToken follows no redirect and
refuses an ExpireTime that is not finite; an answer's parsing cost is bounded.

The hostile services are small aiohttp servers of the test's own, over loopback.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from helpers import AK_ID, AK_SECRET, APPKEY, FIXTURES, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlsstream import (
    AccessKeyTokenProvider,
    AudioFormatError,
    FileTranscriber,
    FlashRecognizer,
    GatewayConnectionError,
    RestRecognizer,
)
from nlsstream.errors import NlsError, ProtocolError, TokenError
from nlsstream.gateway import Gateway
from nlsstream.recordings import wire

Answer = Callable[[web.Request], web.StreamResponse]


class Service:
    """A loopback HTTP server answering every request with ``answer(request)``."""

    def __init__(self) -> None:
        self.answer: Answer = lambda r: web.json_response({})
        self.hits = 0
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        return self.answer(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


async def _serve() -> AsyncIterator[Service]:
    service = Service()
    runner = web.AppRunner(service.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    service.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield service
    finally:
        await runner.cleanup()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    async for s in _serve():
        yield s


@pytest.fixture
async def other() -> AsyncIterator[Service]:
    async for s in _serve():
        yield s


def raw(body: bytes | str, status: int = 200) -> Answer:
    data = body.encode() if isinstance(body, str) else body
    return lambda r: web.Response(body=data, status=status, content_type="application/json")


# --------------------------------------------------------------------------- 11. typed errors

FLASH_BAD = [
    ({"flash_result": {"sentences": [{"text": 5, "begin_time": "a"}]}}, "sentences[0].text"),
    ({"flash_result": {"sentences": [{"text": "x", "begin_time": "a"}]}}, "begin_time"),
    ({"flash_result": {"sentences": "abc"}}, "flash_result.sentences"),
    ({"flash_result": [1]}, "flash_result"),
    ({"flash_result": {"duration": 10**400}}, "flash_result.duration"),
    ({"flash_result": {"sentences": [{"words": [{"begin_time": 1e300}]}]}}, "words[0]"),
]


@pytest.mark.parametrize(("fields", "named"), FLASH_BAD)
async def test_malformed_flash_answers_are_protocol_errors_naming_the_field(
    service: Service, fields: dict[str, Any], named: str
) -> None:
    service.answer = raw(json.dumps({"status": 20000000, "task_id": "t", **fields}))
    async with FlashRecognizer(APPKEY, TOKEN, url=service.url, proxy=None) as flash:
        with pytest.raises(ProtocolError, match=named.replace("[", r"\[").replace("]", r"\]")):
            await flash.recognize(FIXTURES / "hello.wav")


async def test_malformed_file_trans_and_rest_answers_are_typed(service: Service) -> None:
    done = {"StatusCode": 21050000, "TaskId": "t", "Result": {"Sentences": [{"BeginTime": []}]}}
    service.answer = raw(json.dumps(done))
    async with FileTranscriber(
        AK_ID, AK_SECRET, appkey=APPKEY, endpoint=service.url, proxy=None
    ) as ft:
        with pytest.raises(ProtocolError, match=r"Result.Sentences\[0\].BeginTime"):
            await ft.task("t").poll()
        service.answer = raw(json.dumps({"StatusCode": "21050000", "TaskId": "t"}))
        with pytest.raises(ProtocolError, match="StatusCode"):
            await ft.submit("http://x/y.wav")
    service.answer = raw(json.dumps({"status": 20000000, "result": {"a": 1}}))
    async with RestRecognizer(APPKEY, TOKEN, url=service.url, proxy=None) as rest:
        with pytest.raises(ProtocolError, match="result"):
            await rest.recognize(FIXTURES / "hello.wav")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_time = st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.none(), _json)


def _shape(keys: list[str], value: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: value for k in keys})


_flash_word = _shape(["text", "begin_time", "end_time", "punc"], _time)
_flash_sentence = st.fixed_dictionaries(
    {},
    optional={
        "text": _time,
        "begin_time": _time,
        "end_time": _time,
        "channel_id": _time,
        "words": st.lists(_flash_word, max_size=3) | _json,
    },
)
_flash = st.fixed_dictionaries(
    {},
    optional={
        "task_id": _time,
        "flash_result": st.fixed_dictionaries(
            {}, optional={"duration": _time, "sentences": st.lists(_flash_sentence, max_size=3)}
        )
        | _json,
    },
)
_ft_sentence = _shape(
    ["Text", "BeginTime", "EndTime", "ChannelId", "SpeechRate", "EmotionValue"], _time
)
_ft_word = _shape(["Word", "BeginTime", "EndTime", "ChannelId"], _time)
_file_trans = st.fixed_dictionaries(
    {},
    optional={
        "TaskId": _time,
        "StatusCode": _time,
        "BizDuration": _time,
        "Result": st.fixed_dictionaries(
            {},
            optional={
                "Sentences": st.lists(_ft_sentence, max_size=3),
                "Words": st.lists(_ft_word, max_size=3),
            },
        )
        | _json,
    },
)


def _check_result(result: wire.FileResult) -> None:
    assert isinstance(result.task_id, str) and isinstance(result.duration, int)
    for s in result.sentences:
        assert isinstance(s.text, str)
        assert all(isinstance(t, int) for t in (s.begin_time, s.end_time, s.channel_id))
        for w in s.words:
            assert isinstance(w.text, str) and isinstance(w.start_time, int)
        assert s.emotion_value is None or math.isfinite(s.emotion_value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_flash)
def test_any_flash_answer_is_a_typed_result_or_a_protocol_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        _check_result(wire.parse_flash(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_file_trans)
def test_any_file_trans_answer_is_a_typed_result_or_a_protocol_error(
    data: dict[str, Any],
) -> None:
    try:
        _check_result(wire.parse_file_trans(data))
        wire.parse_task_status(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(_json)
def test_any_json_is_a_typed_answer_or_a_protocol_error(data: Any) -> None:
    for parse in (wire.parse_flash, wire.parse_file_trans, wire.parse_submit):
        with contextlib.suppress(ProtocolError):
            parse(data)
    with contextlib.suppress(ProtocolError):
        wire.parse_rest(data, 0)


# --------------------------------------------------------------------------- 12, 13. tokens


async def test_create_token_follows_no_redirect(service: Service, other: Service) -> None:
    service.answer = lambda r: web.Response(status=302, headers={"Location": other.url + "/"})
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url + "/")
    with pytest.raises(TokenError):
        await provider.get_token()
    assert (service.hits, other.hits) == (1, 0)


@pytest.mark.parametrize(
    "expire", ["NaN", "Infinity", "-Infinity", "1e999", "10" * 200, "true", '"soon"', "-5"]
)
async def test_create_token_refuses_an_expire_time_that_is_not_a_finite_time(
    service: Service, expire: str
) -> None:
    service.answer = raw(f'{{"Token": {{"Id": "abc", "ExpireTime": {expire}}}}}')
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url + "/")
    with pytest.raises(TokenError):
        await provider.get_token()


@pytest.mark.parametrize(
    "body",
    [
        '{"Token": {"Id": {"a": 1}, "ExpireTime": 4000000000}}',
        '{"Token": {"Id": "' + "x" * 5000 + '", "ExpireTime": 4000000000}}',
        '{"Code": ' + "[" * 900 + "]" * 900 + "}",
        "[" * 100_000,
    ],
)
async def test_create_token_malformed_answers_are_token_errors(service: Service, body: str) -> None:
    service.answer = raw(body, status=200)
    with pytest.raises(TokenError):
        await AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url + "/").get_token()


# --------------------------------------------------------------------------- 14. answer cost


async def test_an_answer_of_millions_of_objects_is_refused_before_parsing(
    service: Service,
) -> None:
    body = b'{"status": 20000000, "x": [' + b"{}," * 1_100_000 + b"{}]}"
    service.answer = raw(body)
    async with FlashRecognizer(APPKEY, TOKEN, url=service.url, proxy=None) as flash:
        with pytest.raises(ProtocolError, match="objects and lists"):
            await flash.recognize(FIXTURES / "hello.wav")
    service.answer = raw(b'{"status": 20000000, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    async with FlashRecognizer(APPKEY, TOKEN, url=service.url, proxy=None) as flash:
        with pytest.raises(NlsError):
            await flash.recognize(FIXTURES / "hello.wav")


# --------------------------------------------------------------------------- proxies


async def test_recording_clients_use_the_proxy_they_are_given(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``proxy=URL`` sends through that HTTP proxy, ``proxy=None`` connects directly,
    and a SOCKS proxy is a clear error (aiohttp speaks HTTP proxies only)."""
    async with Gateway(tokens=[TOKEN], recognizer="span") as gw:

        async def forward(request: web.Request) -> web.StreamResponse:
            # A forward proxy: the request line names the gateway's absolute URL.
            from aiohttp import ClientSession

            body = await request.read()
            async with (
                ClientSession() as http,
                http.request(
                    request.method, str(request.url), data=body, headers=request.headers
                ) as r,
            ):
                return web.Response(body=await r.read(), status=r.status)

        service.answer = lambda r: web.Response(status=599)  # unused
        proxy_app = web.Application()
        hits: list[str] = []

        async def count(request: web.Request) -> web.StreamResponse:
            hits.append(str(request.url))
            return await forward(request)

        proxy_app.router.add_route("*", "/{tail:.*}", count)
        runner = web.AppRunner(proxy_app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        proxy = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with RestRecognizer(APPKEY, TOKEN, url=gw.http_url, proxy=proxy) as rest:
                await rest.recognize(FIXTURES / "hello.wav")
            assert len(hits) == 1 and hits[0].startswith(gw.http_url)
            async with RestRecognizer(APPKEY, TOKEN, url=gw.http_url, proxy=None) as rest:
                await rest.recognize(FIXTURES / "hello.wav")
            assert len(hits) == 1
            socks = "socks5://127.0.0.1:1"
            async with RestRecognizer(APPKEY, TOKEN, url=gw.http_url, proxy=socks) as rest:
                with pytest.raises(GatewayConnectionError, match="not an HTTP proxy"):
                    await rest.recognize(FIXTURES / "hello.wav")
        finally:
            await runner.cleanup()


async def test_more_channels_than_the_services_take_fail_before_upload(tmp_path: Any) -> None:
    import numpy as np
    import soundfile

    four = tmp_path / "four.wav"
    soundfile.write(four, np.zeros((1600, 4), dtype=np.int16), 16000)
    async with FlashRecognizer(APPKEY, TOKEN, url="http://127.0.0.1:9", proxy=None) as flash:
        for source in (four, np.zeros((1600, 3), dtype=np.int16)):
            with pytest.raises(AudioFormatError, match="channels"):
                await flash.recognize(source, sample_rate=16000)
