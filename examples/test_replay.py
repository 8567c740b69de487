"""How to test your own voice bot offline: replay recorded audio through a local gateway.

nlsstream installs a pytest plugin with the ``nls_gateway`` fixture: a local NLS gateway
on a free port (recognition with PocketSphinx), with ``url``, ``token`` and ``appkey``.
Point your code at it instead of the cloud; no credentials, no network.

    pytest examples/test_replay.py

The recordings here are the project's test fixtures; use your own (WAV, FLAC, raw PCM...).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from voice_bot_server import VoiceBot, caller  # the example bot, tested end to end

import nlsstream
from nlsstream.audio import load_file
from nlsstream.gateway import Faults, Gateway
from nlsstream.quickstart import Endpoint

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
EXPECTED = json.loads((FIXTURES / "transcripts.json").read_text())


async def test_replay_transcribes_every_sentence(nls_gateway: Gateway) -> None:
    transcriber = nlsstream.Transcriber(nls_gateway.appkey, nls_gateway.token, url=nls_gateway.url)
    async with transcriber:
        # pace=None: as fast as possible. Tests need not wait for real time.
        await transcriber.stream(FIXTURES / "three_sentences.wav", pace=None)
        result = await transcriber.stop()
    assert [s.text for s in result.sentences] == EXPECTED["three_sentences.wav"]
    # The gateway records what it saw: handy to check what your code sent.
    record = nls_gateway.sessions[-1]
    assert record.outcome == "completed"
    assert record.audio_seconds == pytest.approx(9.28, abs=0.05)


async def test_voice_bot_replies_per_sentence(nls_gateway: Gateway) -> None:
    bot = VoiceBot(Endpoint(nls_gateway.url, nls_gateway.appkey, nls_gateway.token))
    server = await bot.serve()
    port = server.sockets[0].getsockname()[1]
    audio = load_file(FIXTURES / "hello.wav", 16000)  # PCM16 mono at 16 kHz
    async with server:
        replies = await caller(port, audio, pace=0)
    assert replies == [
        {"sentence": 1, "text": "hello world"},
        {"done": True, "text": "hello world"},
    ]


async def test_voice_bot_reports_gateway_failures(nls_gateway: Gateway) -> None:
    # Fault injection: the next connection fails at start as if the service were overloaded.
    nls_gateway.queue_faults(Faults(fail_status=40000005, fail_at="start"))
    bot = VoiceBot(Endpoint(nls_gateway.url, nls_gateway.appkey, nls_gateway.token))
    server = await bot.serve()
    port = server.sockets[0].getsockname()[1]
    async with server:
        replies = await caller(port, b"", pace=0)  # the bot fails before reading audio
    assert len(replies) == 1 and "40000005" in replies[0]["error"]
