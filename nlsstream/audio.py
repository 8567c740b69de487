"""Audio sources, conversion to PCM16 mono at the session's rate, and framing.

Every source a user can hand to a session ends up as PCM16LE mono bytes at the session's
rate (8000 or 16000 Hz), then cut into :data:`FRAME_BYTES` frames by a :class:`Framer`.

Accepted sources (:data:`AudioSource`):

* bytes-like (``bytes``, ``bytearray``, ``memoryview``): PCM16LE mono at the session rate;
* a path (``str`` or ``os.PathLike``): anything libsndfile reads (WAV, FLAC, OGG, ...),
  downmixed and resampled; ``.pcm`` / ``.raw`` files are headerless PCM16LE mono at the
  session rate;
* a numpy array at the session rate (or at another rate given as ``source_rate``):
  ``(samples,)`` or ``(samples, channels)``, int16 (or
  another integer type, scaled from its full range; unsigned types are centred on their
  midpoint) or float in [-1.0, 1.0];
* a sync or async iterable of chunks, each bytes-like or a numpy array as above.

Whatever cannot be converted raises :class:`~nlsstream.errors.AudioFormatError` saying
what was wrong and what is accepted. Whole sources are converted and validated before
the first chunk is produced, so a bad file never gets half sent.

Memory: files and arrays are converted in blocks of :data:`BLOCK_FRAMES` frames (with a
streaming resampler), so the peak is about twice the *output* PCM, never a float64 copy
of the whole input.
"""

from __future__ import annotations

import asyncio
import io
import math
import numbers
import os
import struct
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Iterator
from pathlib import Path
from types import AsyncGeneratorType, GeneratorType
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from .errors import AudioFormatError
from .redaction import get_logger

__all__ = [
    "FRAME_BYTES",
    "SAMPLE_RATES",
    "SNIFF_BYTES",
    "AudioChunk",
    "AudioSource",
    "Framer",
    "check_audio_path",
    "decode_bytes",
    "decode_channels",
    "frame_bytes_for",
    "is_whole",
    "load_file",
    "pcm_chunks",
    "sniff_container",
    "to_pcm16",
    "wav_stream_layout",
    "whole_pcm",
]

logger = get_logger("nlsstream.audio")

#: 20 ms of 16 kHz PCM16 mono: the frame size the official SDKs send.
FRAME_BYTES = 640
#: The only rates the gateway accepts (§5.1; else 41010101 UNSUPPORTED_SAMPLE_RATE).
SAMPLE_RATES = (8000, 16000)
#: Whole sources are yielded in slices of this size so sending can start early.
CHUNK_BYTES = 64 * 1024
#: Frames per block when decoding files / converting arrays (bounds float64 scratch memory).
BLOCK_FRAMES = 64 * 1024
#: Float samples may overshoot ±1.0 by this much (rounding in DSP tools) and are clipped;
#: beyond it the data is rejected as probably mis-scaled.
FLOAT_TOLERANCE = 1e-3
#: More channels than this almost always means a ``(channels, samples)`` array.
MAX_CHANNELS = 64
#: Arrays with fewer elements are converted on the event loop; bigger ones in a thread.
_INLINE_ELEMENTS = 1 << 16
_RAW_SUFFIXES = frozenset({".pcm", ".raw"})

_ACCEPTED_DTYPES = "int16 (or another integer type) or float32/float64 samples in [-1.0, 1.0]"
_ACCEPTED_SOURCES = (
    "bytes-like PCM16LE mono, a file path (str or os.PathLike), a numpy array, "
    "or a sync/async iterable of bytes-like or numpy-array chunks"
)
_ACCEPTED_FILES = (
    "accepted: files libsndfile can read (WAV, FLAC, OGG, ...) or headerless "
    ".pcm/.raw files of PCM16LE mono at the session rate"
)

#: One chunk of a streamed source: PCM16LE bytes or a numpy array, at the session rate.
AudioChunk: TypeAlias = bytes | bytearray | memoryview | npt.NDArray[Any]
#: Anything :func:`pcm_chunks` accepts.
AudioSource: TypeAlias = (
    bytes
    | bytearray
    | memoryview
    | str
    | os.PathLike[str]
    | npt.NDArray[Any]
    | Iterable[AudioChunk]
    | AsyncIterable[AudioChunk]
)


