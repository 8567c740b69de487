"""Recognition engine of the local gateway: start-parameter validation, sentence
segmentation (VAD) and the recognisers behind one small interface.

A recogniser turns the PCM of one segment into partial and final text:

* :meth:`SpeechEngine.open` starts a segment (``sample_rate``, ``offset_ms`` = where the
  segment starts in the task's audio) and returns a :class:`SegmentDecoder`;
* :meth:`SegmentDecoder.feed` adds PCM16 mono bytes and returns the current hypothesis;
* :meth:`SegmentDecoder.finish` returns the final :class:`Transcript` (word times in ms
  from the segment start) and releases the decoder; :meth:`SegmentDecoder.close`
  releases it without a result.

All three may be slow (CPU work): the gateway calls them in a bounded thread pool, never
on the event loop. Three recognisers ship: :class:`SphinxRecognizer` (PocketSphinx,
real streaming partials, word times), :class:`SpanRecognizer` (deterministic, reports
where speech is, e.g. ``"speech 0.88-2.52"``) and :class:`CallableRecognizer` (wraps a
user function ``fn(pcm, sample_rate) -> str | Transcript``).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from ..errors import SUCCESS, status_text
from ..realtime.protocol import (
    MAX_SPEECH_MS,
    RECOGNIZER,
    TRANSCRIBER,
    DirectiveError,
    StartParams,
    Word,
)
from .vad import FRAME_MS, EnergyVad

__all__ = [
    "Adaptation",
    "CallableRecognizer",
    "DecoderSlots",
    "Emit",
    "RecognizerSpec",
    "RecognizerTask",
    "Runner",
    "SegmentDecoder",
    "SpanRecognizer",
    "SpeechEngine",
    "SphinxRecognizer",
    "TranscriberTask",
    "Transcript",
    "release_memory",
    "resolve_recognizer",
]

T = TypeVar("T")

#: Longest audio a SpeechRecognizer task may carry, and longest transcriber sentence
#: (a longer one is cut, as the cloud's multi-threshold mode does): this bounds memory.
#: Consecutive voiced 20 ms frames that open a sentence (debounces clicks).
START_FRAMES = 3
#: Audio before the detected start that is still given to the recogniser.
PREROLL_FRAMES = 10
#: Silence after a sentence's speech that is still given to the recogniser.
TAIL_MS = 300
#: Intermediate results come about this often (ms of audio).
PARTIAL_MS = 200
DEFAULT_END_SILENCE_MS = 800
#: RMS of the noise floor added to upsampled 8 kHz audio before PocketSphinx (about
#: -72 dBFS: no digital silence). Measured on the held-out phrases at 8 kHz: 24.7 % WER
#: at 8, 25.0 % at 0, 26.7 % at 20, 35.6 % at 60 (the old value), 48.3 % at 150.
NARROWBAND_NOISE = 8.0
#: PocketSphinx's language-model weight: 5.5, not the model's 6.5, trusts the acoustics
#: more; on the held-out phrases it took the WER from 11.4 to 10.3 % (real-time) and
#: from 10.6 to 9.4 % (recordings); see benchmarks/RESULTS-accuracy.md.
LANGUAGE_WEIGHT = 5.5
#: PocketSphinx's word insertion penalty (``wip``, the model's 0.65): fewer spurious short
#: words ("milk and the goods"). Held-out WER at 16 kHz (recordings / real-time, with
#: PRIME_MS = 2000): 9.4 / 9.7 % at 0.65, 8.6 / 8.3 % at 0.01; recordings 9.2 % at 0.001,
#: 8.6 % at 0.003, 8.9 % at 0.03, 9.4 % at 0.1 and 0.2: a broad minimum.
WORD_INSERTION_PENALTY = 0.01
#: Audio of a real-time sentence that sets its cepstral mean (see SphinxRecognizer); it is
#: decoded with that mean, and before, provisionally, if the session wants partial results.
#: Held-out WER (16 kHz, real-time, WORD_INSERTION_PENALTY = 0.01): 9.2 % at 1000 ms, 8.6 %
#: at 1500, 8.3 % at 2000, 8.6 % at 2500. Setting the mean costs little (see _PRIME_SEARCH):
#: the price of a longer prime is the provisional decode of that much audio (partials).
PRIME_MS = 2000


# --------------------------------------------------------------------------- recognisers


@dataclass(frozen=True)
class Transcript:
    """A segment's final text; word times are ms from the segment start."""

    text: str
    words: tuple[Word, ...] = ()
    confidence: float = 1.0


