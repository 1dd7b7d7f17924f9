"""Shared fixtures: every test gets its own QWENRUN_HOME and HF cache, never the user's."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_HOME", str(tmp_path / "qwenrun-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("QWENRUN_DEBUG", raising=False)


class TinyModels:
    """Generates tiny Qwen GGUFs once per test session, keyed by their parameters."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[object, ...], Path] = {}

    def __call__(self, arch: str = "qwen3moe", **kw: object) -> Path:
        from qwenrun.synthetic.tiny_gguf import write_model

        key = (arch, *sorted(kw.items()))
        if key not in self._made:
            folder = self.root / f"m{len(self._made)}"
            self._made[key] = write_model(folder, arch, **kw)  # type: ignore[arg-type]
        return self._made[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))
