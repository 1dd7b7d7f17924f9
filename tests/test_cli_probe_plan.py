"""`qwenrun probe` and `qwenrun plan` as a user runs them: real processes, this machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from qwenrun import catalog
from qwenrun.testing.hub_server import HubServer
from qwenrun.testing.proc import error_line, run_qwenrun

GIB = 1 << 30


def qwenrun(*args: str) -> subprocess.CompletedProcess[str]:
    return run_qwenrun(*args)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    return error_line(proc, code)


def plan_json(*args: str) -> dict:
    proc = qwenrun("plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------------------
# probe


@pytest.mark.slow
def test_probe_json_schema():
    proc = qwenrun("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    hw = data["hardware"]
    for key in (
        "gpus",
        "ram_total_bytes",
        "ram_available_bytes",
        "swap_total_bytes",
        "cpu_model",
        "physical_cores",
        "logical_cores",
        "cpu_flags",
        "disk_free_bytes",
        "cpu_bandwidth_gbs",
        "gpu_offload",
    ):
        assert key in hw
    assert hw["ram_total_bytes"] > 0
    assert isinstance(hw["cpu_flags"], list)
    names = [m["model"] for m in data["models"]]
    assert names == [s.name for s in catalog.CATALOG]
    fitting = [m for m in data["models"] if m["fits"]]
    for m in data["models"]:
        if m["fits"]:
            p = m["plan"]
            assert p["quant"] in catalog.QUANT_LADDER
            assert p["n_ctx"] >= 4096
            assert p["estimated"] is True
            assert p["predicted"]["decode_tok_s"] > 0
            assert m["problem"] is None
        else:
            assert m["plan"] is None
            assert "needs" in m["problem"]
    # This machine (≥ 16 GiB RAM) runs the small models at least.
    if hw["ram_total_bytes"] >= 16 * GIB:
        assert any(m["model"] == "qwen3-30b-a3b" for m in fitting)
    assert not any(m["model"] == "qwen3.5-397b-a17b" for m in fitting) or (
        hw["ram_total_bytes"] > 100 * GIB
    )


@pytest.mark.slow
def test_probe_tables_on_a_pipe_have_no_escape_codes():
    proc = qwenrun("probe")
    assert proc.returncode == 0, proc.stderr
    assert "This machine" in proc.stdout
    assert "qwen3-30b-a3b" in proc.stdout
    assert "\x1b[" not in proc.stdout


@pytest.mark.slow
def test_probe_measure_remembers_the_bandwidth():
    proc = qwenrun("probe", "--measure", "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)["hardware"]
    assert first["cpu_bandwidth_source"] == "measured"
    cache = Path(os.environ["QWENRUN_HOME"]) / "cpu_bandwidth.json"
    assert cache.is_file()
    again = json.loads(qwenrun("probe", "--json").stdout)["hardware"]
    assert again["cpu_bandwidth_source"] == "measured"
    assert again["cpu_bandwidth_gbs"] == first["cpu_bandwidth_gbs"]


@pytest.mark.slow
def test_probe_measure_shows_the_bandwidth_when_the_home_cannot_keep_it(tmp_path):
    # QWENRUN_HOME is a regular file: nothing can be stored under it, the measurement is
    # still shown, and one note says why it was not kept (issue 19).
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    proc = run_qwenrun("probe", "--measure", env={"QWENRUN_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    bandwidth = next(ln for ln in proc.stdout.splitlines() if "RAM bandwidth" in ln)
    assert "(measured)" in bandwidth
    # One note, in the table (wrapped to the pipe's 80 columns): why it was not kept.
    shown = " ".join(proc.stdout.split())
    assert shown.count("not kept") == 1
    assert "measured RAM bandwidth not kept for later runs:" in shown
    assert "cannot be written" in shown


# --------------------------------------------------------------------------------------
# plan, catalog models (offline estimates)


@pytest.mark.slow
def test_plan_12gib_gpu_and_32gib_ram_picks_4bit_or_better_with_most_experts_on_cpu():
    p = plan_json("qwen3-30b-a3b", "--gpu-mem", "12GiB", "--ram", "32GiB")
    assert catalog.quant_rank(p["quant"]) <= catalog.quant_rank("Q4_0")  # 4-bit class or better
    assert p["n_layer"] == 48
    assert p["cpu_expert_layers"] > 24
    assert p["n_gpu_layers"] == -1
    gpu, cpu = p["devices"]
    assert gpu["device"] == "gpu" and cpu["device"] == "cpu"
    assert gpu["capacity"] == 12 * GIB and cpu["capacity"] == 32 * GIB
    assert gpu["used"] <= gpu["budget"] and cpu["used"] <= cpu["budget"]
    assert p["override_patterns"][0]["buffer"] == "CPU"
    assert p["reasons"]


@pytest.mark.slow
def test_plan_gpu_mem_0_puts_everything_on_the_cpu():
    p = plan_json("qwen3-30b-a3b", "--gpu-mem", "0", "--ram", "64G")
    assert p["n_gpu_layers"] == 0
    assert [d["device"] for d in p["devices"]] == ["cpu"]
    assert p["override_patterns"] == []
    assert p["use_mmap"] is True
    cpu = p["devices"][0]
    assert cpu["weights_experts"] > 10 * GIB


@pytest.mark.slow
def test_plan_honours_fixed_settings():
    p = plan_json(
        "qwen3.5-35b",
        "--quant",
        "q4_k_m",
        "--ctx",
        "65536",
        "--kv-type",
        "q8_0",
        "--n-cpu-moe",
        "20",
        "--gpu-mem",
        "16G",
        "--ram",
        "64G",
    )
    assert p["quant"] == "Q4_K_M"
    assert p["n_ctx"] == 65536
    assert p["kv_type"] == "q8_0"
    assert p["expert_cpu_layers"] == list(range(20))
    assert p["expert_cpu_tensors"] == []


def test_plan_takes_every_placement_option_run_takes():
    import typer.main

    from qwenrun import cli

    group = typer.main.get_command(cli.app)

    def options(name: str) -> set[str]:
        command = group.commands[name]  # type: ignore[attr-defined]
        return {o for p in command.params for o in p.opts if o.startswith("--")}

    placement = {
        "--ctx",
        "--kv-type",
        "--cpu-moe",
        "--n-cpu-moe",
        "--cpu-moe-from",
        "--gpu-layers",
        "--prefer",
        "--threads",
    }
    for name in ("plan", "run", "chat", "serve", "bench"):
        assert placement <= options(name), name


@pytest.mark.slow
def test_plan_cpu_moe_puts_every_expert_on_the_cpu():
    p = plan_json(
        "qwen3-30b-a3b", "--cpu-moe", "--threads", "1", "--gpu-mem", "24G", "--ram", "64G"
    )
    assert p["cpu_moe_all"] is True
    assert p["cpu_expert_layers"] == p["n_layer"]
    assert p["n_threads"] == 1
    assert p["override_patterns"] == [
        {"pattern": r"\.ffn_(up|down|gate|gate_up)_(ch|)exps", "buffer": "CPU"}
    ]


@pytest.mark.slow
def test_plan_tables_on_a_pipe():
    proc = qwenrun("plan", "qwen3-30b-a3b", "--gpu-mem", "24G", "--ram", "64G")
    assert proc.returncode == 0, proc.stderr
    for text in ("Memory by device", "Why:", "KV cache", "predicted decode"):
        assert text in proc.stdout
    assert "\x1b[" not in proc.stdout


@pytest.mark.slow
def test_plan_bad_size_is_one_line_exit_2():
    line = one_line_error(qwenrun("plan", "qwen3-30b-a3b", "--gpu-mem", "12 parsecs"), 2)
    assert "--gpu-mem" in line
    one_line_error(qwenrun("plan", "qwen3-30b-a3b", "--ram", "lots"), 2)


@pytest.mark.slow
def test_plan_unknown_model_is_exit_3():
    line = one_line_error(qwenrun("plan", "qwen9-1t"), 3)
    assert "unknown model" in line


@pytest.mark.slow
def test_plan_that_cannot_fit_is_exit_4_with_alternatives():
    line = one_line_error(qwenrun("plan", "qwen3.5-397b", "--gpu-mem", "0", "--ram", "32G"), 4)
    assert "does not fit" in line
    assert "needs about" in line
    assert "hint: try" in line and "smaller" in line


@pytest.mark.slow
def test_plan_unknown_quant_is_exit_2():
    one_line_error(qwenrun("plan", "qwen3-30b-a3b", "--quant", "Q9_Z"), 2)


@pytest.mark.slow
def test_plan_catalog_reference_with_a_quant_plans_that_quant():
    p = plan_json("qwen3-30b-a3b:q4_k_m", "--gpu-mem", "0", "--ram", "64G")
    assert p["quant"] == "Q4_K_M" and p["estimated"] is True
    same = plan_json("qwen3-30b-a3b", "--quant", "Q4_K_M", "--gpu-mem", "0", "--ram", "64G")
    assert same == p
    line = one_line_error(qwenrun("plan", "qwen3-30b-a3b:Q4_K_M", "--quant", "Q8_0"), 2)
    assert "Q4_K_M" in line and "Q8_0" in line


# --------------------------------------------------------------------------------------
# plan, a local file (exact bytes)


@pytest.mark.slow
def test_plan_local_gguf_uses_its_exact_bytes(tiny_models):
    path = tiny_models("qwen35moe", vocab_size=2048)
    p = plan_json(str(path), "--gpu-mem", "0")
    assert p["files"] == [str(path)]
    assert p["estimated"] is False
    assert p["arch"] == "qwen35moe"
    assert p["quant"] == "F32"
    cpu = p["devices"][0]
    size = path.stat().st_size
    assert 0.9 * size < cpu["weights_dense"] + cpu["weights_experts"] <= size
    assert cpu["recurrent_state"] > 0


@pytest.mark.slow
def test_plan_local_gguf_rejects_quant(tiny_models):
    path = tiny_models("qwen3moe")
    one_line_error(qwenrun("plan", str(path), "--quant", "Q4_K_M"), 2)


@pytest.mark.slow
def test_plan_missing_local_file_is_exit_3(tmp_path):
    line = one_line_error(qwenrun("plan", str(tmp_path / "nope.gguf")), 3)
    assert "no such file" in line  # the same words as `run` (one check of a path)


# --------------------------------------------------------------------------------------
# plan, a hub repo (real headers, read with range requests)

REPO = "tiny/plan-GGUF"  # outside the catalog
Q8 = "Plan-Q8_0.gguf"
Q4 = ("Q4_K_M/Plan-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/Plan-Q4_K_M-00002-of-00002.gguf")
BF16 = "Plan-BF16.gguf"


@pytest.fixture
def hub(tiny_models):
    single = tiny_models("qwen3moe")
    first = tiny_models("qwen3moe", split=2)
    second = first.with_name(first.name.replace("-00001-of-", "-00002-of-"))
    with HubServer() as server:
        server.add_repo(REPO, {Q8: single, Q4[0]: first, Q4[1]: second, BF16: single})
        yield server


def hub_plan(hub: HubServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_qwenrun("plan", *args, "--gpu-mem", "0", env={"HF_ENDPOINT": hub.url, **env})


def header_reads(hub: HubServer, name: str) -> list[str | None]:
    """The Range of every GET of the file's bytes (at the storage URL the hub redirects to)."""
    return [r.range for r in hub.requests_for(name, "GET") if r.path.startswith("/_content/")]


