"""Shared fixtures: every test gets its own QWENRUN_HOME and HF cache, never the user's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from qwenrun.engine.crash import CpuCheck


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


@pytest.fixture(scope="session")
def cpu_kernels(tmp_path_factory: pytest.TempPathFactory) -> CpuCheck:
    """The verdict qwenrun itself goes by on this machine for llama.cpp's extra CPU buffer
    types (`engine.crash.cpu_check`: on a CPU with AMX, a K-quant model really decoded in a
    child process), found once per session in a throwaway home.

    A test that loads a K-quant (or Q8_0) model in the pytest process loads it with
    `extra_bufts=cpu_kernels.extra_bufts`: where the AMX kernels die by SIGILL, a load with
    them on would take the whole test run down at the first decode.
    """
    from qwenrun import hwprobe
    from qwenrun.engine import crash

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWENRUN_HOME", str(tmp_path_factory.mktemp("cpu-check-home")))
        hw = hwprobe.probe()
        return crash.cpu_check(hw.cpu_model, hw.cpu_flags)
