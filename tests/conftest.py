"""Fixtures shared by several test modules; plain helpers are in ``helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import FakeTokenService, token_service


@pytest.fixture
def service() -> Iterator[FakeTokenService]:
    """A fake CreateToken service that checks every signature (see ``helpers.py``)."""
    with token_service() as svc:
        yield svc
