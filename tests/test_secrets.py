"""The token never reaches a log line, an event, an error or its context, whatever
logging level is on and whatever the gateway quotes back."""

from __future__ import annotations

import json
import logging
import traceback

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from nlsstream import AuthenticationError, GatewayConnectionError, Transcriber
from nlsstream.errors import redact
from nlsstream.gateway import Gateway
from nlsstream.gateway.light import LightGateway
from nlsstream.realtime import protocol as p

SECRET = "SECRET-tok-8f3a2b"


def leaked(caplog: pytest.LogCaptureFixture, *, ignore: str = "-") -> list[str]:
    """Log lines quoting the token (``ignore``: a logger of the test's own server)."""
    return [
        r.getMessage()
        for r in caplog.records
        if SECRET in r.getMessage() and not r.name.startswith(ignore)
    ]


@pytest.mark.parametrize("gateway", ["full", "light"])
@pytest.mark.parametrize("in_query", [False, True])
async def test_debug_logging_everywhere_never_shows_the_token(
    caplog: pytest.LogCaptureFixture, gateway: str, in_query: bool
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: websockets, aiohttp, picows, ours
    gw: Gateway | LightGateway = (
        Gateway(tokens=[SECRET], recognizer="span")
        if gateway == "full"
        else LightGateway(token=SECRET)
    )
    async with gw:
        url = gw.url + (f"?token={SECRET}" if in_query else "")
        async with Transcriber("app", SECRET, url=url, proxy=None) as t:
            await t.send_audio(b"\x00" * 6400)
            await t.stop()
    assert caplog.records  # DEBUG was really on
    assert leaked(caplog) == []


async def _task_failed_quoting_the_token(ws: ServerConnection) -> None:
    start = json.loads(await ws.recv())
    task_id = start["header"]["task_id"]
    await ws.send(p.encode(p.build_event("SpeechTranscriber", "TranscriptionStarted", task_id)))
    text = f"Meta:ACCESS_DENIED:The token '{SECRET}' has expired!"
    await ws.send(p.encode(p.build_task_failed(task_id, 40000001, text)))
    await ws.wait_closed()


async def test_a_task_failed_quoting_the_token_is_redacted_everywhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    reported: list[str] = []
    async with serve(_task_failed_quoting_the_token, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        t = Transcriber(
            "app",
            SECRET,
            url=f"ws://127.0.0.1:{port}/",
            proxy=None,
            on_error=lambda e: reported.append(str(e)),
        )
        seen = []
        events = t.events()  # from the start: the TaskFailed follows Started at once
        with pytest.raises(AuthenticationError) as info:
            async with t:
                pass
        with pytest.raises(AuthenticationError):
            async for event in events:
                seen.append(event)
    failed = [e for e in seen if isinstance(e, p.TaskFailed)]
    assert len(failed) == 1
    assert "The token '***' has expired!" in failed[0].status_text  # the rest is intact
    assert SECRET not in failed[0].raw_text and SECRET not in json.dumps(failed[0].raw)
    chain = "".join(traceback.format_exception(info.value))
    assert SECRET not in chain and SECRET not in "".join(reported)
    assert leaked(caplog, ignore="websockets.server") == []  # the hostile server logs it


async def test_a_refused_handshake_keeps_no_context_quoting_the_token() -> None:
    def refuse(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(403, f"Meta:ACCESS_DENIED:The token '{SECRET}' is invalid!")

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=refuse) as s:
        port = next(iter(s.sockets)).getsockname()[1]
        with pytest.raises(AuthenticationError) as info:
            async with Transcriber("app", SECRET, url=f"ws://127.0.0.1:{port}/", proxy=None):
                pass
    error = info.value
    assert error.__context__ is None and error.__cause__ is None
    assert "'***'" in error.status_text
    assert SECRET not in "".join(traceback.format_exception(error))


def test_redaction_hides_tokens_where_they_appear_and_nothing_else() -> None:
    url = "ws://127.0.0.1:8765/ws/v1"
    # A short token leaves unrelated text alone...
    assert redact(f"cannot connect to {url}: [Errno 111] refused", "1") == (
        f"cannot connect to {url}: [Errno 111] refused"
    )
    # ...and is still hidden wherever a token goes: header, query, quoted, on its own.
    assert redact("> X-NLS-Token: 1\r\n", "1") == "> X-NLS-Token: ***\r\n"
    assert redact(f"{url}?token=1&x=1", "1") == f"{url}?token=***&x=***"
    assert redact("The token '1' is invalid!", "1") == "The token '***' is invalid!"
    assert redact(f"leaky server says {SECRET}.", SECRET) == "leaky server says ***."
    assert redact(f"{url}?token={SECRET}") == f"{url}?token=***"  # even when not named


async def test_a_short_token_does_not_garble_the_error() -> None:
    async with Gateway(recognizer="span") as gw:
        url = gw.url  # closed again below: nothing listens there
    with pytest.raises(GatewayConnectionError) as info:
        async with Transcriber("app", "1", url=url, proxy=None, connect_timeout=5):
            pass
    assert f"cannot connect to {url}" in str(info.value)


def test_a_registered_secret_is_hidden_at_every_boundary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The boundaries, not the call sites: a log line of any nlsstream logger (a child's
    # records do not pass the parent's filters, so each logger has the filter), and the
    # message of any NlsError, however it was built.
    from nlsstream.errors import TaskFailedError
    from nlsstream.redaction import get_logger, register

    secret = "REGISTERED-secret-41c9"
    register(secret)
    caplog.set_level(logging.DEBUG)
    get_logger("nlsstream.some.module").warning("sent %s to %s", secret, "host")
    [record] = [r for r in caplog.records if r.name == "nlsstream.some.module"]
    assert record.getMessage() == "sent *** to host"  # the rest of the line intact
    error = TaskFailedError(40000000, f"bad {secret} here", "t" * 32)
    assert secret not in str(error) and "bad *** here" in str(error)
    assert secret not in "".join(traceback.format_exception(error))
    # a secret inside a longer word is left alone: nothing else is garbled
    assert f"x{secret}y" in str(GatewayConnectionError(f"x{secret}y"))


def test_short_secrets_are_not_hidden_process_wide() -> None:
    # A test's token "1" must not turn every "sentence 1" into "sentence ***".
    from nlsstream.redaction import register

    register("1", "app")
    assert str(GatewayConnectionError("sentence 1 of app")) == "sentence 1 of app"
