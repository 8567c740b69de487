"""Renderers that turn a session's events into text: live terminal lines, plain text,
JSON Lines and SRT / WebVTT subtitles.

Everything here is pure (no I/O beyond the text stream a renderer is given, no asyncio),
so the command line, the examples and user code can share it. A renderer is fed every
event of a session through :meth:`Renderer.handle` and finished with :meth:`Renderer.close`.

Times in events are milliseconds from the start of the audio (``begin_time`` .. ``time``
of a ``SentenceEnd``); subtitles use them as cue times.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from nlsstream import Completed, Event, ResultChanged, SentenceEnd, TaskFailed, Word
from nlsstream.errors import SUCCESS

if TYPE_CHECKING:
    from nlsstream import FileResult

__all__ = [
    "Cue",
    "JsonlRenderer",
    "LiveRenderer",
    "ProgressBar",
    "Renderer",
    "SubtitleRenderer",
    "TextRenderer",
    "TimedText",
    "Transcript",
    "cue_from_event",
    "event_to_json",
    "format_duration",
    "format_srt",
    "format_timestamp",
    "format_vtt",
    "recording_events",
    "render",
    "renderer_for",
]

# Erase the whole current terminal line (ANSI "EL2"); \r then moves to its start.
CLEAR_LINE = "\r\x1b[2K"

# Fields every event has; event_to_json puts the useful ones first and skips the rest.
_BASE_FIELDS = frozenset({"name", "namespace", "task_id", "message_id", "status", "status_text"})


class TimedText(Protocol):
    """Anything with a text and its time span in ms: a ``SentenceEnd`` or a :class:`Cue`."""

    @property
    def begin_time(self) -> int: ...

    @property
    def time(self) -> int: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class Cue:
    """One subtitle cue, ``begin_time`` to ``time`` in ms (the names ``SentenceEnd`` uses)."""

    begin_time: int
    time: int
    text: str


def cue_from_event(event: Event) -> Cue | None:
    """The subtitle cue an event finalises, if any.

    A transcriber's ``SentenceEnd`` gives its sentence; a recognizer's ``Completed`` (which
    carries the whole result and the audio ``duration``) gives one cue from 0 to the end.
    """
    if isinstance(event, SentenceEnd):
        return Cue(event.begin_time, event.time, event.text)
    if isinstance(event, Completed) and event.text:
        return Cue(0, event.duration or 0, event.text)
    return None


def recording_events(result: FileResult, namespace: str) -> list[tuple[int, SentenceEnd]]:
    """A recording's sentences as ``(channel_id, SentenceEnd)`` in time order, so that
    every renderer here writes them as it writes a real-time transcript; ``index``
    counts each channel's sentences from 1, ``namespace`` names the service."""
    counts: dict[int, int] = {}
    out: list[tuple[int, SentenceEnd]] = []
    for s in result.sentences:
        counts[s.channel_id] = counts.get(s.channel_id, 0) + 1
        event = SentenceEnd(
            name="SentenceEnd",
            namespace=namespace,
            task_id=result.task_id,
            index=counts[s.channel_id],
            time=s.end_time,
            begin_time=s.begin_time,
            text=s.text,
            words=s.words,
        )
        out.append((s.channel_id, event))
    return out


# --------------------------------------------------------------------------- subtitles


def format_timestamp(ms: int, decimal: str = ",") -> str:
    """``HH:MM:SS<decimal>mmm`` for a time in ms: SRT uses ``,`` and WebVTT ``.``.

    Negative times are clamped to zero; hours keep counting past 99.
    """
    ms = max(0, int(ms))
    seconds, millis = divmod(ms, 1000)
    minutes, secs = divmod(seconds, 60)
    hours, mins = divmod(minutes, 60)
    return f"{hours:02d}:{mins:02d}:{secs:02d}{decimal}{millis:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, so a cue's text must be a single paragraph.
    return " ".join(text.split())


def _vtt_escape(text: str) -> str:
    # WebVTT cue text is markup: '&' and '<' must be escaped, and "-->" is not allowed.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _format_cues(sentences: Iterable[TimedText], *, decimal: str, numbered: bool) -> str:
    blocks: list[str] = []
    for sentence in sentences:
        text = _cue_text(sentence.text)
        if not text:
            continue  # an empty cue is noise in every player
        start = max(0, sentence.begin_time)
        end = max(start, sentence.time)
        timing = f"{format_timestamp(start, decimal)} --> {format_timestamp(end, decimal)}"
        head = f"{len(blocks) + 1}\n" if numbered else ""
        blocks.append(f"{head}{timing}\n{text}\n")
    return "\n".join(blocks)


def format_srt(sentences: Iterable[TimedText]) -> str:
    """SubRip subtitles: numbered cues, ``00:00:01,234 --> 00:00:02,500``, blank-line separated.

    Sentences with empty text are skipped (numbering stays contiguous); each cue's text is
    joined onto one line.
    """
    return _format_cues(sentences, decimal=",", numbered=True)