@runtime_checkable
class SegmentDecoder(Protocol):
    """Decodes one segment of audio (see the module docstring)."""

    def feed(self, pcm: bytes) -> str: ...

    def finish(self) -> Transcript: ...

    def close(self) -> None: ...


@runtime_checkable
class SpeechEngine(Protocol):
    """What the gateway recognises speech with (PocketSphinx, the span stand-in, your
    own): it creates a :class:`SegmentDecoder` per segment. Not to be confused with the
    client's :class:`nlsstream.Recognizer` session."""

    name: str

    def open(self, sample_rate: int, offset_ms: int) -> SegmentDecoder: ...


class _SpanDecoder:
    def __init__(self, sample_rate: int, offset_ms: int) -> None:
        self.vad = EnergyVad(sample_rate)
        self.offset_ms = offset_ms
        self.frames = 0
        self.first: int | None = None
        self.last = 0

    def feed(self, pcm: bytes) -> str:
        _, flags = self.vad.process(pcm)
        for voiced in flags:
            self.frames += 1
            if voiced:
                if self.first is None:
                    self.first = self.frames - 1
                self.last = self.frames
        return self._text()

    def _span(self) -> tuple[int, int] | None:
        if self.first is None:
            return None
        return self.first * FRAME_MS, self.last * FRAME_MS

    def _text(self) -> str:
        span = self._span()
        if span is None:
            return ""
        begin, end = (self.offset_ms + t for t in span)
        return f"speech {begin / 1000:.2f}-{end / 1000:.2f}"

    def finish(self) -> Transcript:
        span = self._span()
        words = (Word("speech", *span),) if span else ()
        return Transcript(self._text(), words, 1.0)

    def close(self) -> None:
        pass


class SpanRecognizer:
    """Deterministic recogniser needing nothing installed: the text says where the
    speech in the segment is, ``"speech <begin>-<end>"`` in seconds of task audio, and the
    one word ``"speech"`` carries the same times."""

    name = "span"

    def open(self, sample_rate: int, offset_ms: int) -> SegmentDecoder:
        return _SpanDecoder(sample_rate, offset_ms)


class _CallableDecoder:
    def __init__(self, fn: Callable[[bytes, int], str | Transcript], sample_rate: int) -> None:
        self.fn = fn
        self.sample_rate = sample_rate
        self.buffer = bytearray()

    def feed(self, pcm: bytes) -> str:
        self.buffer += pcm
        return ""

    def finish(self) -> Transcript:
        result = self.fn(bytes(self.buffer), self.sample_rate)
        self.buffer = bytearray()
        return result if isinstance(result, Transcript) else Transcript(str(result))

    def close(self) -> None:
        self.buffer = bytearray()


class CallableRecognizer:
    """Wraps ``fn(pcm: bytes, sample_rate: int) -> str | Transcript``, called once per
    segment with all of its audio (at most 60 s). It gives no partial results."""

    def __init__(self, fn: Callable[[bytes, int], str | Transcript], name: str = "") -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def open(self, sample_rate: int, offset_ms: int) -> SegmentDecoder:
        return _CallableDecoder(self.fn, sample_rate)


