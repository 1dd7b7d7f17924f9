"""Several devices over llama.cpp's RPC backend (engine/rpc.py, engine/devices.py, loadconfig).

Real llama.cpp throughout: two `qwenrun worker` processes on loopback serve their CPU, and a
client process loads a generated model over them with the engine's own placement values. A
process that registered workers is never the test process itself (llama.cpp cannot forget a
worker, and ends the process that loses one). The wrong-version and silent workers are tiny
socket servers speaking ggml-rpc's handshake, the one thing that cannot be had for real here.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenrun import cli, errors
from qwenrun.engine import crash, devices, doctor, native, rebuild, rpc
from qwenrun.engine.llamalog import parse_placement
from qwenrun.engine.loadconfig import ExpertHome, Placement
from qwenrun.testing.proc import child_env
from qwenrun.testing.workers import (
    WorkerProcess,
    client_command,
    free_port,
    run_client,
    start_worker,
)

# ---------------------------------------------------------------------------------------
# Values: endpoints, layer blocks, expert homes


def test_endpoints_are_host_and_port():
    assert rpc.parse_endpoints(" 10.0.0.2:50052, gpu-box:6000,10.0.0.2:50052") == (
        "10.0.0.2:50052",
        "gpu-box:6000",
    )
    for bad in ("10.0.0.2", "10.0.0.2:", ":50052", "host:0", "host:70000", "host:x"):
        with pytest.raises(errors.UsageError, match="not a worker address"):
            rpc.parse_endpoint(bad)
    with pytest.raises(errors.UsageError, match="IPv4 only"):
        rpc.parse_endpoint("[::1]:50052")


def test_layer_blocks_become_devices_split_and_offloaded_layers():
    p = Placement.layer_blocks(8, [("CPU", 2), ("RPC0[a:1]", 3), ("CUDA0", 3)])
    assert p.n_gpu_layers == 7  # 6 layers and the output layer
    assert p.devices == ("RPC0[a:1]", "CUDA0")
    assert p.tensor_split == (3.0, 4.0)  # the output layer goes with the last block
    assert p.layer_devices(8) == (
        *["CPU"] * 2,
        *["RPC0[a:1]"] * 3,
        *["CUDA0"] * 3,
        "CUDA0",  # output
    )
    # Uneven blocks land exactly where they were asked, for every split of 48 layers.
    for first in range(1, 47):
        q = Placement.layer_blocks(48, [("A", first), ("B", 48 - first)])
        assert q.layer_devices(48) == ("A",) * first + ("B",) * (49 - first)


def test_layer_blocks_refuse_what_llama_cpp_cannot_do():
    with pytest.raises(errors.UsageError, match="only be the first block"):
        Placement.layer_blocks(4, [("RPC0[a:1]", 2), ("CPU", 2)])
    with pytest.raises(errors.UsageError, match="hold 3 layers, the model has 4"):
        Placement.layer_blocks(4, [("CPU", 1), ("RPC0[a:1]", 2)])
    with pytest.raises(errors.UsageError, match="listed twice"):
        Placement.layer_blocks(4, [("X", 1), ("Y", 1), ("X", 2)])
    with pytest.raises(errors.UsageError, match="CPU cannot be one of the devices"):
        Placement(devices=("CPU", "RPC0[a:1]")).validate()
    with pytest.raises(errors.UsageError, match="2 shares for 1 devices"):
        Placement(devices=("CUDA0",), tensor_split=(1.0, 1.0)).validate()


def test_expert_homes_generalise_experts_on_the_cpu():
    home = ExpertHome("RPC1[10.0.0.2:50052]", layers=(2, 3), tensors=("blk.5.ffn_up_exps.weight",))
    p = Placement(expert_cpu_layers=(0,), expert_homes=(home,), extra_overrides=(("x", "CPU"),))
    pats = p.override_patterns()
    # qwenrun's CPU patterns first, then the homes, then raw overrides: first match wins.
    assert [b for _, b in pats] == ["CPU", *[home.buffer] * 3, "CPU"]
    assert pats[1][0] == r"blk\.2\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    assert pats[3][0] == r"^blk\.5\.ffn_up_exps\.weight$"
    assert "experts of layers 2-3 on RPC1[10.0.0.2:50052]" in p.describe()
    # A device that only holds experts still joins the model's devices, with no layers.
    q = Placement.layer_blocks(4, [("RPC0[a:1]", 4)], expert_homes=(home,))
    assert q.all_devices() == ("RPC0[a:1]", home.buffer)
    assert q.all_shares() == (5.0, 0.0)
    assert set(q.layer_devices(4) or ()) == {"RPC0[a:1]"}
    with pytest.raises(errors.UsageError, match="more than one home"):
        Placement(expert_cpu_layers=(2,), expert_homes=(home,)).validate()


def test_the_load_log_of_a_worker_is_read_per_device_and_per_worker():
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =     0.41 MiB",
        "load_tensors: RPC0[127.0.0.1:5001] model buffer size =     0.47 MiB",
        "load_tensors: RPC1[127.0.0.1:5001] model buffer size =     0.25 MiB",
        "tensor blk.3.ffn_up_exps.weight (0 MiB f32) buffer type overridden to "
        "RPC1[127.0.0.1:5001]",
        "tensor blk.0.ffn_up_exps.weight (0 MiB f32) buffer type overridden to CPU",
        "llama_kv_cache: RPC0[127.0.0.1:5001] KV buffer size =     0.06 MiB",
    ]
    report = parse_placement(lines, -1)
    mib = 1024 * 1024
    assert report.total("model", "RPC0[127.0.0.1:5001]") == round(0.47 * mib)
    assert report.total("model", "127.0.0.1:5001") == round(0.72 * mib)
    assert report.total("kv", "127.0.0.1:5001") == round(0.06 * mib)
    assert report.cpu_moe_layers == (0,)  # experts sent to a worker are not on this CPU


def test_a_lost_worker_exits_with_the_status_cli_gives_worker_errors():
    assert cli.EXIT_CODES[errors.WorkerError] == rpc.LOST_EXIT_CODE
    assert cli.exit_code_for(errors.WorkerError("x")) == rpc.LOST_EXIT_CODE


def test_a_rebuild_asks_for_cuda_where_a_gpu_is_used_or_waits_but_never_on_macos():
    assert rebuild.keeps_cuda(True, platform="linux")  # a CUDA build stays one
    assert rebuild.keeps_cuda(False, nvidia_gpu=True, platform="linux")  # a GPU it ignores
    assert not rebuild.keeps_cuda(False, platform="linux")
    assert not rebuild.keeps_cuda(True, platform="darwin")  # Metal is built in by default
    assert not rebuild.keeps_cuda(False, nvidia_gpu=True, platform="darwin")


def test_the_rebuild_command_asks_for_rpc_and_defeats_the_wheel_cache():
    cmd = doctor.rpc_install_command("0.3.36")
    assert cmd.startswith('CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall')
    assert "--no-cache-dir" in cmd and "--no-binary llama-cpp-python" in cmd
    assert cmd.endswith("llama-cpp-python==0.3.36")
    assert '"-DGGML_CUDA=on -DGGML_RPC=on"' in doctor.rpc_install_command("0.3.36", cuda=True)


@pytest.mark.slow
def test_a_build_with_rpc_is_not_taken_for_a_gpu_build():
    # llama.cpp's own llama_supports_gpu_offload() is true for any RPC build, GPU or not.
    local_gpus = [d for d in devices.list_devices() if d.kind == "gpu"]
    assert native.supports_gpu_offload() == bool(local_gpus)
    if native.supports_rpc():
        assert native.bindings().llama_supports_gpu_offload()


# ---------------------------------------------------------------------------------------
# The handshake against servers that are not good workers


class FakeWorker:
    """A loopback server that answers ggml-rpc's HELLO with `version` (or not at all)."""

    def __init__(self, version: tuple[int, int, int] | None, reply_size: int = 28) -> None:
        self.version = version
        self.reply_size = reply_size
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                self.requests.append(conn.recv(1 + 8 + 24))
                if self.version is None:
                    self._stop.wait(30)  # accepted, never answers (busy with another client)
                    continue
                body = bytes([*self.version, 0]) + bytes(24)
                conn.sendall(struct.pack("<Q", self.reply_size) + body[: self.reply_size])

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def fake():
    made: list[FakeWorker] = []

    def make(version, reply_size=28):
        made.append(FakeWorker(version, reply_size))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_the_handshake_is_ggml_rpc_hello(fake):
    w = fake(rpc.PROTOCOL)
    assert rpc.hello(w.endpoint) == rpc.PROTOCOL
    # command 14, a u64 size of 24, then 24 capability bytes (all zero: plain TCP)
    assert w.requests == [bytes([14]) + struct.pack("<Q", 24) + bytes(24)]