def frame_bytes_for(sample_rate: int, ms: int = 20) -> int:
    """Bytes in ``ms`` milliseconds of PCM16 mono at ``sample_rate`` (640 at 16 kHz)."""
    if sample_rate <= 0 or ms <= 0:
        raise ValueError(f"sample_rate and ms must be positive; got {sample_rate}, {ms}")
    samples = sample_rate * ms // 1000
    if samples <= 0:
        raise ValueError(f"{ms} ms at {sample_rate} Hz is less than one sample")
    return samples * 2


class Framer:
    """Cuts a byte stream into ``frame_bytes`` frames, carrying the remainder between pushes.

    Only the remainder (< one frame) is ever buffered, so a push costs O(len(data)).
    """

    __slots__ = ("_buf", "_n")

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        if frame_bytes <= 0:
            raise ValueError(f"frame_bytes must be positive; got {frame_bytes}")
        self._n = frame_bytes
        self._buf = bytearray()

    @property
    def frame_bytes(self) -> int:
        """The size of every frame except possibly the last."""
        return self._n

    @property
    def buffered(self) -> int:
        """Bytes waiting for the rest of their frame."""
        return len(self._buf)

    def push(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data``; return the frames it completes (possibly none)."""
        block = self.take(data)
        n = self._n
        if len(block) == n:
            return [block]
        return [block[i : i + n] for i in range(0, len(block), n)]

    def take(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add ``data``; return the frames it completes as one block (a multiple of
        ``frame_bytes``, possibly empty): no per-frame objects, no copy when ``data`` is
        a bytes of whole frames and nothing is carried over."""
        if not isinstance(data, bytes):
            data = bytes(data)
        n = self._n
        buf = self._buf
        if buf:
            buf += data
            end = len(buf) // n * n
            block = bytes(buf[:end])
            del buf[:end]
            return block
        end = len(data) // n * n
        if end < len(data):
            buf += data[end:]
            return data[:end]
        return data

    def flush(self) -> bytes:
        """Return the buffered remainder (maybe ``b""``, never dropped) and reset."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


# -- validation helpers ---------------------------------------------------------------


def _check_session_rate(sample_rate: object) -> int:
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, numbers.Integral)
        or int(sample_rate) not in SAMPLE_RATES
    ):
        raise AudioFormatError(f"session sample_rate must be 8000 or 16000 Hz; got {sample_rate!r}")
    return int(sample_rate)


def _check_rate(rate: object, what: str = "source") -> float:
    if (
        isinstance(rate, bool)
        or not isinstance(rate, numbers.Real)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise AudioFormatError(f"{what} sample rate must be a positive number of Hz; got {rate!r}")
    return float(rate)


def _check_pcm_length(size: int, what: str) -> None:
    if size % 2:
        raise AudioFormatError(
            f"{what} must have an even number of bytes (PCM16LE: 2 bytes per sample); "
            f"got {size} bytes"
        )


def _check_array(data: npt.NDArray[Any]) -> None:
    """Reject shapes and dtypes that cannot be audio (before any conversion work)."""
    kind = data.dtype.kind
    if kind not in "iuf":
        raise AudioFormatError(
            f"unsupported audio array dtype {data.dtype}; accepted: " + _ACCEPTED_DTYPES
        )
    if data.ndim not in (1, 2):
        raise AudioFormatError(
            "audio array must be 1-D (samples,) or 2-D (samples, channels); "
            f"got {data.ndim}-D shape {data.shape}"
        )
    if data.ndim == 2:
        channels = data.shape[1]
        if channels == 0:
            raise AudioFormatError(f"audio array has zero channels (shape {data.shape})")
        if channels > MAX_CHANNELS:
            raise AudioFormatError(
                f"audio array has {channels} channels (shape {data.shape}); expected "
                "(samples, channels): for a (channels, samples) array pass data.T"
            )


def _int_scale(dtype: np.dtype[Any]) -> tuple[float, float]:
    """(offset, full scale) mapping an integer dtype onto [-1.0, 1.0)."""
    half = float(2 ** (dtype.itemsize * 8 - 1))
    offset = half if dtype.kind == "u" else 0.0
    return offset, half


def _to_float_mono(block: npt.NDArray[Any], *, clip_floats: bool) -> npt.NDArray[np.float64]:
    """Downmix (mean) and normalise one block to float64 mono in [-1.0, 1.0]."""
    if block.dtype.kind == "f":
        if not np.isfinite(block).all():
            raise AudioFormatError("float audio contains NaN or infinite values")
        peak = float(np.max(np.abs(block))) if block.size else 0.0
        if peak > 1.0 + FLOAT_TOLERANCE and not clip_floats:
            hint = (
                " (it looks like int16-range data: divide by 32768 or pass it as int16)"
                if peak > 2.0
                else ""
            )
            raise AudioFormatError(
                f"float audio must be in [-1.0, 1.0]; found a peak of {peak:.6g}{hint}"
            )
        mono = block.mean(axis=1, dtype=np.float64) if block.ndim == 2 else block
        return np.asarray(mono, dtype=np.float64)
    offset, scale = _int_scale(block.dtype)
    mono = block.mean(axis=1, dtype=np.float64) if block.ndim == 2 else block.astype(np.float64)
    if offset:
        mono -= offset
    mono /= scale
    return mono


def _float_to_pcm16(x: npt.NDArray[np.float64]) -> bytes:
    """Scale by 32768, round to nearest and clip to int16 (so +1.0 becomes 32767)."""
    y = x * 32768.0
    np.rint(y, out=y)
    np.clip(y, -32768.0, 32767.0, out=y)
    return y.astype("<i2").tobytes()


class _Converter:
    """Block-wise float mono -> PCM16 at the target rate, resampling with soxr (HQ)."""

    def __init__(self, source_rate: float, target_rate: float) -> None:
        self._stream = (
            None
            if source_rate == target_rate
            else soxr.ResampleStream(source_rate, target_rate, 1, dtype="float64", quality="HQ")
        )
        self.parts: list[bytes] = []

    def feed(self, mono: npt.NDArray[np.float64]) -> None:
        if self._stream is not None:
            mono = self._stream.resample_chunk(np.ascontiguousarray(mono))
        if mono.size:
            self.parts.append(_float_to_pcm16(mono))

    def finish(self) -> bytes:
        if self._stream is not None:
            tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float64), last=True)
            if tail.size:
                self.parts.append(_float_to_pcm16(tail))
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _array_to_pcm16(data: npt.NDArray[Any], source_rate: float, target_rate: float) -> bytes:
    """Convert without the empty check (empty stream chunks are legal)."""
    _check_array(data)
    if data.dtype == np.int16 and data.ndim == 1 and source_rate == target_rate:
        return data.astype("<i2", copy=False).tobytes()  # fast path: already PCM16
    conv = _Converter(source_rate, target_rate)
    for start in range(0, data.shape[0], BLOCK_FRAMES):
        conv.feed(_to_float_mono(data[start : start + BLOCK_FRAMES], clip_floats=False))
    return conv.finish()


def to_pcm16(data: npt.NDArray[Any], source_rate: float, target_rate: float) -> bytes:
    """Convert an audio array to PCM16LE mono bytes at ``target_rate``.

    ``data`` is ``(samples,)`` or ``(samples, channels)`` (channels are averaged); int
    dtypes are scaled from their full range (uint8 is centred on 128), floats must be
    finite and within [-1.0, 1.0] (overshoot up to :data:`FLOAT_TOLERANCE` is clipped).
    Floats are scaled by 32768, rounded and clipped. Resampling uses soxr's HQ filter.

    Raises :class:`AudioFormatError` for anything else, including empty input.
    """
    if not isinstance(data, np.ndarray):
        raise AudioFormatError(f"expected a numpy array; got {type(data).__name__}")
    src = _check_rate(source_rate)
    dst = _check_rate(target_rate, "target")
    _check_array(data)
    if data.shape[0] == 0:
        raise AudioFormatError(f"audio array is empty (shape {data.shape})")
    return _array_to_pcm16(data, src, dst)


def check_audio_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it names a file; else
    :class:`AudioFormatError` saying what it is instead (missing, a directory)."""
    p = Path(os.fspath(path))
    if p.is_dir():
        raise AudioFormatError(f"{p} is a directory, not an audio file")
    if not p.exists():
        raise AudioFormatError(f"audio file not found: {p}")
    return p


def load_file(path: str | os.PathLike[str], sample_rate: int) -> bytes:
    """Read an audio file and return PCM16LE mono at ``sample_rate`` (blocking).

    ``.pcm``/``.raw`` files are taken as PCM16LE mono at ``sample_rate``; anything else is
    decoded with soundfile (as float64, so 8/16/24/32-bit, unsigned and float subtypes all
    convert exactly), downmixed and resampled. Float files that overshoot ±1.0 are clipped
    with a warning (the data is not the caller's to fix); NaN/inf is rejected.
    """
    rate = _check_session_rate(sample_rate)
    p = check_audio_path(path)
    if p.suffix.lower() in _RAW_SUFFIXES:
        try:
            pcm = p.read_bytes()
        except OSError as exc:
            raise AudioFormatError(f"cannot read audio file {p}: {exc}") from exc
        if not pcm:
            raise AudioFormatError(f"audio file is empty: {p}")
        _check_pcm_length(len(pcm), f"raw PCM file {p}")
        return pcm
    return _decode(p, f"audio file {p}", rate, split=False)[0]


def decode_bytes(data: bytes, sample_rate: int, name: str = "audio") -> bytes:
    """Decode a whole audio file held in memory (WAV, MP3, OGG, FLAC...: what libsndfile
    reads) to PCM16LE mono at ``sample_rate``, as :func:`load_file` does for paths.

    ``name`` says where the data came from in error messages (e.g. ``"standard input"``).
    """
    rate = _check_session_rate(sample_rate)
    if not data:
        raise AudioFormatError(f"{name} is empty: no audio")
    return _decode(io.BytesIO(data), name, rate, split=False)[0]


def decode_channels(
    source: bytes | str | os.PathLike[str], sample_rate: int | None = None, *, mix: bool = False
) -> tuple[list[bytes], int]:
    """Decode an audio file (a path, or its bytes) into PCM16LE per channel (blocking).

    Returns ``(channels, rate)``: one PCM16LE mono buffer per channel of the file, all at
    ``rate``, which is ``sample_rate`` if given (8000 or 16000), else 8000 for sources at
    8 kHz or less and 16000 for the rest. Anything libsndfile reads (WAV, FLAC, OGG,
    MP3 with libsndfile >= 1.1) is accepted; raises :class:`AudioFormatError` otherwise.
    ``mix=True`` returns one channel, the mean of all.
    """
    name = "audio data" if isinstance(source, bytes) else f"audio file {os.fspath(source)}"
    file: Any = io.BytesIO(source) if isinstance(source, bytes) else Path(os.fspath(source))
    if sample_rate is None:
        try:
            native = soundfile.info(file).samplerate
        except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError, OSError) as exc:
            raise AudioFormatError(f"cannot read {name}: {exc}; {_ACCEPTED_FILES}") from exc
        sample_rate = 8000 if native <= 8000 else 16000
        if isinstance(file, io.BytesIO):
            file.seek(0)
    return _decode(file, name, _check_session_rate(sample_rate), split=not mix), sample_rate


