"""Run the `qwenrun` command as a real process, the way a user's shell would, for tests.

Contract: only builds the environment and runs `python -m qwenrun`; nothing of qwenrun is
imported or patched. The child sees a minimal environment (the variables a shell session
has, plus the ones a test sets), so a developer's own settings never leak into a test.
"""

from __future__ import annotations

import os
import subprocess
import sys

ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "QWENRUN_HOME", "HF_HOME", "PYTHONPATH")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
    env.update(extra or {})
    return env


def run_qwenrun(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`qwenrun ARGS…`; without `stdin` it reads from /dev/null, as a closed pipe would."""
    return subprocess.run(
        [sys.executable, "-m", "qwenrun", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=timeout,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def error_line(proc: subprocess.CompletedProcess[str], code: int, *, only: bool = True) -> str:
    """Check a failed command: this exit code, an `error: …` line last on stderr (the only
    line there when `only`), no traceback; return that line."""
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    if only:
        assert len(lines) == 1, proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]
