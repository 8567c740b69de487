"""Real-time transcription with callbacks.

Run it with no setup at all: without credentials it starts the embedded local gateway
(offline, PocketSphinx). With NLS_APPKEY and NLS_TOKEN (or ALIYUN_AK_ID/ALIYUN_AK_SECRET)
set, the same code talks to Alibaba Cloud.

    python examples/callbacks.py [AUDIO_FILE] [--pace 0]
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


# Callbacks receive typed events. They may be plain functions or coroutines (awaited in
# order); one that raises is reported to on_error and the session carries on.
def on_start(event: nlsstream.Started) -> None:
    print(f"[started] task {event.task_id}")


def on_sentence_begin(event: nlsstream.SentenceBegin) -> None:
    print(f"[sentence {event.index} begins at {event.time} ms]")


def on_result_changed(event: nlsstream.ResultChanged) -> None:
    # The full current hypothesis of the open sentence, not a delta. It may be empty (a
    # sentence has begun but no word is recognised yet): nothing to show then.
    if event.text:
        print(f"  ... {event.text}")


async def on_sentence_end(event: nlsstream.SentenceEnd) -> None:
    # A coroutine callback: a good place to hand the sentence to something async.
    print(f"[sentence {event.index}, {event.begin_time}-{event.time} ms] {event.text}")


def on_completed(event: nlsstream.Completed) -> None:
    print("[completed]")


def on_error(error: nlsstream.NlsError) -> None:
    print(f"[error] {error}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="?", default=str(DEFAULT_AUDIO), help="audio file")
    parser.add_argument("--pace", type=float, default=1.0, help="1 = real time, 0 = fast")
    args = parser.parse_args()

    async with session_settings() as (url, appkey, token):
        transcriber = nlsstream.Transcriber(
            appkey,
            token,
            url=url,
            enable_intermediate_result=True,
            on_start=on_start,
            on_sentence_begin=on_sentence_begin,
            on_result_changed=on_result_changed,
            on_sentence_end=on_sentence_end,
            on_completed=on_completed,
            on_error=on_error,
        )
        # Entering connects and waits for the gateway to accept the task; leaving stops
        # it (or aborts it if the block raised).
        async with transcriber:
            await transcriber.stream(args.audio, pace=args.pace or None)
            result = await transcriber.stop()  # waits for the last sentence
        print(f"transcript: {result.text!r} ({result.duration} ms of audio)")


if __name__ == "__main__":
    asyncio.run(main())
