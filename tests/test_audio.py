"""Unit tests for nlsstream.audio: sources, conversion, resampling, framing, bad input."""

from __future__ import annotations

import asyncio
import io
import logging
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from nlsstream.audio import (
    BLOCK_FRAMES,
    CHUNK_BYTES,
    FRAME_BYTES,
    Framer,
    frame_bytes_for,
    load_file,
    pcm_chunks,
    sniff_container,
    to_pcm16,
    wav_stream_layout,
)
from nlsstream.errors import AudioFormatError

FIXTURES = Path(__file__).parent / "fixtures"


async def collect(source: Any, rate: int = 16000) -> list[bytes]:
    return [chunk async for chunk in pcm_chunks(source, rate)]


async def joined(source: Any, rate: int = 16000) -> bytes:
    return b"".join(await collect(source, rate))


def i16(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2")


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def peak_freq_and_rms(pcm: bytes, rate: int) -> tuple[float, float]:
    """Dominant frequency (Hz) and RMS (int16 units), ignoring the filter's edge transients."""
    x = i16(pcm).astype(np.float64)[rate // 20 : -rate // 20]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freq = float(np.argmax(spectrum)) * rate / len(x)
    return freq, float(np.sqrt(np.mean(x**2)))


# -- Framer ----------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [FRAME_BYTES, 320, 7, 1])
@pytest.mark.parametrize("seed", range(6))
def test_framer_never_loses_or_duplicates_bytes(frame: int, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 20 * frame + 50))
    framer = Framer(frame)
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        # Mix empty, tiny, exactly-one-frame and multi-frame pushes.
        size = rng.choice([0, 1, frame - 1, frame, frame + 1, rng.randrange(0, 5 * frame + 2)])
        piece = data[pos : pos + size]
        kind = rng.choice([bytes, bytearray, memoryview])
        out = framer.push(kind(piece))
        assert all(type(f) is bytes and len(f) == frame for f in out)
        frames.extend(out)
        pos += size
        assert framer.buffered == (pos if pos < len(data) else len(data)) % frame
    last = framer.flush()
    assert len(last) < frame
    assert len(frames) == len(data) // frame
    assert b"".join(frames) + last == data
    assert framer.flush() == b"" and framer.buffered == 0


def test_framer_last_short_frame_is_kept() -> None:
    framer = Framer()
    assert framer.push(b"\x01" * 1000) == [b"\x01" * 640]
    assert framer.flush() == b"\x01" * 360
    assert framer.push(b"\x02" * 10) == []
    assert framer.push(b"\x03" * 630) == [b"\x02" * 10 + b"\x03" * 630]
    assert framer.flush() == b""


def test_framer_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        Framer(0)


def test_frame_bytes_for() -> None:
    assert frame_bytes_for(16000) == FRAME_BYTES == 640
    assert frame_bytes_for(8000) == 320
    assert frame_bytes_for(16000, ms=100) == 3200
    with pytest.raises(ValueError):
        frame_bytes_for(0)
    with pytest.raises(ValueError):
        frame_bytes_for(8000, ms=0)


# -- bytes-like sources ----------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_bytes_like_round_trip(kind: Any) -> None:
    pcm = np.arange(-500, 500, dtype="<i2").tobytes()
    assert await joined(kind(pcm)) == pcm


async def test_big_bytes_are_yielded_in_slices() -> None:
    pcm = random.Random(1).randbytes(3 * CHUNK_BYTES + 10)
    chunks = await collect(pcm)
    assert len(chunks) == 4
    assert all(len(c) <= CHUNK_BYTES for c in chunks)
    assert b"".join(chunks) == pcm


async def test_bytearray_is_snapshotted_before_first_yield() -> None:
    buf = bytearray(b"\x01\x00" * CHUNK_BYTES)
    agen = pcm_chunks(buf, 16000)
    first = await anext(agen)
    buf[:] = b"\xff" * len(buf)  # caller reuses its buffer while we are sending
    rest = [c async for c in agen]
    assert first + b"".join(rest) == b"\x01\x00" * CHUNK_BYTES


# -- files -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rate"), [("hello.wav", 16000), ("alarm_8k.wav", 8000)])
async def test_fixture_at_native_rate_is_bit_exact(name: str, rate: int) -> None:
    expected, native = sf.read(FIXTURES / name, dtype="int16")
    assert native == rate
    assert await joined(FIXTURES / name, rate) == expected.tobytes()
    assert await joined(str(FIXTURES / name), rate) == expected.tobytes()


@pytest.mark.parametrize(("name", "rate"), [("alarm_8k.wav", 16000), ("hello.wav", 8000)])
async def test_fixture_is_resampled_to_session_rate(name: str, rate: int) -> None:
    data, native = sf.read(FIXTURES / name, dtype="float64")
    pcm = await joined(FIXTURES / name, rate)
    assert abs(len(pcm) // 2 - round(len(data) * rate / native)) <= 1
    # Speech energy survives resampling (flite's voice is well below both Nyquists).
    src_rms = np.sqrt(np.mean(data**2)) * 32768
    out_rms = np.sqrt(np.mean(i16(pcm).astype(np.float64) ** 2))
    assert out_rms == pytest.approx(src_rms, rel=0.1)


async def test_stereo_float_44k_wav_is_downmixed_and_resampled(tmp_path: Path) -> None:
    left = sine(1000, 44100, 1.0, amp=0.6)
    right = sine(1000, 44100, 1.0, amp=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    pcm = await joined(path, 16000)
    assert len(pcm) // 2 == 16000
    freq, rms = peak_freq_and_rms(pcm, 16000)
    assert freq == pytest.approx(1000, abs=2)
    assert rms == pytest.approx(0.4 / np.sqrt(2) * 32768, rel=0.01)  # mean of the channels


async def test_stereo_downmix_is_the_rounded_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    frames = rng.integers(-32768, 32768, size=(5000, 2), dtype=np.int16)
    path = tmp_path / "stereo16.wav"
    sf.write(path, frames, 16000, subtype="PCM_16")
    expected = np.rint(frames.astype(np.float64).mean(axis=1)).astype("<i2")
    assert i16(await joined(path)).tolist() == expected.tolist()


async def test_24bit_flac_is_rounded_not_truncated(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(-(2**23), 2**23, size=8000)
    codes[:4] = [2**23 - 1, -(2**23), 127, -129]  # full scale and half-LSB-ish values
    path = tmp_path / "deep.flac"
    sf.write(path, codes / 2**23, 8000, subtype="PCM_24")
    assert sf.info(path).subtype == "PCM_24"
    expected = np.clip(np.rint(codes / 256), -32768, 32767).astype("<i2")
    assert i16(await joined(path, 8000)).tolist() == expected.tolist()


async def test_unsigned_8bit_wav(tmp_path: Path) -> None:
    codes = np.arange(-128, 128)
    path = tmp_path / "u8.wav"
    sf.write(path, codes / 128, 16000, subtype="PCM_U8")
    assert sf.info(path).subtype == "PCM_U8"
    assert i16(await joined(path)).tolist() == (codes * 256).tolist()


@pytest.mark.skipif("OGG" not in sf.available_formats(), reason="libsndfile without OGG")
async def test_ogg_vorbis(tmp_path: Path) -> None:
    path = tmp_path / "tone.ogg"
    sf.write(path, sine(1000, 48000, 1.0), 48000, format="OGG", subtype="VORBIS")
    pcm = await joined(path, 16000)
    assert abs(len(pcm) // 2 - 16000) <= 1
    freq, rms = peak_freq_and_rms(pcm, 16000)
    assert freq == pytest.approx(1000, abs=2)
    assert rms == pytest.approx(0.5 / np.sqrt(2) * 32768, rel=0.05)  # lossy codec


@pytest.mark.parametrize("suffix", [".pcm", ".raw", ".PCM"])
async def test_headerless_pcm_files(tmp_path: Path, suffix: str) -> None:
    pcm = np.arange(0, 3000, dtype="<i2").tobytes()
    path = tmp_path / f"audio{suffix}"
    path.write_bytes(pcm)
    assert await joined(path, 8000) == pcm
    assert load_file(path, 16000) == pcm


async def test_float_file_beyond_full_scale_is_clipped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "hot.wav"
    sf.write(path, np.array([0.0, 1.5, -2.0, 0.5]), 16000, subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="nlsstream.audio"):
        pcm = await joined(path)
    assert i16(pcm).tolist() == [0, 32767, -32768, 16384]
    assert "clipped" in caplog.text


async def test_big_file_is_yielded_in_slices(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    data = sine(440, 16000, 5.0)
    sf.write(path, data, 16000, subtype="PCM_16")
    chunks = await collect(path)
    assert len(chunks) > 1 and all(len(c) <= CHUNK_BYTES for c in chunks)
    assert b"".join(chunks) == sf.read(path, dtype="int16")[0].tobytes()


# -- numpy arrays ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_scaling_and_clipping(dtype: Any) -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1 / 32768, -1 / 32768, 1.0005, -1.0005], dtype)
    assert i16(to_pcm16(x, 16000, 16000)).tolist() == [
        0,
        16384,
        -16384,
        32767,
        -32768,
        1,
        -1,
        32767,
        -32768,
    ]


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([0, 128, 255, 1], np.uint8, [-32768, 0, 32512, -32512]),
        ([-128, 0, 127], np.int8, [-32768, 0, 32512]),
        ([2**31 - 1, -(2**31), 5 * 65536, 98304, 32768], np.int32, [32767, -32768, 5, 2, 0]),
        ([0, 32768, 65535], np.uint16, [-32768, 0, 32767]),
        ([-32768, -1, 0, 32767], np.dtype(">i2"), [-32768, -1, 0, 32767]),
    ],
)
def test_integer_dtypes_are_scaled_from_full_range(
    values: list[int], dtype: Any, expected: list[int]
) -> None:
    assert i16(to_pcm16(np.array(values, dtype=dtype), 8000, 8000)).tolist() == expected


async def test_int16_array_sources() -> None:
    mono = np.arange(-1000, 1000, dtype=np.int16)
    assert await joined(mono) == mono.tobytes()
    strided = np.arange(-1000, 1000, dtype=np.int16)[::2]
    assert await joined(strided) == strided.tobytes()
    stereo = np.stack([mono, -mono], axis=1)  # channel mean is 0 everywhere
    assert await joined(stereo) == bytes(len(mono) * 2)


async def test_big_float_array_goes_through_thread_and_matches_small_path() -> None:
    x = sine(300, 16000, 10.0)  # bigger than the inline threshold and several blocks
    expected = np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes()
    assert await joined(x) == expected
    assert to_pcm16(x[:100], 16000, 16000) == expected[:200]


@pytest.mark.parametrize(("src", "dst"), [(44100, 16000), (48000, 8000), (8000, 16000)])
def test_resampling_keeps_frequency_and_amplitude(src: int, dst: int) -> None:
    x = sine(1000, src, 2.0).astype(np.float32)
    pcm = to_pcm16(x, src, dst)
    assert abs(len(pcm) // 2 - 2 * dst) <= 1
    freq, rms = peak_freq_and_rms(pcm, dst)
    assert freq == pytest.approx(1000, abs=1)
    assert rms == pytest.approx(0.5 / np.sqrt(2) * 32768, rel=0.01)


def test_blockwise_resampling_matches_one_shot_soxr() -> None:
    x = sine(1234, 44100, 3.0) + sine(4321, 44100, 3.0, amp=0.2)
    assert len(x) > 2 * BLOCK_FRAMES  # the block boundaries must not show
    reference = soxr.resample(x, 44100, 16000, quality="HQ")
    reference = np.clip(np.rint(reference * 32768), -32768, 32767)
    got = i16(to_pcm16(x, 44100, 16000)).astype(np.float64)
    assert len(got) == len(reference)
    assert np.max(np.abs(got - reference)) <= 1


def test_resampling_removes_content_above_target_nyquist() -> None:
    x = sine(6000, 44100, 1.0)  # above 4 kHz, must not alias into the 8 kHz output
    pcm = to_pcm16(x, 44100, 8000)
    _, rms = peak_freq_and_rms(pcm, 8000)
    assert rms < 0.001 * 32768


# -- iterables -------------------------------------------------------------------------


async def test_sync_iterable_with_odd_splits_is_realigned() -> None:
    pcm = np.arange(-2000, 2000, dtype="<i2").tobytes()
    rng = random.Random(4)
    pieces: list[Any] = []
    pos = 0
    while pos < len(pcm):
        size = rng.randrange(0, 301)
        pieces.append(rng.choice([bytes, bytearray, memoryview])(pcm[pos : pos + size]))
        pos += size
    chunks = await collect(pieces)
    assert all(len(c) % 2 == 0 and c for c in chunks)
    assert b"".join(chunks) == pcm


async def test_async_iterable_of_mixed_chunks() -> None:
    async def source() -> AsyncIterator[Any]:
        yield b"\x01\x00\x02"
        yield b"\x00"
        yield np.array([3, -4], dtype=np.int16)
        yield np.array([0.5, -1.0], dtype=np.float32)
        yield np.array([[100, 300]], dtype=np.int16)  # stereo chunk downmixed to 200
        yield b""
        yield np.zeros(0, dtype=np.float64)

    assert i16(await joined(source())).tolist() == [1, 2, 3, -4, 16384, -32768, 200]


async def test_sync_iterable_at_8k_passes_bytes_through() -> None:
    chunks = [b"\x00\x01" * 80, b"\x02\x03" * 80]
    assert await collect(iter(chunks), 8000) == chunks


async def test_async_generator_is_closed_when_consumer_stops() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"\x00\x00" * 320
        finally:
            closed.set()

    agen = pcm_chunks(endless(), 16000)
    assert await anext(agen) == bytes(640)
    await agen.aclose()
    assert closed.is_set()


async def test_sync_generator_is_closed_when_consumer_stops() -> None:
    state = {"closed": False}

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield bytes(640)
        finally:
            state["closed"] = True

    agen = pcm_chunks(endless(), 16000)
    await anext(agen)
    await agen.aclose()
    assert state["closed"]


# -- bad input -------------------------------------------------------------------------


def _text_as_wav(tmp_path: Path) -> Path:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all\n" * 10)
    return path


def _empty_wav(tmp_path: Path) -> Path:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0), 16000, subtype="PCM_16")
    return path


def _odd_pcm(tmp_path: Path) -> Path:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x00" * 641)
    return path


def _empty_pcm(tmp_path: Path) -> Path:
    path = tmp_path / "empty.pcm"
    path.write_bytes(b"")
    return path


def _nan_at_end_wav(tmp_path: Path) -> Path:
    data = sine(500, 16000, 6.0)
    data[-1] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    return path


_BAD_WHOLE_SOURCES: list[tuple[str, Any, str]] = [
    ("odd bytes", b"\x00\x01\x02", r"even number of bytes.*got 3 bytes"),
    ("empty bytes", b"", r"empty"),
    ("empty bytearray", bytearray(), r"empty"),
    ("missing file", "/nonexistent/dir/speech.wav", r"not found: /nonexistent/dir/speech\.wav"),
    ("directory", lambda p: p, r"directory"),
    ("text renamed .wav", _text_as_wav, r"cannot read audio file .*notes\.wav.*accepted: .*WAV"),
    ("empty wav", _empty_wav, r"no audio"),
    ("odd raw file", _odd_pcm, r"odd\.raw must have an even number of bytes.*641"),
    ("empty pcm file", _empty_pcm, r"empty"),
    ("nan in file", _nan_at_end_wav, r"NaN"),
    ("complex", np.ones(10, dtype=np.complex64), r"dtype complex64; accepted: int16"),
    ("object", np.array([1, "a"], dtype=object), r"dtype object"),
    ("bool", np.ones(10, dtype=bool), r"dtype bool"),
    ("strings", np.array(["a", "b"]), r"dtype <U1"),
    ("3-D", np.zeros((10, 2, 2), dtype=np.int16), r"1-D .* or 2-D .*got 3-D"),
    ("0-D", np.array(0.5), r"got 0-D"),
    ("zero channels", np.zeros((10, 0), dtype=np.int16), r"zero channels"),
    ("channels first", np.zeros((2, 16000), dtype=np.float32), r"16000 channels.*data\.T"),
    ("empty array", np.zeros(0, dtype=np.int16), r"empty"),
    ("nan", np.array([0.0, np.nan]), r"NaN or infinite"),
    ("inf", np.array([np.inf, 0.0], dtype=np.float32), r"NaN or infinite"),
    ("float peak", np.array([0.0, 1.5, -0.2]), r"\[-1\.0, 1\.0\]; found a peak of 1\.5$"),
    ("int-range floats", np.array([1000.0, -3.0]), r"peak of 1000 .*divide by 32768"),
    ("unsupported type", 12345, r"unsupported audio source type int; accepted: bytes-like"),
]


@pytest.mark.parametrize(
    ("source", "match"),
    [pytest.param(src, match, id=name) for name, src, match in _BAD_WHOLE_SOURCES],
)
async def test_bad_whole_source_fails_before_first_chunk(
    tmp_path: Path, source: Any, match: str
) -> None:
    if callable(source):
        source = source(tmp_path)
    agen = pcm_chunks(source, 16000)
    with pytest.raises(AudioFormatError, match=match):
        await anext(agen)  # the very first chunk: nothing can have been sent


async def test_bad_tail_of_big_array_fails_before_first_chunk() -> None:
    x = sine(500, 16000, 6.0)
    x[-1] = 7.0
    assert len(x) * 2 > CHUNK_BYTES
    with pytest.raises(AudioFormatError, match="peak of 7"):
        await anext(pcm_chunks(x, 16000))


@pytest.mark.parametrize("rate", [44100, 0, -16000, 16000.0, True, "16000"])
async def test_bad_session_rate(rate: Any) -> None:
    with pytest.raises(AudioFormatError, match="sample_rate must be 8000 or 16000 Hz"):
        await anext(pcm_chunks(b"\x00\x00", rate))
    with pytest.raises(AudioFormatError, match="sample_rate must be 8000 or 16000 Hz"):
        load_file(FIXTURES / "hello.wav", rate)


@pytest.mark.parametrize("rate", [0, -8000, float("nan"), float("inf"), None])
def test_bad_source_rate(rate: Any) -> None:
    with pytest.raises(AudioFormatError, match="source sample rate must be a positive"):
        to_pcm16(np.zeros(10, dtype=np.int16), rate, 16000)


def test_to_pcm16_rejects_non_arrays() -> None:
    with pytest.raises(AudioFormatError, match="expected a numpy array; got list"):
        to_pcm16([0, 1], 16000, 16000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("some text", r"bytes-like \(PCM16LE\) or numpy arrays; got an item of type str"),
        (42, r"got an item of type int"),
        ([0, 1], r"got an item of type list"),
        (np.array([np.nan], dtype=np.float32), r"NaN"),
    ],
)
async def test_iterable_with_bad_item(item: Any, match: str) -> None:
    agen = pcm_chunks([b"\x00\x00", item], 16000)
    assert await anext(agen) == b"\x00\x00"  # chunks before the bad one were fine
    with pytest.raises(AudioFormatError, match=match):
        await anext(agen)


async def test_async_iterable_ending_mid_sample() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"\x00\x00\x01"
        yield b"\x02\x03"

    with pytest.raises(AudioFormatError, match="ended mid-sample: 1 byte left over"):
        await collect(source())


async def test_array_after_odd_byte_is_rejected() -> None:
    with pytest.raises(AudioFormatError, match=r"odd length.*numpy array"):
        await collect([b"\x00", np.zeros(2, dtype=np.int16)])


def test_audio_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        to_pcm16(np.zeros(0), 16000, 16000)


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "WAV"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00", "MP3"),
        (b"\xff\xfb\x90\x64" + bytes(8), "MP3"),  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz
        (b"OggS\x00\x02" + bytes(6), "OGG"),
        (b"fLaC\x00\x00\x00\x22" + bytes(4), "FLAC"),
        (b"\xff\xff\xff\xff" + bytes(8), None),  # PCM: samples of -1 (bitrate index 15)
        (b"\xff\xef\x00\x00" + bytes(8), None),  # PCM: reserved MPEG version bits
        (bytes(12), None),  # PCM silence
        (b"RIFF\x24\x00\x00\x00AVI LIST", None),  # RIFF, but not audio
    ],
)
def test_sniff_container(head: bytes, kind: str | None) -> None:
    assert sniff_container(head) == kind


def test_wav_stream_layout() -> None:
    wav = io.BytesIO()
    sf.write(wav, np.zeros(160, dtype=np.int16), 16000, format="WAV", subtype="PCM_16")
    data = wav.getvalue()
    assert wav_stream_layout(data, 16000) == (44, 320)
    assert wav_stream_layout(data, 8000) is None  # another rate: decode it whole
    assert wav_stream_layout(data[:30], 16000) is None  # the header is not complete yet
    open_ended = data[:40] + b"\xff\xff\xff\xff"
    assert wav_stream_layout(open_ended, 16000) == (44, None)
