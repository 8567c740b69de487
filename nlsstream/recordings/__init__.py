"""Recordings over HTTP: FlashRecognizer, FileTrans and the one-sentence REST API. The
public names are re-exported by :mod:`nlsstream`."""
