"""What the command line says when something is wrong (issue 20.8): the options to use,
never the Python API; what a path is; why a file cannot be decoded; how to fetch a
FileTrans result later (``nlsstream result``); no ``ssl:default`` on plain http; no
password of a URL; how to configure a token that was missing. Run as real processes
against a loopback gateway with the fast ``span`` recogniser, or a closed port."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import AK_ID, AK_SECRET, HELLO, THREE, clean_env, run_cli

from nlsstream.gateway import Gateway

TOKEN = "good-token-123"
PYTHON_NAMES = re.compile(r"FileTranscriber|proxy=|Recognizer or")


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """A span gateway that takes one token (any AccessKey)."""
    with Gateway(recognizer="span", tokens=[TOKEN]).run_in_thread() as gw:
        yield gw


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("nlsstream: error: ")]
    assert len(lines) == 1, stderr
    return lines[0].removeprefix("nlsstream: error: ")


def test_too_long_for_rest_names_the_services_to_use(tmp_path: Path) -> None:
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(61 * 8000, dtype=np.int16), 8000, subtype="PCM_16")
    proc = run_cli("transcribe", str(long), "--service", "rest", "--url", closed_url())
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert line.endswith("--service rest takes at most 60 s: use --service flash or filetrans")
    assert not PYTHON_NAMES.search(line), line


def test_too_large_for_flash_names_filetrans(tmp_path: Path) -> None:
    big = tmp_path / "big.wav"
    with big.open("wb") as f:  # sparse: the size is checked before anything is read
        f.truncate(101 * 1024 * 1024)
    proc = run_cli("transcribe", str(big), "--url", closed_url())
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert line == (
        "the recording is 105.9 MB; --service flash takes at most 100 MB: use --service filetrans"
    )


def test_an_unusable_proxy_names_the_option() -> None:
    proxy = "socks5://user:proxypass9@127.0.0.1:9"
    proc = run_cli("transcribe", HELLO, "--proxy", proxy, "--url", "http://example.invalid")
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert "give --proxy none to connect directly" in line
    assert "proxypass9" not in proc.stderr and not PYTHON_NAMES.search(line), line


@pytest.mark.parametrize("service", ["flash", "rest", "filetrans"])
def test_a_directory_is_called_a_directory(tmp_path: Path, service: str) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET)
    proc = run_cli(
        "transcribe", str(tmp_path), "--service", service, "--url", closed_url(), env=env
    )
    assert proc.returncode == 1
    assert error_line(proc.stderr) == f"{tmp_path} is a directory, not an audio file"


def test_a_directory_in_a_batch_is_called_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    out = tmp_path / "out"
    proc = run_cli("transcribe", str(folder), "--output-dir", str(out), "--url", closed_url())
    assert proc.returncode == 1
    assert "is a directory, not an audio file" in proc.stderr, proc.stderr


@pytest.mark.parametrize("service", ["flash", "rest"])
def test_an_undecodable_file_names_the_file_and_the_reason(tmp_path: Path, service: str) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("this is not audio")
    proc = run_cli("transcribe", str(bad), "--service", service, "--url", closed_url())
    assert proc.returncode == 1
    assert error_line(proc.stderr) == (
        f"audio file {bad} could not be decoded: Format not recognised."
    )


def test_output_dir_onto_a_file_is_a_usage_error(tmp_path: Path) -> None:
    file = tmp_path / "taken"
    file.write_text("mine")
    proc = run_cli("transcribe", HELLO, THREE, "--output-dir", str(file))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(
        f"error: --output-dir {file} is a file, not a directory"
    )
    assert "Errno" not in proc.stderr and file.read_text() == "mine"
    below = run_cli("transcribe", HELLO, "--output-dir", str(file / "sub"), "--url", closed_url())
    assert below.returncode == 1
    assert error_line(below.stderr) == f"cannot create --output-dir {file / 'sub'}: Not a directory"


def test_a_filetrans_timeout_says_how_to_fetch_the_result_and_result_does(
    gateway: Gateway,
) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET)
    url = gateway.http_url
    # The first poll comes a second after submitting: a 0.5 s wait always times out.
    args = ("--service", "filetrans", "--url", url, "--timeout", "0.5", "--srt")
    late = run_cli("transcribe", THREE, *args, env=env)
    assert late.returncode == 1
    line = error_line(late.stderr)
    found = re.fullmatch(
        r"FileTrans task (\w+) did not finish within 0\.5 s \(--timeout\); it goes on: "
        rf"'nlsstream result (\w+) --url {re.escape(url)}' prints its result once it is done",
        line,
    )
    assert found is not None and found[1] == found[2], line
    fetched = run_cli("result", found[1], "--url", url, "--srt", env=env)
    assert fetched.returncode == 0, fetched.stderr
    direct = run_cli("transcribe", THREE, "--service", "filetrans", "--url", url, "--srt", env=env)
    assert direct.returncode == 0, direct.stderr
    assert fetched.stdout == direct.stdout and fetched.stdout.startswith("1\n00:00:00,")


def test_result_says_where_to_ask_without_a_url_or_access_key() -> None:
    proc = run_cli("result", "0123abcd")
    assert proc.returncode == 1
    assert "set ALIYUN_AK_ID and ALIYUN_AK_SECRET" in error_line(proc.stderr)
    assert "--url" in proc.stderr


def test_result_of_an_unknown_task(gateway: Gateway) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET)
    proc = run_cli("result", "0123abcd", "--url", gateway.http_url, env=env)
    assert proc.returncode == 1
    assert "41050010" in error_line(proc.stderr)


@pytest.mark.parametrize("service", ["flash", "rest", "realtime"])
def test_connection_refused_on_plain_http_in_plain_words(service: str) -> None:
    url = closed_url().replace("http://", "http://someone:hunter2pass@")
    proc = run_cli("transcribe", HELLO, "--service", service, "--url", url)
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert "ssl:default" not in line and "hunter2pass" not in proc.stderr, line
    if service != "realtime":
        host = url.rpartition("@")[2]
        assert line.endswith(f"cannot connect to {host}: Connection refused"), line


def test_a_password_in_nls_url_is_hidden_too() -> None:
    url = closed_url().replace("http://", "http://someone:hunter2pass@")
    proc = run_cli("transcribe", HELLO, "--service", "realtime", env=clean_env(NLS_URL=url))
    assert proc.returncode == 1
    assert "hunter2pass" not in proc.stderr and "someone:***@" in proc.stderr, proc.stderr


@pytest.mark.parametrize("service", ["flash", "realtime"])
def test_a_rejected_token_when_none_was_given_says_how_to_give_one(
    gateway: Gateway, service: str
) -> None:
    proc = run_cli("transcribe", HELLO, "--service", service, "--url", gateway.http_url)
    assert proc.returncode == 1
    assert "no token was configured: set NLS_TOKEN or give --token" in error_line(proc.stderr)
    wrong = run_cli(
        "transcribe", HELLO, "--service", service, "--url", gateway.http_url,
        env=clean_env(NLS_TOKEN="wrong-token-456"),
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "token" in wrong.stderr and "no token was configured" not in wrong.stderr
    assert "wrong-token-456" not in wrong.stderr