@pytest.mark.slow
def test_plan_hub_repo_from_its_real_headers(hub):
    proc = hub_plan(hub, REPO, "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    # The best quant that fits, from exact bytes: full precision is not a default pick.
    assert p["quant"] == "Q8_0" and p["estimated"] is False
    assert [f.rsplit("/", 1)[-1] for f in p["files"]] == [Q8]
    size = hub.file(REPO, Q8).size
    cpu = p["devices"][0]
    assert 0.9 * size < cpu["weights_dense"] + cpu["weights_experts"] <= size
    # Only the header of the one quant that decided: a range from byte 0, never the file.
    reads = header_reads(hub, Q8)
    assert reads and all(r is not None and r.startswith("bytes=0-") for r in reads)
    assert header_reads(hub, Q4[0]) == [] and header_reads(hub, BF16) == []


@pytest.mark.slow
def test_plan_hub_repo_does_not_read_a_quant_too_big_for_the_machine(hub):
    hub.advertise_size(REPO, Q8, 10**15)  # a petabyte: no header needed to rule it out
    p = json.loads(hub_plan(hub, REPO, "--json").stdout)
    assert p["quant"] == "Q4_K_M" and p["estimated"] is False
    assert [f.rsplit("/", 1)[-1] for f in p["files"]] == [Path(q).name for q in Q4]
    assert header_reads(hub, Q8) == []
    assert header_reads(hub, Q4[0]) and header_reads(hub, Q4[1])


@pytest.mark.slow
def test_plan_hub_repo_with_a_quant(hub):
    for args in ((f"hf.co/{REPO}:q4_k_m",), (REPO, "--quant", "Q4_K_M")):
        proc = hub_plan(hub, *args, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["quant"] == "Q4_K_M"
    line = one_line_error(hub_plan(hub, f"{REPO}:Q2_K"), 3)
    assert "has no quant Q2_K" in line and "Q8_0" in line


@pytest.mark.slow
def test_plan_hub_repo_offline_uses_a_cached_copy_or_says_it_cannot(hub):
    line = one_line_error(hub_plan(hub, REPO, HF_HUB_OFFLINE="1"), 5)
    assert "offline" in line and REPO in line
    pulled = run_qwenrun("pull", f"{REPO}:Q4_K_M", env={"HF_ENDPOINT": hub.url})
    assert pulled.returncode == 0, pulled.stderr
    hub.clear_requests()
    proc = hub_plan(hub, REPO, "--json", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    assert p["quant"] == "Q4_K_M" and p["estimated"] is False
    assert p["files"] == pulled.stdout.split()
    assert hub.requests == []
