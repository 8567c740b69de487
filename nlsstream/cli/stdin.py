"""Standard input as a session's audio: containers recognised by their header, WAV
streamed as it arrives, anything else taken as raw PCM16LE mono."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncGenerator

from nlsstream import AudioFormatError
from nlsstream.audio import SNIFF_BYTES, decode_bytes, sniff_container, wav_stream_layout

__all__ = ["stdin_audio"]

# A WAV header is usually 44 bytes; one not complete within this much is not streamed.
_WAV_HEADER_MAX = 64 * 1024
# Bytes per read from a stdin pipe; read1 returns what is there, so this bounds latency only.
_STDIN_CHUNK = 32 * 1024


async def stdin_audio(sample_rate: int) -> bytes | AsyncGenerator[bytes, None]:
    """Standard input as the session's audio, from its first bytes: a WAV of PCM16 mono
    at ``sample_rate`` is streamed as it arrives (a live recorder's too); other WAV, MP3,
    OGG and FLAC are read to the end and decoded to PCM; anything else is taken as raw
    PCM16LE mono at ``sample_rate`` and streamed."""
    chunks = _stdin_chunks()
    head = b""
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(chunks.aclose)  # unless handed on below
        while len(head) < SNIFF_BYTES and (chunk := await anext(chunks, b"")):
            head += chunk
        if not head:
            raise AudioFormatError("standard input is empty: there is no audio to transcribe")
        kind = sniff_container(head)
        if kind is None:
            stack.pop_all()
            return _chain(head, chunks)
        if kind == "WAV":
            layout = wav_stream_layout(head, sample_rate)
            while layout is None and len(head) < _WAV_HEADER_MAX:
                if not (chunk := await anext(chunks, b"")):
                    break
                head += chunk
                layout = wav_stream_layout(head, sample_rate)
            if layout is not None:
                stack.pop_all()
                offset, size = layout
                return _chain(head[offset:], chunks, size)
        rest = [chunk async for chunk in chunks]
    name = f"standard input ({kind})"
    return await asyncio.to_thread(decode_bytes, head + b"".join(rest), sample_rate, name)


async def _chain(
    first: bytes, rest: AsyncGenerator[bytes, None], limit: int | None = None
) -> AsyncGenerator[bytes, None]:
    """``first`` then ``rest``, ``limit`` bytes in all (``None``: to the end)."""
    async with contextlib.aclosing(rest):
        chunk = first
        while limit != 0:
            if limit is not None:
                chunk = chunk[:limit]
                limit -= len(chunk)
            if chunk:
                yield chunk
            if not (chunk := await anext(rest, b"")):
                return


def _pollable(fd: int) -> bool:
    """Whether the event loop can wait for ``fd`` to be readable: a pipe, a socket or a
    terminal. Regular files and devices such as ``/dev/null`` cannot be polled (epoll
    refuses them) and never block for long: they are read in a worker thread."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def _stdin_chunks() -> AsyncGenerator[bytes, None]:
    """Standard input as chunks of bytes, without blocking the event loop.

    Pipes, sockets and terminals are read through the event loop; anything else
    (``< file.pcm``, ``< /dev/null``) in a worker thread (see :func:`_pollable`).
    """
    stdin = sys.stdin.buffer
    if not _pollable(stdin.fileno()):
        while chunk := await asyncio.to_thread(stdin.read, _STDIN_CHUNK):
            yield chunk
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_STDIN_CHUNK)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    try:
        while chunk := await reader.read(_STDIN_CHUNK):
            yield chunk
    finally:
        transport.close()
