"""GGUF file names: split shards, the quant a name carries, vision projectors, quant groups.

Contract: pure functions over names and paths (no I/O except `local_shards`, which checks that a
split model's siblings exist). One shard rule for the whole program, llama.cpp's `gguf-split`
naming: `<base>-00001-of-00003.gguf`, 1-based, five digits. One quant rule: the last quant token
of the file name (`…-UD-Q4_K_XL-00001-of-00003.gguf` → `UD-Q4_K_XL`), else of the nearest folder
that names one (`Q4_K_M/model-00001-of-00002.gguf`). It knows nothing of the hub's API or the
cache's layout; the hub modules, the planner, the prompt cache, bench's store and the server ask
it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qwenrun import catalog, errors

_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)

# A quant token in a file or folder name: llama.cpp's type names (Q4_K_M, IQ2_XXS, Q8_0,
# Q4_0_4_4, …), unsloth's UD- prefix, bartowski's _L/_XL, and the float types. It must stand
# alone (no letter or digit either side), so "A3B" or "Qwen3" never match.
_QUANT_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])"
    r"((?:UD-)?(?:I?Q[1-8]_(?:K|[0-9]|[A-Z]+)(?:_[A-Z0-9]+)*|TQ[12]_0|MXFP4(?:_MOE)?"
    r"|BF16|FP16|FP32|F16|F32))"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)


# ------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shard:
    """What a split file's name says: `base-000k-of-000n.gguf`."""

    base: str
    number: int  # 1-based
    total: int


def split_name(name: str) -> Shard | None:
    """The shard a file name (no folder) names; None for a single-file model."""
    m = _SPLIT_RE.match(name)
    return Shard(m["base"], int(m["k"]), int(m["n"])) if m else None


def shard_names(name: str) -> list[str] | None:
    """Every shard name of the split model `name` belongs to, in order; None if not split."""
    shard = split_name(name)
    if shard is None:
        return None
    return [f"{shard.base}-{i:05d}-of-{shard.total:05d}.gguf" for i in range(1, shard.total + 1)]


def local_shards(path: Path) -> list[Path]:
    """A local GGUF and, for a split model named by any shard, all its shards in order.

    Siblings are looked for next to the given path (HF cache snapshots hold symlinks:
    nothing is resolved).
    """
    names = shard_names(path.name)
    if names is None:
        return [path]
    shards = [path.with_name(n) for n in names]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        n = len(shards)
        base = split_name(path.name)
        stem = base.base if base else path.name
        raise errors.ModelNotFoundError(
            f"split model {stem} is missing {len(missing)} of {n} files: {', '.join(missing[:3])}",
            hint="all shards must sit in the same folder",
        )
    return shards


# ------------------------------------------------------------------------------ quants


def _quant_in(part: str) -> str | None:
    stem = re.sub(r"\.gguf$", "", part, flags=re.IGNORECASE)
    stem = _SPLIT_SUFFIX.sub("", stem)
    found = _QUANT_TOKEN.findall(stem)
    # The quant is the last token: `Qwen3-30B-A3B-Q4_K_M`, `…-UD-Q4_K_XL-00001-of-00003`.
    return catalog.normalize_quant(found[-1]) if found else None


def parse_quant(filename: str) -> str | None:
    """The quant a GGUF file name (or repo path) names, canonical spelling; None if none.

    `Qwen3-30B-A3B-UD-Q4_K_XL.gguf` → `UD-Q4_K_XL`;
    `Q4_K_M/Qwen3-235B-A22B-Q4_K_M-00001-of-00002.gguf` → `Q4_K_M`. The file name wins; when
    it names no quant, the nearest folder that does (`BF16/model-00001-of-00002.gguf`).
    """
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    for part in reversed(parts):
        found = _quant_in(part)
        if found is not None:
            return found
    return None


def quant_label(path: str) -> str:
    """The quant a GGUF path names, else the file's stem (without any shard suffix)."""
    p = PurePosixPath(path)
    shard = split_name(p.name)
    stem = shard.base if shard else re.sub(r"\.gguf$", "", p.name, flags=re.IGNORECASE)
    return parse_quant(path) or stem


def is_mmproj(path: str) -> bool:
    """A vision projector (`mmproj-*.gguf`): shipped beside a quant, never part of one."""
    return PurePosixPath(path).name.lower().startswith("mmproj")


@dataclass(frozen=True)
class FileGroup:
    """The files of one quant, by repo path: one file, or the shards of a split set in order."""

    quant: str
    paths: tuple[str, ...]
    n_expected: int  # shards the names promise (1 for a single file)

    @property
    def complete(self) -> bool:
        return len(self.paths) == self.n_expected


def group_files(paths: Iterable[str]) -> tuple[list[FileGroup], list[str]]:
    """GGUF repo paths → quants (sorted best first) and mmproj files; other files are ignored."""
    sets: dict[tuple[str, str, int], dict[int, str]] = {}
    mmproj: list[str] = []
    for path in paths:
        p = PurePosixPath(path)
        if not p.name.lower().endswith(".gguf"):
            continue
        if is_mmproj(path):
            mmproj.append(path)
            continue
        shard = split_name(p.name)
        folder = str(p.parent)
        if shard:
            sets.setdefault((folder, shard.base, shard.total), {})[shard.number] = path
        else:
            sets.setdefault((folder, p.name, 1), {})[1] = path
    groups: list[FileGroup] = []
    seen: set[str] = set()
    for (_folder, _base, n), shards in sorted(sets.items()):
        ordered = tuple(shards[k] for k in sorted(shards))
        quant = quant_label(ordered[0])
        if quant.lower() in seen:  # the same quant twice (two folders): keep both, tell apart
            quant = PurePosixPath(ordered[0]).name
        seen.add(quant.lower())
        groups.append(FileGroup(quant=quant, paths=ordered, n_expected=n))
    groups.sort(key=lambda g: (catalog.quant_rank(g.quant), g.quant))
    return groups, sorted(mmproj)