def _decode(file: Any, name: str, rate: int, *, split: bool) -> list[bytes]:
    """Decode with soundfile (as float64, so 8/16/24/32-bit, unsigned and float subtypes
    all convert exactly), then downmix (``split=False``) or keep each channel, and
    resample to ``rate``. Float files that overshoot ±1.0 are clipped with a warning."""
    try:
        f = soundfile.SoundFile(file)
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError, OSError) as exc:
        raise AudioFormatError(f"cannot read {name}: {exc}; {_ACCEPTED_FILES}") from exc
    with f:
        convs = [_Converter(f.samplerate, rate) for _ in range(f.channels if split else 1)]
        clipped = False
        while True:
            try:
                block = f.read(BLOCK_FRAMES, dtype="float64", always_2d=True)
            except (soundfile.SoundFileError, RuntimeError, ValueError, OSError) as exc:
                raise AudioFormatError(f"cannot decode {name}: {exc}") from exc
            if not block.shape[0]:
                break
            if not np.isfinite(block).all():
                raise AudioFormatError(f"{name} contains NaN or infinite samples")
            clipped = clipped or float(np.max(np.abs(block))) > 1.0
            if split:
                for c, conv in enumerate(convs):
                    conv.feed(np.clip(block[:, c], -1.0, 1.0))
            else:
                convs[0].feed(_to_float_mono(block, clip_floats=True))
    if clipped:
        logger.warning("%s has float samples beyond ±1.0; they were clipped", name)
    pcms = [conv.finish() for conv in convs]
    if not any(pcms):
        raise AudioFormatError(f"{name} contains no audio")
    return pcms


