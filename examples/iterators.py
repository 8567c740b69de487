"""Real-time transcription with async iterators.

Iterators and callbacks work on the same session at the same time; here two consumers
read concurrently: one prints intermediate results, the other collects final sentences.
Each iterator has its own bounded queue and sees every event from its creation on.

    python examples/iterators.py [AUDIO_FILE] [--pace 0]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import nlsstream
from nlsstream.quickstart import session_settings

# The project's test recordings; pass your own file instead.
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DEFAULT_AUDIO = FIXTURES / "three_sentences.wav"


async def show_partials(transcriber: nlsstream.Transcriber) -> None:
    async for partial in transcriber.results():
        if partial.text:  # empty while a sentence has begun but no word is recognised yet
            print(f"  ... {partial.text}")


async def collect_sentences(transcriber: nlsstream.Transcriber) -> list[str]:
    texts = []
    async for sentence in transcriber.sentences():  # ends when the task completes
        print(f"[{sentence.begin_time:>6} ms] {sentence.text}")
        texts.append(sentence.text)
    return texts


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="?", default=str(DEFAULT_AUDIO), help="audio file")
    parser.add_argument("--pace", type=float, default=1.0, help="1 = real time, 0 = fast")
    args = parser.parse_args()

    async with session_settings() as (url, appkey, token):
        transcriber = nlsstream.Transcriber(appkey, token, url=url, enable_intermediate_result=True)
        async with transcriber:
            # Create the consumers first so they see every event; then send the audio.
            partials = asyncio.create_task(show_partials(transcriber))
            sentences = asyncio.create_task(collect_sentences(transcriber))
            await transcriber.stream(args.audio, pace=args.pace or None)
            await transcriber.stop()
            # Both iterators end after Completed (or raise the task's error).
            texts = await sentences
            await partials
        print(f"{len(texts)} sentences")


if __name__ == "__main__":
    asyncio.run(main())
