"""The recordings' wire format, sans I/O: one place for the clients and the gateway.

Protocol: ``docs/protocol.md`` §11 (FlashRecognizer §11.2, FileTrans §11.3, REST §11.4)
and ``docs/recordings.md`` (this module's model). Here live the paths, the limits, the
status codes a refusal carries and the HTTP status it travels with, the typed results
(:class:`FileSentence`, :class:`FileResult`) and the validation that turns a service's
JSON answer into them (anything else is a :class:`~nlsstream.errors.ProtocolError` naming
the field), and the builders of the answers the local gateway sends. Nothing here reads
a socket or a file.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import STATUS_CODES, SUCCESS, ProtocolError
from ..realtime.protocol import Word

__all__ = [
    "FILE_TRANS_MAX_BYTES",
    "FLASH_MAX_BYTES",
    "FLASH_MAX_SECONDS",
    "FLASH_PATH",
    "MAX_CHANNELS",
    "MAX_RATE",
    "MIN_RATE",
    "POP_PATH",
    "REST_MAX_SECONDS",
    "REST_PATH",
    "FileResult",
    "FileSentence",
    "Recognised",
    "Refusal",
    "file_trans_answer",
    "flash_answer",
    "http_status",
    "parse_file_trans",
    "parse_flash",
    "parse_rest",
    "parse_submit",
    "pop_error",
    "status_name",
]

# --------------------------------------------------------------------------- paths, limits

FLASH_PATH = "/stream/v1/FlashRecognizer"
REST_PATH = "/stream/v1/asr"
POP_PATH = "/"

#: FlashRecognizer (and REST upload) limit: bytes of one recording (body or link).
FLASH_MAX_BYTES = 100 * 1024 * 1024
#: FileTrans: bytes of one downloaded recording.
FILE_TRANS_MAX_BYTES = 512 * 1024 * 1024
#: Seconds of one recording: FlashRecognizer 2 h, REST 60 s, FileTrans 12 h.
FLASH_MAX_SECONDS = 2 * 3600
REST_MAX_SECONDS = 60
FILE_TRANS_MAX_SECONDS = 12 * 3600
#: The rates the services recognise at.
SAMPLE_RATES = (8000, 16000)
#: A container's rate must lie in this range (a header saying 1 Hz is a bomb: every
#: byte would resample into thousands of samples).
MIN_RATE = 8000
MAX_RATE = 96000
#: Channels of one recording (the services take single- and dual-track audio).
MAX_CHANNELS = 2
#: FileTrans allows one GetTaskResult per second per task.
MIN_POLL_INTERVAL = 1.0

# --------------------------------------------------------------------------- statuses


class Refusal(Exception):
    """A request or task refused with a documented ``status`` (``detail`` says why)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def status_name(status: int) -> str:
    """The documented name of ``status`` (``INJECTED_FAULT`` for an unknown one)."""
    known = STATUS_CODES.get(status)
    return known.name if known is not None else "INJECTED_FAULT"


def http_status(status: int) -> int:
    """The HTTP status a Flash/REST refusal travels with: 403 for a token problem, 429
    for throttling, 408 for a request that came too slowly, 400 for the client's other
    faults, 500 for the service's."""
    if status == 40000001:
        return 403
    if status == 40000005:
        return 429
    if status == 40000004:
        return 408
    return 400 if status < 50000000 else 500


#: The POP errors the gateway answers: code -> (HTTP status, the cloud's message).
POP_ERRORS: dict[str, tuple[int, str]] = {
    "MissingParameter": (400, "The input parameter {} is missing."),
    "InvalidAccessKeyId.NotFound": (404, "Specified access key is not found."),
    "SignatureDoesNotMatch": (
        400,
        # aliyunsdkcore compares what follows the colon with its own string to sign.
        "Specified signature is not matched with our calculation. server string to sign is:{}",
    ),
    "SignatureNonceUsed": (400, "Specified signature nonce was used already."),
    "InvalidTimeStamp.Expired": (400, "Specified time stamp or date value is expired."),
    "InvalidTimeStamp.Format": (
        400,
        "Specified time stamp or date value is not well formatted.",
    ),
    "InvalidParameter": (400, "The parameter {} is not valid."),
    "InvalidAction.NotFound": (404, "Specified api is not found."),
    "Throttling.User": (400, "Request was denied due to user flow control."),
    "RequestTimeout": (408, "The request was not received in time."),
    "InternalError": (500, "The request processing has failed due to some unknown error."),
}


def pop_error(code: str, *args: str) -> tuple[int, dict[str, Any]]:
    """HTTP status and body of the generic POP error envelope for ``code`` (a key of
    :data:`POP_ERRORS`); ``args`` fill the message's ``{}``."""
    http, message = POP_ERRORS[code]
    return http, {
        "HostId": "127.0.0.1",
        "Code": code,
        "Message": message.format(*args),
        "Recommend": f"https://next.api.aliyun.com/troubleshoot?q={code}",
    }


# --------------------------------------------------------------------------- typed results