@pytest.mark.parametrize("version", [(6, 0, 0), (8, 0, 0), (7, 1, 0)])
def test_another_protocol_version_is_refused_naming_both(fake, version):
    w = fake(version)
    t0 = time.monotonic()
    with pytest.raises(errors.WorkerError) as info:
        rpc.connect([w.endpoint])
    assert time.monotonic() - t0 < 5
    theirs, ours = ".".join(map(str, version)), ".".join(map(str, rpc.PROTOCOL))
    assert f"speaks RPC protocol {theirs}" in info.value.message
    assert f"llama.cpp speaks {ours}" in info.value.message
    assert "same qwenrun" in (info.value.hint or "")
    assert rpc.connected() == ()  # nothing was registered


def test_a_reply_of_another_shape_is_refused_even_with_our_version(fake):
    # llama.cpp would abort on a HELLO reply of any other size.
    w = fake(rpc.PROTOCOL, reply_size=3)
    with pytest.raises(errors.WorkerError, match=r"speaks RPC protocol 7\.0\.0"):
        rpc.hello(w.endpoint)


@pytest.mark.slow
def test_a_worker_that_never_answers_is_one_error_within_seconds(fake):
    w = fake(None)
    t0 = time.monotonic()
    with pytest.raises(errors.WorkerError, match="did not answer within 1 s") as info:
        rpc.hello(w.endpoint, reply_timeout=1.0)
    assert time.monotonic() - t0 < 3
    assert "one client at a time" in (info.value.hint or "")


