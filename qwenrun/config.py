"""Paths and defaults, read from the environment each time they are asked for.

Contract: functions here only read environment variables and build paths; they create nothing on
disk unless the name says so (`ensure_home`). Reading at call time (not import time) lets tests
point `QWENRUN_HOME` at a temporary folder with `monkeypatch.setenv`. The Hugging Face cache is
not ours: `hf_hub_cache()` finds it from huggingface_hub's own variables (`HF_HUB_CACHE`, then
`HF_HOME`, then `XDG_CACHE_HOME`), in the order huggingface_hub resolves them, so the
downloader, `list` and `rm` use the folder it would.
"""

from __future__ import annotations

import os
from pathlib import Path


def qwenrun_home() -> Path:
    """Where qwenrun keeps its own state (history, verification records, measurements)."""
    env = os.environ.get("QWENRUN_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "qwenrun"


def ensure_home() -> Path:
    home = qwenrun_home()
    home.mkdir(parents=True, exist_ok=True)
    return home


def debug_enabled() -> bool:
    """`QWENRUN_DEBUG=1` shows tracebacks instead of one-line messages."""
    return os.environ.get("QWENRUN_DEBUG", "").strip() not in ("", "0", "false", "no")


def history_file() -> Path:
    return qwenrun_home() / "history"


def hf_hub_cache() -> Path:
    """The huggingface_hub cache folder, resolved the way huggingface_hub resolves it."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"
