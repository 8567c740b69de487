"""Recordings decoded with every limit checked before the work, and the work bounded.

An upload (or a download) is a seekable binary file (spooled to disk when large, see
:mod:`nlsstream.gateway.http`). :func:`probe` reads only its header and refuses, before a
single sample is decoded: a sample rate outside :data:`~nlsstream.recordings.wire.MIN_RATE`
- :data:`~nlsstream.recordings.wire.MAX_RATE` (a 10 KB WAV that says 1 Hz would otherwise
resample into gigabytes), more than :data:`~nlsstream.recordings.wire.MAX_CHANNELS`
channels, and a duration (from the header, or from the byte count for headerless PCM)
beyond the service's limit. :class:`BlockDecoder` then streams the audio block by block
(:data:`BLOCK_FRAMES` at a time) as PCM16 per channel at the service rate, and stops with
the same refusal as soon as it has produced more than the limit allows, whatever the
header said: the decode never holds more than one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from ..recordings import wire
from ..recordings.wire import Refusal

__all__ = ["BLOCK_FRAMES", "AudioInfo", "BlockDecoder", "probe"]

#: Frames decoded at once (4 s at 16 kHz): bounds the decode's scratch memory.
BLOCK_FRAMES = 64 * 1024
_SOUNDFILE_ERRORS = (soundfile.SoundFileError, RuntimeError, ValueError, TypeError, OSError)


@dataclass(frozen=True)
class AudioInfo:
    """What the header says: ``channels``, native ``rate``, ``frames``; ``pcm`` when
    the data is headerless PCM16LE mono."""

    channels: int
    rate: int
    frames: int
    pcm: bool = False

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    @property
    def target_rate(self) -> int:
        """The rate it is recognised at: 8000 for sources at 8 kHz or less, else 16000."""
        return 8000 if self.rate <= 8000 else 16000


def probe(
    file: IO[bytes], size: int, fmt: str, rate: int, max_seconds: float, too_long: int
) -> AudioInfo:
    """The header of ``file`` (``size`` bytes) checked against every limit (blocking,
    cheap: only the header is read). Raises :class:`Refusal` with the documented status
    (``too_long`` for audio longer than ``max_seconds``)."""
    if size <= 0:
        raise Refusal(40000000, "No audio data!")
    if fmt == "pcm":
        if rate not in wire.SAMPLE_RATES:
            raise Refusal(41010101, f"Unsupported sample rate {rate}!")
        if size % 2:
            raise Refusal(40270003, "PCM16 audio must be an even number of bytes!")
        info = AudioInfo(1, rate, size // 2, pcm=True)
    else:
        file.seek(0)
        try:
            sf = soundfile.info(file)
        except _SOUNDFILE_ERRORS:
            raise Refusal(40270003, "Audio decode error!") from None
        finally:
            file.seek(0)
        info = AudioInfo(int(sf.channels), int(sf.samplerate), int(sf.frames))
        if info.frames <= 0:
            raise Refusal(40270003, "The audio contains no samples!")
        if not wire.MIN_RATE <= info.rate <= wire.MAX_RATE:
            raise Refusal(
                41010101,
                f"Unsupported sample rate {info.rate} Hz "
                f"(from {wire.MIN_RATE} to {wire.MAX_RATE} Hz)!",
            )
        if not 1 <= info.channels <= wire.MAX_CHANNELS:
            raise Refusal(40270004, f"{info.channels} channels (at most {wire.MAX_CHANNELS})!")
    if info.seconds > max_seconds:
        raise _too_long(too_long, max_seconds)
    return info


def _too_long(status: int, max_seconds: float) -> Refusal:
    return Refusal(status, f"The audio is longer than {max_seconds:g} s!")


class BlockDecoder:
    """Streams ``file`` as PCM16LE per channel at ``info.target_rate``, one block per
    :meth:`read` (blocking: run it in a worker thread). ``mix`` averages the channels
    into one. Raises :class:`Refusal` (``too_long``) once the audio proves longer than
    ``max_seconds`` and 40270003 when it cannot be decoded."""

    def __init__(
        self,
        file: IO[bytes],
        info: AudioInfo,
        max_seconds: float,
        too_long: int,
        *,
        mix: bool = False,
    ) -> None:
        self.info = info
        self.max_seconds = max_seconds
        self.too_long = too_long
        self.channels = 1 if mix else info.channels
        self._mix = mix
        self._file = file
        self._max_frames = math.ceil(max_seconds * info.rate)
        self.frames = 0  # native frames read so far
        self._sf: Any = None
        if not info.pcm:
            file.seek(0)
            try:
                self._sf = soundfile.SoundFile(file)
            except _SOUNDFILE_ERRORS:
                raise Refusal(40270003, "Audio decode error!") from None
        else:
            file.seek(0)
        target = info.target_rate
        self._streams = [
            None
            if info.rate == target
            else soxr.ResampleStream(info.rate, target, 1, dtype="float32", quality="HQ")
            for _ in range(self.channels)
        ]
        self._done = False

    @property
    def seconds(self) -> float:
        """Seconds of audio decoded so far."""
        return self.frames / self.info.rate

    def read(self) -> list[bytes] | None:
        """The next block of every channel, or ``None`` at the end."""
        if self._done:
            return None
        block = self._block()
        # A short block is the last one: flushing the resamplers now saves a round trip
        # to the worker thread (a sentence holds its decoder meanwhile).
        last = block is None or block.shape[0] < BLOCK_FRAMES
        if last:
            self._done = True
        if block is None:
            block = np.zeros((0, self.channels), dtype=np.float32)
        else:
            self.frames += block.shape[0]
            if self.frames > self._max_frames:
                raise _too_long(self.too_long, self.max_seconds)
            if self._mix and block.shape[1] > 1:
                block = block.mean(axis=1, keepdims=True, dtype=np.float32)
        out = []
        for c, stream in enumerate(self._streams):
            column = np.ascontiguousarray(block[:, c])
            if stream is not None:
                column = stream.resample_chunk(column, last=last)
            out.append(_pcm16(column))
        if last and not any(out):
            return None
        return out

    def _block(self) -> npt.NDArray[np.float32] | None:
        if self._sf is None:
            data = self._file.read(BLOCK_FRAMES * 2)
            if len(data) % 2:
                data = data[:-1]
            if not data:
                return None
            pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
            return pcm.reshape(-1, 1)
        try:
            block = self._sf.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
        except _SOUNDFILE_ERRORS:
            raise Refusal(40270003, "Audio decode error!") from None
        if not block.shape[0]:
            return None
        if not np.isfinite(block).all():
            raise Refusal(40270003, "The audio contains NaN or infinite samples!")
        return np.asarray(block, dtype=np.float32)

    def close(self) -> None:
        if self._sf is not None:
            self._sf.close()
            self._sf = None


def _pcm16(samples: npt.NDArray[np.float32]) -> bytes:
    pcm: bytes = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    return pcm
