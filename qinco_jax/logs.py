"""Progress messages: the library takes a `log` callable wherever a step has something to
say, and stays silent by default (`quiet`); programs pass `print`."""

from __future__ import annotations

from typing import Callable

Log = Callable[[str], None]


def quiet(_msg: str) -> None:
    """The log that says nothing: every library step's default."""
