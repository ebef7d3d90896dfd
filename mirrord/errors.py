"""Errors the daemon's parts raise to each other."""

from __future__ import annotations


class Refused(Exception):
    """A command the engine will not carry out now: why, and what to do."""

    def __init__(self, error: str, hint: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.hint = hint