def test_an_unreachable_worker_is_one_error_within_seconds():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(errors.WorkerError, match=f"worker 127.0.0.1:{port} is unreachable") as e:
        rpc.connect([f"127.0.0.1:{port}"])
    assert time.monotonic() - t0 < 5
    assert f"qwenrun worker --port {port}" in (e.value.hint or "")
    assert "\n" not in e.value.message


@pytest.mark.slow
def test_the_abort_line_names_the_worker_that_is_gone():
    dead = f"127.0.0.1:{free_port()}"
    with socket.create_server(("127.0.0.1", 0)) as alive_sock:
        alive = f"127.0.0.1:{alive_sock.getsockname()[1]}"
        message = "ggml-rpc.cpp:612: Remote RPC server crashed or returned malformed response"
        line, lost = rpc.abort_line(message, [alive, dead])
        assert lost and line.startswith(f"error: lost worker {dead}:") and alive not in line
        line, lost = rpc.abort_line(f"ggml-rpc.cpp:548: Failed to connect to {alive}", [alive])
        assert lost and f"worker {alive}" in line
        line, lost = rpc.abort_line("ggml.c:10: GGML_ASSERT(x) failed", [alive])
        assert not lost and line == "error: llama.cpp aborted: GGML_ASSERT(x) failed (hint: " + (
            "run again with --verbose)"
        )


# ---------------------------------------------------------------------------------------
# Real workers


@pytest.fixture(scope="module")
def two_workers() -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    a = start_worker("--threads", "1")
    b = start_worker("--threads", "1")
    yield a, b
    a.stop()
    b.stop()


def _json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_the_protocol_constant_is_what_a_real_worker_speaks(two_workers):
    assert rpc.hello(two_workers[0].endpoint) == rpc.PROTOCOL


@pytest.mark.slow
def test_a_workers_round_trip_is_measured_on_the_wire(two_workers):
    times = rpc.round_trips(two_workers[1].endpoint, calls=50)
    assert len(times) == 50 and all(0 < t < 1 for t in times)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_layer_blocks_over_two_workers_answer_as_a_local_run(tiny_models, two_workers, arch):
    a, b = two_workers
    model = str(tiny_models(arch))
    local = _json(run_client(model=model, tokens=24))
    # Layer 0 here, layer 1 on worker a, layers 2-3 on worker b; layer 3's experts in a's RAM.
    blocks = [["CPU", 1], [a.buffer(), 1], [b.buffer(), 2]]
    remote = _json(
        run_client(
            model=model,
            tokens=24,
            workers=f"{a.endpoint},{b.endpoint}",
            blocks=blocks,
            homes=[[a.buffer(), [3]]],
        )
    )
    assert remote["text"] == local["text"] and remote["runs"][0]["tokens"] == 24
    assert remote["layer_devices"] == ["CPU", a.buffer(), b.buffer(), b.buffer(), b.buffer()]

    def model_bytes(report, buft):
        return sum(
            b["n_bytes"] for b in report["buffers"] if (b["kind"], b["buft"]) == ("model", buft)
        )

    assert model_bytes(remote, a.buffer()) > 0 and model_bytes(remote, b.buffer()) > 0
    assert model_bytes(local, a.buffer()) == 0
    # Each worker computes its layers; layer 3's experts went to a, and nothing else moved.
    for w in (a, b):
        assert any(x["kind"] == "compute" and x["buft"] == w.buffer() for x in remote["buffers"])
    moved = {(t.split(".")[1], buft) for t, buft in remote["overridden"]}
    assert moved == {("3", a.buffer())}
    # Every device llama.cpp had, as values: this CPU, then the workers' in order.
    devs = remote["devices"]
    assert devs[0]["name"] == "CPU" and devs[0]["endpoint"] is None
    assert [(d["buffer_type"], d["endpoint"]) for d in devs[1:]] == [
        (a.buffer(), a.endpoint),
        (b.buffer(), b.endpoint),
    ]
    assert all(d["total_bytes"] > 0 for d in remote["devices"])
    # The engine's connections to both workers carry keepalive (a vanished machine is noticed).
    assert remote["keepalive"] and all(remote["keepalive"])


