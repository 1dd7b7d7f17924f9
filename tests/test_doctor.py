"""`qwenrun doctor`: the diagnosis over hardware values, and the command on this machine."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenrun.engine import doctor
from qwenrun.hwprobe import GPUInfo, HardwareProfile

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
CUDA_CMD = (
    'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
    "--no-binary llama-cpp-python llama-cpp-python==0.3.36"
)
CPU_CMD = (
    'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
    "--no-binary llama-cpp-python llama-cpp-python==0.3.36"
)

RTX_4090 = GPUInfo(
    index=0,
    name="NVIDIA GeForce RTX 4090",
    total_bytes=24 * GIB,
    free_bytes=23 * GIB,
    used_bytes=1 * GIB,
    compute_capability=(8, 9),
    driver="550.54.14",
    mem_bandwidth_gbs=1008.0,
    pcie="4.0 x16",
)
H100 = GPUInfo(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    total_bytes=80 * GIB,
    free_bytes=79 * GIB,
    used_bytes=1 * GIB,
    compute_capability=(9, 0),
    driver="580.159.04",
    mem_bandwidth_gbs=3350.0,
    pcie="5.0 x16",
)


def machine(*gpus: GPUInfo) -> HardwareProfile:
    return HardwareProfile(
        gpus=tuple(gpus),
        ram_total_bytes=64 * GIB,
        ram_available_bytes=50 * GIB,
        swap_total_bytes=0,
        cpu_model="AMD Ryzen 9 7950X",
        physical_cores=16,
        logical_cores=32,
        cpu_flags=frozenset({"avx2", "avx512f"}),
        disk_free_bytes=500 * GIB,
        cpu_bandwidth_gbs=60.0,
        gpu_offload=None,
    )


def _finding(d: doctor.Diagnosis, topic: str) -> doctor.Finding:
    (found,) = [f for f in d.findings if f.topic == topic]
    return found


# ---------------------------------------------------------------------------------------
# diagnose() over hardware values


def test_gpu_with_cpu_only_build_gives_the_cuda_reinstall_command():
    d = doctor.diagnose(machine(RTX_4090), "0.3.36", False, pinned="0.3.36")
    assert d.fix == CUDA_CMD
    assert d.level == "warn"
    assert d.ok  # it runs, only slower
    offload = _finding(d, "gpu-offload")
    assert offload.level == "warn"
    assert "CPU-only" in offload.text
    assert "RTX 4090" in offload.text
    assert offload.fix == CUDA_CMD


def test_no_gpu_and_cpu_build_is_fine():
    d = doctor.diagnose(machine(), "0.3.36", False, pinned="0.3.36")
    assert d.level == "ok"
    assert d.fix is None
    assert "no NVIDIA GPU" in _finding(d, "gpu").text
    assert _finding(d, "gpu-offload").level == "ok"


def test_gpu_with_cuda_build_is_ok_and_lists_the_gpu():
    d = doctor.diagnose(machine(H100), "0.3.36", True, pinned="0.3.36")
    assert d.level == "ok"
    assert d.fix is None
    gpu = _finding(d, "gpu").text
    assert "NVIDIA H100 80GB HBM3" in gpu
    assert "80.0 GiB" in gpu
    assert "compute 9.0" in gpu
    assert d.gpus == (H100,)


def test_every_gpu_is_listed():
    second = dataclasses.replace(RTX_4090, index=1)
    d = doctor.diagnose(machine(RTX_4090, second), "0.3.36", False, pinned="0.3.36")
    gpu_lines = [f.text for f in d.findings if f.topic == "gpu"]
    assert [line.split(":")[0] for line in gpu_lines] == ["GPU 0", "GPU 1"]
    assert "2 NVIDIA GPUs" in _finding(d, "gpu-offload").text


def test_missing_llama_cpp_python_is_an_error_with_the_right_install():
    with_gpu = doctor.diagnose(machine(RTX_4090), None, None, pinned="0.3.36")
    assert with_gpu.level == "error"
    assert not with_gpu.ok
    assert with_gpu.fix == CUDA_CMD
    assert "not installed" in _finding(with_gpu, "llama-cpp-python").text

    cpu_only = doctor.diagnose(machine(), None, None, pinned="0.3.36")
    assert cpu_only.fix == CPU_CMD


def test_a_version_other_than_the_pin_is_a_warning():
    d = doctor.diagnose(machine(), "0.3.20", False, pinned="0.3.36")
    llama = _finding(d, "llama-cpp-python")
    assert llama.level == "warn"
    assert "0.3.20" in llama.text and "0.3.36" in llama.text
    assert d.fix is not None and d.fix.endswith("llama-cpp-python==0.3.36")


def test_a_library_that_does_not_load_is_an_error():
    d = doctor.diagnose(
        machine(H100),
        "0.3.36",
        None,
        pinned="0.3.36",
        offload_error="RuntimeError: Failed to load shared library 'libllama.so'",
    )
    offload = _finding(d, "gpu-offload")
    assert offload.level == "error"
    assert "libllama.so" in offload.text
    assert d.fix == CUDA_CMD


def test_the_pin_comes_from_pyproject_through_qwenrun_metadata():
    # tomllib is 3.11+, and qwenrun supports 3.10: read the one pinned line directly.
    (pin,) = re.findall(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert doctor.pinned_llama_version() == pin
    d = doctor.diagnose(machine(RTX_4090), "0.0.1", False)
    assert d.pinned_version == pin
    assert d.fix is not None and d.fix.endswith(f"llama-cpp-python=={pin}")


def test_cuda_warning_only_when_a_gpu_sits_unused():
    warning = doctor.cuda_warning(machine(RTX_4090), False)
    assert warning is not None
    assert "RTX 4090" in warning
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on" pip install' in warning
    assert "\n" not in warning
    assert doctor.cuda_warning(machine(RTX_4090), True) is None
    assert doctor.cuda_warning(machine(RTX_4090), None) is None
    assert doctor.cuda_warning(machine(), False) is None


def test_json_and_text_renderings():
    d = doctor.diagnose(machine(RTX_4090), "0.3.36", False, pinned="0.3.36")
    doc = json.loads(json.dumps(d.as_dict()))
    assert doc["ok"] is True
    assert doc["level"] == "warn"
    assert doc["gpu_offload"] is False
    assert doc["llama_cpp_python"] == {"installed": "0.3.36", "pinned": "0.3.36"}
    assert doc["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert doc["fix"] == CUDA_CMD
    assert {f["level"] for f in doc["findings"]} == {"ok", "warn"}

    text = doctor.render_text(d)
    for f in d.findings:
        assert f.text in text
    assert text.rstrip().endswith(CUDA_CMD)


# ---------------------------------------------------------------------------------------
# The command on this machine


def _qwenrun(*args: str) -> subprocess.CompletedProcess[str]:
    keep = ("PATH", "HOME", "LANG", "QWENRUN_HOME", "HF_HOME", "LLAMA_CPP_LIB_PATH", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    return subprocess.run(
        [sys.executable, "-m", "qwenrun", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def this_machine() -> tuple[HardwareProfile, bool]:
    # What doctor should report: the probe's GPUs and the build's own answer.
    from qwenrun import hwprobe
    from qwenrun.engine import native

    return hwprobe.probe(), native.supports_gpu_offload()


@pytest.mark.slow
def test_doctor_command_reports_this_machine(this_machine):
    hw, offload = this_machine
    proc = _qwenrun("doctor")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"llama-cpp-python {doctor.installed_llama_version()}" in out
    if hw.gpus:
        for g in hw.gpus:
            assert g.name in out
    else:
        assert "no NVIDIA GPU found" in out
    if not offload:
        assert "CPU-only build" in out
    if hw.gpus and not offload:
        assert "-DGGML_CUDA=on -DGGML_RPC=on" in out
    else:
        assert "To fix it" not in out


@pytest.mark.slow
def test_doctor_json_on_this_machine(this_machine):
    hw, offload = this_machine
    proc = _qwenrun("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["gpu_offload"] is offload
    assert [g["name"] for g in doc["gpus"]] == [g.name for g in hw.gpus]
    assert doc["llama_cpp_python"]["installed"] == doctor.installed_llama_version()
    assert doc["ok"] is True
    assert doc["rpc"] is native_rpc()


def native_rpc() -> bool:
    from qwenrun.engine import native

    return native.supports_rpc()


def test_a_build_without_rpc_gets_the_rebuild_that_adds_it():
    # No GPU: the CPU rebuild with RPC; nothing is wrong, so the level stays ok.
    d = doctor.diagnose(machine(), "0.3.36", False, pinned="0.3.36", rpc=False)
    rpc = _finding(d, "rpc")
    assert "without the RPC backend" in rpc.text and "qwenrun worker" in rpc.text
    assert d.level == "ok" and d.fix == rpc.fix == CPU_CMD
    assert json.loads(json.dumps(d.as_dict()))["rpc"] is False
    # A CUDA build without RPC: the rebuild keeps CUDA.
    cuda = doctor.diagnose(machine(H100), "0.3.36", True, pinned="0.3.36", rpc=False)
    assert cuda.fix == CUDA_CMD
    # A CPU-only build under a GPU: one command fixes both.
    both = doctor.diagnose(machine(RTX_4090), "0.3.36", False, pinned="0.3.36", rpc=False)
    assert both.fix == CUDA_CMD and _finding(both, "rpc").fix == CUDA_CMD


def test_a_build_with_rpc_says_so_and_needs_nothing():
    d = doctor.diagnose(machine(), "0.3.36", False, pinned="0.3.36", rpc=True)
    assert "has the RPC backend" in _finding(d, "rpc").text
    assert d.fix is None


def test_what_the_probe_could_not_tell_is_shown_but_not_judged():
    hw = dataclasses.replace(machine(), notes=("RAM bandwidth is a default",))
    d = doctor.diagnose(hw, "0.3.36", False, pinned="0.3.36")
    assert _finding(d, "probe").text == "note: RAM bandwidth is a default"
    assert d.level == "ok"
