"""What NVML failures mean for one GPU: the status `carbond check` shows and a one-line
description. Apart from the meter so that it stays small; carbond imports without pynvml."""

from __future__ import annotations

from types import ModuleType
from typing import Any

STATUS_OK = "ok"
STATUS_LOST = "lost"
STATUS_NOT_SUPPORTED = "not supported"
STATUS_NO_PERMISSION = "no permission"
STATUS_ERROR = "error"


def load_pynvml() -> ModuleType | None:
    """The pynvml module, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def error_code(exc: BaseException) -> int | None:
    """The NVML return code carried by a pynvml exception, if any."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def status_for(exc: BaseException, nvml: ModuleType) -> str:
    """Map an NVML failure to the per-GPU status shown by `carbond check`. The codes are those
    of `nvml`, the pynvml module that raised it (carbond imports without nvidia-ml-py)."""
    code = error_code(exc)
    if code == nvml.NVML_ERROR_GPU_IS_LOST:
        return STATUS_LOST
    if code in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        return STATUS_NOT_SUPPORTED
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return STATUS_NO_PERMISSION
    return STATUS_ERROR


def describe(exc: BaseException) -> str:
    """One-line text for an NVML failure; pynvml's str() can itself fail on odd codes."""
    try:
        text = str(exc)
    except Exception:  # pragma: no cover - pynvml calls into the library for unknown codes
        text = ""
    code = error_code(exc)
    if not text:
        text = type(exc).__name__
    return f"{text} (NVML error {code})" if code is not None else text


def as_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
