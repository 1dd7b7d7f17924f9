"""One quant of a model as the planner sees it: its tensors, files and size (`QuantOption`).

Contract: plain values with lazy parts. A `QuantOption`'s tensor list comes from a GGUF
header (a local file's, or a hub file's read over HTTP ranges) or from a catalog estimate
made only when the search reaches it; its `ModelFacts` are computed once. `quant_name_for`
names the quant a local GGUF holds. Nothing here decides anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwenrun.hub import names
from qwenrun.planner.facts import ModelFacts

if TYPE_CHECKING:
    from qwenrun.hub.header import GGUFInfo


@dataclass(frozen=True)
class QuantOption:
    """One quant of the model: its tensors, the files that hold it, their total size.

    `source` is the quant's GGUF header, or a function that makes it (a catalog estimate):
    then it is made only when the search reaches this quant.
    """

    name: str
    source: GGUFInfo | Callable[[], GGUFInfo]
    files: tuple[str, ...] = ()
    size_bytes: int = 0  # download size; 0: the tensor bytes
    local: bool = False  # a file on disk: the quant is what it is, not a choice
    # A catalog estimate: its facts come from `facts_source` (a cache) without the header.
    estimate: bool = False
    facts_source: Callable[[], ModelFacts] | None = None

    @property
    def total_bytes(self) -> int:
        return self.size_bytes or self.facts.file_bytes

    @property
    def estimated(self) -> bool:
        return self.estimate or self.info.estimated

    @functools.cached_property
    def info(self) -> GGUFInfo:
        return self.source() if callable(self.source) else self.source

    @functools.cached_property
    def facts(self) -> ModelFacts:
        """The planner's condensed view of the tensors, computed once per option."""
        if self.facts_source is not None:
            return self.facts_source()
        return ModelFacts.from_info(self.info)


def quant_name_for(info: GGUFInfo, path: str | Path) -> str:
    """The quant a GGUF holds: from its file name (`…-UD-Q4_K_XL.gguf`), else its file type,
    else the type holding most of its weight bytes (`F32`, `Q8_0`)."""
    named = names.parse_quant(str(path)) or info.file_type
    if named:
        return named.removeprefix("ALL_")  # llama.cpp's ftype of a float file is ALL_F32
    by_type: dict[str, int] = {}
    for t in info.tensors:
        if len(t.shape) >= 2:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
    return max(by_type, key=lambda k: by_type[k]) if by_type else "unknown"
