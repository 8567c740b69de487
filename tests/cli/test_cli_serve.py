"""``nlsstream serve`` as a real subprocess: prints its URL, serves, logs one line per
session without the token, and exits cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytest
from helpers import (
    AK_ID,
    AK_SECRET,
    FIXTURES,
    FRAME,
    RawTask,
    directive,
    events_until,
    names,
    read_pcm,
    readline_within,
    recv_json,
    start,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nlsstream import FileTranscriber, PopError
from nlsstream.cli.main import main
from nlsstream.realtime.protocol import TRANSCRIBER, new_id

SECRET = "cli-secret-token-42"


def start_server(
    *extra: str, token_arg: bool = True, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    token = ["--token", SECRET] if token_arg else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "nlsstream", "serve", "--port", "0", *token, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert proc.stdout is not None
    line = readline_within(proc.stdout, 30)  # once listening (or the process died)
    match = re.search(r"ws://127\.0\.0\.1:\d+/ws/v1", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"no URL printed: {line!r} {proc.communicate()}")
    return proc, match.group(0)


def finish(proc: subprocess.Popen[str], sig: int) -> tuple[str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_serve_runs_a_session_and_stops_cleanly(sig: int) -> None:
    proc, url = start_server("--recognizer", "span", "--appkey", "cli-app", "--log-level", "info")
    try:
        pcm, _ = read_pcm("hello.wav")
        async with connect(url, additional_headers={"X-NLS-Token": SECRET}) as ws:
            task = RawTask(ws, appkey="cli-app")
            await task.start()
            await task.audio(pcm)
            await task.stop()
            assert names(await task.until_end())[-1] == "TranscriptionCompleted"
        with pytest.raises(InvalidStatus):
            async with connect(url, additional_headers={"X-NLS-Token": "wrong"}):
                pass
    finally:
        out, err = finish(proc, sig)
    output = out + err
    assert SECRET not in output
    session_lines = [line for line in err.splitlines() if "session task=" in line]
    assert len(session_lines) == 1
    assert task.task_id in session_lines[0]
    assert "audio=1.24s" in session_lines[0] and "sentences=1" in session_lines[0]
    assert "status=20000000" in session_lines[0]
    assert "gateway stopped after 1 sessions" in err


def test_serve_rejects_a_busy_port() -> None:
    proc, url = start_server("--recognizer", "span")
    try:
        port = url.rsplit(":", 1)[1].split("/")[0]
        other = subprocess.run(
            [sys.executable, "-m", "nlsstream", "serve", "--port", port, "--recognizer", "span"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert other.returncode == 1
        assert "cannot listen" in other.stderr
    finally:
        finish(proc, signal.SIGINT)


def test_cli_without_subcommand_prints_help(capsys: Any) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_serve_help(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--idle-timeout" in out
    # Every limit the gateway enforces, with what a client then sees.
    for limit in ("1009", "40000004", "41010104", "52010001", "8190", "404", "403"):
        assert limit in out, limit


@pytest.mark.parametrize("light", [False, True], ids=["full", "light"])
async def test_serve_takes_its_tokens_from_the_environment(light: bool) -> None:
    """NLS_GATEWAY_TOKEN keeps the token off the command line (and out of ``ps``)."""
    extra = ("--light",) if light else ()
    env = {"NLS_GATEWAY_TOKEN": f"other,{SECRET}"}
    proc, url = start_server(*extra, token_arg=False, env=env)
    try:
        assert SECRET not in " ".join(proc.args)  # type: ignore[arg-type]
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"X-NLS-Token": "wrong"}):
                pass
        assert info.value.response.status_code == 403
        async with connect(url, additional_headers={"X-NLS-Token": SECRET}) as ws:
            task = RawTask(ws)
            assert (await task.start())["header"]["name"] == "TranscriptionStarted"
    finally:
        finish(proc, signal.SIGINT)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_serve_light_checks_token_and_appkey_and_stops_cleanly(sig: int) -> None:
    proc, url = start_server("--light", "--appkey", "cli-app", "--idle-timeout", "5")
    try:
        headers = {"X-NLS-Token": SECRET}
        async with connect(url, additional_headers=headers) as ws:
            task_id = new_id()
            await ws.send(start(task_id, appkey="cli-app"))
            assert (await recv_json(ws))["header"]["name"] == "TranscriptionStarted"
            for _ in range(60):  # 1.2 s: one whole sentence and a tail
                await ws.send(FRAME)
            await ws.send(directive(TRANSCRIBER.name, TRANSCRIBER.stop, task_id, appkey="cli-app"))
            events = await events_until(ws, "TranscriptionCompleted")
        assert names(events) == ["SentenceBegin", "SentenceEnd"] * 2 + ["TranscriptionCompleted"]
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(start(new_id(), appkey="other-app"))
            assert (await recv_json(ws))["header"]["status"] == 40020105
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"X-NLS-Token": "wrong"}):
                pass
        assert info.value.response.status_code == 403
    finally:
        out, err = finish(proc, sig)
    assert SECRET not in out + err
    assert "light gateway stopped after 1 sessions (1 completed)" in err


def test_serve_light_refuses_a_recognizer(capsys: Any) -> None:
    assert main(["serve", "--light", "--recognizer", "span", "--port", "0"]) == 2
    assert "--recognizer" in capsys.readouterr().err


def test_serve_light_control_needs_a_token(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("NLS_GATEWAY_TOKEN", raising=False)
    assert main(["serve", "--light", "--control", "--port", "0"]) == 2
    assert "--control requires a token" in capsys.readouterr().err


def test_light_options_need_light(capsys: Any) -> None:
    assert main(["serve", "--sentence-ms", "500", "--port", "0"]) == 2
    assert "--sentence-ms applies to --light" in capsys.readouterr().err


def test_serve_light_writes_its_stats_and_serves_control(tmp_path: Any) -> None:
    """The light gateway's own options live on ``serve --light``: --sentence-ms,
    --control (with the token), --stats-file on exit."""
    import json
    import urllib.request

    stats_file = tmp_path / "stats.json"
    proc, url = start_server(
        "--light", "--sentence-ms", "500", "--control", "--stats-file", str(stats_file)
    )
    try:
        base = url.replace("ws://", "http://").removesuffix("/ws/v1")
        request = urllib.request.Request(base + "/stats", headers={"X-NLS-Token": SECRET})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer)["overall"]["sessions"] == 0
    finally:
        finish(proc, signal.SIGINT)
    stats = json.loads(stats_file.read_text())
    assert stats["overall"]["sessions"] == 0
    assert "loop" in stats


@pytest.mark.parametrize("from_env", [False, True])
async def test_serve_lists_every_endpoint_and_checks_access_keys(from_env: bool) -> None:
    pair = f"{AK_ID}:{AK_SECRET}"
    if from_env:
        proc, url = start_server("--recognizer", "span", env={"NLS_GATEWAY_ACCESS_KEYS": pair})
    else:
        proc, url = start_server("--recognizer", "span", "--access-key", pair)
    try:
        assert proc.stdout is not None
        # The lines came with the first one (maybe already in the pipe's reader buffer,
        # where select() cannot see them): read them in a thread, bounded.
        lines = [
            await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10) for _ in "1234"
        ]
        listed = [line.split()[0] for line in lines]
        base = url.replace("ws://", "http://").removesuffix("/ws/v1")
        assert listed == [
            url,
            f"{base}/stream/v1/FlashRecognizer",
            f"{base}/stream/v1/asr",
            base + "/",
        ]
        link = (FIXTURES / "hello.wav").as_uri()
        async with FileTranscriber(AK_ID, AK_SECRET, appkey="a", endpoint=base) as ft:
            result = await ft.transcribe(link, timeout=60)
        assert result.text.startswith("speech ")
        async with FileTranscriber(AK_ID, "wrong", appkey="a", endpoint=base) as ft:
            with pytest.raises(PopError, match="SignatureDoesNotMatch"):
                await ft.submit(link)
    finally:
        out, err = finish(proc, signal.SIGTERM)
    assert AK_SECRET not in out + err
