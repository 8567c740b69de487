"""Every example runs, as a user would run it, against the embedded local gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import clean_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / "tests" / "fixtures"
EXPECTED = json.loads((FIXTURES / "transcripts.json").read_text())
TIMEOUT = 90


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=clean_env(),  # no credentials: the examples must fall back to the local gateway
        cwd=ROOT,
        timeout=TIMEOUT,
    )


def test_callbacks() -> None:
    proc = run_example(str(EXAMPLES / "callbacks.py"), "--pace", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[started] task ")
    for i, text in enumerate(EXPECTED["three_sentences.wav"], 1):
        assert any(line.startswith(f"[sentence {i},") and line.endswith(text) for line in lines)
    assert "  ... " in proc.stdout  # intermediate results
    assert "  ... " not in lines  # but no empty one
    assert lines[-2] == "[completed]"
    assert lines[-1].startswith("transcript: 'the weather is nice today i would like")
    assert "embedded local gateway" in proc.stderr


def test_iterators() -> None:
    proc = run_example(str(EXAMPLES / "iterators.py"), "--pace", "0")
    assert proc.returncode == 0, proc.stderr
    finals = [line.split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert finals == EXPECTED["three_sentences.wav"]
    assert "  ... " in proc.stdout
    assert "  ... " not in proc.stdout.splitlines()  # no empty intermediate result
    assert proc.stdout.splitlines()[-1] == "3 sentences"


def test_microphone_with_a_simulated_device() -> None:
    proc = run_example(
        str(EXAMPLES / "microphone.py"), "--simulate", str(FIXTURES / "hello.wav"), "--seconds", "2"
    )
    assert proc.returncode == 0, proc.stderr
    # Live renderer: clear-line codes before each partial and the final line.
    assert "\x1b[2Khell" in proc.stdout and "\x1b[2Khello world\n" in proc.stdout
    assert proc.stdout.endswith("transcript: 'hello world'\n")


def test_microphone_without_a_device_is_one_clear_line() -> None:
    # Device 99999 exists nowhere; without PortAudio the message says that instead.
    proc = run_example(str(EXAMPLES / "microphone.py"), "--device", "99999", "--seconds", "1")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("microphone.py: "), proc.stderr
    assert any(word in lines[0] for word in ("99999", "PortAudio", "sounddevice"))


def test_voice_bot_selftest_with_concurrent_callers() -> None:
    proc = run_example(
        str(EXAMPLES / "voice_bot_server.py"),
        "--selftest",
        "3",
        "--pace",
        "0",
        "--audio",
        str(FIXTURES / "hello.wav"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok: ['hello world']") == 3
    assert proc.stdout.splitlines()[-1] == "3/3 callers transcribed"


def test_replay_test_passes_under_pytest() -> None:
    proc = run_example(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_replay.py")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def readme_block(heading: str) -> str:
    """The first python code block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text().split(heading, 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_pytest_example_runs_as_shown(tmp_path: Path) -> None:
    # As in a user's project: no asyncio_mode = "auto", only what the example says.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    test = tmp_path / "test_readme_example.py"
    test.write_text(readme_block("### In your tests"))
    ini = tmp_path / "pytest.ini"
    pytest_args = ["-q", "-p", "no:cacheprovider", "-c", str(ini), "--rootdir", str(tmp_path)]
    proc = run_example("-m", "pytest", *pytest_args, str(test))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout


def test_readme_does_not_say_stop_twice_raises() -> None:
    errors = (ROOT / "README.md").read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in errors.splitlines() if line.startswith("| `InvalidStateError`"))
    assert "stop twice" not in row  # stop() again returns the same result (test_session.py)