def sphinx_available() -> bool:
    """Whether PocketSphinx can be imported."""
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Adaptation:
    """One session's acoustic normalisation for :class:`SphinxRecognizer`: one per
    real-time task or recording channel, never shared between sessions, so that a
    session's text depends on its own audio only, not on what a pooled decoder heard
    before.

    Attributes:
        batch: the whole of each segment is known before it is decoded (recordings):
            the segment is decoded in one pass, with the cepstral mean of all of it.
        cmn: the session's cepstral mean so far (PocketSphinx's comma-separated form),
            carried from sentence to sentence; ``None`` before the first sentence.
        partials: the session wants partial results (``enable_intermediate_result``).
            Only then is a real-time sentence's start decoded provisionally, until its
            mean is set; without, that audio is decoded once, after, and ``feed()``
            returns ``""`` until then. The final texts are the same either way.
    """

    batch: bool = False
    cmn: str | None = None
    partials: bool = True


def release_memory() -> bool:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``); whether it
    could. glibc keeps freed blocks in its arenas: without this a gateway holds a burst's
    decoders' worth of memory long after they are gone."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


class SphinxRecognizer:
    """PocketSphinx with its bundled US-English model, streaming (``start_utt`` /
    ``process_raw`` / ``hyp`` / ``end_utt`` / ``seg``).

    Decoders take ~0.3 s and tens of MB to create, so they are pooled: a segment borrows
    one and gives it back when it ends; at most ``max_idle`` idle decoders are kept, and
    when the last borrowed decoder comes back (the gateway is idle) only ``keep_idle``
    stay and the freed memory is returned to the system (:func:`release_memory`).

    Cepstral mean normalisation (CMN) is what makes PocketSphinx accurate, and its live
    mode barely moves within a short sentence, so the mean must fit the speaker from
    the start. It comes from the session's own audio (:class:`Adaptation`), never from
    whichever session used a pooled decoder before: a real-time sentence is decoded once
    its first ``PRIME_MS`` of audio (or all of it, if shorter) have set the mean, starting
    from the session's previous sentence or, for the first, from the model's (until then
    a provisional decode gives the partial results, if the session wants them:
    ``Adaptation.partials``); a recording's sentence
    (``Adaptation.batch``) is decoded with the mean of all of it.

    All decoders run at 16 kHz: the en-us model is trained on wide-band audio and fails
    to initialise at 8 kHz, so 8 kHz audio is upsampled with soxr first, plus a faint
    noise floor. Expect a higher error rate there: the audio lacks everything above
    4 kHz (benchmarks/RESULTS-accuracy.md has the figures).
    """

    name = "sphinx"

    def __init__(self, *, max_idle: int = 4, keep_idle: int = 1, **config: Any) -> None:
        if not 0 <= keep_idle <= max_idle:
            raise ValueError(f"need 0 <= keep_idle <= max_idle, got {keep_idle}, {max_idle}")
        self.max_idle = max_idle
        self.keep_idle = keep_idle
        self.config = {
            "loglevel": "FATAL",
            "lw": LANGUAGE_WEIGHT,
            "wip": WORD_INSERTION_PENALTY,
            **config,
        }
        self._idle: list[Any] = []
        self._borrowed = 0
        self._searched = 0  # bytes of 16 kHz PCM16
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        """Decoders kept for the next segments."""
        return len(self._idle)

    @property
    def borrowed(self) -> int:
        """Decoders in use by open segments now."""
        return self._borrowed

    @property
    def searched_ms(self) -> int:
        """Audio (ms) the segments that ended so far ran through the language-model
        search, the costly part of decoding: audio decoded twice (a provisional decode
        for partial results) counts twice, the pass that only sets a mean not at all."""
        return self._searched // 32

    def _acquire(self) -> Any:
        with self._lock:
            self._borrowed += 1
            if self._idle:
                return self._idle.pop()
        try:
            from pocketsphinx import Decoder

            decoder = Decoder(samprate=16000, **self.config)
            decoder.add_jsgf_string(_PRIME_SEARCH, _PRIME_GRAMMAR)
        except BaseException:
            with self._lock:
                self._borrowed -= 1
            raise
        return decoder

    def _release(self, decoder: Any, searched: int = 0) -> None:
        surplus: list[Any] = []
        with self._lock:
            self._borrowed -= 1
            self._searched += searched
            if len(self._idle) < self.max_idle:
                self._idle.append(decoder)
            else:
                surplus.append(decoder)
            if self._borrowed == 0 and len(self._idle) > self.keep_idle:
                surplus += self._idle[self.keep_idle :]
                del self._idle[self.keep_idle :]
        if surplus:
            surplus.clear()  # the decoders are freed here, then their memory returned
            release_memory()

    def warm_up(self) -> None:
        """Create one decoder now, so the first segment does not pay for it."""
        self._release(self._acquire())

    def open(
        self, sample_rate: int, offset_ms: int, adaptation: Adaptation | None = None
    ) -> SegmentDecoder:
        """A segment's decoder; ``adaptation`` is its session's (a fresh one if omitted:
        the segment is then normalised on its own)."""
        return _SphinxDecoder(self, self._acquire(), sample_rate, adaptation or Adaptation())


