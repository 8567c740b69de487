"""When to try again, and how long to wait first: the one policy for every retry.

Resuming a real-time session, a batch of recordings trying an input again and polling a
FileTrans task wait with :func:`backoff` (exponential, capped, jittered so that many
clients cut off at once do not come back at the same instant) and ask
:func:`is_retryable` whether the failure is one that trying again can cure. (A session
resumes on a narrower rule, :meth:`~nlsstream.realtime.resume.Resumer.cures`: a failure a
*new task* can cure.)
"""

from __future__ import annotations

import random

from .errors import NlsError

__all__ = ["backoff", "is_retryable"]


def backoff(attempt: int, base: float, cap: float, *, factor: float = 2.0) -> float:
    """Seconds to wait before attempt ``attempt`` (1-based): ``base`` multiplied by
    ``factor`` for each attempt after the first, at most ``cap``, then scaled by a random
    50–100 %."""
    return min(cap, base * factor ** (attempt - 1)) * (0.5 + random.random() / 2)


def is_retryable(error: BaseException) -> bool:
    """Whether repeating the same request may succeed: an :class:`~nlsstream.NlsError`
    says so itself (``retryable``: network failures, timeouts, throttling, the service's
    own failures); anything else is a bug or bad input, which a retry would meet again."""
    return isinstance(error, NlsError) and error.retryable
