"""The values every pipeline stage hands on, and the one error bad input raises.

Kept apart from the stages so that attribution and the exporter import nothing of the meters,
and commands nothing of the exporter: a consumer, a device's energy, a tick's device delta.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple


class Consumer(NamedTuple):
    """Who energy is attributed to: a (kind, name) pair, as in DESIGN.md's consumer table."""

    kind: str  # unit, container, pod, job, vm, user, project, process, cgroup, idle, other
    name: str  # the `consumer` label value


IDLE = Consumer("idle", "idle")
OTHER = Consumer("other", "other")


@dataclass(frozen=True)
class DeviceEnergy:
    """A meter's cumulative reading of one device."""

    device: str  # package-0, dram-0, psys, gpu-0, cpu (model)
    component: str  # cpu, dram, gpu, platform
    source: str  # rapl, nvml, model
    joules: float  # cumulative since the meter started, never decreasing


@dataclass(frozen=True)
class DeviceDelta:
    """One device's energy in one tick."""

    component: str
    device: str
    source: str
    joules: float


def name_text(value: str | bytes) -> str:
    """A kernel-provided name (cgroup path, comm) as text that encodes as UTF-8, the same for
    the same input, with bad bytes marked visibly; every label value goes through here.

    Bytes that are not UTF-8 become the four characters `\\xff`; so does a lone surrogate
    U+DCxx, which is how os.fsdecode and os.scandir hand such a byte over. Any other lone
    surrogate becomes `\\udXXX`. Never U+FFFD, which would merge distinct names. An ASCII str
    is returned as it is (checked in O(1)), which saves a UTF-8 encode per label value.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if value.__class__ is str and value.isascii():
        return value
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


SHOWN_CHARS = 80  # how much of a refused value an error echoes: enough to recognise it
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
    """Bad input, which ends a command with exit status 2 and one clear line: names the key
    or flag and what is wrong with it (both kept short)."""

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


ConsumerEnergy = dict[Consumer, dict[str, float]]  # joules per consumer and component


@dataclass(frozen=True)
class TickRecord:
    """One accounted tick, as every sink receives it (ledger, budgets, exported series):
    the energy per consumer and component, its operational and embodied grams, the host energy
    per device that was counted, the grid intensity (with its provider) it was priced at, and
    what is known of each consumer's owner (its `carbond_consumer_info` labels, where any)."""

    wall_time: float
    seconds: float
    energy: Mapping[Consumer, Mapping[str, float]]
    grams: Mapping[Consumer, float]
    embodied_grams: Mapping[Consumer, float]
    devices: tuple[DeviceDelta, ...] = ()
    grams_per_kwh: float | None = None
    provider: str | None = None
    metadata: Mapping[Consumer, Mapping[str, str]] = field(default_factory=dict)

    @property
    def host_grams(self) -> float:
        return math.fsum(self.grams.values())