def format_vtt(sentences: Iterable[TimedText]) -> str:
    """WebVTT subtitles: the ``WEBVTT`` header, then ``00:00:01.234 --> 00:00:02.500`` cues.

    Like :func:`format_srt`, with ``&``, ``<`` and ``>`` escaped as WebVTT requires.
    """
    cues = [Cue(s.begin_time, s.time, _vtt_escape(s.text)) for s in sentences]
    body = _format_cues(cues, decimal=".", numbered=False)
    return "WEBVTT\n\n" + body if body else "WEBVTT\n"


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    if isinstance(value, Word):
        return {"text": value.text, "start_time": value.start_time, "end_time": value.end_time}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value


def event_to_json(event: Event) -> dict[str, Any]:
    """A JSON-ready dict of an event: ``type`` (class name, e.g. ``"SentenceEnd"``),
    ``name`` (wire name), ``task_id``, then the event's own fields (``index``, ``time``,
    ``begin_time``, ``text``, ``confidence``, ``words``, ``duration``...; ``None`` when the
    gateway did not send one; a ``Completed`` leaves out what it lacks, as a transcriber's
    has no text or duration; ``latency_ms`` where the session measured one). ``status``
    and ``status_text`` are included for failures, ``payload`` for unknown events. The raw
    message is not included.
    """
    out: dict[str, Any] = {
        "type": type(event).__name__,
        "name": event.name,
        "task_id": event.task_id,
    }
    for f in dataclasses.fields(event):
        if f.name in _BASE_FIELDS or f.name == "raw_text":
            continue
        value = getattr(event, f.name)
        if isinstance(event, Completed) and value in ("", None):
            continue  # a transcriber's end carries no text or duration: no empty keys
        if f.name == "latency_ms" and value is None:
            continue  # the session's measure, on sentences where it was taken
        out[f.name] = _jsonable(value)
    if event.status != SUCCESS or isinstance(event, TaskFailed):
        out["status"] = event.status
        out["status_text"] = event.status_text
    return out


# --------------------------------------------------------------------------- renderers


class Renderer(Protocol):
    """Receives every event of a session, then :meth:`close` once at the end."""

    def handle(self, event: Event) -> None: ...

    def close(self) -> None: ...


def _final_text(event: Event) -> str | None:
    """The text an event finalises: a sentence, or a recognizer's whole result."""
    if isinstance(event, SentenceEnd):
        return event.text
    if isinstance(event, Completed) and event.text:
        return event.text
    return None


