"""What machine a result was measured on (recorded next to every benchmark and report)."""

from __future__ import annotations

import platform
from pathlib import Path


def _first_processor(cpuinfo: str | None = None) -> dict[str, str]:
    """The fields of the first processor in ``/proc/cpuinfo`` (or the text given); empty where unreadable."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    name = _first_processor().get("model name")
    return name if name is not None else platform.processor() or platform.machine() or "unknown CPU"


# AMD family 19h holds both Zen 3 and Zen 4; these model ranges are Zen 4 (Genoa, Raphael/Phoenix,
# Bergamo/Siena), the rest of 19h is Zen 3. The cloud CPU name ("AMD EPYC") does not tell them apart,
# and their GEMM routes differ (Zen 3 has no AVX-512, Zen 4 double-pumps it, Zen 5 runs it natively).
_ZEN4_MODELS_19H = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def cpu_family_model(cpuinfo: str | None = None) -> tuple[str, int, int] | None:
    """(vendor id, family, model) from ``/proc/cpuinfo`` (or the text given), None where it does not say."""
    fields = _first_processor(cpuinfo)
    try:
        return fields["vendor_id"], int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None


def cpu_microarchitecture(cpuinfo: str | None = None) -> str | None:
    """``zen3`` / ``zen4`` / ``zen5`` for the AMD families that have run this project's benchmarks,
    ``family F model M`` for any other x86 CPU, None where ``/proc/cpuinfo`` is not readable."""
    fm = cpu_family_model(cpuinfo)
    if fm is None:
        return None
    vendor, family, model = fm
    if vendor == "AuthenticAMD":
        if family == 0x1A:
            return "zen5"
        if family == 0x19:
            return "zen4" if any(model in r for r in _ZEN4_MODELS_19H) else "zen3"
        if family == 0x17:
            return "zen2" if model >= 0x30 else "zen1"
    return f"family {family} model {model}"