@dataclass(frozen=True)
class FileSentence:
    """One recognised sentence of a recording; times in ms from its start.

    ``words`` (when asked for) are :class:`~nlsstream.Word` s with the same time base.
    FileTrans also reports ``speech_rate`` (words or characters per minute),
    ``emotion_value`` (1-10) and ``silence_duration`` (seconds of silence before the
    sentence); the other services leave them ``None``.
    """

    text: str
    begin_time: int
    end_time: int
    channel_id: int = 0
    words: tuple[Word, ...] = ()
    speech_rate: int | None = None
    emotion_value: float | None = None
    silence_duration: int | None = None


@dataclass(frozen=True)
class FileResult:
    """A recognised recording: ``sentences`` in time order (all channels), ``duration``
    of the audio in ms, the service's ``task_id`` and ``status`` (e.g. 21050003 when
    FileTrans found no speech: no sentences), and the ``raw`` answer."""

    sentences: tuple[FileSentence, ...]
    duration: int
    task_id: str
    status: int
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def text(self) -> str:
        """The sentences' texts joined (a space between sentences of Latin script)."""
        out = ""
        for s in self.sentences:
            if not s.text:
                continue
            if out and (out[-1].isascii() or s.text[0].isascii()):
                out += " "
            out += s.text
        return out

    def channel(self, channel_id: int) -> tuple[FileSentence, ...]:
        """The sentences of one channel."""
        return tuple(s for s in self.sentences if s.channel_id == channel_id)


# --------------------------------------------------------------------------- validation

#: Integers in answers: times (ms), durations, channels, statuses. Beyond 2**53 a number
#: is no time of any recording.
_MAX_INT = 2**53


class _Fields:
    """Typed reads of one JSON object of an answer; every failure names the field
    (``where`` is its path, e.g. ``flash_result.sentences[3]``)."""

    __slots__ = ("data", "service", "where")

    def __init__(self, service: str, data: Any, where: str) -> None:
        self.service = service
        self.where = where
        if not isinstance(data, Mapping):
            raise self.error(f"{where or 'the answer'} is {_kind(data)}, not an object")
        self.data: Mapping[str, Any] = data

    def error(self, text: str) -> ProtocolError:
        return ProtocolError(f"{self.service} answered a malformed result: {text}")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def integer(self, key: str, default: int | None = 0, *, lenient: bool = False) -> int:
        """An integer; ``lenient`` also takes a decimal string or an integral float
        (FlashRecognizer's word times are documented as strings)."""
        value = self.data.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            if -_MAX_INT <= value <= _MAX_INT:
                return value
        elif isinstance(value, float) and lenient:
            if math.isfinite(value) and abs(value) <= _MAX_INT:
                return int(value)
        elif isinstance(value, str) and lenient and 0 < len(value) <= 16:
            text = value.strip()
            if text.lstrip("-").isdigit() and text.isascii():
                return int(text)
        raise self.error(f"{self._name(key)} must be an integer, not {_kind(value)}")

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value) if abs(value) <= _MAX_INT else math.inf
            if math.isfinite(out):
                return out
        raise self.error(f"{self._name(key)} must be a finite number, not {_kind(value)}")

    def text(self, key: str, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            return value
        raise self.error(f"{self._name(key)} must be a string, not {_kind(value)}")

    def items(self, key: str) -> Sequence[Any]:
        value = self.data.get(key)
        if value is None:
            return ()
        if isinstance(value, list):
            return value
        raise self.error(f"{self._name(key)} must be a list, not {_kind(value)}")

    def obj(self, key: str) -> _Fields:
        value = self.data.get(key)
        return _Fields(self.service, {} if value is None else value, self._name(key))

    def item(self, key: str, index: int, value: Any) -> _Fields:
        return _Fields(self.service, value, f"{self._name(key)}[{index}]")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:40]
    if isinstance(value, str):
        return f"the string {value[:20]!r}"
    return "a list" if isinstance(value, list) else "an object"


def _sorted(sentences: list[FileSentence]) -> tuple[FileSentence, ...]:
    return tuple(sorted(sentences, key=lambda s: (s.begin_time, s.channel_id)))


def parse_flash(data: Mapping[str, Any]) -> FileResult:
    """A FlashRecognizer success answer as a :class:`FileResult` (or ProtocolError)."""
    top = _Fields("FlashRecognizer", data, "")
    flash = top.obj("flash_result")
    sentences = []
    for i, raw in enumerate(flash.items("sentences")):
        s = flash.item("sentences", i, raw)
        words = []
        for j, raw_word in enumerate(s.items("words")):
            w = s.item("words", j, raw_word)
            begin = w.integer("begin_time", lenient=True)
            words.append(Word(w.text("text"), begin, w.integer("end_time", lenient=True)))
        sentences.append(
            FileSentence(
                s.text("text"),
                s.integer("begin_time", lenient=True),
                s.integer("end_time", lenient=True),
                s.integer("channel_id"),
                words=tuple(words),
            )
        )
    duration = flash.integer("duration", lenient=True)
    last_end = max((s.end_time for s in sentences), default=0)
    if 0 < duration * 10 < last_end:
        duration *= 1000  # one documented example gives seconds, not ms (§11.2)
    return FileResult(_sorted(sentences), duration, top.text("task_id"), SUCCESS, dict(data))


