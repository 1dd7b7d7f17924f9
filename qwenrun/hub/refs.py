"""Model references: the one parser every command uses to read what the user named.

Contract: `parse_ref(text)` turns a user's model argument into a `ModelRef`, one of
- a catalog name or alias, optionally with a quant: `qwen3-30b-a3b`, `qwen3.5-35b:UD-Q4_K_XL`;
- a hub repo with a quant, as Ollama and llama.cpp's `-hf` accept: `owner/repo:Q4_K_M`,
  `hf.co/owner/repo:Q4_K_M`, `huggingface.co/owner/repo` (optionally with `https://`);
- a local `.gguf` file; any shard of a split model names its first shard (the file llama.cpp
  loads the model from), so `run`, `chat` and `plan` accept every shard alike.
Quant names match case-insensitively and come back in the catalog's spelling. Unknown names
raise `ModelNotFoundError` with the closest catalog names (from `catalog.lookup`). This module
is pure: it looks at the file system only to ask whether a path (and a split model's sibling
shards) exists, and never touches the network or the cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from qwenrun import catalog, errors
from qwenrun.hub import names

RefKind = Literal["catalog", "hub", "file"]

# Hub repo ids: `owner/name`, each part letters, digits, `-`, `_`, `.` (what the hub allows).
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_PREFIXES = ("hf.co/", "huggingface.co/", "www.huggingface.co/")


@dataclass(frozen=True)
class ModelRef:
    """What a model argument names. Exactly one of `spec`+`repos`, `repos` alone, or `path`."""

    kind: RefKind
    text: str  # what the user typed
    spec: catalog.ModelSpec | None = None  # catalog entry (also set for a hub repo it lists)
    repos: tuple[str, ...] = ()  # hub repos to look in, preferred first
    quant: str | None = None  # canonical spelling, None when not given
    path: Path | None = None  # local file (a split model's first shard)

    @property
    def name(self) -> str:
        """The reference without its quant: catalog name, `owner/repo`, or the file path."""
        if self.kind == "catalog":
            assert self.spec is not None
            return self.spec.name
        if self.kind == "hub":
            return self.repos[0]
        return str(self.path)

    def with_quant(self, quant: str) -> ModelRef:
        return replace(self, quant=catalog.normalize_quant(quant))

    def __str__(self) -> str:
        if self.kind == "file" or self.quant is None:
            return self.name
        return f"{self.name}:{self.quant}"


def parse_ref(text: str) -> ModelRef:
    """Read a model argument; see the module docstring for the accepted forms."""
    raw = text.strip()
    if not raw:
        raise errors.UsageError("empty model reference", hint="name a model, e.g. qwen3-30b-a3b")
    as_file = _as_local_file(raw)
    if as_file is not None:
        return as_file
    hub_text = _strip_hub_prefix(raw)
    if hub_text is not None:
        return _hub_ref(raw, hub_text)
    name, quant = _split_quant(raw)
    if _REPO_RE.match(name):
        return _hub_ref(raw, raw)
    if "/" in name:
        raise errors.UsageError(
            f"{raw!r} is neither a hub repo nor a .gguf file",
            hint="write owner/repo:QUANT for a hub repo, or give the path of a .gguf file",
        )
    return _catalog_ref(raw, name, quant)


def spec_for_repo(repo: str) -> catalog.ModelSpec | None:
    """The catalog entry that lists `repo` among its hub repos (case-insensitive), if any."""
    wanted = repo.lower()
    for spec in catalog.CATALOG:
        if any(r.lower() == wanted for r in spec.repos):
            return spec
    return None


def reference_for(repo: str, quant: str | None) -> str:
    """The shortest reference that names `repo` (and `quant`): a catalog name when there is one."""
    spec = spec_for_repo(repo)
    base = spec.name if spec is not None else repo
    return f"{base}:{quant}" if quant else base


# ------------------------------------------------------------------------------ helpers


def _looks_like_path(text: str) -> bool:
    lowered = text.lower()
    return (
        lowered.endswith(".gguf")
        or text.startswith(("/", "./", "../", "~"))
        or text in (".", "..")
        or "\\" in text
    )


def _as_local_file(text: str) -> ModelRef | None:
    """A path that exists, or that can only be a path (`*.gguf`, `./x`): a file reference."""
    path = Path(text).expanduser()
    # Only path-looking text counts, so a stray file named like a model cannot shadow it.
    if path.is_file() and _looks_like_path(text):
        # llama.cpp loads a split model only from its first shard; this also checks that
        # every shard is there (ModelNotFoundError naming the missing ones).
        return ModelRef(kind="file", text=text, path=names.local_shards(path)[0])
    if path.is_dir() and _looks_like_path(text):
        raise errors.UsageError(
            f"{text} is a folder, not a GGUF file",
            hint="pass the .gguf file itself (for a split model, its -00001-of-N file)",
        )
    if _looks_like_path(text) and not text.lower().startswith(_HUB_PREFIXES):
        raise errors.ModelNotFoundError(
            f"no such file: {text}",
            hint="check the path, or name a model instead (qwenrun list shows downloaded ones)",
        )
    return None


def _strip_hub_prefix(text: str) -> str | None:
    """`[https://]hf.co/owner/repo[:Q]` → `owner/repo[:Q]`; None when there is no hub prefix."""
    rest = re.sub(r"^https?://", "", text, flags=re.IGNORECASE)
    lowered = rest.lower()
    for prefix in _HUB_PREFIXES:
        if lowered.startswith(prefix):
            return rest[len(prefix) :]
    return None


def _split_quant(text: str) -> tuple[str, str | None]:
    name, sep, quant = text.rpartition(":")
    if not sep:
        return text, None
    if not quant or not _QUANT_RE.match(quant):
        raise errors.UsageError(
            f"bad quant in {text!r}", hint="write MODEL:QUANT, e.g. qwen3-30b-a3b:Q4_K_M"
        )
    return name, catalog.normalize_quant(quant)


def _hub_ref(text: str, body: str) -> ModelRef:
    repo, quant = _split_quant(body.rstrip("/"))
    if not _REPO_RE.match(repo):
        raise errors.UsageError(
            f"{text!r} is not a hub reference",
            hint="write owner/repo:QUANT, e.g. unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M",
        )
    return ModelRef(kind="hub", text=text, spec=spec_for_repo(repo), repos=(repo,), quant=quant)


def _catalog_ref(text: str, name: str, quant: str | None) -> ModelRef:
    # lookup is case-insensitive and raises ModelNotFoundError naming the closest entries.
    spec = catalog.lookup(name)
    return ModelRef(kind="catalog", text=text, spec=spec, repos=tuple(spec.repos), quant=quant)
