"""The one error every metadata source raises, so the resolver counts it and carries on."""

from __future__ import annotations


class SourceError(Exception):
    """A metadata source did not give a usable answer: missing socket or command, refused,
    timed out, garbage, too large. The message names what happened, never a credential."""
