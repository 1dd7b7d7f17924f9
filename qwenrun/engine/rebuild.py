"""The pip commands that install or rebuild llama-cpp-python with the backends qwenrun uses.

Contract: pure strings from versions, plus two reads of installed metadata (the version
qwenrun pins, the version installed), never importing llama_cpp; `keeps_cuda` is the one rule
for whether a rebuild asks for CUDA. Every command builds the RPC
backend in (`qwenrun worker`, workers), and CUDA where asked, and defeats pip's wheel cache:
pip keeps the wheel it built from the sdist and hands it back for the same version whatever
`CMAKE_ARGS` says now. `qwenrun doctor` (engine/doctor.py) and the RPC client's "no RPC in this
build" error (engine/rpc.py) print them.
"""

from __future__ import annotations

import functools
import re
import sys
from importlib import metadata

LLAMA_DIST = "llama-cpp-python"
# "llama-cpp-python==0.3.36" (PEP 503 spellings of the name included; markers ignored).
_PIN_RE = re.compile(r"^\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s;,]+)", re.IGNORECASE)


@functools.cache
def pinned_llama_version() -> str | None:
    """The llama-cpp-python version qwenrun's installed metadata pins, if it can be read."""
    try:
        requirements = metadata.requires("qwenrun") or []
    except metadata.PackageNotFoundError:
        return None  # running from a source tree that was never installed
    for req in requirements:
        match = _PIN_RE.match(req)
        if match:
            return match.group(1)
    return None


def installed_llama_version() -> str | None:
    """The installed llama-cpp-python's version, read without importing it."""
    try:
        return metadata.version(LLAMA_DIST)
    except metadata.PackageNotFoundError:
        return None


def _spec(version: str | None) -> str:
    return f"{LLAMA_DIST}=={version}" if version else LLAMA_DIST


RPC_FLAG = "-DGGML_RPC=on"


def _rebuild(flags: str, version: str | None) -> str:
    # --no-cache-dir skips pip's wheel cache, and --no-binary refuses any prebuilt wheel an
    # index or --find-links may offer (it alone does not skip the cache): llama.cpp is compiled
    # anew.
    return (
        f'CMAKE_ARGS="{flags}" pip install --force-reinstall --no-cache-dir '
        f"--no-binary {LLAMA_DIST} {_spec(version)}"
    )


def cuda_install_command(version: str | None) -> str:
    """The command that rebuilds llama-cpp-python with llama.cpp's CUDA and RPC backends."""
    return _rebuild(f"-DGGML_CUDA=on {RPC_FLAG}", version)


def cpu_install_command(version: str | None) -> str:
    """The command that rebuilds llama-cpp-python for the CPU, with the RPC backend."""
    return _rebuild(RPC_FLAG, version)


def keeps_cuda(gpu_offload: bool, nvidia_gpu: bool = False, platform: str = sys.platform) -> bool:
    """Whether a rebuild that adds RPC should build CUDA in: the build offloads to a GPU now or
    an NVIDIA GPU waits to be used, except on macOS, whose GPU backend (Metal) llama.cpp builds
    in by default and where CUDA does not build."""
    return platform != "darwin" and (gpu_offload or nvidia_gpu)


def rpc_install_command(version: str | None, *, cuda: bool = False) -> str:
    """The rebuild that adds RPC (`qwenrun worker`, --rpc), keeping CUDA where it is used."""
    return cuda_install_command(version) if cuda else cpu_install_command(version)
