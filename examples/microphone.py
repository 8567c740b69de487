"""Live transcription from the microphone (needs ``pip install 'nlsstream[mic]'``).

Speak; partial results are rewritten in place and each sentence is printed when it ends.
Ctrl-C (or --seconds) stops cleanly: the last sentence is still delivered.

    python examples/microphone.py [--seconds 10] [--device NAME_OR_NUMBER]
    python examples/microphone.py --simulate speech.wav   # no microphone: play a file

``--simulate`` plugs a fake audio backend into :class:`nlsstream.mic.Microphone`: a
thread that delivers a file's audio in real time, exactly like a sound card would.
Without a usable input device the script exits with one clear line and status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator, Callable

import nlsstream
from nlsstream.audio import load_file
from nlsstream.cli.output import LiveRenderer
from nlsstream.mic import Microphone, MicrophoneError
from nlsstream.quickstart import session_settings


class FileBackend:
    """An :class:`nlsstream.mic.AudioBackend` that "records" an audio file in real time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def open_input(
        self,
        *,
        sample_rate: int,
        channels: int,
        blocksize: int,
        device: int | str | None,
        callback: Callable[[bytes], None],
    ) -> _FileStream:
        return _FileStream(load_file(self.path, sample_rate), sample_rate, blocksize, callback)


class _FileStream:
    def __init__(
        self, pcm: bytes, rate: int, blocksize: int, callback: Callable[[bytes], None]
    ) -> None:
        # Like a real device: after the file, keep delivering silence until stopped.
        self._blocks = [pcm[i : i + 2 * blocksize] for i in range(0, len(pcm), 2 * blocksize)]
        self._silence = bytes(2 * blocksize)
        self._period = blocksize / rate
        self._callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        blocks = iter(self._blocks)
        while not self._stop.wait(self._period):
            self._callback(next(blocks, self._silence))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


async def transcribe_microphone(mic: Microphone, seconds: float | None) -> None:
    renderer = LiveRenderer(sys.stdout)  # \r-rewritten partials, one line per sentence
    async with session_settings() as (url, appkey, token):
        transcriber = nlsstream.Transcriber(
            appkey, token, url=url, sample_rate=mic.sample_rate, enable_intermediate_result=True
        )
        async with transcriber:
            events = transcriber.events()
            render = asyncio.create_task(_render(events, renderer))
            # The microphone is already real time: pace=None sends each chunk as it comes.
            sending = asyncio.create_task(transcriber.stream(mic, pace=None))
            try:
                await asyncio.wait_for(asyncio.shield(sending), seconds)
            except asyncio.TimeoutError:
                pass  # --seconds is up
            finally:
                sending.cancel()  # stop sending (also on Ctrl-C) ...
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
                result = await transcriber.stop()  # ... but still get the last sentence
                await render
                renderer.close()
        print(f"transcript: {result.text!r}")


async def _render(events: AsyncIterator[nlsstream.Event], renderer: LiveRenderer) -> None:
    async for event in events:
        renderer.handle(event)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    parser.add_argument("--device", help="input device name or number")
    parser.add_argument("--simulate", metavar="AUDIO_FILE", help="play a file instead")
    args = parser.parse_args()

    device: int | str | None = args.device
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    backend = FileBackend(args.simulate) if args.simulate else None  # None: sounddevice
    try:
        async with Microphone(sample_rate=16000, device=device, backend=backend) as mic:
            await transcribe_microphone(mic, args.seconds)
    except MicrophoneError as exc:
        # No sounddevice/PortAudio, no input device, or the device stopped delivering.
        print(f"microphone.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