#: Bytes :func:`sniff_container` needs to recognise every container it knows.
SNIFF_BYTES = 12
# MPEG audio frame header fields that no valid frame has (reserved or "bad" values).
_MPEG_RESERVED_VERSION = 0b01
_MPEG_RESERVED_LAYER = 0b00


def sniff_container(head: bytes) -> str | None:
    """The audio container ``head`` (the first :data:`SNIFF_BYTES` bytes of a stream)
    starts with: ``"WAV"`` (RIFF/WAVE), ``"MP3"`` (an ID3 tag or an MPEG audio frame
    header), ``"OGG"`` (OggS) or ``"FLAC"`` (fLaC); ``None`` for anything else, which is
    then taken as headerless PCM.

    An MPEG frame header is checked field by field (sync, version, layer, bitrate and
    rate indices), so PCM that merely starts with ``0xFF`` bytes is not mistaken for one.
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV"
    if head[:3] == b"ID3":
        return "MP3"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:4] == b"fLaC":
        return "FLAC"
    if len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
        bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0b11
        if (
            version != _MPEG_RESERVED_VERSION
            and layer != _MPEG_RESERVED_LAYER
            and bitrate not in (0b0000, 0b1111)
            and rate != 0b11
        ):
            return "MP3"
    return None


#: A WAV data size that means "unknown, until the end" (streams written before their
#: length was known: 0, or about 2 or 4 GiB).
_WAV_OPEN_ENDED = 0x7FFF0000


def wav_stream_layout(head: bytes, sample_rate: int) -> tuple[int, int | None] | None:
    """Whether the WAV file ``head`` begins can be streamed as it arrives: PCM16 mono at
    ``sample_rate``, with its header complete within ``head``. Returns ``(offset, size)``
    of the samples (``size`` ``None`` when the header leaves it open, as live
    recorders do), or ``None`` when the file must be decoded whole (another format,
    or a header not complete within ``head``)."""
    pos, pcm16_mono = 12, False
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            if body + 16 > len(head):
                return None
            tag, channels, rate = struct.unpack_from("<HHI", head, body)
            (bits,) = struct.unpack_from("<H", head, body + 14)
            pcm16_mono = (tag, channels, rate, bits) == (1, 1, sample_rate, 16)
        elif chunk == b"data":
            if not pcm16_mono:
                return None
            return body, (None if size == 0 or size >= _WAV_OPEN_ENDED else size)
        pos = body + size + (size & 1)
    return None


# -- the async source ------------------------------------------------------------------


_WHOLE = (bytes, bytearray, memoryview, str, os.PathLike, np.ndarray)


def _slices(pcm: bytes) -> Iterator[bytes]:
    if len(pcm) <= CHUNK_BYTES:
        yield pcm
        return
    for i in range(0, len(pcm), CHUNK_BYTES):
        yield pcm[i : i + CHUNK_BYTES]


def is_whole(source: object) -> bool:
    """Whether ``source`` is a whole recording (bytes, a path, an array), not a stream."""
    return isinstance(source, _WHOLE)


async def whole_pcm(
    source: AudioSource, sample_rate: int, source_rate: float | None = None
) -> bytes:
    """A whole source (see :func:`is_whole`) as PCM16LE mono at ``sample_rate``, converted
    and validated at once (blocking work in a thread); ``source_rate`` as in
    :func:`pcm_chunks`."""
    rate = _check_session_rate(sample_rate)
    return await _whole_source(source, rate, _source_rate(source_rate, rate))


def _source_rate(source_rate: float | None, rate: int) -> float:
    return float(rate) if source_rate is None else _check_rate(source_rate)


async def _whole_source(source: Any, rate: int, source_rate: float) -> bytes:
    """Convert and validate a whole (non-iterable) source; blocking work runs in a thread."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        # Snapshot mutable buffers so later changes by the caller cannot tear a frame.
        pcm = source if isinstance(source, bytes) else bytes(source)
        if not pcm:
            raise AudioFormatError("audio source is empty (0 bytes of PCM16LE)")
        _check_pcm_length(len(pcm), "PCM16LE audio")
        if source_rate == rate:
            return pcm
        source = np.frombuffer(pcm, dtype="<i2")
    if isinstance(source, (str, os.PathLike)):
        if source_rate != rate:
            raise AudioFormatError(
                "sample_rate= is for arrays and PCM bytes; a file's rate is read from the file"
            )
        return await asyncio.to_thread(load_file, source, rate)
    assert isinstance(source, np.ndarray)
    if source.size < _INLINE_ELEMENTS:
        return to_pcm16(source, source_rate, rate)
    return await asyncio.to_thread(to_pcm16, source, source_rate, rate)


