"""Recordings: the FlashRecognizer, FileTrans and one-sentence REST clients.

Protocol: ``docs/protocol.md`` §11 (FlashRecognizer §11.2, FileTrans §11.3, REST §11.4).

* :class:`FlashRecognizer`: one HTTP POST of a whole recording (≤ 100 MB, ≤ 2 h), the
  answer in seconds; commercial edition only in the cloud.
* :class:`FileTranscriber`: FileTrans, a URL the cloud downloads (hours of audio), signed
  with an AccessKey (the POP v1 signer of :mod:`nlsstream.auth`); submit, then poll
  ``GetTaskResult`` with backoff (never more than once a second per task) or receive a
  callback.
* :class:`RestRecognizer`: the one-sentence REST API, ≤ 60 s of audio.

Each client holds one ``aiohttp.ClientSession`` (connection reuse) and bounds every
request by ``timeout``. Network failures raise
:class:`~nlsstream.errors.GatewayConnectionError`; a failed task
:class:`~nlsstream.errors.TaskFailedError` (``status`` from the status table); a rejected
token :class:`~nlsstream.errors.AuthenticationError`; a rejected AccessKey or signature
:class:`~nlsstream.errors.PopError`; audio that cannot be sent
:class:`~nlsstream.errors.AudioFormatError`, before anything is uploaded. No token or
secret ever appears in a message or log line.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
import soundfile

from .. import auth
from ..audio import _check_array, check_audio_path, decode_channels, to_pcm16
from ..errors import (
    FILE_TRANS_DONE,
    FILE_TRANS_PENDING,
    SUCCESS,
    AudioFormatError,
    AuthenticationError,
    GatewayConnectionError,
    NlsError,
    PopError,
    TaskFailedError,
    redact,
    task_error,
)
from ..proxies import redact_proxy
from ..realtime.connection import ProxySetting, proxy_for
from ..redaction import get_logger
from ..retry import backoff, is_retryable
from . import wire
from .wire import (
    FLASH_MAX_BYTES,
    FLASH_MAX_SECONDS,
    FLASH_PATH,
    MIN_POLL_INTERVAL,
    REST_MAX_SECONDS,
    REST_PATH,
    FileResult,
    FileSentence,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "FILE_TRANS_VERSION",
    "FLASH_MAX_BYTES",
    "FLASH_MAX_SECONDS",
    "FLASH_URL",
    "MIN_POLL_INTERVAL",
    "REST_MAX_SECONDS",
    "REST_URL",
    "FileResult",
    "FileSentence",
    "FileTransTask",
    "FileTranscriber",
    "FlashRecognizer",
    "RecordingSource",
    "RestRecognizer",
    "UploadProgress",
    "file_trans_endpoint",
]

log = get_logger("nlsstream.recordings.services")

FLASH_URL = "https://nls-gateway-cn-shanghai.aliyuncs.com" + FLASH_PATH
REST_URL = "https://nls-gateway-cn-shanghai.aliyuncs.com" + REST_PATH
#: FileTrans API version of the mainland regions (the international one: 2019-08-23).
FILE_TRANS_VERSION = "2018-08-17"
_INTL_FILE_TRANS_VERSION = "2019-08-23"

#: Largest answer read from any service (a 12 h recording's words fit several times).
_MAX_ANSWER_BYTES = 32 * 1024 * 1024
#: Containers the FlashRecognizer takes as they are; anything else is sent as WAV.
_FLASH_NATIVE = {("WAV", "PCM_16"): "wav", ("MP3", None): "mp3", ("OGG", "OPUS"): "opus"}
_FLASH_OPAQUE = {".aac": "aac", ".mp4": "mp4", ".m4a": "mp4", ".opus": "opus"}

#: What ``recognize`` accepts: a path, the bytes of a file (or raw PCM16LE mono), or a
#: numpy array ``(samples,)`` / ``(samples, channels)`` with its ``sample_rate``.
RecordingSource: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | npt.NDArray[Any]"
)

#: ``on_progress(sent, total)`` of :meth:`FlashRecognizer.recognize` and
#: :meth:`RestRecognizer.recognize`: bytes of the upload handed to the connection so far
#: and in all; called with ``(0, total)`` when the upload starts and ``(total, total)``
#: once it is sent (the service is then recognising). Called on the event loop: keep it
#: quick.
UploadProgress: TypeAlias = "Callable[[int, int], None]"
#: How much of an upload is handed to the connection at a time when progress is reported.
_UPLOAD_CHUNK = 1 << 16


async def _upload_chunks(body: bytes, on_progress: UploadProgress) -> AsyncIterator[bytes]:
    """``body`` in :data:`_UPLOAD_CHUNK` pieces, reporting each one sent (aiohttp asks
    for the next piece once it has written the last, waiting while the socket is full)."""
    total = len(body)
    on_progress(0, total)
    view = memoryview(body)
    for start in range(0, total, _UPLOAD_CHUNK):
        yield bytes(view[start : start + _UPLOAD_CHUNK])
        on_progress(min(start + _UPLOAD_CHUNK, total), total)


# --------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class _Upload:
    body: bytes
    format: str
    sample_rate: int
    duration: float | None  # seconds, None when the container is opaque to soundfile


def _wav(channels: list[bytes], rate: int) -> bytes:
    """PCM16 channels (equal length) as one WAV file."""
    arrays = [np.frombuffer(c, dtype="<i2") for c in channels]
    n = min(len(a) for a in arrays)
    data = np.stack([a[:n] for a in arrays], axis=1)
    out = io.BytesIO()
    soundfile.write(out, data, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _pcm_upload(pcm: bytes, rate: int, *, container: bool) -> _Upload:
    seconds = len(pcm) / (2 * rate)
    if container:
        return _Upload(_wav([pcm], rate), "wav", rate, seconds)
    return _Upload(pcm, "pcm", rate, seconds)


def _target_rate(rate: int) -> int:
    """The service rate for audio at ``rate``: 8000 or 16000 as they are, else the
    nearer of the two from above (resampled)."""
    return rate if rate in (8000, 16000) else (8000 if rate < 8000 else 16000)


def _array_channels(data: npt.NDArray[Any], rate: int) -> tuple[list[bytes], int]:
    """Each channel of ``(samples,)`` / ``(samples, channels)`` audio as PCM16LE."""
    _check_array(data)
    target = _target_rate(rate)
    columns = [data] if data.ndim == 1 else [data[:, c] for c in range(data.shape[1])]
    return [to_pcm16(col, rate, target) for col in columns], target


def _prepare(
    source: Any, *, sample_rate: int | None, fmt: str | None, keep_channels: bool
) -> _Upload:
    """What to upload for ``source`` (blocking: runs in a worker thread).

    ``keep_channels`` (FlashRecognizer): containers it understands go as they are, the
    rest become a WAV with every channel. Otherwise (REST): PCM16 mono.
    """
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioFormatError("a numpy array needs its sample_rate= (in Hz)")
        if keep_channels:
            if source.ndim == 2 and source.shape[1] > wire.MAX_CHANNELS:
                raise AudioFormatError(
                    f"the array has {source.shape[1]} channels; the service takes at most "
                    f"{wire.MAX_CHANNELS}"
                )
            channels, rate = _array_channels(source, sample_rate)
            return _Upload(_wav(channels, rate), "wav", rate, len(channels[0]) / (2 * rate))
        rate = _target_rate(sample_rate)
        return _pcm_upload(to_pcm16(source, sample_rate, rate), rate, container=False)
    if isinstance(source, (str, os.PathLike)):
        path = check_audio_path(source)
        name = f"audio file {path}"
        size = path.stat().st_size
        if keep_channels and size > FLASH_MAX_BYTES:
            raise AudioFormatError(_too_large(size))
        suffix = path.suffix.lower()
        if suffix in (".pcm", ".raw"):
            return _raw_pcm(path.read_bytes(), sample_rate, keep_channels)
        data = path.read_bytes()
        container = True  # only .pcm/.raw files are headerless
        if fmt is None and keep_channels and suffix in _FLASH_OPAQUE:
            fmt = _FLASH_OPAQUE[suffix]
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = "the recording"
        data = bytes(source)
        container = fmt == "wav" or data[:4] in (b"RIFF", b"OggS", b"fLaC", b"ID3\x03", b"ID3\x04")
    else:
        raise AudioFormatError(
            f"unsupported recording source {type(source).__name__}: use a path, bytes or a "
            "numpy array (with sample_rate=), or audio_address="
        )
    if not data:
        raise AudioFormatError("the recording is empty")
    if fmt is not None and fmt.lower() not in ("wav", "pcm"):
        # A container we cannot look into (AAC, MP4, ...): sent as it is, unchecked.
        return _Upload(data, fmt.lower(), sample_rate or 16000, None)
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError, OSError) as exc:
        if container:
            # libsndfile's own words ("Format not recognised."), without its BytesIO repr
            reason = getattr(exc, "error_string", None) or type(exc).__name__
            raise AudioFormatError(f"{name} could not be decoded: {reason}") from None
        return _raw_pcm(data, sample_rate, keep_channels)
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioFormatError("the recording contains no audio")
    if keep_channels and info.channels > wire.MAX_CHANNELS:
        raise AudioFormatError(
            f"the recording has {info.channels} channels; the service takes at most "
            f"{wire.MAX_CHANNELS} (mix it down, or split the channels)"
        )
    duration = info.frames / info.samplerate
    if keep_channels:
        native = _FLASH_NATIVE.get((info.format, info.subtype)) or _FLASH_NATIVE.get(
            (info.format, None)
        )
        if native and (native != "wav" or info.samplerate in (8000, 16000)):
            rate = info.samplerate if info.samplerate in (8000, 16000) else 16000
            return _Upload(data, native, rate, duration)
        channels, rate = decode_channels(data)
        return _Upload(_wav(channels, rate), "wav", rate, duration)
    (mono,), rate = decode_channels(data, mix=True)
    return _pcm_upload(mono, rate, container=False)


def _raw_pcm(data: bytes, sample_rate: int | None, container: bool) -> _Upload:
    rate = sample_rate or 16000
    if rate not in (8000, 16000):
        raise AudioFormatError(f"raw PCM must be at 8000 or 16000 Hz, not {rate}")
    if not data or len(data) % 2:
        raise AudioFormatError("raw PCM16LE audio must be a non-empty, even number of bytes")
    return _pcm_upload(data, rate, container=container)


def _too_large(size: int) -> str:
    return (
        f"the recording is {size / 1e6:.1f} MB; FlashRecognizer takes at most "
        f"{FLASH_MAX_BYTES // (1024 * 1024)} MB: use FileTranscriber"
    )


def _check_limits(upload: _Upload, service: str) -> None:
    limit = REST_MAX_SECONDS if service == "rest" else FLASH_MAX_SECONDS
    if upload.duration is not None and upload.duration > limit:
        other = "FlashRecognizer or FileTranscriber" if service == "rest" else "FileTranscriber"
        raise AudioFormatError(
            f"the recording is {upload.duration:.1f} s long; the {service} service takes at "
            f"most {limit} s: use {other}"
        )
    if service == "flash" and len(upload.body) > FLASH_MAX_BYTES:
        raise AudioFormatError(_too_large(len(upload.body)))


# --------------------------------------------------------------------------- HTTP


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError:
        raise ImportError(
            "nlsstream's recording clients need aiohttp: pip install 'nlsstream[files]'"
        ) from None
    return aiohttp


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """All of an aiohttp body stream, or ``None`` as soon as it exceeds ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while chunk := await stream.read(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _service_url(url: str, path: str) -> str:
    """``url`` as given, or with the service's path when it names only a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the service URL must be http(s)://host[:port][/path], not {url!r}")
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return url


def _host(url: str) -> str:
    """``host[:port]`` of ``url`` for messages: never its ``user:password@``."""
    return urllib.parse.urlsplit(url).netloc.rpartition("@")[2]


def _connect_failure(exc: Exception) -> str:
    """Why a connection failed, in the system's words ("Connection refused"): aiohttp's
    own text says ``ssl:default`` even for plain http."""
    os_error = getattr(exc, "os_error", None)
    if not isinstance(os_error, OSError):
        return str(exc)
    if isinstance(os_error.errno, int) and os_error.errno > 0:
        return os.strerror(os_error.errno)
    return os_error.strerror or str(os_error)


def _flag(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_C = TypeVar("_C", bound="_Client")


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    data: dict[str, Any] | None  # the body as a JSON object, if it is one


class _Client:
    """One ``aiohttp.ClientSession`` per client object and a timeout on every request."""

    _service = "service"

    def __init__(
        self, timeout: float, secrets: tuple[str, ...] = (), proxy: ProxySetting = True
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.proxy = proxy
        self._aiohttp = _aiohttp()
        self._session: aiohttp.ClientSession | None = None
        self._secrets = secrets

    async def __aenter__(self: _C) -> _C:
        self._http()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP connections (the client can still be used: it reconnects)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._aiohttp.ClientSession(
                timeout=self._aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "nlsstream"},
            )
        return self._session

    async def _request(
        self,
        method: str,
        url: str,
        *,
        secrets: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> _Answer:
        """One request; network failures and timeouts become GatewayConnectionError."""
        host = _host(url)
        hide = (*self._secrets, *secrets)
        from yarl import URL  # aiohttp's URL type: ``encoded=True`` keeps our encoding

        proxy: str | None = None
        try:
            target = URL(url, encoded=True)
            proxy = self._proxy(target)
            async with self._http().request(
                method, target, allow_redirects=False, proxy=proxy, **kwargs
            ) as r:
                body = await read_bounded(r.content, _MAX_ANSWER_BYTES)
                status = r.status
        except asyncio.TimeoutError:
            raise GatewayConnectionError(
                f"{self._service} at {host} did not answer within {self.timeout} s"
            ) from None
        except self._aiohttp.ClientSSLError as exc:  # before its base, ClientConnectorError
            raise GatewayConnectionError(
                f"{self._service} request to {host} failed: {redact(str(exc), *hide)}"
            ) from None
        except self._aiohttp.ClientConnectorError as exc:
            where = host
            if isinstance(exc, self._aiohttp.ClientProxyConnectionError) and proxy is not None:
                where = f"the proxy {redact_proxy(proxy)} (for {host})"
            raise GatewayConnectionError(
                f"{self._service} cannot connect to {where}: {_connect_failure(exc)}"
            ) from None
        except self._aiohttp.ClientError as exc:
            raise GatewayConnectionError(
                f"{self._service} request to {host} failed: {redact(str(exc), *hide)}"
            ) from None
        if body is None:
            raise GatewayConnectionError(
                f"{self._service} at {host} answered more than {_MAX_ANSWER_BYTES} bytes"
            )
        return _Answer(status, body, auth.json_object(body))

    def _proxy(self, target: Any) -> str | None:
        """The HTTP proxy for ``target``, by the real-time client's rule (``proxy=``:
        ``True`` the system's settings, a URL, ``None`` direct)."""
        url = (
            proxy_for(target.scheme == "https", target.host or "")
            if self.proxy is True
            else self.proxy
        )
        if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise GatewayConnectionError(
                f"{self._service}: the proxy {redact_proxy(url)} is not an HTTP proxy; the "
                "recording clients support http:// proxies (pass proxy=None to connect "
                "directly)"
            )
        return url

    def _http_failure(self, answer: _Answer, host: str, *secrets: str) -> NlsError:
        snippet = redact(answer.body[:200].decode("utf-8", "replace"), *self._secrets, *secrets)
        if answer.status == 403:
            return AuthenticationError(
                f"{self._service} at {host} rejected the token: {snippet}",
                status_text=snippet,
                http_status=403,
            )
        return GatewayConnectionError(
            f"{self._service} at {host} answered HTTP {answer.status}: {snippet!r}"
        )


class _TokenClient(_Client):
    """What the two token-authenticated services share: a token (string or provider,
    refreshed once when the gateway rejects it), an appkey, the audio preparation."""

    _path = ""
    _default_url = ""
    _default_timeout = 60.0
    #: FlashRecognizer (every channel kept, token in the query, its limits) or REST.
    _flash = True

    def __init__(
        self,
        appkey: str,
        token: auth.TokenSource,
        url: str | None = None,
        *,
        timeout: float | None = None,
        proxy: ProxySetting = True,
    ) -> None:
        super().__init__(timeout or self._default_timeout, proxy=proxy)
        if not appkey:
            raise ValueError("appkey must not be empty")
        self.appkey = appkey
        self.url = _service_url(url or self._default_url, self._path)
        self._tokens = auth.as_provider(token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(appkey={self.appkey!r}, url={self.url!r})"

    async def _recognize(
        self,
        source: Any,
        audio_address: str | None,
        fmt: str | None,
        sample_rate: int | None,
        params: Mapping[str, Any],
        on_progress: UploadProgress | None = None,
    ) -> tuple[dict[str, Any], _Upload | None]:
        """Send the audio (checked before upload) or its address with ``params`` as the
        query; the success answer and what was uploaded."""
        query = {k: _flag(v) for k, v in params.items() if v is not None}
        if audio_address is not None:
            query["audio_address"] = audio_address
            query["format"] = fmt or Path(urllib.parse.urlsplit(audio_address).path).suffix[1:]
            query["sample_rate"] = str(sample_rate or 16000)
            return await self._call(query, None), None
        upload = await asyncio.to_thread(
            _prepare, source, sample_rate=sample_rate, fmt=fmt, keep_channels=self._flash
        )
        _check_limits(upload, "flash" if self._flash else "rest")
        query["format"], query["sample_rate"] = upload.format, str(upload.sample_rate)
        return await self._call(query, upload.body, on_progress), upload

    async def _call(
        self,
        params: dict[str, str],
        body: bytes | None,
        on_progress: UploadProgress | None = None,
    ) -> dict[str, Any]:
        """POST (or, without a body, still POST) and return the success answer; a
        rejected token is refreshed and tried once more when the provider can."""
        for attempt in (1, 2):
            token = await self._tokens.get_token()
            query = {"appkey": self.appkey, **params}
            headers = {"Content-Type": "application/octet-stream"}
            if self._flash:
                query["token"] = token
            else:
                headers["X-NLS-Token"] = token
            data: Any = None
            if body is None:
                headers["Content-Type"] = "application/text"
            elif on_progress is None:
                data = io.BytesIO(body)
            else:  # in pieces, each reported; with its length, as a whole body goes
                data = _upload_chunks(body, on_progress)
                headers["Content-Length"] = str(len(body))
            answer = await self._request(
                "POST",
                self.url,
                params=query,
                data=data,
                headers=headers,
                secrets=(token,),
            )
            try:
                return self._check(answer, token)
            except AuthenticationError:
                if attempt == 2 or not isinstance(self._tokens, auth.RefreshableTokenProvider):
                    raise
                self._tokens.invalidate(token)
        raise AssertionError("unreachable")

    def _check(self, answer: _Answer, token: str) -> dict[str, Any]:
        host = _host(self.url)
        data = answer.data
        status = data.get("status") if data is not None else None
        if data is None or isinstance(status, bool) or not isinstance(status, int):
            raise self._http_failure(answer, host, token)
        if status != SUCCESS:
            message = data.get("message")
            message = redact(message[:500] if isinstance(message, str) else "", token)
            task_id = data.get("task_id")
            raise task_error(status, message, task_id[:64] if isinstance(task_id, str) else None)
        return data


class FlashRecognizer(_TokenClient):
    """FlashRecognizer (录音文件识别极速版): a whole recording in one request.

    ``recognize(source)`` uploads a path, the bytes of an audio file, raw PCM16LE mono
    bytes (at ``sample_rate``, default 16000) or a numpy array (with ``sample_rate``);
    or, with ``audio_address=``, lets the service download a URL. Every channel is
    recognised (``FileSentence.channel_id``). WAV (16-bit, 8/16 kHz), MP3 and Ogg Opus
    go as they are; other formats libsndfile reads (FLAC, Vorbis, other rates) are
    converted to WAV first; AAC/MP4 go unchecked. Limits: 100 MB and 2 h
    (:class:`AudioFormatError` before upload). ``token``: a string or a token provider
    (sent as the ``token`` query parameter). ``url``: the endpoint (default
    :data:`FLASH_URL`, Shanghai), or just ``http(s)://host:port`` (e.g. a local gateway).
    ``timeout`` bounds each request (default 120 s). ``proxy``: ``True`` (default) the
    system's proxy settings (``https_proxy``/``http_proxy``/``no_proxy``), an ``http://``
    proxy URL, or ``None`` to connect directly (the real-time client's rule).
    The cloud offers this service to commercial-edition appkeys only.
    """

    _service = "FlashRecognizer"
    _path = FLASH_PATH

    _default_url = FLASH_URL
    _default_timeout = 120.0

    async def recognize(
        self,
        source: RecordingSource | None = None,
        *,
        audio_address: str | None = None,
        format: str | None = None,
        sample_rate: int | None = None,
        on_progress: UploadProgress | None = None,
        **params: Any,
    ) -> FileResult:
        """Recognise one recording; ``params`` are the service's query parameters
        (``enable_word_level_result=True``, ``enable_inverse_text_normalization``,
        ``first_channel_only``, ``vocabulary_id``, ...). ``on_progress(sent, total)`` is
        told how much of the upload has gone (:data:`UploadProgress`; not called with
        ``audio_address``)."""
        if (source is None) == (audio_address is None):
            raise ValueError("give either a source or audio_address=, not both or neither")
        data, _ = await self._recognize(
            source, audio_address, format, sample_rate, params, on_progress
        )
        return wire.parse_flash(data)


class RestRecognizer(_TokenClient):
    """The one-sentence REST API (``POST /stream/v1/asr``): up to 60 s of audio, one text.

    Sources as for :class:`FlashRecognizer`; the audio is sent as PCM16 mono (channels
    mixed), so that its length is checked before upload (more than 60 s:
    :class:`AudioFormatError`). An explicit ``format=`` other than pcm/wav sends bytes as
    they are, unchecked. The token goes in the ``X-NLS-Token`` header. ``url`` as for
    :class:`FlashRecognizer` (default :data:`REST_URL`); ``timeout`` default 60 s;
    ``proxy`` as for :class:`FlashRecognizer`. The result has one sentence spanning the
    audio.
    """

    _service = "REST recognizer"
    _path = REST_PATH
    _flash = False

    _default_url = REST_URL
    _default_timeout = 60.0

    async def recognize(
        self,
        source: RecordingSource,
        *,
        format: str | None = None,
        sample_rate: int | None = None,
        on_progress: UploadProgress | None = None,
        **params: Any,
    ) -> FileResult:
        """Recognise up to 60 s of audio; ``params`` are the service's query parameters
        (``enable_punctuation_prediction``, ``enable_inverse_text_normalization``, ...);
        ``on_progress`` as for :meth:`FlashRecognizer.recognize`."""
        data, upload = await self._recognize(source, None, format, sample_rate, params, on_progress)
        assert upload is not None
        duration = round(upload.duration * 1000) if upload.duration is not None else 0
        return wire.parse_rest(data, duration)


# --------------------------------------------------------------------------- FileTrans


def file_trans_endpoint(region: str = auth.DEFAULT_REGION) -> str:
    """The documented FileTrans endpoint of ``region``."""
    return f"https://filetrans.{region}.aliyuncs.com/"


class FileTransTask:
    """A submitted FileTrans task: ``task_id``, the last ``status`` seen, and
    :meth:`wait` / :meth:`poll`. Made by :meth:`FileTranscriber.submit` or
    :meth:`FileTranscriber.task`."""

    def __init__(self, client: FileTranscriber, task_id: str, status: int = 21050002) -> None:
        self.client = client
        self.task_id = task_id
        #: The last StatusCode seen (21050002 QUEUEING, 21050001 RUNNING, ...).
        self.status = status
        self.polls = 0

    def __repr__(self) -> str:
        return f"FileTransTask(task_id={self.task_id!r}, status={self.status})"

    async def poll(self) -> FileResult | None:
        """One GetTaskResult (waiting first if the last one was less than a second ago):
        the result once the task is done, ``None`` while it is queued or running; raises
        :class:`TaskFailedError` if it failed."""
        data = await self.client._get_task_result(self.task_id)
        self.polls += 1
        self.status, text = wire.parse_task_status(data)
        if self.status in FILE_TRANS_PENDING:
            return None
        if self.status in FILE_TRANS_DONE:
            return wire.parse_file_trans(data)
        raise TaskFailedError(self.status, text[:500], self.task_id)

    async def wait(self, timeout: float = 3600.0) -> FileResult:
        """Poll until the task is done; the first poll comes ``poll_interval`` after the
        call, then the interval grows by half each time up to ``max_poll_interval``
        (jittered, never under the service's one query a second; see :mod:`nlsstream.retry`). A
        poll that fails for a transient reason (network, HTTP 5xx, throttling) is logged
        and retried at the next interval; a failed task raises :class:`TaskFailedError`.
        Raises :class:`TimeoutError` after ``timeout`` seconds (the task goes on; wait
        again or call :meth:`FileTranscriber.result` later)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = self.client.poll_interval
        polls = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(interval, remaining))
            if loop.time() >= deadline:
                break
            try:
                result = await asyncio.wait_for(self.poll(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                break
            except (GatewayConnectionError, PopError) as exc:
                if not is_retryable(exc):
                    raise
                # A network blip or throttling must not end a wait of hours: poll again.
                log.warning("polling FileTrans task %s failed, will retry: %s", self.task_id, exc)
                result = None
            if result is not None:
                return result
            polls += 1
            client = self.client
            interval = max(
                MIN_POLL_INTERVAL,
                backoff(polls + 1, client.poll_interval, client.max_poll_interval, factor=1.5),
            )
        raise TimeoutError(
            f"FileTrans task {self.task_id} did not finish within {timeout} s "
            f"(last status {self.status}); it goes on: wait again or fetch it later"
        )


class FileTranscriber(_Client):
    """FileTrans (录音文件识别): the service downloads a URL and recognises it (hours).

    Signed with the AccessKey by the POP v1 signer of :mod:`nlsstream.auth`. ``region``
    picks the documented endpoint and API version (``ap-southeast-1``: 2019-08-23, else
    2018-08-17); ``endpoint`` overrides the URL (e.g. ``http://127.0.0.1:PORT/``).
    ``timeout`` bounds each request; ``poll_interval`` / ``max_poll_interval`` set the
    polling backoff of :meth:`FileTransTask.wait` (never below the service's one query
    per second per task). ``proxy`` as for :class:`FlashRecognizer`.
    """

    _service = "FileTrans"

    def __init__(
        self,
        ak_id: str,
        ak_secret: str,
        *,
        appkey: str,
        region: str = auth.DEFAULT_REGION,
        endpoint: str | None = None,
        version: str | None = None,
        timeout: float = 30.0,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        proxy: ProxySetting = True,
    ) -> None:
        if not ak_id or not ak_secret:
            raise ValueError("FileTranscriber needs both the AccessKey id and secret")
        if not appkey:
            raise ValueError("appkey must not be empty")
        super().__init__(timeout, secrets=(ak_secret,), proxy=proxy)
        self._ak_id = ak_id
        self._secret = ak_secret
        self.appkey = appkey
        self.region = region
        self.endpoint = _service_url(endpoint or file_trans_endpoint(region), "/")
        self.version = version or (
            _INTL_FILE_TRANS_VERSION if region == "ap-southeast-1" else FILE_TRANS_VERSION
        )
        self.poll_interval = max(poll_interval, MIN_POLL_INTERVAL)
        self.max_poll_interval = max(max_poll_interval, self.poll_interval)
        self._next_poll: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"FileTranscriber(ak_id={self._ak_id[:4] + '***'!r}, appkey={self.appkey!r}, "
            f"endpoint={self.endpoint!r})"
        )

    async def submit(
        self, file_link: str, *, callback_url: str | None = None, **params: Any
    ) -> FileTransTask:
        """SubmitTask: returns at once with the task (``task.task_id``).

        ``params`` go into the Task JSON (``enable_words=True``, ``auto_split``,
        ``enable_sample_rate_adaptive``, ...; ``version`` is "4.0"). With
        ``callback_url`` the service also POSTs the result there when the task ends.
        """
        task: dict[str, Any] = {"appkey": self.appkey, "file_link": file_link, "version": "4.0"}
        if callback_url is not None:
            task["enable_callback"] = True
            task["callback_url"] = callback_url
        task.update(params)
        data = await self._pop("POST", "SubmitTask", {"Task": json.dumps(task)})
        status, task_id, text = wire.parse_submit(data)
        if status != 21050000 or not task_id:
            raise TaskFailedError(status, text[:500], task_id[:64] or None)
        log.info("FileTrans task %s submitted", task_id)
        return FileTransTask(self, task_id)

    def task(self, task_id: str) -> FileTransTask:
        """A handle on a task submitted elsewhere (no request is made)."""
        return FileTransTask(self, task_id)

    async def result(self, task_id: str, timeout: float = 3600.0) -> FileResult:
        """Wait for a task submitted elsewhere (see :meth:`FileTransTask.wait`)."""
        return await self.task(task_id).wait(timeout)

    async def transcribe(
        self, file_link: str, *, timeout: float = 3600.0, **params: Any
    ) -> FileResult:
        """Submit and wait: :meth:`submit` then :meth:`FileTransTask.wait`."""
        task = await self.submit(file_link, **params)
        return await task.wait(timeout)

    async def _get_task_result(self, task_id: str) -> dict[str, Any]:
        """GetTaskResult, at most once per :data:`MIN_POLL_INTERVAL` per task."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = max(now, self._next_poll.get(task_id, now))
        if len(self._next_poll) > 1024:
            self._next_poll = {k: v for k, v in self._next_poll.items() if v > now}
        self._next_poll[task_id] = due + MIN_POLL_INTERVAL  # reserved before sleeping
        if due > now:
            await asyncio.sleep(due - now)
        return await self._pop("GET", "GetTaskResult", {"TaskId": task_id})

    async def _pop(
        self, method: auth.HttpMethod, action: str, extra: dict[str, str]
    ) -> dict[str, Any]:
        """One signed POP RPC call: the business parameters in a form body for POST
        (as aliyunsdkcore sends them), everything in the query for GET."""
        params = auth.signed_params(
            method,
            self._ak_id,
            self._secret,
            action,
            region=self.region,
            version=self.version,
            extra=extra,
        )
        host = _host(self.endpoint)
        if method == "POST":
            query = {k: v for k, v in params.items() if k not in extra}
            url = f"{self.endpoint}?{auth.canonical_query(query)}"
            answer = await self._request(
                "POST",
                url,
                data=auth.canonical_query(extra).encode("ascii"),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:
            url = f"{self.endpoint}?{auth.canonical_query(params)}"
            answer = await self._request("GET", url)
        data = answer.data
        if answer.status == 200 and data is not None and "StatusCode" in data:
            return data
        if answer.status >= 500 and data is None:
            raise self._http_failure(answer, host)
        raise auth.pop_failure(
            action, host, answer.status, answer.body, self._secret, PopError, data=data
        )
