"""Everyday use of the command line in a normal environment (issue 20): proxy variables
set, standard input redirected, Ctrl-C, outputs next to inputs, a local gateway with
AccessKeys. Every run is a real ``python -m nlsstream`` subprocess against a real
gateway on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import (
    AK_ID,
    AK_SECRET,
    CLI,
    FIXTURES,
    HELLO,
    TIMEOUT,
    clean_env,
    readline_within,
    run_cli,
)

import nlsstream.testing
from nlsstream.gateway import Faults, Gateway, GatewayThread
from nlsstream.testing import TEST_APPKEY, TEST_TOKEN

# Nothing listens on the discard port: a client sent there fails at once.
DEAD_PROXY = "http://127.0.0.1:9"
PROXY_ENV = {name: DEAD_PROXY for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")}


def _gateway_args(gateway: Gateway, host: str = "127.0.0.1") -> list[str]:
    url = gateway.url.replace("127.0.0.1", host)
    return ["--url", url, "--token", TEST_TOKEN, "--appkey", TEST_APPKEY]


def _outward_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # TEST-NET-3: a route lookup, nothing is sent
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def outward_gateway() -> Iterator[tuple[Gateway, str]]:
    """A span gateway listening on every address, and this machine's outward address."""
    address = _outward_address()
    if address is None:
        pytest.skip("no address besides loopback")
    gateway = Gateway("0.0.0.0", 0, recognizer="span", tokens=[TEST_TOKEN], appkeys=[TEST_APPKEY])
    with GatewayThread(gateway) as gw:
        yield gw, address


# --------------------------------------------------------------------------- 1. proxies


