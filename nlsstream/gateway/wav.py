"""The RIFF/WAVE header of ``format: "wav"`` audio: collected, checked and stripped.

A client may split the header over any number of binary messages; the gateway accepts
16-bit mono PCM at the task's declared sample rate and refuses anything else with the
documented status (§6): 40000009 for a header that is not RIFF/WAVE (or is
absurdly long), 40010003 for a valid one describing other audio.
"""

from __future__ import annotations

from ..errors import status_text
from ..realtime.protocol import DirectiveError

__all__ = ["MAX_WAV_HEADER", "WavStripper", "wav_data_offset"]

#: A header longer than this (without its data chunk) is refused.
MAX_WAV_HEADER = 4096


def _invalid(detail: str) -> DirectiveError:
    return DirectiveError(40000009, status_text(40000009, detail))


class WavStripper:
    """Feed it a task's audio messages in order; it returns the PCM (maybe empty while
    the header is still incomplete) or raises :class:`DirectiveError`."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._header: bytearray | None = bytearray()  # None once the header is done

    def feed(self, data: bytes) -> bytes:
        if self._header is None:
            return data
        self._header += data
        header = bytes(self._header)
        end = wav_data_offset(header, self.sample_rate)
        if end is None:
            if len(header) > MAX_WAV_HEADER:
                raise _invalid("Too large wav header!")
            return b""
        self._header = None
        return header[end:]


def wav_data_offset(header: bytes, rate: int) -> int | None:
    """Offset of the PCM after a RIFF/WAVE header, or ``None`` if more bytes are needed.

    Raises :class:`DirectiveError`: 40000009 for a header that is not RIFF/WAVE,
    40010003 for a valid one describing anything but PCM16 mono at ``rate``.
    """
    if len(header) < 12:
        if not (b"RIFF"[: len(header)] == header[:4]):
            raise _invalid("Invalid wav header: it does not start with RIFF!")
        return None
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        raise _invalid("Invalid wav header: it does not start with RIFF....WAVE!")
    pos = 12
    fmt_seen = False
    while pos + 8 <= len(header):
        chunk, size = header[pos : pos + 4], int.from_bytes(header[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"data":
            if not fmt_seen:
                raise _invalid("Invalid wav header: data chunk before fmt chunk!")
            return body
        if body + size > len(header):
            return None
        if chunk == b"fmt ":
            if size < 16:
                raise _invalid("Invalid wav header: fmt chunk too short!")
            _check_fmt(header[body : body + 16], rate)
            fmt_seen = True
        pos = body + size + (size & 1)
    return None


def _check_fmt(fmt: bytes, rate: int) -> None:
    tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    srate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    problems = []
    if tag not in (1, 0xFFFE):
        problems.append(f"encoding tag {tag} (only 1 = PCM)")
    if bits != 16:
        problems.append(f"{bits}-bit samples (only 16-bit)")
    if channels != 1:
        problems.append(f"{channels} channels (only mono)")
    if srate != rate:
        problems.append(f"{srate} Hz (the task declared sample_rate {rate})")
    if problems:
        raise DirectiveError(
            40010003, status_text(40010003, "Unsupported wav audio: " + ", ".join(problems) + "!")
        )
