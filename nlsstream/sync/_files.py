"""The blocking recording clients: :class:`FlashRecognizer`, :class:`RestRecognizer`,
:class:`FileTranscriber` and the :class:`FileTransTask` it returns."""

from __future__ import annotations

from typing import Any, TypeVar

from ..recordings import services as _files
from ._bridge import CALL_MARGIN, BlockingFacade, blocking

__all__ = [
    "PREPARE_MARGIN",
    "FileTransTask",
    "FileTranscriber",
    "FlashRecognizer",
    "RestRecognizer",
]

#: Added to a recording request's bound for preparing the audio (decoding, resampling a
#: long recording in a worker thread) and getting a token.
PREPARE_MARGIN = 60.0

C = TypeVar("C", bound=_files._Client)


class _BlockingClient(BlockingFacade[C]):
    """What the blocking recording clients share: the same constructor arguments as the
    async client; ``with`` (or :meth:`close`) closes its HTTP connections."""

    _async_class: type[C]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(self._async_class(*args, **kwargs))
        # A rejected token is refreshed and the request tried once more: two requests.
        self.call_timeout = 2 * self.wrapped.timeout + PREPARE_MARGIN + CALL_MARGIN

    close = blocking(_files._Client.close)


class FlashRecognizer(_BlockingClient[_files.FlashRecognizer]):
    """Blocking :class:`nlsstream.FlashRecognizer`: same arguments, results
    (:class:`~nlsstream.FileResult`) and errors::

        with nlsstream.sync.FlashRecognizer(appkey, token) as flash:
            result = flash.recognize("meeting.mp3")
    """

    _async_class = _files.FlashRecognizer
    recognize = blocking(_files.FlashRecognizer.recognize)


class RestRecognizer(_BlockingClient[_files.RestRecognizer]):
    """Blocking :class:`nlsstream.RestRecognizer` (one sentence, ≤ 60 s): same
    arguments, results and errors."""

    _async_class = _files.RestRecognizer
    recognize = blocking(_files.RestRecognizer.recognize)


class FileTransTask(BlockingFacade[_files.FileTransTask]):
    """Blocking :class:`nlsstream.FileTransTask`, as :meth:`FileTranscriber.submit`
    returns it: ``task_id``, ``status``, :meth:`poll` and :meth:`wait`. ``wait(timeout=)``
    blocks up to ``timeout`` (default 3600 s), then raises :class:`TimeoutError`; the
    task goes on."""

    def __init__(self, task: _files.FileTransTask) -> None:
        super().__init__(task)
        # One request, after up to a second's wait for the service's poll budget.
        self.call_timeout = task.client.timeout + _files.MIN_POLL_INTERVAL + CALL_MARGIN

    poll = blocking(_files.FileTransTask.poll)
    wait = blocking(_files.FileTransTask.wait)

    @property
    def task_id(self) -> str:
        """The service's task id."""
        return self.wrapped.task_id

    @property
    def status(self) -> int:
        """The last StatusCode seen (21050002 QUEUEING, 21050001 RUNNING, ...)."""
        return self.wrapped.status


class FileTranscriber(_BlockingClient[_files.FileTranscriber]):
    """Blocking :class:`nlsstream.FileTranscriber` (FileTrans): same arguments, results
    and errors. :meth:`submit` returns a blocking :class:`FileTransTask`;
    :meth:`transcribe` and :meth:`result` block up to their ``timeout`` (default 3600 s)::

        with nlsstream.sync.FileTranscriber(ak_id, ak_secret, appkey=appkey) as ft:
            task = ft.submit("https://example.com/call.wav")
            result = task.wait(timeout=600)
    """

    _async_class = _files.FileTranscriber
    submit = blocking(_files.FileTranscriber.submit, wrap=FileTransTask)
    transcribe = blocking(_files.FileTranscriber.transcribe)
    result = blocking(_files.FileTranscriber.result)

    def task(self, task_id: str) -> FileTransTask:
        """A handle on a task submitted elsewhere (no request is made)."""
        return FileTransTask(self.wrapped.task(task_id))
