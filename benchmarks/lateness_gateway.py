"""The light gateway, plus each session's lateness against its best-fit real-time schedule.

``nlsstream.gateway.light`` measures every audio message against the schedule that
starts at the session's first message (``t_first + audio before it``). That hides a
late start: if the first frame leaves 200 ms late and the next ten catch up in a burst,
they all read as on time, and a session whose first frame alone was late reads as early
(clamped to 0) for the rest of its life. So the benchmark's gateway also records, for
every audio message, ``x_k = arrival - audio before it / byte rate``: the start time
that message implies. A session streaming at exactly real time has the same ``x_k`` for
every message; the **best-fit real-time schedule** is the earliest of them (the latest
start the whole session is consistent with), and a message's lateness against it is
``x_k - min(x)``. Its first message's lateness is the session's *late start*.

The figures appear beside the light gateway's own in ``GET /stats``: per session
``best_fit`` (p50/p99/max ms) and ``first_frame_late_ms``, and in ``overall.best_fit``
the pooled p50/p99/max, the worst per-session p99, the number of sessions whose p99 is
over 20 ms, and the worst late start.

Benchmark-only: it serves ``nlsstream.gateway.light`` unchanged except for these
subclasses (one more ``array.append`` per audio message)::

    python -m benchmarks.lateness_gateway [--no-sentences] [the options of nlsstream serve --light]

``--no-sentences`` turns it into a neutral sink: it answers Started and Completed and
sends no other event.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nlsstream.gateway import light
from nlsstream.gateway.light import _percentiles_ms

#: The per-session p99 above which a session counts as late (the benchmark's target).
LIMIT_MS = 20.0


class BestFitSessionStats(light.SessionStats):
    """A task's statistics, with every audio message's implied start time."""

    __slots__ = ("starts",)

    #: ``--no-sentences``: no SentenceBegin/SentenceEnd at all, only Started/Completed
    #: (a neutral sink: nothing but the audio for the client to handle).
    neutral = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.neutral:
            self.sentence_bytes = 0
            self.next_sentence = -1
        #: Per audio message, in seconds: its arrival minus the audio received before it.
        self.starts = array("d")

    def record(self, size: int, now: float) -> None:
        self.starts.append(now - self.received / self.byte_rate)
        super().record(size, now)

    def best_fit(self) -> np.ndarray[Any, Any]:
        """Each message's lateness (s) against the session's best-fit schedule."""
        x = np.frombuffer(self.starts, dtype=np.float64)
        return x - x.min() if x.size else x

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        late = self.best_fit()
        out["best_fit"] = _percentiles_ms(late)
        out["first_frame_late_ms"] = round(float(late[0]) * 1000, 3) if late.size else 0.0
        return out


class BestFitGateway(light.LightGateway):
    """The light gateway whose stats pool the best-fit figures too."""

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        sessions = out["sessions"]
        arrays = [s.best_fit() for s in self._sessions if isinstance(s, BestFitSessionStats)]
        pooled = np.concatenate(arrays) if arrays else np.zeros(0)
        p99s = [x["best_fit"]["p99_ms"] for x in sessions if "best_fit" in x]
        best_fit: dict[str, Any] = _percentiles_ms(pooled)
        best_fit["worst_session_p99_ms"] = max(p99s, default=0.0)
        best_fit["sessions_p99_over_20ms"] = sum(1 for p in p99s if p > LIMIT_MS)
        best_fit["worst_first_frame_late_ms"] = max(
            (x.get("first_frame_late_ms", 0.0) for x in sessions), default=0.0
        )
        out["overall"]["best_fit"] = best_fit
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """Serve like ``nlsstream serve --light`` (which takes ``argv``), with the best-fit
    figures."""
    from nlsstream.cli.main import build_parser
    from nlsstream.cli.serve import serve_command

    # Each connection builds its task's statistics from this module name.
    light.SessionStats = BestFitSessionStats  # type: ignore[misc]
    options = list(sys.argv[1:] if argv is None else argv)
    if "--no-sentences" in options:
        options.remove("--no-sentences")
        BestFitSessionStats.neutral = True
    args = build_parser().parse_args(["serve", "--light", *options])
    return serve_command(args, light_factory=BestFitGateway)


if __name__ == "__main__":
    sys.exit(main())
