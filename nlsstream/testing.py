"""pytest plugin: a local NLS gateway for your tests, no cloud needed.

Installed with nlsstream (entry point ``pytest11``), so the fixture is simply there::

    def test_my_app_transcribes(nls_gateway):
        result = my_app.transcribe("hello.wav", url=nls_gateway.url,
                                   token=nls_gateway.token, appkey=nls_gateway.appkey)
        assert result == "hello world"
        assert nls_gateway.sessions[-1].status == 20000000

``nls_gateway`` is a :class:`nlsstream.gateway.Gateway` listening on a free loopback
port, running on its own event loop in a background thread, so it serves synchronous
tests (e.g. the official ``nls`` SDK, which blocks) and ``async`` tests alike. A fresh
gateway is started for every test and closed afterwards.

What it offers:

* ``url`` (``ws://127.0.0.1:<port>/ws/v1``), ``token`` and ``appkey``: the gateway
  accepts exactly this token (HTTP 403 otherwise) and this appkey (TaskFailed 40020105).
* ``http_url`` (``http://127.0.0.1:<port>``): the same gateway's recording services and
  POP RPC, for ``FlashRecognizer(appkey, token, url=nls_gateway.http_url)``,
  ``RestRecognizer(..., url=nls_gateway.http_url)`` and
  ``FileTranscriber(..., endpoint=nls_gateway.http_url)``.

An ``async def`` test needs pytest-asyncio (``@pytest.mark.asyncio``, or
``asyncio_mode = "auto"``): without it pytest fails the test ("async def functions are
not natively supported"); a sync test can run the client with ``asyncio.run``.
* ``sessions``: one :class:`~nlsstream.gateway.SessionRecord` per task with
  ``task_id``, ``namespace``, ``params``, ``audio_bytes``, ``sentences`` (final texts),
  ``status`` (final status code) and ``outcome``.
* Fault injection: ``nls_gateway.faults = Faults(...)`` for every later connection, or
  ``nls_gateway.queue_faults(Faults(...))`` for the next connection only::

      from nlsstream.gateway import Faults

      def test_retries_after_server_error(nls_gateway):
          nls_gateway.queue_faults(Faults(fail_status=50000000, fail_at="start"))
          ...  # the first attempt fails with 50000000, the retry succeeds

  See :class:`~nlsstream.gateway.Faults` for delays, drops, stalls and malformed events.

Recognition is PocketSphinx (English) when installed, else a deterministic recogniser
that answers ``"speech <begin>-<end>"``. Options go in a marker::

    @pytest.mark.nls_gateway(recognizer="span", idle_timeout=1.0)
    def test_idle(nls_gateway): ...

The marker takes any :class:`~nlsstream.gateway.Gateway` keyword argument
(``tokens=None`` / ``appkeys=None`` accept anything).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["TEST_APPKEY", "TEST_TOKEN", "nls_gateway"]

TEST_TOKEN = "nls-test-token"
TEST_APPKEY = "nls-test-appkey"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nls_gateway(**kwargs): Gateway options for the nls_gateway fixture"
    )


@pytest.fixture
def nls_gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """A local NLS gateway on a free loopback port, in a background thread (see the
    module docstring)."""
    # Imported here: the plugin loads in every pytest run, the gateway needs ``[local]``.
    from .gateway import Gateway, GatewayThread

    options: dict[str, Any] = {"tokens": [TEST_TOKEN], "appkeys": [TEST_APPKEY]}
    marker = request.node.get_closest_marker("nls_gateway")
    if marker is not None:
        options.update(marker.kwargs)
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    runner = GatewayThread(Gateway(**options))
    with runner as gateway:
        yield gateway
