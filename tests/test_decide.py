"""What the planner says must be true: unknown architectures, a file's own quant, and the
settings it had to clamp (issue 10 §4). Real GGUF headers, real `qwenrun` processes."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenrun import errors, offload
from qwenrun.offload import Wishes
from qwenrun.testing.hardware import machine
from qwenrun.testing.proc import error_line, run_qwenrun


def _foreign_gguf(path: Path, arch: str = "foo") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.block_count", 2)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_an_unknown_architecture_is_refused_in_one_line(tmp_path):
    model = _foreign_gguf(tmp_path / "foo.gguf")
    line = error_line(run_qwenrun("plan", str(model)), 3)
    assert "architecture 'foo'" in line and "qwen3moe" in line
    with pytest.raises(errors.UnsupportedModelError):
        offload.plan_for_file(model, machine(None, 16))


def test_a_float_file_is_named_by_its_weights_not_unknown(tiny_models):
    # tiny models carry no general.file_type and no quant in their name: the weights tell.
    path = tiny_models("qwen3moe", dtype="f32")
    p = offload.plan_for_file(path, machine(None, 16))
    assert p.quant == "F32"
    assert p.reasons[0] == "quant F32: the file's own"
    f16 = offload.plan_for_file(tiny_models("qwen3moe", dtype="f16"), machine(None, 16))
    assert f16.quant == "F16"


@pytest.mark.parametrize(
    ("wishes", "said"),
    [
        (Wishes(n_cpu_moe=999), "--n-cpu-moe 999 is more than the model's 4 layers"),
        (Wishes(threads=1000), "--threads 1,000 is more than this machine's"),
        (Wishes(n_ctx=65536), "--ctx 65,536 is beyond the 32,768 tokens"),
    ],
)
def test_settings_that_cannot_be_honoured_as_written_are_said(tiny_models, wishes, said):
    p = offload.plan_for_file(tiny_models("qwen3moe"), machine(8, 32), wishes)
    assert any(w.startswith(said) for w in p.warnings), p.warnings


def test_threads_beyond_the_machine_are_clamped(tiny_models):
    hw = machine(None, 16)
    p = offload.plan_for_file(tiny_models("qwen3moe"), hw, Wishes(threads=1000))
    assert p.load.n_threads == hw.logical_cores


@pytest.mark.slow
def test_run_says_what_it_clamped_without_verbose(tiny_models):
    model = tiny_models("qwen3moe", steer=2)
    proc = run_qwenrun(
        "run", str(model), "hi", "--max-tokens", "2", "--ctx", "512", "--n-cpu-moe", "999"
    )
    assert proc.returncode == 0, proc.stderr
    assert "--n-cpu-moe 999 is more than the model's 4 layers" in proc.stderr
    plan = json.loads(run_qwenrun("plan", str(model), "--n-cpu-moe", "999", "--json").stdout)
    assert any("--n-cpu-moe 999" in w for w in plan["warnings"])
