"""The ``nlsstream`` command line, run as a real subprocess (``python -m nlsstream``).

No credentials are in the environment, so transcribe/recognize use the embedded local
gateway (PocketSphinx) unless given ``--url``. Runs that check recognised words use it,
with timeouts scaled to the audio (:func:`sphinx_timeout`); runs that check output
formats or signals use a gateway with the fast ``span`` recogniser instead. The slower
runs are started together by one fixture and checked by several tests.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from helpers import (
    AK_ID,
    AK_SECRET,
    CLI,
    FIXTURES,
    HELLO,
    THREE,
    TIMEOUT,
    FakeTokenService,
    clean_env,
    parse_subtitles,
    process_timeout,
    readline_within,
    run_cli,
    run_together,
    run_with_terminal,
    sphinx_args,
    sphinx_timeout,
)

from nlsstream import __version__
from nlsstream.audio import load_file
from nlsstream.cli import main as cli
from nlsstream.gateway import Faults, Gateway

EXPECTED = json.loads((FIXTURES / "transcripts.json").read_text())["three_sentences.wav"]
NOTICE = re.compile(
    r"nlsstream: no NLS credentials configured; using the embedded local gateway "
    r"\(PocketSphinx\) at ws://127\.0\.0\.1:\d+/ws/v1"
)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 1 and exactly one line on stderr: ``nlsstream: error: ...``."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nlsstream: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- slow runs


@pytest.fixture
def span_gateway() -> Iterator[Gateway]:
    """A gateway with the fast, deterministic span recogniser, accepting any token."""
    with Gateway(recognizer="span").run_in_thread() as gw:
        yield gw


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[object, ...]]]:
    """Start the slower CLI runs all at once; yields
    ``{name: (returncode, stdout, stderr)}``, plus ``"jsonl_file": (its text,)`` and
    ``"span": (the sentences the span gateway recognised in THREE,)``.

    Only "text" and "recognize" need real words (PocketSphinx, one process each); the
    output-format runs use a span gateway."""
    tmp = tmp_path_factory.mktemp("cli")
    jsonl_file = tmp / "out.jsonl"
    with Gateway(recognizer="span").run_in_thread() as gw:
        span = ["transcribe", THREE, "--pace", "0", "--url", gw.url]
        commands = {
            "text": ["transcribe", *sphinx_args(THREE)],
            "recognize": ["recognize", *sphinx_args(HELLO)],
            "jsonl": [*span, "--jsonl", "-o", str(jsonl_file)],
            "srt": [*span, "--srt"],
            "vtt": [*span, "--vtt", "--intermediate"],
        }
        results: dict[str, tuple[object, ...]] = dict(
            run_together(commands, process_timeout(sphinx_timeout(THREE)))
        )
        sentences = [s.sentences for s in gw.sessions]
    assert len(sentences) == 3 and sentences[0] == sentences[1] == sentences[2], sentences
    assert len(sentences[0]) == len(EXPECTED), sentences  # one per spoken sentence
    results["span"] = (sentences[0],)
    results["jsonl_file"] = (jsonl_file.read_text() if jsonl_file.exists() else "",)
    yield results


def test_transcribe_prints_sentences_and_one_notice(runs: dict[str, tuple[object, ...]]) -> None:
    code, out, err = runs["text"]
    assert code == 0, err
    assert str(out).splitlines() == EXPECTED  # plain text: not a terminal, finals only
    lines = str(err).splitlines()
    assert len(lines) == 1 and NOTICE.fullmatch(lines[0]), err


def test_jsonl_to_file_has_every_event(runs: dict[str, tuple[object, ...]]) -> None:
    code, out, err = runs["jsonl"]
    assert code == 0, err
    assert out == ""  # -o FILE: nothing on stdout
    (text,) = runs["jsonl_file"]
    events = [json.loads(line) for line in str(text).splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == "Started" and types[-1] == "Completed"
    ends = [e for e in events if e["type"] == "SentenceEnd"]
    assert [e["text"] for e in ends] == runs["span"][0]
    assert [e["index"] for e in ends] == [1, 2, 3]
    assert all(0 <= e["begin_time"] < e["time"] for e in ends)
    assert len({e["task_id"] for e in events}) == 1
    assert "ResultChanged" not in types  # intermediate results are off unless asked for


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles(runs: dict[str, tuple[object, ...]], fmt: str) -> None:
    code, out, err = runs[fmt]
    assert code == 0, err
    cues = parse_subtitles(str(out), fmt)
    assert [c[2] for c in cues] == runs["span"][0]
    times = [t for start, end, _ in cues for t in (start, end)]
    assert times == sorted(times) and times[-1] <= 9300  # in order, within the audio


def test_recognize_sentence_mode(runs: dict[str, tuple[object, ...]]) -> None:
    code, out, err = runs["recognize"]
    assert code == 0, err
    assert out == "hello world\n"


# --------------------------------------------------------------------------- quick runs


def _encode(path: str, fmt: str, subtype: str | None, rate: int, channels: int) -> bytes:
    data, source_rate = sf.read(path, dtype="float64")
    if rate != source_rate:
        data = soxr.resample(data, source_rate, rate)
    if channels == 2:
        data = np.column_stack([data, data])
    out = io.BytesIO()
    sf.write(out, data, rate, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["raw-pcm-8k", "mp3"])
def test_stdin_is_recognised(kind: str) -> None:
    if kind == "mp3":
        if "MP3" not in sf.available_formats():
            pytest.skip("libsndfile without MP3")
        data, rate = _encode(HELLO, "MP3", None, 16000, 1), 16000
    else:
        data, rate = load_file(HELLO, 8000), 8000
    timeout = sphinx_timeout(HELLO)
    proc = run_cli(
        "transcribe",
        "-",
        "--pace",
        "0",
        "--timeout",
        str(timeout),
        "--sample-rate",
        str(rate),
        input=data,
        timeout=process_timeout(timeout),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello world\n"


def test_stdin_odd_length_is_a_clear_error() -> None:
    proc = run_cli("transcribe", "-", "--pace", "0", input=b"\0\0\0")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("nlsstream: error: "), proc.stderr
    assert "mid-sample" in lines[-1] and "Traceback" not in proc.stderr


# Usage errors and help run in-process (argparse only, nothing to start): fast.


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "COMMAND"),
        (("transcribe",), "give an audio FILE"),
        (("transcribe", HELLO, "--mic"), "not both"),
        (("transcribe", HELLO, "--device", "1"), "--device needs --mic"),
        (("transcribe", HELLO, "--pace", "-1"), "--pace"),
        (("transcribe", HELLO, "--srt", "--vtt"), "not allowed with"),
        (("transcribe", HELLO, "--sample-rate", "44100"), "--sample-rate"),
        (("transcribe", HELLO, "--max-sentence-silence", "50"), "200..6000"),
        (("transcribe", HELLO, "--timeout", "0"), "--timeout"),
        (("recognize",), "FILE|-"),
        (("recognize", HELLO, "--mic"), "unrecognized arguments: --mic"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        sys.exit(cli.main(list(args)))
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert message in err
    assert out == ""


@pytest.mark.parametrize("command", [None, "transcribe", "recognize", "serve", "token"])
def test_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*([command] if command else []), "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nlsstream" + (f" {command}" if command else ""))
    if command in ("transcribe", "recognize"):
        assert "NLS_TOKEN" in out  # --token's help points to the environment instead
        assert "130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM" in " ".join(out.split())


def test_entry_point_version_and_usage_status() -> None:
    proc = run_cli("--version")
    assert (proc.returncode, proc.stdout.strip()) == (0, f"nlsstream {__version__}")
    proc = run_cli("transcribe", "--pace", "fast", HELLO)
    assert proc.returncode == 2 and "--pace" in proc.stderr


def test_missing_file_is_one_line_before_any_connection(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    assert_one_line_error(run_cli("transcribe", str(missing)), "not found", "nope.wav")


def test_unreadable_audio_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.wav"
    bogus.write_text("this is not audio")
    assert_one_line_error(run_cli("recognize", str(bogus)), "cannot read audio file")


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "out.srt"
    assert_one_line_error(run_cli("transcribe", HELLO, "--srt", "-o", str(target)), "out.srt")


def test_wrong_token_is_one_line_without_the_token() -> None:
    secret = "wrong-token-3f9a1c"
    with Gateway(tokens=["right"], recognizer="span").run_in_thread() as gw:
        proc = run_cli(
            "transcribe", HELLO, "--pace", "0", "--url", gw.url, env=clean_env(NLS_TOKEN=secret)
        )
    line = assert_one_line_error(proc, "rejected the token", "403")
    assert secret not in proc.stderr + proc.stdout, line


def test_unreachable_gateway_is_one_line() -> None:
    with Gateway(recognizer="span").run_in_thread() as gw:
        url = gw.url  # a port that was just free and is closed again below
    proc = run_cli("transcribe", HELLO, "--pace", "0", "--url", url, "--timeout", "5")
    assert_one_line_error(proc, "cannot connect")


def test_config_error_is_one_line() -> None:
    proc = run_cli("transcribe", HELLO, env=clean_env(ALIYUN_AK_ID="LTAIxyz"))
    assert_one_line_error(proc, "ALIYUN_AK_SECRET")


def live_wav_header(rate: int = 16000) -> bytes:
    """A WAV header as live recorders (arecord) write it: PCM16 mono, length unknown."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", 16) + fmt + b"data\xff\xff\xff\xff"