def parse_rest(data: Mapping[str, Any], duration: int) -> FileResult:
    """A one-sentence REST success answer: one sentence spanning ``duration`` ms."""
    top = _Fields("REST recognizer", data, "")
    text = top.text("result")
    sentences = (FileSentence(text, 0, duration),) if text else ()
    return FileResult(sentences, duration, top.text("task_id"), SUCCESS, dict(data))


def parse_submit(data: Mapping[str, Any]) -> tuple[int, str, str]:
    """SubmitTask's answer: ``(StatusCode, TaskId, StatusText)``."""
    top = _Fields("FileTrans", data, "")
    return top.integer("StatusCode", None), top.text("TaskId"), top.text("StatusText")


def parse_task_status(data: Mapping[str, Any]) -> tuple[int, str]:
    """GetTaskResult's ``(StatusCode, StatusText)``."""
    top = _Fields("FileTrans", data, "")
    return top.integer("StatusCode", None), top.text("StatusText")


def parse_file_trans(data: Mapping[str, Any]) -> FileResult:
    """A finished GetTaskResult (or callback) answer as a :class:`FileResult`."""
    top = _Fields("FileTrans", data, "")
    result = top.obj("Result")
    sentences = []
    for i, raw in enumerate(result.items("Sentences")):
        s = result.item("Sentences", i, raw)
        rate = s.number("SpeechRate")
        silence = s.number("SilenceDuration")
        sentences.append(
            FileSentence(
                s.text("Text"),
                s.integer("BeginTime"),
                s.integer("EndTime"),
                s.integer("ChannelId"),
                speech_rate=None if rate is None else int(rate),
                emotion_value=s.number("EmotionValue"),
                silence_duration=None if silence is None else int(silence),
            )
        )
    ordered = list(_sorted(sentences))
    # Words come as one flat list: each goes to the latest sentence of its channel that
    # began at or before it.
    starts: dict[int, list[int]] = {}
    members: dict[int, list[int]] = {}
    for i, sentence in enumerate(ordered):
        starts.setdefault(sentence.channel_id, []).append(sentence.begin_time)
        members.setdefault(sentence.channel_id, []).append(i)
    words: dict[int, list[Word]] = {}
    for j, raw_word in enumerate(result.items("Words")):
        w = result.item("Words", j, raw_word)
        channel, begin = w.integer("ChannelId"), w.integer("BeginTime")
        word = Word(w.text("Word"), begin, w.integer("EndTime"))
        if channel not in starts:
            continue
        k = max(bisect.bisect_right(starts[channel], begin) - 1, 0)
        words.setdefault(members[channel][k], []).append(word)
    for i, ws in words.items():
        ws.sort(key=lambda w: w.start_time)
        ordered[i] = dataclasses.replace(ordered[i], words=tuple(ws))
    return FileResult(
        tuple(ordered),
        top.integer("BizDuration"),
        top.text("TaskId"),
        top.integer("StatusCode"),
        dict(data),
    )


# --------------------------------------------------------------------------- the gateway's answers


@dataclass
class Recognised:
    """One sentence the gateway recognised on one channel (times in ms); ``words`` as
    ``(text, begin, end)``."""

    channel: int
    begin: int
    end: int
    text: str
    words: list[tuple[str, int, int]]


def flash_answer(
    sentences: Sequence[Recognised], duration: int, latency: int, *, words: bool
) -> dict[str, Any]:
    """The FlashRecognizer success fields (``task_id``/``status``/``message`` aside)."""
    out = []
    for s in sentences:
        item: dict[str, Any] = {
            "text": s.text,
            "begin_time": s.begin,
            "end_time": s.end,
            "channel_id": s.channel,
        }
        if words:
            item["words"] = [
                {"text": t, "begin_time": b, "end_time": e, "punc": ""} for t, b, e in s.words
            ]
        out.append(item)
    return {
        "result": "",
        "flash_result": {
            "duration": duration,
            "completed": True,
            "latency": latency,
            "sentences": out,
        },
    }


def file_trans_answer(sentences: Sequence[Recognised], words: bool) -> dict[str, Any]:
    """The documented FileTrans ``Result``: Sentences (SilenceDuration in s since the
    channel's previous sentence, SpeechRate in words per minute, a neutral EmotionValue)
    and, when asked for, the flat Words list."""
    previous_end: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    for s in sentences:
        span = max(s.end - s.begin, 1)
        out.append(
            {
                "ChannelId": s.channel,
                "BeginTime": s.begin,
                "EndTime": s.end,
                "Text": s.text,
                "SilenceDuration": max(s.begin - previous_end.get(s.channel, 0), 0) // 1000,
                "SpeechRate": round(len(s.text.split()) * 60000 / span),
                "EmotionValue": 5.0,
            }
        )
        previous_end[s.channel] = s.end
    result: dict[str, Any] = {"Sentences": out}
    if words:
        result["Words"] = [
            {"ChannelId": s.channel, "Word": t, "BeginTime": b, "EndTime": e}
            for s in sentences
            for t, b, e in s.words
        ]
    return result
