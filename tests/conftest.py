"""Shared test helpers (keep small)."""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

FIXTURES = Path(__file__).parent / "fixtures"


def read_pcm(name: str) -> tuple[bytes, int]:
    """PCM16 mono bytes and sample rate of a fixture WAV."""
    data, rate = sf.read(FIXTURES / name, dtype="int16")
    return data.tobytes(), int(rate)