@pytest.mark.slow
def test_layers_here_and_every_layers_experts_in_a_workers_ram(tiny_models, two_workers):
    a, _ = two_workers
    model = str(tiny_models("qwen3moe"))
    local = _json(run_client(model=model, tokens=12))
    remote = _json(
        run_client(
            model=model,
            tokens=12,
            workers=a.endpoint,
            blocks=[["CPU", 4]],
            homes=[[a.buffer(), [0, 1, 2, 3]]],
        )
    )
    assert remote["text"] == local["text"]
    assert remote["layer_devices"] == ["CPU"] * 5
    assert {buft for _, buft in remote["overridden"]} == {a.buffer()}
    assert len(remote["overridden"]) == 12  # gate, up and down of 4 layers
    # Each layer's experts are a trip there and back: llama.cpp cuts the graph at each.
    assert remote["graph_splits"] >= 2 * 4 > local["graph_splits"]


@pytest.mark.slow
def test_an_unknown_device_is_one_line_listing_the_devices(tiny_models, two_workers):
    a, _ = two_workers
    proc = run_client(
        model=str(tiny_models("qwen3moe")),
        workers=a.endpoint,
        blocks=[["RPC0[127.0.0.1:1]", 4]],
    )
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: no device named 'RPC0[127.0.0.1:1]' here")
    assert f"RPC0 ({a.buffer()})" in line and "CPU" in line


def _paused_client(model, worker, tmp_path, **kw):
    """A client that registered `worker` and waits for the test (the file `gate`) to go on."""
    gate = tmp_path / "go"
    argv = client_command(
        model=model,
        workers=worker.endpoint,
        blocks=[[worker.buffer(), 4]],
        pause_file=str(gate),
        **kw,
    )
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stderr is not None
    assert proc.stderr.readline().strip() == "paused", proc.stderr.read()
    return proc, gate


@pytest.mark.slow
def test_a_worker_killed_mid_answer_is_one_line_and_a_nonzero_exit(tiny_models):
    worker = start_worker("--threads", "1")
    model = str(tiny_models("qwen3moe", steer=2))  # never stops early
    proc = subprocess.Popen(
        client_command(
            model=model,
            workers=worker.endpoint,
            blocks=[["CPU", 2], [worker.buffer(), 2]],
            tokens=4000,
            ctx=4096,
            progress=True,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("token 20"):
                break
        worker.kill()
        t0 = time.monotonic()
        rest = proc.stderr.read()
        code = proc.wait(timeout=30)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        worker.stop()
    lines = [ln for ln in rest.splitlines() if not ln.startswith("token ")]
    assert code == rpc.LOST_EXIT_CODE, rest
    assert lines == [
        f"error: lost worker {worker.endpoint}: it stopped, or the network to it failed "
        "(hint: start `qwenrun worker` there again, then the command)"
    ]
    assert waited < 10


@pytest.mark.slow
def test_a_worker_lost_before_the_load_is_one_line(tiny_models, tmp_path):
    worker = start_worker("--threads", "1")
    proc, gate = _paused_client(str(tiny_models("qwen3moe")), worker, tmp_path)
    worker.kill()
    gate.touch()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == rpc.LOST_EXIT_CODE, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: lost worker {worker.endpoint}:")


@pytest.mark.slow
def test_an_abort_that_the_hook_misses_is_still_said_as_a_lost_worker(tiny_models, tmp_path):
    # The supervising parent (engine/crash.py) reads which workers its child was using.
    worker = start_worker("--threads", "1")
    proc, gate = _paused_client(str(tiny_models("qwen3moe")), worker, tmp_path, then_abort=True)
    worker.kill()
    gate.touch()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGABRT
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: llama.cpp aborted (SIGABRT): lost worker {worker.endpoint}")
    assert not list(Path(child_env()["QWENRUN_HOME"], "run").glob("workers-*"))


def test_a_death_without_workers_keeps_the_usual_line():
    assert crash._death_line(2**22 + 7, signal.SIGABRT) == crash.describe_death(signal.SIGABRT)
