"""``nlsstream transcribe`` with each recording service and with many inputs, run as real
subprocesses over loopback.

Runs that check recognised words use the embedded local gateway (PocketSphinx): each
test starts its own, with timeouts scaled to the audio as in ``test_cli.py``. Runs that
check batch mechanics (skipping, --force, progress) use a gateway with the fast ``span``
recogniser through ``--url``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import (
    CLI,
    FIXTURES,
    HELLO,
    THREE,
    TIMEOUT,
    clean_env,
    parse_subtitles,
    process_timeout,
    run_cli,
    run_together,
    run_with_terminal,
    sphinx_timeout,
)

from nlsstream.cli import main as cli
from nlsstream.gateway import Faults, Gateway

TRANSCRIPTS = json.loads((FIXTURES / "transcripts.json").read_text())
WEATHER = str(FIXTURES / "weather.wav")
TWO = str(FIXTURES / "two_channel.flac")
BOUND = process_timeout(sphinx_timeout(THREE))
NOTICE = re.compile(
    r"nlsstream: no NLS credentials configured; using the embedded local gateway "
    r"\(PocketSphinx\) at http://127\.0\.0\.1:\d+"
)

Run = tuple[int, str, str]


def run_sphinx(**commands: list[str]) -> dict[str, Run]:
    """CLI runs on the embedded PocketSphinx gateway, at once: ``{name: (status, stdout,
    stderr)}``. Each test starts the runs it checks: a module fixture would be built again
    on every xdist worker that runs one of its tests."""
    return run_together(commands, BOUND)


def test_each_recording_service_recognises_a_file() -> None:
    results = run_sphinx(
        flash=["transcribe", HELLO, "--service", "flash"],
        rest=["transcribe", HELLO, "--service", "rest"],
    )
    for name in ("flash", "rest"):
        code, out, err = results[name]
        assert (code, out) == (0, "hello world\n"), err
        assert NOTICE.fullmatch(err.strip()), err


def test_filetrans_gives_a_local_file_to_the_embedded_gateway() -> None:
    code, out, err = run_sphinx(
        filetrans=["transcribe", THREE, "--service", "filetrans", "--words", "--jsonl"]
    )["filetrans"]
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["text"] for e in events] == TRANSCRIPTS["three_sentences.wav"]
    assert {e["type"] for e in events} == {"SentenceEnd"}
    assert {e["channel_id"] for e in events} == {0}
    assert [e["index"] for e in events] == [1, 2, 3]
    words = [w["text"] for e in events for w in e["words"]]
    assert " ".join(words) == " ".join(TRANSCRIPTS["three_sentences.wav"])


def check_channels(folder: Path, ext: str) -> None:
    """One output per channel of two_channel.flac, each with its own phrase."""
    expected = TRANSCRIPTS["two_channel.flac"]
    for channel, phrase in enumerate(expected):
        text = (folder / f"two_channel.ch{channel}.{ext}").read_text()
        cues = parse_subtitles(text, "srt") if ext == "srt" else []
        assert ([c[2] for c in cues] if cues else text.splitlines()) == [phrase]


def test_a_batch_keeps_every_good_output_when_inputs_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("this is not audio")
    folder = tmp_path / "batch"
    # the default service (flash), three good inputs, two bad ones, three at once
    code, out, err = run_sphinx(
        batch=[
            "transcribe",
            HELLO,
            WEATHER,
            str(bad),
            TWO,
            str(tmp_path / "missing.wav"),
            "--output-dir",
            str(folder),
            "--srt",
            "-j",
            "3",
        ]
    )["batch"]
    assert code == 1, err  # not every input succeeded
    assert out == ""
    assert sorted(os.listdir(folder)) == [
        "hello.srt",
        "two_channel.ch0.srt",
        "two_channel.ch1.srt",
        "weather.srt",
    ]  # and no temporary file left behind
    for name, key in (("hello.srt", "hello.wav"), ("weather.srt", "weather.wav")):
        assert [c[2] for c in parse_subtitles((folder / name).read_text(), "srt")] == (
            TRANSCRIPTS[key]
        )
    check_channels(folder, "srt")  # a two-channel file by flash: one output per channel
    lines = err.splitlines()
    bad_lines = [x for x in lines if "bad.wav" in x]
    assert len(bad_lines) == 1
    assert re.fullmatch(r"nlsstream: error: .*could not be decoded: .+", bad_lines[0])
    assert bad_lines[0].count("bad.wav") == 1, bad_lines[0]  # the input is named once
    missing = [x for x in lines if "missing.wav" in x]
    assert len(missing) == 1 and re.fullmatch(r"nlsstream: error: .*not found.*", missing[0])
    assert missing[0].count("missing.wav") == 1, missing[0]
    assert lines[-1] == "nlsstream: 3 of 5 done, 2 failed"
    assert "Traceback" not in err


def test_a_two_channel_file_gives_one_output_per_channel(tmp_path: Path) -> None:
    # (flash's outputs per channel are checked with the batch above)
    folder = tmp_path / "filetrans"
    code, _, err = run_sphinx(
        filetrans_channels=[
            "transcribe",
            TWO,
            "--service",
            "filetrans",
            "--output-dir",
            str(folder),
        ]
    )["filetrans_channels"]
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["two_channel.ch0.txt", "two_channel.ch1.txt"]
    check_channels(folder, "txt")


def test_realtime_batch(tmp_path: Path) -> None:
    folder = tmp_path / "realtime"
    code, _, err = run_sphinx(
        realtime_batch=[
            "transcribe",
            HELLO,
            WEATHER,
            "--service",
            "realtime",
            "--pace",
            "0",
            "--timeout",
            str(sphinx_timeout(THREE)),
            "--output-dir",
            str(folder),
            "--vtt",
        ]
    )["realtime_batch"]
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["hello.vtt", "weather.vtt"]
    cues = parse_subtitles((folder / "weather.vtt").read_text(), "vtt")
    assert [c[2] for c in cues] == TRANSCRIPTS["weather.wav"]
    assert err.splitlines()[-1] == "nlsstream: 2 of 2 done"


# --------------------------------------------------------------------------- span gateway


@pytest.fixture(scope="module")
def span_gateway() -> Iterator[Gateway]:
    """A gateway with the fast span recogniser, accepting any token and AccessKey."""
    with Gateway(recognizer="span").run_in_thread() as gw:
        yield gw


def test_a_rerun_skips_done_inputs_unless_forced(span_gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["transcribe", HELLO, WEATHER, "--output-dir", str(out), "--url", span_gateway.url]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines()[-1] == "nlsstream: 2 of 2 done"
    hello = out / "hello.txt"
    assert hello.read_text().startswith("speech ")  # the span recogniser's sentences
    hello.write_text("kept\n")
    (out / "weather.txt").unlink()
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert second.stderr.splitlines()[-1] == (
        "nlsstream: 1 of 2 done, 1 skipped (output exists; --force redoes them)"
    )
    assert hello.read_text() == "kept\n"
    assert (out / "weather.txt").read_text().startswith("speech ")
    third = run_cli(*args, "--force")
    assert third.returncode == 0, third.stderr
    assert third.stderr.splitlines()[-1] == "nlsstream: 2 of 2 done"
    assert hello.read_text().startswith("speech ")


def test_nothing_to_do_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "hello.jsonl").write_text("{}\n")
    proc = run_cli("transcribe", HELLO, "--jsonl", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    # no embedded gateway was started: no notice
    assert proc.stderr == (
        "nlsstream: 0 of 1 done, 1 skipped (output exists; --force redoes them)\n"
    )


def test_filetrans_to_a_loopback_gateway_gets_file_urls(
    span_gateway: Gateway, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    url = span_gateway.http_url  # an http(s) URL works as --url too
    proc = run_cli(
        "transcribe", HELLO, TWO, "--service", "filetrans", "--output-dir", str(out), "--url", url
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["hello.txt", "two_channel.ch0.txt", "two_channel.ch1.txt"]
    links = [t.task["file_link"] for t in span_gateway.files.tasks.values()][-2:]  # type: ignore[union-attr]
    assert sorted(links) == sorted(Path(p).resolve().as_uri() for p in (HELLO, TWO))


@pytest.fixture(scope="module")
def fixture_server() -> Iterator[str]:
    """The fixtures over HTTP on loopback: the base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(FIXTURES))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.mark.parametrize("service", ["flash", "filetrans"])
