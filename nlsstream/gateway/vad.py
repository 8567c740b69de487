"""Energy-based voice activity detection on 20 ms frames, streaming.

The gateway only needs to find sentence boundaries in clean speech (TTS, phone audio),
so a frame is *voiced* when its RMS level is above both an absolute floor and a
multiple of a slowly adapting noise floor. Work per call is one vectorised numpy pass
over whatever bytes arrived, never a Python loop per sample.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FRAME_MS", "EnergyVad"]

FRAME_MS = 20


class EnergyVad:
    """Classifies PCM16 mono audio into 20 ms frames, voiced or not.

    ``min_rms`` is the absolute level below which a frame is always silence (about
    -44 dBFS by default); ``ratio`` is how far above the tracked noise floor a frame must
    be to count as speech. Odd leftover bytes are kept for the next call, so chunks need
    not be frame- or sample-aligned. Memory: at most one frame is buffered.
    """

    def __init__(self, sample_rate: int, *, min_rms: float = 200.0, ratio: float = 3.0) -> None:
        self.sample_rate = sample_rate
        self.frame_bytes = sample_rate * FRAME_MS // 1000 * 2
        self.min_rms = min_rms
        self.ratio = ratio
        self.noise = min_rms / ratio
        self._rest = b""

    def process(self, pcm: bytes) -> tuple[bytes, list[bool]]:
        """Consume ``pcm``; return the bytes of the completed frames and a voiced flag for
        each of them (a partial frame waits for the next call)."""
        data = self._rest + pcm if self._rest else pcm
        n = len(data) // self.frame_bytes
        used = n * self.frame_bytes
        self._rest = bytes(data[used:])
        if n == 0:
            return b"", []
        frames = np.frombuffer(data, dtype="<i2", count=used // 2).reshape(n, -1)
        rms = np.sqrt(np.mean(frames.astype(np.float32) ** 2, axis=1))
        flags: list[bool] = []
        noise = self.noise
        for level in rms.tolist():
            voiced = level > self.min_rms and level > noise * self.ratio
            flags.append(voiced)
            # The floor follows quiet frames quickly and loud ones very slowly, so a long
            # sentence does not raise it above the speech level.
            if level < noise:
                noise = max(level, 1.0) * 0.5 + noise * 0.5
            elif not voiced:
                noise += (level - noise) * 0.05
        self.noise = noise
        return bytes(data[:used]), flags