@pytest.mark.nls_gateway(recognizer="span")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_proxy_variables_never_proxy_a_loopback_gateway(nls_gateway: Gateway, host: str) -> None:
    proc = run_cli(
        "transcribe",
        HELLO,
        "--service",
        "realtime",
        "--pace",
        "0",
        *_gateway_args(nls_gateway, host),
        env=clean_env(**PROXY_ENV),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("speech ")


def test_proxy_variables_never_proxy_the_embedded_gateway() -> None:
    proc = run_cli(
        "recognize", HELLO, "--pace", "0", env=clean_env(**PROXY_ENV), timeout=3 * TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert "embedded local gateway" in proc.stderr


def test_proxy_option_none_connects_directly(outward_gateway: tuple[Gateway, str]) -> None:
    gateway, address = outward_gateway
    args = ["transcribe", HELLO, "--service", "realtime", "--pace", "0"]
    args += _gateway_args(gateway, address)
    env = clean_env(**PROXY_ENV)
    through = run_cli(*args, env=env)  # not loopback: the variables apply
    assert through.returncode == 1
    assert "through the proxy http://127.0.0.1:9" in through.stderr
    direct = run_cli(*args, "--proxy", "none", env=env)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.startswith("speech ")


@pytest.mark.nls_gateway(recognizer="span")
def test_proxy_option_url_is_used_and_its_password_hidden(nls_gateway: Gateway) -> None:
    proc = run_cli(
        "transcribe",
        HELLO,
        "--service",
        "realtime",
        "--proxy",
        "socks5://user:hunter2@127.0.0.1:9",
        *_gateway_args(nls_gateway),
    )
    assert proc.returncode == 1
    assert "through the proxy socks5://user:***@127.0.0.1:9" in proc.stderr
    assert "hunter2" not in proc.stderr


def test_proxy_option_takes_a_url_or_none() -> None:
    proc = run_cli("transcribe", HELLO, "--proxy", "nowhere")
    assert proc.returncode == 2
    assert "--proxy: must be none or a proxy URL" in proc.stderr


@pytest.mark.parametrize(
    ("host", "proxied"),
    [
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("::1", False),
        ("[::1]", False),
        ("localhost", False),
        ("LOCALHOST.", False),
        ("nls-gateway.cn-shanghai.aliyuncs.com", True),
        ("192.0.2.7", True),
    ],
)
def test_the_one_proxy_rule_skips_loopback_only(
    host: str, proxied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nlsstream.proxies import system_proxy

    for name in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY", "ws_proxy", "wss_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in PROXY_ENV.items():
        monkeypatch.setenv(name, value)
    assert system_proxy("wss", host) == (DEAD_PROXY if proxied else None)
    assert system_proxy("http", host) == (DEAD_PROXY if proxied else None)


# --------------------------------------------------------------------------- 2. stdin


@pytest.mark.parametrize("command", ["transcribe", "recognize"])
def test_stdin_from_dev_null_is_one_line_not_a_hang(command: str) -> None:
    proc = subprocess.run(
        [*CLI, command, "-"],
        stdin=subprocess.DEVNULL,  # /dev/null: a device the event loop cannot poll
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "nlsstream: error: standard input is empty: there is no audio to transcribe\n"
    )


# --------------------------------------------------------------------------- 3. Ctrl-C


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _long_recording(path: Path) -> str:
    """74 s of speech: the embedded gateway decodes it for seconds."""
    data, rate = sf.read(FIXTURES / "three_sentences.wav", dtype="int16")
    sf.write(path, np.concatenate([data] * 8), rate)
    return str(path)


def _interrupt_while_decoding(args: list[str], signals: int) -> tuple[int, str]:
    """Run the CLI; once its embedded gateway is decoding (the process has spent two
    seconds of CPU since it announced the gateway), send SIGINT ``signals`` times."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
    )
    try:
        assert proc.stderr is not None
        assert "embedded local gateway" in readline_within(proc.stderr, TIMEOUT)
        start = _cpu_seconds(proc.pid)
        deadline = time.monotonic() + TIMEOUT
        while _cpu_seconds(proc.pid) - start < 2.0:  # decoding: CPU time, not a guess
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        if signals == 2:  # once the first is handled: signals sent at once may merge
            assert "interrupted: finishing" in readline_within(proc.stderr, TIMEOUT)
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_during_a_flash_run_is_one_line(tmp_path: Path) -> None:
    status, err = _interrupt_while_decoding(
        ["transcribe", _long_recording(tmp_path / "long.wav")], signals=1
    )
    assert status == 130
    assert err.splitlines() == ["nlsstream: interrupted before the recording was recognised"]


def test_second_ctrl_c_in_a_flash_batch_still_sums_up(tmp_path: Path) -> None:
    first = _long_recording(tmp_path / "a.wav")
    second = str(tmp_path / "b.wav")
    shutil.copy(first, second)
    args = ["transcribe", first, second, "--output-dir", str(tmp_path / "out")]
    status, err = _interrupt_while_decoding(args, signals=2)
    assert status == 130
    assert err.splitlines() == ["nlsstream: 0 of 2 done, 2 cancelled (interrupted)"]


# --------------------------------------------------------------------------- 4, 5. -o FILE

THREE = str(FIXTURES / "three_sentences.wav")


@pytest.mark.nls_gateway(
    recognizer="span",
    # Two of the three sentences are final when the task fails (not retryable: no resume).
    faults=Faults(fail_status=40000000, fail_at="audio", fail_after_bytes=8 * 32000),
)
def test_a_live_run_that_fails_part_way_keeps_what_was_recognised(
    nls_gateway: Gateway, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    out.write_text("an earlier transcript\n")
    proc = run_cli(
        "transcribe", THREE, "--service", "realtime", "--pace", "0", "-o", str(out),
        *_gateway_args(nls_gateway),
    )  # fmt: skip
    assert proc.returncode == 1
    assert out.read_text() == "an earlier transcript\n"  # FILE untouched, as promised
    partial = Path(f"{out}.partial")
    assert f"what was recognised before the failure is in {partial}" in proc.stderr
    lines = partial.read_text().splitlines()
    assert len(lines) >= 1 and all(line.startswith("speech ") for line in lines)
    assert sorted(os.listdir(tmp_path)) == ["out.txt", "out.txt.partial"]  # no debris


@pytest.mark.parametrize("link", [False, True])
def test_output_onto_the_input_is_refused(tmp_path: Path, link: bool) -> None:
    victim = tmp_path / "victim.wav"
    shutil.copy(HELLO, victim)
    target = victim
    if link:
        target = tmp_path / "alias.txt"
        target.symlink_to(victim)
    proc = run_cli("transcribe", str(victim), "-o", str(target))
    assert proc.returncode == 2
    assert f"-o {target} is the input {victim}: it would replace the recording" in proc.stderr
    assert victim.read_bytes() == Path(HELLO).read_bytes()


# --------------------------------------------------------------------------- 6. tokens


@pytest.fixture
def access_key_gateway() -> Iterator[Gateway]:
    """A gateway that accepts only the tokens its own CreateToken issued."""
    gateway = Gateway(
        recognizer="span", tokens=["not-yours"], access_keys={AK_ID: AK_SECRET}, port=0
    )
    with GatewayThread(gateway) as gw:
        yield gw


@pytest.mark.parametrize("service", ["flash", "rest", "realtime"])
def test_access_key_with_a_local_url_gets_tokens_there(
    access_key_gateway: Gateway, service: str
) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET, NLS_APPKEY="app")
    url = access_key_gateway.http_url
    proc = run_cli("transcribe", HELLO, "--service", service, "--url", url, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("speech ")
    assert AK_SECRET not in proc.stderr


def test_token_endpoint_option_is_where_tokens_come_from(access_key_gateway: Gateway) -> None:
    env = clean_env(ALIYUN_AK_ID=AK_ID, ALIYUN_AK_SECRET=AK_SECRET, NLS_APPKEY="app")
    proc = run_cli(
        "transcribe", HELLO, "--url", access_key_gateway.http_url,
        "--token-endpoint", "http://127.0.0.1:9/", env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "127.0.0.1:9" in proc.stderr


# --------------------------------------------------------------------------- 10. the plugin

PLUGIN_USER_TESTS = """
import asyncio

import nlsstream.testing
from nlsstream import FlashRecognizer


def test_recordings_through_http_url(nls_gateway):
    assert "http_url" in nlsstream.testing.__doc__  # documented

    async def flash():
        async with FlashRecognizer(
            nls_gateway.appkey, nls_gateway.token, url=nls_gateway.http_url
        ) as f:
            return await f.recognize({hello!r})

    assert asyncio.run(flash()).text


async def test_unmarked_async(nls_gateway):
    pass
"""


@pytest.mark.parametrize("plugin", ["nls_gateway"])
def test_the_plugin_as_documented(tmp_path: Path, plugin: str) -> None:
    """The fixture's documented ``http_url`` serves the recording clients; an unmarked
    ``async def`` test without pytest-asyncio fails (as the docs now say)."""
    (tmp_path / "test_user.py").write_text(PLUGIN_USER_TESTS.format(hello=HELLO))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:asyncio", "-p", "no:cacheprovider",
         "-q", "-rA", str(tmp_path / "test_user.py")],
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=3 * TIMEOUT,
    )  # fmt: skip
    assert "PASSED test_user.py::test_recordings_through_http_url" in proc.stdout, proc.stdout
    assert "FAILED test_user.py::test_unmarked_async" in proc.stdout, proc.stdout
    assert "async def functions are not natively supported" in proc.stdout
    assert plugin in nlsstream.testing.__doc__


# --------------------------------------------------------------------------- 11. help, JSON


def test_recognize_help_names_only_its_own_timeout() -> None:
    proc = run_cli("recognize", "--help")
    assert proc.returncode == 0
    assert "--timeout" in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "flash" not in text and "filetrans" not in text


@pytest.mark.nls_gateway(recognizer="span")
def test_realtime_jsonl_completed_has_no_empty_totals(nls_gateway: Gateway) -> None:
    proc = run_cli(
        "transcribe", HELLO, "--service", "realtime", "--pace", "0", "--jsonl",
        *_gateway_args(nls_gateway),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    completed = json.loads(proc.stdout.splitlines()[-1])
    assert completed["type"] == "Completed"
    assert "text" not in completed and "duration" not in completed


# --------------------------------------------------------------------------- 9. ignored options


@pytest.mark.nls_gateway(recognizer="span")
def test_options_that_do_nothing_here_are_named(nls_gateway: Gateway) -> None:
    proc = run_cli(
        "transcribe", HELLO, "--service", "realtime", "--pace", "0", "--force", "-j", "3",
        "--words", "--srt", *_gateway_args(nls_gateway),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[:3] == [
        "nlsstream: warning: --force applies to a batch (--output-dir), not to one input",
        "nlsstream: warning: -j applies to a batch (--output-dir), not to one input",
        "nlsstream: warning: --words shows word times in --jsonl output only",
    ]
