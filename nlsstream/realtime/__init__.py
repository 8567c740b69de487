"""The real-time core: the sans-I/O protocol, the connection, the pacing clock, the event
router, the audio writer, resuming, and the :class:`Transcriber`/:class:`Recognizer`
sessions on top. The public names are re-exported by :mod:`nlsstream`."""