@pytest.mark.parametrize(
    ("sig", "status", "header"),
    [(signal.SIGINT, 130, b""), (signal.SIGTERM, 143, live_wav_header())],
    ids=["SIGINT-raw-pcm", "SIGTERM-live-wav"],
)
def test_a_signal_stops_cleanly_keeping_the_sentences(
    span_gateway: Gateway, sig: signal.Signals, status: int, header: bytes
) -> None:
    # stdin stays open, as with a live source: only the signal ends the session. A live
    # WAV stream is sent as it comes, not read to an end that never comes.
    proc = subprocess.Popen(
        [*CLI, "transcribe", "-", "--pace", "0", "--url", span_gateway.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(header + load_file(THREE, 16000))
        proc.stdin.flush()
        first = readline_within(proc.stdout, TIMEOUT).decode()  # once a sentence is final
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    lines = [first.rstrip("\n"), *rest.decode().splitlines()]
    # Finals already due are still printed; a sentence cut by the Stop just after it
    # began may have no text, and empty finals are not printed.
    sentences = [text for text in span_gateway.sessions[-1].sentences if text]
    assert lines == sentences[: len(lines)]
    assert "Traceback" not in err.decode()


def test_token_needs_an_access_key() -> None:
    proc = run_cli("token", env=clean_env(NLS_TOKEN="abc"))
    assert_one_line_error(proc, "ALIYUN_AK_ID and ALIYUN_AK_SECRET")


def test_token_prints_only_the_token(service: FakeTokenService) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET)
    proc = run_cli("token", "--endpoint", service.url, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"token-1-[0-9a-f]{32}\n", proc.stdout)
    assert "expires" in proc.stderr and AK_SECRET not in proc.stderr
    assert len(service.requests) == 1


def test_token_rejected_key_is_one_line(service: FakeTokenService) -> None:
    env = clean_env(ALIYUN_AK_ID="LTAIunknown", ALIYUN_AK_SECRET=AK_SECRET)
    proc = run_cli("token", "--endpoint", service.url, env=env)
    assert_one_line_error(proc, "InvalidAccessKeyId.NotFound")
    assert AK_SECRET not in proc.stderr


def test_live_output_on_a_terminal() -> None:
    code, shown, err = run_with_terminal("transcribe", *sphinx_args(HELLO), stream="stdout")
    assert code == 0, err
    # Partials are rewritten in place (CR + clear line); the final is a line of its own.
    assert "\r\x1b[2K" in shown
    assert shown.replace("\r\n", "\n").endswith("\r\x1b[2Khello world\n")


def test_progress_bar_on_a_terminal() -> None:
    code, shown, out = run_with_terminal("transcribe", *sphinx_args(HELLO), stream="stderr")
    assert code == 0
    assert out == "hello world\n"
    assert "] 100% sent" in shown and "\r" in shown
    assert NOTICE.search(shown)


def test_a_progress_bar_with_elapsed_and_eta_when_writing_a_file(
    span_gateway: Gateway, tmp_path: Path
) -> None:
    target = tmp_path / "out.txt"
    args = ("transcribe", HELLO, "--pace", "2", "--url", span_gateway.url, "-o", str(target))
    code, shown, out = run_with_terminal(*args, stream="stderr")
    assert code == 0, shown
    assert out == ""
    assert target.read_text() == "".join(f"{s}\n" for s in span_gateway.sessions[-1].sentences)
    assert re.search(r"\] +\d+% sent  0:0\d elapsed, ETA 0:0\d", shown), shown
    assert re.search(r"\] 100% sent  0:0\d elapsed", shown), shown


# --------------------------------------------------------------------------- -o FILE


def test_a_failed_run_destroys_no_output_file(tmp_path: Path) -> None:
    target = tmp_path / "x.srt"
    target.write_text("keep\n")
    missing = tmp_path / "missing.wav"
    assert_one_line_error(run_cli("transcribe", str(missing), "--srt", "-o", str(target)))
    with Gateway(recognizer="span").run_in_thread() as gw:
        url = gw.url  # closed again: the run fails after the output was opened
    proc = run_cli(
        "transcribe", HELLO, "--service", "realtime", "--srt", "-o", str(target), "--url", url
    )
    assert_one_line_error(proc, "cannot connect")
    assert target.read_text() == "keep\n"
    assert os.listdir(tmp_path) == ["x.srt"]  # no temporary file left behind


def test_a_successful_run_replaces_the_output_file_whole(
    span_gateway: Gateway, tmp_path: Path
) -> None:
    target = tmp_path / "x.srt"
    target.write_text("old subtitles\n")
    target.chmod(0o640)
    args = ("--service", "realtime", "--srt", "-o", str(target), "--url", span_gateway.url)
    proc = run_cli("transcribe", HELLO, *args)
    assert proc.returncode == 0, proc.stderr
    cues = parse_subtitles(target.read_text(), "srt")
    assert [c[2] for c in cues] == span_gateway.sessions[-1].sentences != []
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["x.srt"]


# --------------------------------------------------------------------------- standard input


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 16000, 1),  # streamed as it comes
        ("WAV", "FLOAT", 44100, 2),  # decoded whole
        ("FLAC", None, 16000, 1),
        ("OGG", "VORBIS", 22050, 1),
        ("MP3", None, 16000, 1),
    ],
)
def test_containers_on_stdin_are_decoded(
    span_gateway: Gateway, fmt: str, subtype: str | None, rate: int, channels: int
) -> None:
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile without {fmt}")
    data = _encode(HELLO, fmt, subtype, rate, channels)
    proc = run_cli("transcribe", "-", "--pace", "0", "--url", span_gateway.url, input=data)
    assert proc.returncode == 0, proc.stderr
    sent = span_gateway.sessions[-1].audio_bytes
    expected = len(load_file(HELLO, 16000))
    if (fmt, rate) == ("WAV", 16000):
        assert sent == expected  # exactly the samples: the header is not audio
    else:
        assert abs(sent - expected) < 0.1 * expected  # codec padding aside, the same audio


