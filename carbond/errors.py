"""Errors that end a command with exit status 2 and one clear line."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input: names the key or flag and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
