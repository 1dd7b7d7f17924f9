"""A plan as the rest of qwenrun reads it: `Plan`, with a `DevicePlan` per device.

Contract: plain frozen values. A `Plan` carries the chosen quant and files, the `LoadConfig`
the engine takes, the bytes per device, the predicted speeds, where an n-gram table lives
(`TablePlan`), the reasons in words and the warnings; `to_dict()` is `qwenrun plan --json`'s
shape and `predicted_buffers()` lines the bytes up with what llama.cpp's load log reports.
Made by `planner/decide.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.planner.costs import DeviceBytes, Layout, NgramPlace


@dataclass(frozen=True)
class TablePlan:
    """Where Qwen3.8-Flash-Next's n-gram table lives: read whole into this machine's RAM
    ("ram"), or left in the file and read a few rows per token ("disk", which wants the file
    on a fast local disk), and why."""

    place: NgramPlace
    n_bytes: int
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "place": self.place,
            "bytes": self.n_bytes,
            "in_ram": self.place == "ram",
            "lazy_read": self.place == "disk",
            "needs_fast_disk": self.place == "disk",
            "reason": self.why,
        }


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # "gpu" (this machine's), "cpu" (this machine's RAM), "remote" (a worker's)
    name: str
    bytes: DeviceBytes
    capacity: int  # free VRAM / available RAM
    reserved: int  # CUDA context + margin / the OS's share
    endpoint: str | None = None  # a worker's "host:port"
    buffer: str = ""  # llama.cpp's name for it: CUDA0, CPU, RPC1[host:port]

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserved)

    def to_dict(self) -> dict[str, Any]:
        b = self.bytes
        return {
            "name": self.name,
            "kind": self.kind,
            "endpoint": self.endpoint,
            "buffer": self.buffer,
            "capacity_bytes": self.capacity,
            "planned_bytes": b.used,
            "device": self.kind,
            "weights_dense": b.weights_dense,
            "weights_experts": b.weights_experts,
            "kv": b.kv,
            "recurrent_state": b.rs,
            "compute": b.compute,
            "output": b.output,
            "ngram_table": b.ngram_table,
            "used": b.used,
            "reserved": self.reserved,
            "capacity": self.capacity,
            "budget": self.budget,
        }


@dataclass(frozen=True)
class Plan:
    model: str
    quant: str
    files: tuple[str, ...]
    size_bytes: int
    load: LoadConfig
    # Every device that holds something, this machine's GPUs first, its RAM, then workers'.
    devices: tuple[DevicePlan, ...]
    n_layer: int
    gpu_expert_layers: int  # trunk layers whose routed experts all sit on the GPU
    native_ctx: int
    decode_tok_s: float
    prefill_tok_s: float
    estimated: bool
    reasons: tuple[str, ...]
    prefill_rough: bool = True
    arch: str = ""
    repack_bytes: int = 0  # reported by llama.cpp as CPU_REPACK on top of CPU_Mapped
    # What the user asked for that was clamped or is risky: shown even without --verbose.
    warnings: tuple[str, ...] = ()
    # The search's own terms for the placement (which run of layers, the boundary tensors),
    # for `qwenrun bench` to try its neighbours.
    layout: Layout | None = None
    ngram_table: TablePlan | None = None  # a model with an n-gram table: where it lives
    # the weights by what they do (`facts.WEIGHT_CLASSES`), bytes; the n-gram table included
    weight_classes: tuple[tuple[str, int], ...] = ()

    @property
    def n_ctx(self) -> int:
        return self.load.n_ctx

    @property
    def cpu(self) -> DevicePlan:
        """This machine's RAM."""
        return next(d for d in self.devices if d.kind == "cpu")

    @property
    def gpu(self) -> DevicePlan | None:
        """This machine's GPUs together (one card: that card), or None without one."""
        gpus = [d for d in self.devices if d.kind == "gpu"]
        if len(gpus) <= 1:
            return gpus[0] if gpus else None
        total = DeviceBytes.total(g.bytes for g in gpus)
        names = " + ".join(g.name for g in gpus)
        capacity = sum(g.capacity for g in gpus)
        return DevicePlan("gpu", names, total, capacity, sum(g.reserved for g in gpus))

    @property
    def spread(self) -> bool:
        """Several devices take layers."""
        return self.layout is not None and self.layout.spread is not None

    @property
    def cpu_expert_layers(self) -> int:
        return self.n_layer - self.gpu_expert_layers

    def predicted_buffers(self) -> dict[tuple[str, str], int]:
        """Bytes per (kind, device) as llama.cpp's load log reports them: ("model", "CPU"),
        ("kv", "GPU") for this machine's GPUs together, ("compute", "127.0.0.1:50052") for a
        worker's devices together; ("lazy", "CPU") for an n-gram table left in the file
        (`llamalog` reads its own mapped buffer under that kind)."""
        out: dict[tuple[str, str], int] = {}
        groups: dict[str, list[DevicePlan]] = {}
        for d in self.devices:
            key = "CPU" if d.kind == "cpu" else "GPU" if d.kind == "gpu" else str(d.endpoint)
            groups.setdefault(key, []).append(d)
        for name, devs in groups.items():
            b = DeviceBytes.total(d.bytes for d in devs)
            model = b.weights + b.ngram_table + (self.repack_bytes if name == "CPU" else 0)
            for kind, n in (
                ("model", model),
                ("kv", b.kv),
                ("rs", b.rs),
                ("compute", b.compute),
                ("output", b.output),
            ):
                if n:
                    out[(kind, name)] = n
        table = self.ngram_table
        if table is not None and table.place == "disk":
            out[("lazy", "CPU")] = table.n_bytes  # its own mapping of the file, not memory
        return out

    def to_dict(self) -> dict[str, Any]:
        p = self.load.placement
        return {
            "model": self.model,
            "arch": self.arch,
            "quant": self.quant,
            "files": list(self.files),
            "size_bytes": self.size_bytes,
            "estimated": self.estimated,
            "n_ctx": self.load.n_ctx,
            "native_ctx": self.native_ctx,
            "kv_type": self.load.kv_type,
            "n_batch": self.load.n_batch,
            "n_ubatch": self.load.n_ubatch,
            "n_threads": self.load.n_threads,
            "n_gpu_layers": p.n_gpu_layers,
            "n_layer": self.n_layer,
            "cpu_moe_all": p.cpu_moe_all,
            "expert_cpu_layers": list(p.expert_cpu_layers),
            "expert_cpu_tensors": list(p.expert_cpu_tensors),
            "gpu_expert_layers": self.gpu_expert_layers,
            "cpu_expert_layers": self.cpu_expert_layers,
            "override_patterns": [{"pattern": a, "buffer": b} for a, b in p.override_patterns()],
            "use_mmap": self.load.mmap_enabled(),
            "devices": [d.to_dict() for d in self.devices],
            "predicted": {
                "decode_tok_s": round(self.decode_tok_s, 2),
                "prefill_tok_s": round(self.prefill_tok_s, 1),
                "prefill_rough": self.prefill_rough,
            },
            "ngram_table": self.ngram_table.to_dict() if self.ngram_table else None,
            "weights_by_class": dict(self.weight_classes),
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
        }
