"""The devices llama.cpp can place tensors on, as values, and a placement's names resolved to them.

Contract: `list_devices()` reads every device llama.cpp has at the moment it is called (this
machine's CPU and GPUs, and the devices of every RPC worker registered so far: see
`engine/rpc.py`) into `Device` values, with their free and total memory (`ggml_backend_dev_memory`;
for a worker's device that is a question over the network). `apply(placement, mparams)` fills
`llama_model_params.devices` and `tensor_split` from a `Placement`, after checking that every
device it names exists; an unknown name is a `UsageError` whose hint lists the devices there are.
Nothing here registers workers, plans or prints.

Names: a device is named as llama.cpp names it (`CPU`, `CUDA0`, `RPC2`) or by its buffer type
(`CPU`, `CUDA0`, `RPC0[10.0.0.2:50052]`). A worker's buffer type name says which worker and
which of its devices (the index on the worker), and stays the same from one process to the next;
its device name (`RPCn`) counts every worker's devices in the order they were registered.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any, Literal

from qwenrun import errors
from qwenrun.engine import native
from qwenrun.engine.loadconfig import Placement

Kind = Literal["cpu", "gpu", "remote"]
_RPC_BUFT_RE = re.compile(r"^RPC(\d+)\[(.+)\]$")


@dataclass(frozen=True)
class Device:
    """One device llama.cpp can put tensors on.

    `type` is ggml's ("cpu", "gpu", "igpu", "accel"); a worker's devices all say "gpu"
    whatever they are (ggml-rpc does not ask the worker). `endpoint` is the worker's
    "host:port" for a remote device, None for a local one; `index` is the device's position
    on that worker (`qwenrun worker` serves its GPUs in order, then its CPU last), or among
    this machine's devices. Memory is in bytes, as the device reported it when listed.
    """

    name: str
    description: str
    type: str
    buffer_type: str
    free_bytes: int
    total_bytes: int
    endpoint: str | None = None
    index: int = 0

    @property
    def remote(self) -> bool:
        return self.endpoint is not None

    @property
    def kind(self) -> Kind:
        """A worker's device is "remote", this machine's CPU "cpu", anything else "gpu"."""
        if self.remote:
            return "remote"
        return "cpu" if self.type in ("cpu", "accel") else "gpu"

    def names(self) -> tuple[str, ...]:
        """The names a placement may use for it."""
        return (self.name,) if self.name == self.buffer_type else (self.name, self.buffer_type)


def list_devices() -> tuple[Device, ...]:
    """Every device llama.cpp has now: local ones, then each worker's in registration order."""
    out = []
    local = 0
    for handle in native.device_handles():
        raw = native.describe_device(handle)
        endpoint, index = None, local
        m = _RPC_BUFT_RE.match(raw.buffer_type) if raw.rpc else None
        if m:
            index, endpoint = int(m.group(1)), m.group(2)
        else:
            local += 1
        out.append(
            Device(
                name=raw.name,
                description=raw.description,
                type=raw.type,
                buffer_type=raw.buffer_type,
                free_bytes=raw.free_bytes,
                total_bytes=raw.total_bytes,
                endpoint=endpoint,
                index=index,
            )
        )
    return tuple(out)


def find(name: str, devices: tuple[Device, ...]) -> Device:
    """The device a placement names; a one-line error listing the devices there are."""
    for dev in devices:
        if name in dev.names():
            return dev
    listed = ", ".join(
        dev.name if dev.name == dev.buffer_type else f"{dev.name} ({dev.buffer_type})"
        for dev in devices
    )
    raise errors.UsageError(
        f"no device named {name!r} here",
        hint=f"llama.cpp has: {listed}; a worker's devices appear once it is given with --rpc",
    )


def _handles(names: tuple[str, ...]) -> list[int]:
    """Device handles for `names`, in order (looked up by name, no memory asked)."""
    by_name: dict[str, int] = {}
    for handle in native.device_handles():
        for key in native.device_names(handle):
            by_name.setdefault(key, handle)
    missing = [n for n in names if n not in by_name]
    if missing:
        find(missing[0], list_devices())  # raises, listing the devices there are
    return [by_name[n] for n in names]


def apply(placement: Placement, mparams: Any) -> tuple[Any, ...]:
    """Set `mparams.devices` and `mparams.tensor_split` from `placement` (left as llama.cpp's
    defaults when it names no devices). Returns the arrays, which must outlive the model."""
    placement.validate()
    names = placement.all_devices()
    if not names:
        return ()
    devs = native.device_array(_handles(names))
    mparams.devices = ctypes.cast(devs, ctypes.c_void_p)
    shares = placement.all_shares()
    if not shares:
        return (devs,)
    split = native.split_array(list(shares))
    mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
    return (devs, split)
