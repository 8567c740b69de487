"""The ``nlsstream`` command. It uses the library's public API; the library never
imports it."""
