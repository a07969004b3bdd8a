"""Errors that end a command with exit status 2 and one clear line."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable

SHOWN_CHARS = 80
"""How much of a refused value an error echoes: enough to recognise it, never a whole file."""
MAX_KEY_CHARS = 200
MAX_PROBLEM_CHARS = 1000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = SHOWN_CHARS + 10


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` whole when short, else its first `limit` - 1 characters and an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """repr(value) for an error message, in bounded time and length: a YAML alias bomb is a
    small file whose full repr is gigabytes (it made an 802 MB log line)."""
    return cut(_REPR.repr(value), limit)


class ConfigError(Exception):
    """Bad input: names the key or flag and what is wrong with it (both kept short)."""

    def __init__(self, key: str, problem: str) -> None:
        key, problem = cut(key, MAX_KEY_CHARS), cut(problem, MAX_PROBLEM_CHARS)
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'interval'?)` for the closest of `choices`, else "": the tail of an
    "unknown ..." message, so a typo reads as one line that carries its fix."""
    word = str(word)[:MAX_KEY_CHARS]  # no known name is longer; bounded work for a huge one
    close = difflib.get_close_matches(word, [str(choice) for choice in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
