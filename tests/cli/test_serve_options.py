"""``nlsstream serve --max-decoders / --decoder-wait / --fault SPEC``, and the SPEC parser
behind ``--fault`` (:func:`nlsstream.gateway.faults.parse_faults`)."""

from __future__ import annotations

import signal
from typing import Any

import numpy as np
import pytest
from helpers import RawTask, read_pcm
from test_cli_serve import SECRET, finish, start_server
from websockets.asyncio.client import connect

from nlsstream.cli.main import main
from nlsstream.gateway.faults import Faults, parse_faults

# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("drop", Faults(drop_at="start")),
        ("drop@audio+2s", Faults(drop_at="audio", drop_after_bytes=64000)),
        ("stall@audio+1500ms", Faults(stall_at="audio", stall_after_bytes=48000)),
        ("malformed@audio+3200b", Faults(malformed_at="audio", malformed_after_bytes=3200)),
        ("malformed@stop", Faults(malformed_at="stop")),
        ("fail=40000005", Faults(fail_status=40000005)),
        ("fail=52010001@stop", Faults(fail_status=52010001, fail_at="stop")),
        ("delay=2", Faults(start_delay=2.0)),
        ("delay=0.5@stop", Faults(complete_delay=0.5)),
        ("delay=1@event", Faults(event_delay=1.0)),
        ("http=503", Faults(http_status=503)),
    ],
)
def test_a_fault_spec_is_the_faults_it_names(spec: str, expected: Faults) -> None:
    assert parse_faults([spec]) == (expected, None)
    # once: the next connection only; the others get nothing.
    assert parse_faults([f"once:{spec}"]) == (Faults(), expected)


def test_fault_specs_combine_and_once_adds_to_every() -> None:
    every, once = parse_faults(["delay=1@start", "once:fail=40000005@audio+100ms"])
    assert every == Faults(start_delay=1.0)
    assert once == Faults(
        start_delay=1.0, fail_status=40000005, fail_at="audio", fail_after_bytes=3200
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("boom", "WHAT is drop, stall"),
        ("drop@later", "WHEN is start, stop or audio"),
        ("drop@audio", "WHEN is start, stop or audio"),
        ("drop@start+2s", "WHEN is start, stop or audio"),
        ("drop@audio+2", "needs N with a unit"),
        ("drop@audio+-5ms", "needs N with a unit"),
        ("fail", "fail takes a status"),
        ("fail=abc", "fail takes a status"),
        ("stall=3", "stall takes no ="),
        ("delay=soon", "delay takes seconds"),
        ("delay=-1", "delay takes seconds"),
        ("delay=1@audio", "delay takes seconds"),
        ("http=99", "http takes an HTTP status"),
        ("http=500@start", "http takes an HTTP status"),
    ],
)
def test_a_bad_fault_spec_is_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_faults([spec])
    assert repr(spec) in str(info.value)


def test_conflicting_fault_specs_are_an_error() -> None:
    with pytest.raises(ValueError, match="conflicts"):
        parse_faults(["drop@start", "drop@stop"])


# --------------------------------------------------------------------------- serve


def test_serve_help_documents_the_fault_syntax_with_examples(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--max-decoders", "--decoder-wait", "[once:]WHAT[@WHEN]", "--fault drop@"):
        assert text in out, text
    assert out.count("--fault ") >= 3  # the option and two examples
    for example in [line.split("--fault ")[1].split()[0] for line in out.splitlines()[-2:]]:
        parse_faults([example])  # the examples parse


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault", "boom"], "fault 'boom'"),
        (["--max-decoders", "0"], "--max-decoders must be >= 1"),
        (["--decoder-wait", "-1"], "--decoder-wait"),
        (["--light", "--fault", "drop"], "apply to the full gateway"),
    ],
)
def test_serve_rejects_bad_options(capsys: Any, args: list[str], message: str) -> None:
    assert main(["serve", "--port", "0", *args]) == 2
    assert message in capsys.readouterr().err


async def test_serve_fault_once_fails_the_next_task_only() -> None:
    proc, url = start_server("--recognizer", "span", "--fault", "once:fail=40000005@start")
    try:
        pcm, _ = read_pcm("hello.wav")
        for expected in (40000005, 20000000):
            async with connect(url, additional_headers={"X-NLS-Token": SECRET}) as ws:
                task = RawTask(ws)
                started = await task.start()
                assert started["header"]["status"] == expected
        async with connect(url, additional_headers={"X-NLS-Token": SECRET}) as ws:
            task = RawTask(ws)
            await task.start()
            await task.audio(pcm)
            await task.stop()
            assert (await task.until_end())[-1]["header"]["name"] == "TranscriptionCompleted"
    finally:
        finish(proc, signal.SIGINT)


async def test_serve_max_decoders_bounds_the_pool_and_the_error_names_the_option() -> None:
    proc, url = start_server("--recognizer", "span", "--max-decoders", "1", "--decoder-wait", "0.3")
    loud = np.random.default_rng(2).integers(-20000, 20000, 16000, dtype=np.int16).tobytes()
    headers = {"X-NLS-Token": SECRET}
    try:
        async with (
            connect(url, additional_headers=headers) as ws_a,
            connect(url, additional_headers=headers) as ws_b,
        ):
            a = RawTask(ws_a, "SpeechRecognizer")
            b = RawTask(ws_b, "SpeechRecognizer")
            await a.start(enable_intermediate_result=True)
            await a.audio(loud)  # A's utterance holds the only decoder
            await a.recv()
            await b.start()
            await b.audio(loud)
            failed = (await b.until_end())[-1]["header"]
            assert failed["status"] == 52010001
            assert "at most 1 sentences" in failed["status_text"]
            assert "--max-decoders" in failed["status_text"]
            await a.stop()
            assert (await a.until_end())[-1]["header"]["name"] == "RecognitionCompleted"
    finally:
        finish(proc, signal.SIGINT)