def test_empty_stdin_is_a_clear_error() -> None:
    proc = run_cli("transcribe", "-", input=b"")
    assert_one_line_error(proc, "standard input is empty")


def test_silence_says_no_speech_was_recognised(span_gateway: Gateway) -> None:
    silence = b"\0\0" * 16000
    proc = run_cli("transcribe", "-", "--pace", "0", "--url", span_gateway.url, input=silence)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == "nlsstream: no speech recognised\n"


def test_punctuation_and_itn_on_the_local_gateway_are_said_to_be_ignored() -> None:
    proc = run_cli("transcribe", "-", "--pace", "0", "--punctuation", "--itn", input=b"\0\0" * 800)
    assert proc.returncode == 0, proc.stderr
    ignored = "nlsstream: the local gateway ignores --punctuation and --itn (cloud only)"
    assert proc.stderr.count(ignored) == 1, proc.stderr


def test_a_short_token_does_not_garble_the_error() -> None:
    with Gateway(recognizer="span").run_in_thread() as gw:
        url = gw.url  # closed again: nothing listens there
    args = ("--service", "realtime", "--url", url, "--token", "1", "--timeout", "5")
    proc = run_cli("transcribe", HELLO, *args)
    assert_one_line_error(proc, f"cannot connect to {url}")


def test_a_dropped_connection_is_resumed_and_said_once(span_gateway: Gateway) -> None:
    span_gateway.queue_faults(Faults(drop_at="audio", drop_after_bytes=2 * 16000 * 4))
    proc = run_cli(
        "transcribe", THREE, "--service", "realtime", "--pace", "0", "--url", span_gateway.url
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(EXPECTED)
    resumed = [line for line in proc.stderr.splitlines() if "resumed on a new connection" in line]
    assert len(resumed) == 1 and "lost during task" in resumed[0], proc.stderr
