"""Bytes and sizes: the binary units of memory, the decimal units of disks, and parsing.

Contract: pure functions. Memory (RAM, VRAM, buffers) is shown in binary units, as the
planner and llama.cpp count it (`gib`: "17.3 GiB"); file and download sizes in decimal units,
as the hub and disks show them (`gb`: "18.6 GB"). `parse_size` reads what a user types for a
memory size, `parse_sizes` several (one per GPU), `parse_worker` a machine's GPUs and RAM.
Nothing here knows what the bytes are for.
"""

from __future__ import annotations

import re

from qwenrun import errors

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40


def gib(n: int | float) -> str:
    """Memory: `17.3 GiB`, `512 MiB`, `64 KiB`."""
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / KIB:.0f} KiB"


def gb(n: float) -> str:
    """Files and downloads, in decimal units as the hub shows sizes: `17.7 GB`."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": GIB, "k": KIB, "m": MIB, "g": GIB, "t": TIB}


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes from `24GiB`, `24G`, `24GB`, `512M`, `1.5T` or a bare `24` (GiB).

    Memory is sold in binary units (a "24 GB" card holds 24 GiB), so GB and GiB both mean
    2^30 bytes here. `0` means none.
    """
    m = _SIZE_RE.match(text)
    if not m or (m.group(3) and not m.group(2)):
        raise errors.UsageError(
            f"cannot read {flag} {text!r}",
            hint="give a size such as 24GiB, 12G or 512M (a bare number means GiB; 0 means none)",
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_sizes(text: str, flag: str = "size") -> tuple[int, ...]:
    """One size or several, comma-separated: `24GiB,12GiB` (one per GPU)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise errors.UsageError(f"{flag} needs a size", hint="give one such as 24GiB, or 24G,12G")
    return tuple(parse_size(p, flag) for p in parts)


def parse_worker(text: str, flag: str = "--worker") -> tuple[tuple[int, ...], int]:
    """A machine as `GPU[,GPU…]/RAM`: `24GiB/128GiB`, `24G,24G/256G`, `0/64G` (no GPU)."""
    gpus, sep, ram = text.partition("/")
    if not sep or not ram.strip():
        raise errors.UsageError(
            f"cannot read {flag} {text!r}",
            hint="give its GPUs' memory, then / and its RAM: 24GiB/128GiB (0/64GiB: no GPU)",
        )
    sizes = tuple(s for s in parse_sizes(gpus, flag) if s > 0)
    return sizes, parse_size(ram, flag)