def test_urls_are_downloaded_by_the_service(
    span_gateway: Gateway, fixture_server: str, tmp_path: Path, service: str
) -> None:
    urls = [f"{fixture_server}/hello.wav", f"{fixture_server}/weather.wav?v=1"]
    out = tmp_path / "out"
    args = ("--service", service, "--output-dir", str(out), "--url", span_gateway.url)
    proc = run_cli("transcribe", *urls, *args)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["hello.txt", "weather.txt"]
    assert all((out / name).read_text().startswith("speech ") for name in os.listdir(out))


def test_progress_bar_counts_files_on_a_terminal(span_gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("transcribe", HELLO, WEATHER, THREE, "--output-dir", str(out), "-j", "1")
    code, shown, stdout = run_with_terminal(*args, "--url", span_gateway.url, stream="stderr")
    assert code == 0, shown
    assert stdout == ""
    assert re.search(r"\] +0% 0/3 files, 0 failed  0:0\d elapsed", shown), shown
    assert re.search(r"\] +\d+% [12]/3 files, 0 failed  0:0\d elapsed, ETA 0:\d\d", shown), shown
    assert shown.replace("\r\n", "\n").endswith("\r\x1b[2Knlsstream: 3 of 3 done\n"), shown


def test_a_signal_starts_no_more_inputs_and_keeps_what_is_done(
    span_gateway: Gateway, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["transcribe", HELLO, WEATHER, THREE, "--output-dir", str(out), "-j", "1"]
    args += ["--service", "realtime", "--pace", "1", "--url", span_gateway.url]
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "hello.txt").exists():  # the first output is written
            assert proc.poll() is None and time.monotonic() < deadline, "no first output"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    # The input running when the signal came (weather, unless the signal came in the
    # instant between two inputs) was finished; the last was never started.
    last = err.decode().splitlines()[-1]
    summary = re.fullmatch(r"nlsstream: ([12]) of 3 done, ([12]) not started \(interrupted\)", last)
    assert summary is not None, err
    done = int(summary[1])
    assert int(summary[2]) == 3 - done
    assert sorted(os.listdir(out)) == ["hello.txt", "weather.txt"][:done]


def test_filetrans_in_the_cloud_needs_an_access_key() -> None:
    proc = run_cli(
        "transcribe",
        "https://example.com/a.wav",
        "--service",
        "filetrans",
        env=clean_env(NLS_TOKEN="t0k3n-abc", NLS_APPKEY="app"),
    )
    assert proc.returncode == 1 and "ALIYUN_AK_ID and ALIYUN_AK_SECRET" in proc.stderr
    assert "t0k3n-abc" not in proc.stderr


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((HELLO, WEATHER), "several inputs need --output-dir"),
        ((HELLO, "--service", "flash", "--pace", "0"), "--pace applies to --service realtime"),
        (("-", "--service", "filetrans"), "- and --mic are real time"),
        (("https://example.com/a.wav", "--service", "rest"), "not URLs"),
        ((HELLO, "-o", "x.txt", "--output-dir", "d"), "not both"),
        ((HELLO, str(FIXTURES / "sub" / "hello.flac"), "--output-dir", "d"), "would both write"),
        ((HELLO, "-j", "0", "--output-dir", "d"), "-j/--jobs"),
        (("-", HELLO, "--output-dir", "d"), "cannot be one of several"),
    ],
)
def test_usage_errors(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        sys.exit(cli.main(["transcribe", *args]))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_services_and_batch_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["transcribe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--service {realtime,flash,filetrans,rest}", "--output-dir DIR", "--force"):
        assert needle in text
    assert "1 at least one failed" in text


def test_a_transient_failure_is_tried_again(span_gateway: Gateway, tmp_path: Path) -> None:
    """A full decoder pool (52010001) is what a batch of many files meets by design: the
    input is tried again rather than lost."""
    span_gateway.queue_faults(Faults(fail_status=52010001))  # the first request only
    out = tmp_path / "out"
    proc = run_cli("transcribe", HELLO, "--output-dir", str(out), "--url", span_gateway.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "nlsstream: 1 of 1 done"
    assert (out / "hello.txt").read_text().startswith("speech ")
