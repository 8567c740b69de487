"""A voice-bot style server: many concurrent callers, one Transcriber per call.

Protocol (plain TCP, one call per connection): the caller sends raw PCM16LE mono 16 kHz
audio and half-closes its side when done; the server answers with JSON lines, one per
final sentence (``{"sentence": 1, "text": "..."}``) as soon as it is recognised, then
``{"done": true, "text": "<whole transcript>"}`` (or ``{"error": "..."}``) and closes.
A real bot would answer each sentence with its own reply (an LLM, a TTS stream...).

Every call runs on the same event loop: no thread per call, and all transcribers share
one pacing clock. Try it:

    python examples/voice_bot_server.py --port 9000                 # serve
    python examples/voice_bot_server.py --selftest 3 --pace 0       # 3 simulated callers

``--selftest N`` starts the server on a free port, runs N callers against it at once
(each sends an audio file), checks every caller got its sentences, and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nlsstream
from nlsstream.audio import load_file
from nlsstream.quickstart import Endpoint, session_settings

# The project's test recordings; pass your own file instead.
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DEFAULT_AUDIO = FIXTURES / "three_sentences.wav"
SAMPLE_RATE = 16000
READ_BYTES = 3200  # 100 ms of audio
CALL_TIMEOUT = 120.0  # a caller that stops sending without closing is dropped after this

log = logging.getLogger("voice_bot")


class VoiceBot:
    """The server: accepts calls and transcribes each with its own Transcriber."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.calls = 0

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        return await asyncio.start_server(self.handle_call, host, port)

    async def handle_call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.calls += 1
        call = self.calls
        url, appkey, token = self.endpoint

        async def reply(message: dict[str, Any]) -> None:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()

        async def say_sentence(sentence: nlsstream.SentenceEnd) -> None:
            # Called as each sentence ends, while the caller is still talking.
            await reply({"sentence": sentence.index, "text": sentence.text})

        async def caller_audio() -> AsyncIterator[bytes]:
            while chunk := await asyncio.wait_for(reader.read(READ_BYTES), CALL_TIMEOUT):
                yield chunk

        try:
            transcriber = nlsstream.Transcriber(
                appkey, token, url=url, sample_rate=SAMPLE_RATE, on_sentence_end=say_sentence
            )
            async with transcriber:
                # The caller already sends in real time: forward audio as it arrives.
                await transcriber.stream(caller_audio(), pace=None)
                result = await transcriber.stop()
            await reply({"done": True, "text": result.text})
            log.info("call %d: %d sentences", call, len(result.sentences))
        except (nlsstream.NlsError, asyncio.TimeoutError) as exc:
            # Tell the caller why; the server and every other call carry on.
            log.warning("call %d failed: %s", call, exc)
            await reply({"error": str(exc) or type(exc).__name__})
        finally:
            writer.close()
            await writer.wait_closed()


async def caller(port: int, audio: bytes, pace: float) -> list[dict[str, Any]]:
    """A simulated caller: sends ``audio`` (at ``pace`` x real time; 0 = at once) and
    returns every message the bot answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(0, len(audio), READ_BYTES):
        writer.write(audio[i : i + READ_BYTES])
        await writer.drain()
        if pace:
            await asyncio.sleep(READ_BYTES / (2 * SAMPLE_RATE) / pace)
    writer.write_eof()  # end of the call's audio
    replies = [json.loads(line) async for line in reader]
    writer.close()
    await writer.wait_closed()
    return replies


async def selftest(bot: VoiceBot, n: int, audio_path: str, pace: float) -> int:
    server = await bot.serve()
    port = server.sockets[0].getsockname()[1]
    audio = load_file(audio_path, SAMPLE_RATE)
    async with server:
        results = await asyncio.wait_for(
            asyncio.gather(*(caller(port, audio, pace) for _ in range(n))), CALL_TIMEOUT
        )
    failed = 0
    for i, replies in enumerate(results, 1):
        sentences = [r["text"] for r in replies if "sentence" in r]
        done = replies[-1] if replies else {}
        ok = bool(sentences) and done.get("done") is True
        failed += not ok
        print(f"caller {i}: {'ok' if ok else 'FAILED'}: {sentences} {done}")
    print(f"{n - failed}/{n} callers transcribed")
    return 0 if failed == 0 else 1


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--selftest", type=int, metavar="N", help="run N simulated callers")
    parser.add_argument("--audio", default=str(DEFAULT_AUDIO), help="selftest callers' audio")
    parser.add_argument("--pace", type=float, default=1.0, help="selftest send speed, 0 = fast")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per handshake

    async with session_settings() as endpoint:
        bot = VoiceBot(endpoint)
        if args.selftest:
            return await selftest(bot, args.selftest, args.audio, args.pace)
        server = await bot.serve(args.host, args.port)
        print(f"voice bot listening on {args.host}:{args.port}", flush=True)
        async with server:
            await server.serve_forever()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
