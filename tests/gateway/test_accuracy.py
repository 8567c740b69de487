"""Recognition you can trust: word error rate on held-out phrases, results that do not
depend on what ran before, times that agree across services, memory that returns.

The phrase set (tests/fixtures/phrases: 48 phrases, four flite voices, 16 and 8 kHz) is
measured in full by ``python -m benchmarks.accuracy``; here every third phrase (16, all
four voices) runs through the gateway's engine directly, to stay fast in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import AK_ID, AK_SECRET, FIXTURES, TRANSCRIPTS, read_pcm

from nlsstream.gateway.engine import (
    PARTIAL_MS,
    PRIME_MS,
    Adaptation,
    SphinxRecognizer,
    release_memory,
    sphinx_available,
)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import (  # noqa: E402
    engine_pairs,
    engine_text,
    load_phrases,
    wer,
    word_errors,
)

pytestmark = pytest.mark.skipif(not sphinx_available(), reason="pocketsphinx not installed")

SUBSET = load_phrases()[::3]


@pytest.fixture(scope="module")
def recognizer() -> SphinxRecognizer:
    # One pool for the module, as a gateway has: each phrase may get a decoder that
    # decoded other phrases before.
    return SphinxRecognizer(max_idle=1)


def test_the_subset_covers_every_voice() -> None:
    assert len(load_phrases()) >= 40
    assert {p.voice for p in SUBSET} == {"slt", "kal16", "awb", "rms"}


Pairs = list[tuple[str, str]]
VOICES = sorted({p.voice for p in SUBSET})
SERVICES = ("live", "batch")  # real-time sessions, recordings; each phrase one session


class Decoded:
    """The subset's 16 kHz (reference, hypothesis) pairs per service and voice, decoded
    once in a test run: each voice's by a test of its own (a quarter of the cost each),
    kept in ``folder`` for the bar over the whole subset, which may run on another xdist
    worker (a module fixture would decode everything again on each worker).

    A voice is decoded by whichever test asks for it first, in any worker: it claims the
    voice (a file created exclusively) and writes the pairs; a test that finds the voice
    claimed waits for them (bounded), one that finds it unclaimed decodes it itself (the
    bar, when a voice's test was deselected or is yet to run). No voice is decoded twice."""

    WAIT = 300.0  # a claimed voice's decode on a loaded machine (~2 CPU s at rest)

    def __init__(self, recognizer: SphinxRecognizer, folder: Path) -> None:
        self.recognizer = recognizer
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def voice(self, service: str, voice: str) -> Pairs:
        path = self.folder / f"{service}-{voice}.json"
        claim = path.with_suffix(".claim")
        deadline = time.monotonic() + self.WAIT
        while not path.exists():
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                assert time.monotonic() < deadline, f"{claim} was not decoded in {self.WAIT} s"
                time.sleep(0.05)  # another process decodes it: a cross-process condition
                continue
            try:
                pairs = self._decode(service, voice)
                tmp = path.with_name(f"{path.name}.{os.getpid()}")  # whole, or not there
                tmp.write_text(json.dumps(pairs))
                tmp.replace(path)
                return pairs
            finally:
                claim.unlink()  # after the pairs are there; if they are not, others retry
        return [(ref, hyp) for ref, hyp in json.loads(path.read_text())]

    def _decode(self, service: str, voice: str) -> Pairs:
        phrases = [p for p in SUBSET if p.voice == voice]
        batch = service == "batch"
        return asyncio.run(engine_pairs(phrases, 16000, batch=batch, recognizer=self.recognizer))

    def subset(self, service: str) -> Pairs:
        return [pair for voice in VOICES for pair in self.voice(service, voice)]


@pytest.fixture(scope="module")
def decoded(
    recognizer: SphinxRecognizer, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Decoded:
    # The run's base directory, shared by its xdist workers (pytest-xdist's recipe).
    base = tmp_path_factory.getbasetemp()
    return Decoded(recognizer, (base if worker_id == "master" else base.parent) / "accuracy")


def _errors(pairs: Pairs) -> list[tuple[str, str]]:
    return [(ref, hyp) for ref, hyp in pairs if ref != hyp]


# Measured on this subset (benchmarks/RESULTS-accuracy.md has the full set), real-time
# at 16 kHz / 8 kHz (first 6 phrases): 13.3 % / 35.4 % at 6b2b20c~1 (the mean of whatever
# the pooled decoder heard last: order-dependent), 20.0 % / 50.0 % from 6b2b20c on (every
# sentence from the model's mean), 5.8 % / 16.7 % with a 1 s prime, and 8.3 % for
# recordings; now (2 s prime, word insertion penalty 0.01) 9 / 120 words real-time
# (7.5 %: this subset lost 2 where the full set gained 7), 7 / 120 for recordings and
# 4 / 48 at 8 kHz. The bounds leave two words of margin.
MAX_ERRORS = {"live": 11, "batch": 9}
MAX_ERRORS_8K = 6


def _word_errors(pairs: Pairs) -> int:
    return sum(word_errors(ref, hyp) for ref, hyp in pairs)


@pytest.mark.parametrize(("service", "voice"), [(s, v) for s in SERVICES for v in VOICES])
def test_no_voice_alone_exceeds_the_word_errors_of_the_whole_subset(
    service: str, voice: str, decoded: Decoded
) -> None:
    pairs = decoded.voice(service, voice)
    assert _word_errors(pairs) <= MAX_ERRORS[service], _errors(pairs)


async def test_word_error_rate_at_8_khz(recognizer: SphinxRecognizer) -> None:
    pairs = await engine_pairs(SUBSET[:6], 8000, batch=False, recognizer=recognizer)
    assert _word_errors(pairs) <= MAX_ERRORS_8K, _errors(pairs)


async def test_the_same_audio_gives_the_same_text_whatever_ran_before() -> None:
    # One decoder in the pool: the second decode of the phrase runs on a decoder that
    # heard other voices in between, and must not be swayed by them.
    recognizer = SphinxRecognizer(max_idle=1)
    first, *others = SUBSET[:3]
    pcm = first.pcm(16000)
    for batch in (False, True):
        alone = await engine_text(pcm, 16000, batch=batch, recognizer=recognizer)
        for other in others:
            await engine_text(other.pcm(16000), 16000, batch=batch, recognizer=recognizer)
        assert await engine_text(pcm, 16000, batch=batch, recognizer=recognizer) == alone


def test_a_sentence_is_decoded_provisionally_only_for_partial_results() -> None:
    # Before a real-time sentence's first PRIME_MS have set its mean, its audio is
    # decoded provisionally only to give partial results; without them it is searched
    # once, after, and the final words and times are the same.
    recognizer = SphinxRecognizer(max_idle=1)
    pcm = SUBSET[0].pcm(16000)
    assert len(pcm) > PRIME_MS * 32  # the mean is set mid-sentence, not at its end
    step = PARTIAL_MS * 32
    decoded = {}
    for partials in (False, True):
        before = recognizer.searched_ms
        segment = recognizer.open(16000, 0, Adaptation(partials=partials))
        hyps = [segment.feed(pcm[i : i + step]) for i in range(0, len(pcm), step)]
        decoded[partials] = (hyps, segment.finish(), recognizer.searched_ms - before)
    (plain, final, searched), (with_partials, final_p, searched_p) = decoded[False], decoded[True]
    assert final == final_p and final.words  # the same words, at the same times
    primed = PRIME_MS // PARTIAL_MS - 1  # the chunks before the one that sets the mean
    assert not any(plain[:primed]) and any(with_partials[:primed])
    assert searched == len(pcm) // 32  # every ms of the audio once
    assert searched_p > searched  # and some twice


async def test_a_session_pays_for_partial_results_only_if_it_asks(
    recognizer: SphinxRecognizer,
) -> None:
    pcm, rate = read_pcm("hello.wav")
    searched, texts = {}, {}
    for partials in (False, True):
        before = recognizer.searched_ms
        texts[partials] = await engine_text(
            pcm, rate, batch=False, recognizer=recognizer, partials=partials
        )
        searched[partials] = recognizer.searched_ms - before
    assert texts[False] == texts[True] == "hello world"
    audio_ms = len(pcm) * 1000 // (2 * rate)
    assert searched[False] <= audio_ms < searched[True]  # once, twice


def test_an_idle_pool_keeps_one_decoder_and_returns_memory() -> None:
    recognizer = SphinxRecognizer(max_idle=4, keep_idle=1)
    pcm, rate = read_pcm("hello.wav")
    segments = [recognizer.open(rate, 0) for _ in range(3)]  # a burst: 3 decoders at once
    assert recognizer.borrowed == 3
    for seg in segments[:2]:
        seg.feed(pcm)
        seg.finish()
    assert (recognizer.borrowed, recognizer.idle) == (1, 2)  # still busy: kept for reuse
    segments[2].finish()
    assert (recognizer.borrowed, recognizer.idle) == (0, 1)  # idle: the rest are freed
    if platform.libc_ver()[0] == "glibc":
        assert release_memory()
    with pytest.raises(ValueError, match="keep_idle"):
        SphinxRecognizer(max_idle=1, keep_idle=2)


# --------------------------------------------------------------------------- times


async def _realtime_sentences(url: str, pcm: bytes, rate: int) -> list[Any]:
    import nlsstream

    async with nlsstream.Transcriber(
        appkey="app", token="tok", url=url, sample_rate=rate, enable_words=True
    ) as t:
        await t.stream(pcm, pace=None)
        result = await t.stop()
    return [
        (s.begin_time, s.time, s.text, [(w.text, w.start_time, w.end_time) for w in s.words])
        for s in result.sentences
    ]


async def test_sentence_times_enclose_their_words_and_agree_across_services() -> None:
    import nlsstream
    from nlsstream.gateway import Gateway

    pcm, rate = read_pcm("three_sentences.wav")
    path = FIXTURES / "three_sentences.wav"
    async with Gateway(recognizer="sphinx", access_keys={AK_ID: AK_SECRET}) as gw:
        realtime = await _realtime_sentences(gw.url, pcm, rate)
        async with nlsstream.FlashRecognizer("app", "tok", url=gw.http_url) as flash:
            fl = await flash.recognize(path, enable_word_level_result=True)
        async with nlsstream.FileTranscriber(
            AK_ID, AK_SECRET, appkey="app", endpoint=gw.http_url
        ) as ft:
            ftr = await ft.transcribe(path.resolve().as_uri(), enable_words=True, timeout=120)
    assert [s[2] for s in realtime] == TRANSCRIPTS["three_sentences.wav"]
    for begin, end, _, words in realtime:
        assert words and begin <= words[0][1] and words[-1][2] <= end
    for result in (fl, ftr):
        spans = [(s.begin_time, s.end_time) for s in result.sentences]
        assert len(spans) == len(realtime)
        for (begin, end), (rb, re_, _, _) in zip(spans, realtime, strict=True):
            assert abs(begin - rb) <= 10 and abs(end - re_) <= 10, (spans, realtime)
        words = [(w.text, w.start_time, w.end_time) for s in result.sentences for w in s.words]
        expected = [w for s in realtime for w in s[3]]
        assert [w[0] for w in words] == [w[0] for w in expected]
        for (_, b, e), (_, rb, re_) in zip(words, expected, strict=True):
            assert abs(b - rb) <= 10 and abs(e - re_) <= 10, (words, expected)


# ---------------------------------------------------------------- the bar over the subset
# Last in the module: by then the voices' tests, here or on other workers, have decoded
# much of what it checks (see Decoded).


@pytest.mark.parametrize("service", SERVICES)
def test_word_error_rate_at_16_khz_meets_the_bar(service: str, decoded: Decoded) -> None:
    # Over the whole subset. The 10 % bar also catches 6b2b20c's cepstral mean regression
    # (20.0 % real-time, above).
    pairs = decoded.subset(service)
    assert sorted(ref for ref, _ in pairs) == sorted(p.text for p in SUBSET)
    assert wer(pairs) <= 0.10, _errors(pairs)
    assert _word_errors(pairs) <= MAX_ERRORS[service], _errors(pairs)