#: A one-word grammar the mean-setting pass runs under: ``end_utt`` always searches the
#: audio it was given, and with the language model that search cost as much as the
#: decode itself (0.16 CPU s per audio s); with this grammar it costs ~0.004.
_PRIME_SEARCH = "_prime"
_PRIME_GRAMMAR = b"#JSGF V1.0;\ngrammar prime;\npublic <s> = a;\n"


class _SphinxDecoder:
    FILLERS = ("<", "[")

    def __init__(
        self, owner: SphinxRecognizer, decoder: Any, sample_rate: int, adaptation: Adaptation
    ) -> None:
        self.owner = owner
        self.decoder: Any = decoder
        self.adaptation = adaptation
        self.started = False  # the utterance is being decoded (its mean is set)
        self.provisional = False  # a provisional decode runs until then (partials)
        self.held = bytearray()  # 16 kHz audio waiting for its mean to be known
        self.searched = 0  # bytes given to the language-model search (searched_ms)
        self.resampler: Any = None
        if sample_rate != 16000:
            import soxr

            self.resampler = soxr.ResampleStream(sample_rate, 16000, 1, dtype="int16")
            self.rng = np.random.default_rng(0)  # deterministic results

    def _process(self, pcm: bytes, last: bool = False) -> None:
        if self.resampler is not None:
            samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
            up = self.resampler.resample_chunk(samples, last=last).astype(np.float32)
            # Upsampled audio has nothing above 4 kHz: a faint floor, not digital silence.
            up += self.rng.normal(0.0, NARROWBAND_NOISE, up.shape).astype(np.float32)
            pcm = np.clip(up, -32768, 32767).astype("<i2").tobytes()
        if self.started:
            if pcm:
                self._search(pcm)
            return
        self.held += pcm
        if last or (not self.adaptation.batch and len(self.held) >= PRIME_MS * 32):
            self._start()
        elif self.adaptation.partials and not self.adaptation.batch and pcm:
            # Until the mean is known, a provisional decode (from the session's mean so
            # far) gives the partial results; _start() decodes this audio again. Without
            # partials nobody would see it: the audio waits for _start() alone.
            if not self.provisional:
                self._reset()
                self.decoder.start_utt()
                self.provisional = True
            self._search(pcm)

    def _search(self, pcm: bytes, full_utt: bool = False) -> None:
        self.searched += len(pcm)
        self.decoder.process_raw(pcm, False, full_utt)

    def _reset(self) -> None:
        # A pooled decoder's feature extraction keeps running sums (CMN, noise) from
        # the segments it decoded before, and set_cmn() alone does not clear them:
        # reinitialise it (0.1 ms), so nothing of another session is left.
        self.decoder.activate_search()  # the language model (not _PRIME_SEARCH)
        self.decoder.reinit_feat()
        if self.adaptation.cmn is not None:
            self.decoder.set_cmn(self.adaptation.cmn)

    def _start(self) -> None:
        """Set the mean from the held audio (a pass with no search), then decode it."""
        decoder, audio = self.decoder, bytes(self.held)
        self.held = bytearray()
        if self.provisional:
            decoder.end_utt()
            self.provisional = False
        self._reset()
        if audio and self.adaptation.batch:
            # A recording's sentence: one pass with the mean of all of it (PocketSphinx's
            # batch CMN). Held-out WER at 16 / 8 kHz: 8.6 / 20.3 %; 8.6 / 22.8 % when
            # decoded live from that mean instead.
            decoder.start_utt()
            self.started = True
            self._search(audio, full_utt=True)
            return
        if audio:
            decoder.activate_search(_PRIME_SEARCH)
            decoder.start_utt()
            decoder.process_raw(audio, True, True)
            decoder.end_utt()  # a search under the one-word grammar: nearly free
            decoder.activate_search()
            decoder.set_cmn(decoder.get_cmn(False))
        decoder.start_utt()
        self.started = True
        if audio:
            self._search(audio)

    def feed(self, pcm: bytes) -> str:
        if self.decoder is None:
            return ""
        self._process(pcm)
        if not (self.started or self.provisional):
            return ""
        hyp = self.decoder.hyp()
        return str(hyp.hypstr) if hyp is not None else ""

    def finish(self) -> Transcript:
        decoder = self.decoder
        if decoder is None:
            return Transcript("")
        self._process(b"", last=True)
        decoder.end_utt()
        # The session's next sentence starts from this one's mean.
        self.adaptation.cmn = str(decoder.get_cmn(False))
        hyp = decoder.hyp()
        words: list[Word] = []
        probs: list[float] = []
        frate = 100
        for seg in decoder.seg() or ():  # None when the segment had no audio
            text = str(seg.word)
            if text.startswith(self.FILLERS):
                continue
            text = text.split("(", 1)[0]
            words.append(
                Word(text, seg.start_frame * 1000 // frate, (seg.end_frame + 1) * 1000 // frate)
            )
            probs.append(float(seg.prob))
        self.decoder = None
        self.owner._release(decoder, self.searched)
        text = str(hyp.hypstr) if hyp is not None else ""
        confidence = round(sum(probs) / len(probs), 3) if probs else 0.0
        return Transcript(text, tuple(words), confidence)

    def close(self) -> None:
        decoder, self.decoder = self.decoder, None
        if decoder is not None:
            if self.started or self.provisional:
                decoder.end_utt()
            self.owner._release(decoder, self.searched)


_shared_sphinx: SphinxRecognizer | None = None
_shared_lock = threading.Lock()


def shared_sphinx() -> SphinxRecognizer:
    """The process-wide PocketSphinx recogniser, so every gateway shares one pool."""
    global _shared_sphinx
    with _shared_lock:
        if _shared_sphinx is None:
            _shared_sphinx = SphinxRecognizer()
        return _shared_sphinx


RecognizerSpec = str | SpeechEngine | Callable[[bytes, int], "str | Transcript"]


def resolve_recognizer(spec: RecognizerSpec) -> SpeechEngine:
    """``"auto"`` (PocketSphinx if importable, else span), ``"sphinx"``, ``"span"``, a
    :class:`SpeechEngine`, or a callable ``fn(pcm, sample_rate) -> str | Transcript``."""
    if isinstance(spec, str):
        if spec == "auto":
            return shared_sphinx() if sphinx_available() else SpanRecognizer()
        if spec == "sphinx":
            if not sphinx_available():
                raise ValueError("recognizer='sphinx' needs pocketsphinx: pip install pocketsphinx")
            return shared_sphinx()
        if spec == "span":
            return SpanRecognizer()
        raise ValueError(f"unknown recognizer {spec!r}: use 'auto', 'sphinx', 'span' or a callable")
    if isinstance(spec, SpeechEngine):
        return spec
    if callable(spec):
        return CallableRecognizer(spec)
    raise TypeError(f"recognizer must be a name, a SpeechEngine or a callable, got {spec!r}")


# --------------------------------------------------------------------------- tasks


class Runner(Protocol):
    """Runs blocking work off the event loop (e.g. ``loop.run_in_executor`` bound to a pool)."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


#: Sends one event: ``await emit(name, payload)``.
Emit = Callable[[str, "dict[str, Any] | None"], Awaitable[None]]


class DecoderSlots:
    """At most ``size`` open segments (decoders) at once across a gateway's tasks: a
    PocketSphinx decoder holds ~45 MB. A segment that finds no free slot within ``wait``
    seconds fails its task with 52010001 INSTANCE_POOL_EXHAUSTED (retryable), and the
    others go on. A task whose client is gone stops waiting (it is cancelled) and never
    creates its decoder."""

    def __init__(self, size: int, wait: float) -> None:
        if size < 1:
            raise ValueError(f"max_decoders must be at least 1, got {size}")
        self.size = size
        self.wait = wait
        self._free = asyncio.Semaphore(size)
        #: Slots taken now.
        self.in_use = 0

    async def acquire(self) -> None:
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait)
            self.in_use += 1
        except asyncio.TimeoutError:
            raise DirectiveError(
                52010001,
                status_text(
                    52010001,
                    f"No recogniser free within {self.wait:g} s: this gateway decodes at "
                    f"most {self.size} sentences at once (serve --max-decoders N, "
                    "--decoder-wait S)!",
                ),
            ) from None

    def release(self) -> None:
        self.in_use -= 1
        self._free.release()


class _Base:
    def __init__(
        self,
        params: StartParams,
        recognizer: SpeechEngine,
        run: Runner,
        emit: Emit,
        slots: DecoderSlots | None = None,
        alive: Callable[[], bool] | None = None,
        *,
        batch: bool = False,
    ) -> None:
        self.params = params
        #: The session's acoustic adaptation (PocketSphinx); ``batch`` when the whole
        #: recording is known, so a sentence need not be decoded as it comes.
        self.adaptation = Adaptation(batch=batch, partials=params.enable_intermediate_result)
        self.recognizer = recognizer
        self.run = run
        self.emit = emit
        self.slots = slots or DecoderSlots(1 << 20, 60.0)  # no bound of its own
        #: Whether the task's client is still there (checked before making a decoder).
        self.alive = alive or (lambda: True)
        self._setup()
        self.rate = params.sample_rate
        self.vad = EnergyVad(params.sample_rate)
        self.frame_no = 0  # 20 ms frames classified so far: the task's audio clock
        self.audio_bytes = 0
        self.decoder: SegmentDecoder | None = None
        self.pending = bytearray()  # audio not yet given to the decoder (< PARTIAL_MS)
        self.partial_bytes = self.rate * 2 * PARTIAL_MS // 1000

    def _setup(self) -> None:
        """What a kind of task adds to the state above."""

    @property
    def now_ms(self) -> int:
        return self.frame_no * FRAME_MS

    @property
    def duration_ms(self) -> int:
        return self.audio_bytes * 1000 // (2 * self.rate)

    async def _feed_pending(self) -> str:
        assert self.decoder is not None
        data, self.pending = bytes(self.pending), bytearray()
        return await self.run(self.decoder.feed, data)

    async def _open(self, offset_ms: int) -> None:
        """Start a segment: a decoder slot (waiting for one, bounded), then a decoder."""
        await self.slots.acquire()
        try:
            if not self.alive():
                # The client left while this segment waited for a slot: no decoder.
                raise ConnectionAbortedError("the client is gone")
            if isinstance(self.recognizer, SphinxRecognizer):
                self.decoder = await self.run(
                    self.recognizer.open, self.rate, offset_ms, self.adaptation
                )
            else:
                self.decoder = await self.run(self.recognizer.open, self.rate, offset_ms)
        except BaseException:
            self.slots.release()
            raise

    async def _finish(self) -> Transcript:
        """End the segment: its final transcript; the slot is free again."""
        decoder, self.decoder = self.decoder, None
        assert decoder is not None
        try:
            return await self.run(decoder.finish)
        finally:
            self.slots.release()

    async def close(self) -> None:
        """Release the decoder without a result (connection gone, task failed)."""
        decoder, self.decoder = self.decoder, None
        self.pending = bytearray()
        if decoder is not None:
            try:
                await self.run(decoder.close)
            finally:
                self.slots.release()


class TranscriberTask(_Base):
    """One SpeechTranscriber task: segments audio into sentences and emits
    SentenceBegin / TranscriptionResultChanged / SentenceEnd. The caller sends Started,
    Completed and TaskFailed."""

    def _setup(self) -> None:
        params = self.params
        self.max_silence = params.max_sentence_silence
        self.index = 0
        self.preroll: collections.deque[bytes] = collections.deque(maxlen=PREROLL_FRAMES)
        self.run_start = 0
        self.run_len = 0
        self.begin_time = 0
        self.silence = 0
        self.speech_end = 0
        self.sentences: list[str] = []
        self.offset = 0
        self.pause = bytearray()  # silence after TAIL_MS, held back (see audio())

    def control(self, params: StartParams) -> None:
        """Apply the parameters a ControlTranscriber changed (``max_sentence_silence``)."""
        self.max_silence = params.max_sentence_silence

    async def audio(self, pcm: bytes) -> None:
        self.audio_bytes += len(pcm)
        data, flags = self.vad.process(pcm)
        fb = self.vad.frame_bytes
        view = memoryview(data)
        for i, voiced in enumerate(flags):
            frame = view[i * fb : (i + 1) * fb]
            t = self.now_ms
            self.frame_no += 1
            if self.decoder is None:
                self.preroll.append(bytes(frame))
                if not voiced:
                    self.run_len = 0
                    continue
                if self.run_len == 0:
                    self.run_start = t
                self.run_len += 1
                if self.run_len >= START_FRAMES:
                    await self._begin()
                continue
            if voiced:
                # Speech again: the pause was part of the sentence after all.
                self.pending += self.pause
                self.pause = bytearray()
                self.pending += frame
                self.silence = 0
                self.speech_end = t + FRAME_MS
            else:
                self.silence += FRAME_MS
                # Silence beyond TAIL_MS is held back: fed to the recogniser only if
                # speech follows, so a sentence's end is not decoded into words.
                (self.pending if self.silence <= TAIL_MS else self.pause).extend(frame)
            if self.silence >= self.max_silence or t + FRAME_MS - self.begin_time >= MAX_SPEECH_MS:
                await self._end()
            elif len(self.pending) >= self.partial_bytes:
                text = await self._feed_pending()
                # Partials follow speech, not the silence that may end the sentence.
                if self.params.enable_intermediate_result and self.silence < PARTIAL_MS:
                    await self.emit(
                        TRANSCRIBER.result_changed,
                        {
                            "index": self.index,
                            "time": self.now_ms,
                            "result": text,
                            "confidence": 0.0,
                            "words": [],
                            "status": SUCCESS,
                        },
                    )

    async def _begin(self) -> None:
        self.index += 1
        self.begin_time = self.run_start
        self.speech_end = self.now_ms
        self.silence = 0
        self.run_len = 0
        offset = self.now_ms - len(self.preroll) * FRAME_MS
        self.pending = bytearray(b"".join(self.preroll))
        self.preroll.clear()
        await self.emit("SentenceBegin", {"index": self.index, "time": self.begin_time})
        await self._open(offset)
        self.offset = offset

    async def _end(self) -> None:
        assert self.decoder is not None
        self.pause = bytearray()
        if self.pending:
            await self._feed_pending()
        result = await self._finish()
        words = [
            {
                "text": w.text,
                "startTime": self.offset + w.start_time,
                "endTime": self.offset + w.end_time,
            }
            for w in result.words
        ]
        # A sentence encloses its words: the recogniser hears the audio before the voice
        # detector's start (the pre-roll) and may place a word's edges beyond it.
        begin = min([self.begin_time, *(self.offset + w.start_time for w in result.words)])
        end = max([self.speech_end, *(self.offset + w.end_time for w in result.words)])
        self.sentences.append(result.text)
        await self.emit(
            "SentenceEnd",
            {
                "index": self.index,
                "time": end,
                "begin_time": begin,
                "result": result.text,
                "confidence": result.confidence,
                "words": words if self.params.enable_words else [],
                "status": SUCCESS,
            },
        )

    async def stop(self) -> None:
        """Flush the open sentence (SentenceEnd) before the caller sends Completed."""
        if self.decoder is not None:
            await self._end()


class RecognizerTask(_Base):
    """One SpeechRecognizer task: all audio is one utterance. Emits
    RecognitionResultChanged; returns the RecognitionCompleted payload from
    :meth:`stop`, or from :meth:`audio` when voice detection ended the task early.
    Raises :class:`DirectiveError` for too long (41010104) or silent (41010105) speech."""

    def _setup(self) -> None:
        params = self.params
        self.speech = False
        self.run_len = 0
        self.silence = 0
        self.done = False
        self.end_silence = (
            params.max_end_silence if params.max_end_silence is not None else DEFAULT_END_SILENCE_MS
        )
        self.sentences: list[str] = []

    async def audio(self, pcm: bytes) -> dict[str, Any] | None:
        if self.done:
            return None  # after an early completion later audio is ignored, like the cloud
        if self.duration_ms + len(pcm) * 1000 // (2 * self.rate) > MAX_SPEECH_MS:
            raise DirectiveError(
                41010104,
                status_text(
                    41010104,
                    f"Speech is longer than {MAX_SPEECH_MS // 1000} s, "
                    "the limit of sentence recognition!",
                ),
            )
        self.audio_bytes += len(pcm)
        if self.decoder is None:
            await self._open(0)
        self.pending += pcm
        _, flags = self.vad.process(pcm)
        end_now = False
        for voiced in flags:
            self.frame_no += 1
            if not self.speech:
                self.run_len = self.run_len + 1 if voiced else 0
                self.speech = self.run_len >= START_FRAMES
            elif voiced:
                self.silence = 0
            else:
                self.silence += FRAME_MS
        if self.params.enable_voice_detection:
            limit = self.params.max_start_silence
            if not self.speech and limit is not None and self.now_ms >= limit:
                raise DirectiveError(
                    41010105,
                    status_text(
                        41010105, f"No speech in the first {limit} ms (max_start_silence)!"
                    ),
                )
            end_now = self.speech and self.silence >= self.end_silence
        if end_now:
            return await self.stop()
        if len(self.pending) >= self.partial_bytes:
            text = await self._feed_pending()
            if self.params.enable_intermediate_result:
                await self.emit(
                    RECOGNIZER.result_changed, {"result": text, "duration": self.duration_ms}
                )
        return None

    async def stop(self) -> dict[str, Any]:
        """Finish the utterance; the RecognitionCompleted payload (``result``, ``duration``)."""
        self.done = True
        text = ""
        if self.decoder is not None:
            if self.pending:
                await self._feed_pending()
            text = (await self._finish()).text
        self.sentences.append(text)
        return {"result": text, "duration": self.duration_ms}
