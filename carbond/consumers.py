"""Who energy is attributed to: a (kind, name) pair, as in DESIGN.md's consumer table."""

from __future__ import annotations

from typing import NamedTuple


class Consumer(NamedTuple):
    kind: str  # unit, container, pod, job, user, project, process, cgroup, idle, other
    name: str  # the `consumer` label value


def name_text(value: str | bytes) -> str:
    """A kernel-provided name (cgroup path, comm) as text that encodes as UTF-8, the same for
    the same input, with bad bytes marked visibly.

    Bytes that are not UTF-8 become the four characters `\\xff`; so does a lone surrogate
    U+DCxx, which is how os.fsdecode and os.scandir hand such a byte over. Any other lone
    surrogate becomes `\\udXXX`. Never U+FFFD, which would merge distinct names.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_escape_surrogate(ch) for ch in value)
    return value


def _escape_surrogate(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch


IDLE = Consumer("idle", "idle")
OTHER = Consumer("other", "other")
