"""A plan as the rest of qwenrun reads it: `Plan`, with a `DevicePlan` per device.

Contract: plain frozen values. A `Plan` carries the chosen quant and files, the `LoadConfig`
the engine takes, the bytes per device, the predicted speeds, the reasons in words and the
warnings; `to_dict()` is `qwenrun plan --json`'s shape and `predicted_buffers()` lines the
bytes up with what llama.cpp's load log reports. Made by `planner/decide.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.planner.costs import DeviceBytes, Layout


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # "gpu" | "cpu"
    name: str
    bytes: DeviceBytes
    capacity: int  # free VRAM / available RAM
    reserved: int  # CUDA context + margin / the OS's share

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserved)

    def to_dict(self) -> dict[str, Any]:
        b = self.bytes
        return {
            "device": self.kind,
            "name": self.name,
            "weights_dense": b.weights_dense,
            "weights_experts": b.weights_experts,
            "kv": b.kv,
            "recurrent_state": b.rs,
            "compute": b.compute,
            "output": b.output,
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
    cpu: DevicePlan
    gpu: DevicePlan | None
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

    @property
    def n_ctx(self) -> int:
        return self.load.n_ctx

    @property
    def cpu_expert_layers(self) -> int:
        return self.n_layer - self.gpu_expert_layers

    def predicted_buffers(self) -> dict[tuple[str, str], int]:
        """Bytes per (kind, device) as llama.cpp's load log reports them ("model", "CPU")."""
        out: dict[tuple[str, str], int] = {}
        for dev, name in ((self.cpu, "CPU"), (self.gpu, "GPU")):
            if dev is None:
                continue
            b = dev.bytes
            model = b.weights + (self.repack_bytes if name == "CPU" else 0)
            for kind, n in (
                ("model", model),
                ("kv", b.kv),
                ("rs", b.rs),
                ("compute", b.compute),
                ("output", b.output),
            ):
                if n:
                    out[(kind, name)] = n
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
            "devices": [d.to_dict() for d in (self.gpu, self.cpu) if d is not None],
            "predicted": {
                "decode_tok_s": round(self.decode_tok_s, 2),
                "prefill_tok_s": round(self.prefill_tok_s, 1),
                "prefill_rough": self.prefill_rough,
            },
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
        }
