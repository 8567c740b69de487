"""Progress of one recording (issue 20.7): the recording clients' upload hook, and the
phases ``nlsstream transcribe`` shows for flash, rest and filetrans on a terminal (and
not when stderr is piped). Everything runs against a loopback gateway with the fast
``span`` recogniser."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from helpers import AK_ID, AK_SECRET, APPKEY, HELLO, THREE, TOKEN, clean_env, run_cli
from helpers import run_with_terminal as terminal_run

from nlsstream import FlashRecognizer, RestRecognizer
from nlsstream.gateway import Gateway


@pytest.fixture(scope="module")
def span_gateway() -> Iterator[Gateway]:
    """A gateway with the fast span recogniser, accepting any token and AccessKey."""
    with Gateway(recognizer="span").run_in_thread() as gw:
        yield gw


@pytest.mark.parametrize("client", [FlashRecognizer, RestRecognizer])
async def test_on_progress_reports_the_upload_from_start_to_end(
    span_gateway: Gateway, client: type[FlashRecognizer] | type[RestRecognizer]
) -> None:
    calls: list[tuple[int, int]] = []
    async with client(APPKEY, TOKEN, span_gateway.http_url) as c:
        plain = await c.recognize(THREE)
        shown = await c.recognize(THREE, on_progress=lambda s, t: calls.append((s, t)))
    assert shown.text == plain.text != ""
    total = calls[0][1]
    assert total > 4 * 65536  # three_sentences.wav: several pieces
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    sent = [s for s, _ in calls]
    assert sent == sorted(sent) and len(sent) >= 5


def _steps(shown: str) -> list[str]:
    """The progress lines a terminal was shown, in order (each redraw clears the line)."""
    return [s.strip() for s in shown.split("\r\x1b[2K") if s.strip()]


@pytest.mark.parametrize("service", ["flash", "rest"])
def test_one_recording_shows_upload_then_recognising_on_a_terminal(
    span_gateway: Gateway, service: str
) -> None:
    args = ("transcribe", THREE, "--service", service, "--url", span_gateway.http_url)
    code, shown, stdout = terminal_run(*args, stream="stderr")
    assert code == 0, shown
    assert stdout.startswith("speech ")
    steps = _steps(shown)
    uploading = [i for i, s in enumerate(steps) if re.match(r"\[[#-]+\] +\d+% uploading ", s)]
    assert uploading, steps
    assert re.match(r"\[[#-]+\] +0% uploading 0\.0/0\.3 MB  0:0\d elapsed", steps[uploading[0]])
    recognising = [i for i, s in enumerate(steps) if re.match(r"recognising  0:0\d elapsed$", s)]
    assert recognising and recognising[0] > uploading[-1], steps
    assert shown.endswith("\r\x1b[2K"), shown  # the line is erased at the end


def test_filetrans_shows_the_task_and_its_status_on_a_terminal(span_gateway: Gateway) -> None:
    args = ("transcribe", HELLO, "--service", "filetrans", "--url", span_gateway.http_url)
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET)
    code, shown, stdout = terminal_run(*args, stream="stderr", env=env)
    assert code == 0, shown
    assert stdout.startswith("speech ")
    steps = _steps(shown)
    assert any(re.match(r"submitting  0:0\d elapsed$", s) for s in steps), steps
    task = r"FileTrans task [0-9a-f]{32} (queueing|running)  0:0\d elapsed$"
    assert any(re.match(task, s) for s in steps), steps


@pytest.mark.parametrize("service", ["flash", "filetrans"])
def test_no_progress_when_stderr_is_piped(span_gateway: Gateway, service: str) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET)
    proc = run_cli(
        "transcribe", HELLO, "--service", service, "--url", span_gateway.http_url, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout.startswith("speech ")


def test_no_progress_with_no_progress_on_a_terminal(span_gateway: Gateway) -> None:
    args = ("transcribe", HELLO, "--url", span_gateway.http_url, "--no-progress")
    code, shown, stdout = terminal_run(*args, stream="stderr")
    assert code == 0 and shown == "" and stdout.startswith("speech ")