class TextRenderer:
    """Plain text for pipes and files: one line per final sentence, flushed at once.

    Intermediate results are ignored, so the output is exactly the transcript.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def handle(self, event: Event) -> None:
        text = _final_text(event)
        if text:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        self.out.flush()


class LiveRenderer:
    """Live transcript for a terminal: the current partial result is rewritten in place
    (carriage return + clear line) and each final sentence is printed as a line.

    Partials are cut to the terminal width (``width``, default: the terminal's, else 80)
    so they never wrap, since a wrapped line cannot be rewritten with ``\\r``.
    """

    def __init__(self, out: TextIO, width: int | None = None) -> None:
        self.out = out
        self.width = width or shutil.get_terminal_size((80, 24)).columns
        self._partial = False

    def _partial_text(self, text: str) -> str:
        limit = max(self.width - 1, 1)
        if len(text) <= limit:
            return text
        # Show the end of a long hypothesis: that is the part that is changing.
        return "…" + text[-(limit - 1) :] if limit > 1 else text[-1:]

    def handle(self, event: Event) -> None:
        if isinstance(event, ResultChanged):
            self.out.write(CLEAR_LINE + self._partial_text(event.text))
            self._partial = True
            self.out.flush()
            return
        text = _final_text(event)
        if text is None:
            return
        if self._partial:
            self.out.write(CLEAR_LINE)
            self._partial = False
        if text:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self._partial:
            # A partial that never became final (e.g. the session failed): leave no debris.
            self.out.write(CLEAR_LINE)
            self._partial = False
        self.out.flush()


class JsonlRenderer:
    """JSON Lines: every event as one compact JSON object per line (:func:`event_to_json`)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def handle(self, event: Event) -> None:
        self.out.write(json.dumps(event_to_json(event), ensure_ascii=False) + "\n")
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


class SubtitleRenderer:
    """Collects final sentences and writes SRT or WebVTT subtitles on :meth:`close`."""

    def __init__(self, out: TextIO, fmt: str = "srt") -> None:
        if fmt not in ("srt", "vtt"):
            raise ValueError(f"subtitle format must be 'srt' or 'vtt', not {fmt!r}")
        self.out = out
        self.fmt = fmt
        self.cues: list[Cue] = []

    def handle(self, event: Event) -> None:
        cue = cue_from_event(event)
        if cue is not None:
            self.cues.append(cue)

    def close(self) -> None:
        self.out.write(format_srt(self.cues) if self.fmt == "srt" else format_vtt(self.cues))
        self.out.flush()


def renderer_for(fmt: str, out: TextIO, *, live: bool | None = None) -> Renderer:
    """The renderer for an output format: ``"text"``, ``"jsonl"``, ``"srt"`` or ``"vtt"``.

    For ``"text"``, ``live`` picks :class:`LiveRenderer` over :class:`TextRenderer`;
    by default it is live when ``out`` is a terminal.
    """
    if fmt == "text":
        if live is None:
            live = _isatty(out)
        return LiveRenderer(out) if live else TextRenderer(out)
    if fmt == "jsonl":
        return JsonlRenderer(out)
    if fmt in ("srt", "vtt"):
        return SubtitleRenderer(out, fmt)
    raise ValueError(f"unknown output format {fmt!r} (text, jsonl, srt, vtt)")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


# --------------------------------------------------------------------------- transcripts


@dataclass
class Transcript:
    """One input's events, each with its channel (0 for real time, which is mono)."""

    events: list[tuple[int, Event]]
    channels: int

    @property
    def text(self) -> bool:
        """Whether anything was recognised."""
        return any(getattr(event, "text", "") for _, event in self.events)

    def channel(self, channel: int) -> list[tuple[int, Event]]:
        """The events of one channel."""
        return [(c, e) for c, e in self.events if c == channel]


def render(
    events: Iterable[tuple[int, Event]], fmt: str, out: TextIO, *, channel_ids: bool
) -> None:
    """Write ``events`` in ``fmt`` with the renderers above (JSON Lines of a recording
    also carry each sentence's ``channel_id``)."""
    if fmt == "jsonl" and channel_ids:
        for channel, event in events:
            record = {**event_to_json(event), "channel_id": channel}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        return
    renderer = renderer_for(fmt, out, live=False)
    for _, event in events:
        renderer.handle(event)
    renderer.close()


# --------------------------------------------------------------------------- progress


def format_duration(seconds: float) -> str:
    """``M:SS`` (``H:MM:SS`` from an hour on) for a duration in seconds, rounded down."""
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, mins = divmod(minutes, 60)
    return f"{hours}:{mins:02d}:{secs:02d}" if hours else f"{mins}:{secs:02d}"


class ProgressBar:
    """A one-line progress bar (``\\r``-rewritten) for a terminal, typically stderr, with
    the time elapsed since it was created and, while under way, the time left at the
    rate so far: ``[#####-----]  50% sent  0:05 elapsed, ETA 0:05``.

    :meth:`update` takes the amount done so far (e.g. ms of audio sent) and redraws only
    when the shown percentage, second or ``label`` (which may be changed, e.g. to show
    counts) changes; :meth:`close` erases the line (a later :meth:`update` draws it again).
    A ``total`` of ``None`` (a phase of unknown length: "recognising") shows no bar, only
    the label and the time elapsed; ``total`` may be changed between updates.
    ``clock`` gives the time in seconds (default :func:`time.monotonic`).
    """

    def __init__(
        self,
        total: float | None,
        out: TextIO,
        *,
        label: str = "sent",
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.out = out
        self.label = label
        self.width = width
        self._clock = clock
        self._start = clock()
        self._shown: tuple[int, int, str] | None = None

    def render(self, done: float, elapsed: float = 0.0) -> str:
        """The bar's text for ``done`` (clamped to 0..total) after ``elapsed`` seconds."""
        if self.total is None:
            return f"{self.label}  {format_duration(elapsed)} elapsed"
        fraction = self._fraction(done)
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {fraction * 100:3.0f}% {self.label}  {format_duration(elapsed)} elapsed"
        if 0.0 < fraction < 1.0:
            text += f", ETA {format_duration(elapsed * (1 - fraction) / fraction)}"
        return text

    def _fraction(self, done: float) -> float:
        total = max(float(self.total or 0.0), 1e-9)
        return min(max(done / total, 0.0), 1.0)

    def update(self, done: float = 0.0) -> None:
        """Redraw for ``done`` so far, if what is shown changes."""
        elapsed = self._clock() - self._start
        percent = -1 if self.total is None else int(self._fraction(done) * 100)
        shown = (percent, int(elapsed), self.label)
        if shown == self._shown:
            return
        self._shown = shown
        self.out.write(CLEAR_LINE + self.render(done, elapsed))
        self.out.flush()

    def close(self) -> None:
        """Erase the line."""
        if self._shown is not None:
            self.out.write(CLEAR_LINE)
            self.out.flush()
            self._shown = None
