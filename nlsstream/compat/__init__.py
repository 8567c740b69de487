"""Drop-in replacements for other SDKs' modules, running on nlsstream's core.

:mod:`nlsstream.compat.nls` is the official Python SDK's ``nls`` module for the
real-time recognisers: put ``import nlsstream.compat.nls as nls`` in front of code
written for ``import nls``.
"""
