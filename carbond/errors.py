"""Errors that end a command with exit status 2 and one clear line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """Bad input: names the key or flag and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'interval'?)` for the closest of `choices`, else "": the tail of an
    "unknown ..." message, so a typo reads as one line that carries its fix."""
    close = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