class _ChunkStream:
    """Turns stream chunks into even-length PCM16 bytes, carrying an odd byte across chunks."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._odd = b""

    def convert(self, item: object) -> bytes:
        if isinstance(item, np.ndarray):
            if self._odd:
                raise AudioFormatError(
                    "a bytes chunk ended mid-sample (odd length) and the next chunk is a "
                    "numpy array; keep PCM16 chunks aligned to whole samples"
                )
            return _array_to_pcm16(item, self._rate, self._rate)
        if isinstance(item, (bytes, bytearray, memoryview)):
            # Copy non-bytes buffers: producers (e.g. audio callbacks) reuse them.
            data = item if isinstance(item, bytes) else bytes(item)
            if self._odd:
                data = self._odd + data
                self._odd = b""
            if len(data) % 2:
                self._odd = data[-1:]
                data = data[:-1]
            return data
        raise AudioFormatError(
            "audio chunks must be bytes-like (PCM16LE) or numpy arrays; "
            f"got an item of type {type(item).__name__}"
        )

    def finish(self) -> None:
        if self._odd:
            raise AudioFormatError(
                "audio stream ended mid-sample: 1 byte left over "
                "(PCM16LE needs 2 bytes per sample, so the total length must be even)"
            )


async def pcm_chunks(
    source: AudioSource, sample_rate: int, source_rate: float | None = None
) -> AsyncGenerator[bytes, None]:
    """Yield PCM16LE mono bytes at ``sample_rate`` (8000 or 16000) from any :data:`AudioSource`.

    ``source_rate`` is the rate of a numpy array or of PCM bytes when it is not
    ``sample_rate`` (they are then resampled with soxr, HQ); ``None`` means they are at
    ``sample_rate`` already. Files carry their own rate; for iterables it is an error.

    Whole sources (bytes-like, path, array) are fully converted and validated before the
    first yield, so :class:`AudioFormatError` comes before anything is sent; they are then
    yielded in slices of at most :data:`CHUNK_BYTES`. File decoding and big-array
    conversion run in a worker thread, never on the event loop.

    Iterables are converted chunk by chunk (empty chunks are skipped; a bad chunk raises
    :class:`AudioFormatError` when it is reached). Sync iterables are consumed on the event
    loop, so they must not block: wrap blocking producers in an async iterable. A generator
    source is closed when this generator is closed early.
    """
    rate = _check_session_rate(sample_rate)
    src_rate = _source_rate(source_rate, rate)
    if isinstance(source, _WHOLE):
        pcm = await _whole_source(source, rate, src_rate)
        for piece in _slices(pcm):
            yield piece
        return
    if src_rate != rate:
        raise AudioFormatError(
            "sample_rate= applies to a whole array or PCM bytes; chunks of an iterable "
            f"must be at the session rate ({rate} Hz)"
        )
    stream = _ChunkStream(rate)
    if isinstance(source, AsyncIterable):
        ait = aiter(source)
        try:
            async for item in ait:
                data = stream.convert(item)
                if data:
                    yield data
        finally:
            if isinstance(ait, AsyncGeneratorType):
                await ait.aclose()
    elif isinstance(source, Iterable):
        it = iter(source)
        try:
            for item in it:
                data = stream.convert(item)
                if data:
                    yield data
        finally:
            if isinstance(it, GeneratorType):
                it.close()
    else:
        raise AudioFormatError(
            f"unsupported audio source type {type(source).__name__}; accepted: {_ACCEPTED_SOURCES}"
        )
    stream.finish()
