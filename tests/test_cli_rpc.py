"""`--rpc` as a user gives it: two `qwenrun worker`s on loopback (their CPU and RAM) and the
local CPU, planned and run by real `qwenrun` processes (issue 18's "done when")."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenrun.engine import rpc
from qwenrun.testing.proc import error_line, run_qwenrun
from qwenrun.testing.workers import WorkerProcess, free_port, start_worker

pytestmark = pytest.mark.slow
MIB = 1 << 20


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    a = start_worker("--threads", "1")
    b = start_worker("--threads", "1")
    yield a, b
    a.stop()
    b.stop()


def _json(proc) -> dict:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_run_over_two_workers_answers_as_a_local_run(tiny_models, workers, arch):
    a, b = workers
    model = str(tiny_models(arch, steer=2, n_layer=6))
    ask = ("run", model, "The lighthouse keeper", "--max-tokens", "16", "--temp", "0")
    ask += ("--ctx", "1024", "--json", "--verbose")
    local = _json(run_qwenrun(*ask))
    rpc_list = f"{a.endpoint},{b.endpoint}"
    remote = _json(run_qwenrun(*ask, "--rpc", rpc_list))
    assert remote["answer"] == local["answer"]
    # Both workers hold weights, as the plan says, and each within 3 % or 64 MiB of what
    # llama.cpp allocated there.
    plan = _json(run_qwenrun("plan", model, "--ctx", "1024", "--json", "--rpc", rpc_list))
    logged: dict[str, dict[str, int]] = {}
    for buf in remote["placement"]["buffers"]:
        where = buf["buft"].partition("[")[2].rstrip("]") or "here"
        logged.setdefault(where, {}).setdefault(buf["kind"], 0)
        logged[where][buf["kind"]] += buf["n_bytes"]
    for w in (a, b):
        devices = [d for d in plan["devices"] if d["endpoint"] == w.endpoint]
        assert devices, plan["devices"]
        planned = {
            "model": sum(d["weights_dense"] + d["weights_experts"] for d in devices),
            "kv": sum(d["kv"] for d in devices),
            "compute": sum(d["compute"] for d in devices),
        }
        assert planned["model"] > 0
        for kind, n in planned.items():
            got = logged[w.endpoint].get(kind, 0)
            # Weights and caches are counted exactly (3 %); compute buffers are an estimate
            # of the peak, held to the 64 MiB.
            slack = 64 * MIB if kind == "compute" else 0
            assert abs(n - got) <= max(0.03 * got, slack), (w.endpoint, kind, n, got)


def test_plan_json_lists_each_workers_devices(tiny_models, workers):
    a, b = workers
    plan = _json(
        run_qwenrun(
            "plan", str(tiny_models("qwen3moe")), "--json", "--rpc", f"{a.endpoint},{b.endpoint}"
        )
    )
    remote = [d for d in plan["devices"] if d["kind"] == "remote"]
    assert {d["endpoint"] for d in remote} == {a.endpoint, b.endpoint}
    assert all(d["capacity_bytes"] > 0 and d["planned_bytes"] > 0 for d in remote)
    assert any("contiguous block" in r for r in plan["reasons"])


def test_an_unreachable_worker_is_one_line_within_seconds(tiny_models):
    nobody = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = run_qwenrun("run", str(tiny_models("qwen3moe")), "hi", "--rpc", nobody)
    assert time.monotonic() - t0 < 30
    line = error_line(proc, rpc.LOST_EXIT_CODE)
    assert nobody in line


def test_a_bad_worker_address_is_a_usage_error(tiny_models):
    line = error_line(run_qwenrun("plan", str(tiny_models("qwen3moe")), "--rpc", "nowhere"), 2)
    assert "worker address" in line


def test_a_chat_that_loses_its_worker_keeps_the_conversation(tiny_models, tmp_path):
    import subprocess

    from qwenrun.testing.proc import child_env

    worker = start_worker("--threads", "1")
    model = str(tiny_models("qwen3moe", steer=2, n_layer=4))
    env = child_env()
    args = [sys.executable, "-m", "qwenrun", "chat", model, "--rpc", worker.endpoint]
    args += ["--max-tokens", "8", "--ctx", "1024"]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("Tell me about the sea\n")
        proc.stdin.flush()
        proc.stdout.readline()  # the first answer has come
        worker.kill()
        proc.stdin.write("And the lighthouse?\n")
        proc.stdin.flush()
        proc.stdin.close()
        proc.wait(timeout=60)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        proc.kill()
        worker.stop()
    assert proc.returncode == rpc.LOST_EXIT_CODE, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"lost worker {worker.endpoint}" in line and "/load " in line
    kept = Path(line.split("/load ", 1)[1].rstrip(")"))
    saved = json.loads(kept.read_text())
    users = [m["content"] for m in saved["messages"] if m["role"] == "user"]
    assert users == ["Tell me about the sea"]  # the answered turn; the lost one never was
