"""llama-cpp-python's bindings, loaded once, and the ctypes pieces they lack.

Contract: the only module that imports `llama_cpp`, and only when `bindings()` is first called,
so `qwenrun --help` and the planner never pay for it. On first use it initialises llama.cpp's
backend, routes its log to `llamalog.LOG`, and binds the few ggml functions the Python package
does not (the device registry, buffer types, the RPC backend's entry points and ggml's abort
hook). It builds the NULL-terminated arrays placement needs (tensor buffer-type overrides, the
device list; llama-cpp-python declares both fields as untyped pointers), and says what the build
can do (`supports_gpu_offload`: a local GPU device, `supports_rpc`). It loads no model and keeps
no state besides the bindings.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from qwenrun import errors
from qwenrun.engine.llamalog import LOG

_lc: ModuleType | None = None
_init_lock = threading.Lock()


def bindings() -> ModuleType:
    """Import the bindings once, init the backend, and route llama.cpp's log to us."""
    global _lc
    if _lc is not None:
        return _lc
    with _init_lock:
        if _lc is None:
            import llama_cpp.llama_cpp as lc

            lc.llama_backend_init()
            LOG.install(lc)
            _bind_ggml(lc)
            _lc = lc
    return _lc


def loaded() -> ModuleType | None:
    """The bindings if something already loaded them, else None (never loads them)."""
    return _lc


def supports_gpu_offload() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend (CUDA, Metal, ...).

    Not `llama_supports_gpu_offload()`: that one is also true for any build with the RPC
    backend (src/llama.cpp), even on a machine with no GPU and no worker. This asks for a
    local GPU device instead.
    """
    bindings()
    return any(
        _ggml["ggml_backend_dev_type"](dev) in (_DEV_GPU, _DEV_IGPU) and not _is_rpc_device(dev)
        for dev in device_handles()
    )


def supports_rpc() -> bool:
    """Whether this llama.cpp was built with the RPC backend (`-DGGML_RPC=on`)."""
    return bool(bindings().llama_supports_rpc())


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


# ggml's device registry is exported by the libraries the wheel ships, but not bound by
# llama-cpp-python. `libllama` lists libggml and libggml-base as DT_NEEDED, so dlsym on its
# handle finds these symbols without loading anything else.
_GGML_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ggml_backend_dev_count": ([], ctypes.c_size_t),
    "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_dev_buffer_type": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_buft_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_cpu_buffer_type": ([], ctypes.c_void_p),
    # the device registry, for listing devices and registering RPC workers
    "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
    "ggml_backend_dev_memory": (
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
        None,
    ),
    "ggml_backend_dev_backend_reg": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_reg_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_register": ([ctypes.c_void_p], None),
    "ggml_set_abort_callback": ([ctypes.c_void_p], ctypes.c_void_p),
}
_ggml: dict[str, Any] = {}
# enum ggml_backend_dev_type (ggml-backend.h)
_DEV_CPU, _DEV_GPU, _DEV_IGPU, _DEV_ACCEL, _DEV_META = range(5)
DEVICE_TYPES = {_DEV_CPU: "cpu", _DEV_GPU: "gpu", _DEV_IGPU: "igpu", _DEV_ACCEL: "accel"}
# The RPC backend's two entry points, reached through its registry's proc address (they are
# exported by libggml-rpc, which libllama does not list as needed). ggml-rpc.h:
#   ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
#   void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
#        size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices);
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
)
# void (*ggml_abort_callback_t)(const char * error_message) (ggml.h)
ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _bind_ggml(lc: ModuleType) -> None:
    for name, (argtypes, restype) in _GGML_SIGNATURES.items():
        fn = getattr(lc._lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        _ggml[name] = fn


def buffer_types() -> dict[str, int]:
    """Buffer type name → handle for every device llama.cpp sees ("CPU", "CUDA0", ...)."""
    bindings()
    out: dict[str, int] = {}
    for i in range(_ggml["ggml_backend_dev_count"]()):
        buft = _ggml["ggml_backend_dev_buffer_type"](_ggml["ggml_backend_dev_get"](i))
        if buft:
            out[_ggml["ggml_backend_buft_name"](buft).decode()] = buft
    # The CPU override must be exactly this handle: the loader then picks from the CPU
    # buffer-type list, so repacked CPU layouts still apply to overridden experts.
    out["CPU"] = _ggml["ggml_backend_cpu_buffer_type"]()
    return out


def device_handles() -> list[int]:
    """Every device llama.cpp has now, in its registry's order (RPC workers' included)."""
    bindings()
    return [_ggml["ggml_backend_dev_get"](i) for i in range(_ggml["ggml_backend_dev_count"]())]


@dataclass(frozen=True)
class RawDevice:
    """One device as ggml describes it (`engine/devices.py` makes the planner's value)."""

    handle: int
    name: str
    description: str
    type: str  # "cpu", "gpu", "igpu", "accel"
    buffer_type: str
    free_bytes: int
    total_bytes: int
    rpc: bool  # a device of an RPC worker


def describe_device(handle: int) -> RawDevice:
    """A device's names, type and memory. For a worker's device, the memory is asked of
    the worker over the network (and llama.cpp aborts if it has gone: see engine/rpc.py)."""
    bindings()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _ggml["ggml_backend_dev_memory"](handle, ctypes.byref(free), ctypes.byref(total))
    buft = _ggml["ggml_backend_dev_buffer_type"](handle)
    return RawDevice(
        handle=handle,
        name=_ggml["ggml_backend_dev_name"](handle).decode(),
        description=(_ggml["ggml_backend_dev_description"](handle) or b"").decode(),
        type=DEVICE_TYPES.get(_ggml["ggml_backend_dev_type"](handle), "other"),
        buffer_type=_ggml["ggml_backend_buft_name"](buft).decode() if buft else "",
        free_bytes=int(free.value),
        total_bytes=int(total.value),
        rpc=_is_rpc_device(handle),
    )


def device_names(handle: int) -> tuple[str, str]:
    """A device's name and its buffer type's name (`RPC2`, `RPC0[10.0.0.2:50052]`)."""
    bindings()
    buft = _ggml["ggml_backend_dev_buffer_type"](handle)
    name = _ggml["ggml_backend_dev_name"](handle).decode()
    return name, _ggml["ggml_backend_buft_name"](buft).decode() if buft else name


def _is_rpc_device(handle: int) -> bool:
    reg = _ggml["ggml_backend_dev_backend_reg"](handle)
    return bool(reg) and _ggml["ggml_backend_reg_name"](reg).decode().startswith("RPC")


def _rpc_proc(name: str) -> int:
    reg = _ggml["ggml_backend_reg_by_name"](b"RPC")
    proc = _ggml["ggml_backend_reg_get_proc_address"](reg, name.encode()) if reg else None
    if not proc:
        raise errors.WorkerError("this llama.cpp build has no RPC backend")
    return int(proc)


def rpc_add_server(endpoint: str) -> list[int]:
    """Register a worker's devices with llama.cpp; their handles, in the worker's order.

    llama.cpp connects to the worker here, and aborts the process when it cannot (ggml-rpc.cpp:
    `rpc_dispatcher::start`): check the endpoint first (engine/rpc.py does). Registering the
    same endpoint twice would list its devices twice: call this once per endpoint.
    """
    bindings()
    reg = _ADD_SERVER(_rpc_proc("ggml_backend_rpc_add_server"))(endpoint.encode())
    if not reg:
        return []  # the worker serves no device
    _ggml["ggml_backend_register"](reg)
    count = _ggml["ggml_backend_reg_dev_count"](reg)
    return [_ggml["ggml_backend_reg_dev_get"](reg, i) for i in range(count)]


def rpc_start_server(endpoint: str, cache_dir: str | None, n_threads: int, devs: list[int]) -> None:
    """Serve `devs` to RPC clients on `endpoint`. Blocks for as long as it serves (run it in a
    thread: ctypes lets go of the GIL); returns only when it could not start (a busy port)."""
    bindings()
    arr = (ctypes.c_void_p * len(devs))(*devs)
    start = _START_SERVER(_rpc_proc("ggml_backend_rpc_start_server"))
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(devs), arr)


def set_abort_callback(callback: Any) -> None:
    """ggml's abort hook: an `ABORT_CALLBACK` (kept alive by the caller), or None for ggml's
    own (the message and a backtrace on stderr). ggml calls abort() after it either way."""
    bindings()
    _ggml["ggml_set_abort_callback"](ctypes.cast(callback, ctypes.c_void_p) if callback else None)


def device_array(handles: list[int]) -> Any:
    """A NULL-terminated `ggml_backend_dev_t` array (for `llama_model_params.devices`)."""
    return (ctypes.c_void_p * (len(handles) + 1))(*handles, None)


def split_array(proportions: list[float]) -> Any:
    """`llama_model_params.tensor_split`: llama.cpp reads `llama_max_devices()` floats."""
    n = max(int(bindings().llama_max_devices()), len(proportions))
    return (ctypes.c_float * n)(*proportions)


class _OverrideStruct(ctypes.Structure):
    # struct llama_model_tensor_buft_override {
    #     const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def override_array(patterns: list[tuple[str, str]]) -> tuple[Any, list[bytes]]:
    """A NULL-terminated override array, plus the pattern bytes it points into."""
    bufts = buffer_types()
    # A device's own name names its buffer type too ("RPC2" for "RPC0[10.0.0.2:50052]").
    for handle in device_handles():
        name, buft_name = device_names(handle)
        if buft_name in bufts:
            bufts.setdefault(name, bufts[buft_name])
    encoded = []
    arr = (_OverrideStruct * (len(patterns) + 1))()  # zeroed last entry terminates
    for i, (pattern, buft_name) in enumerate(patterns):
        buft = bufts.get(buft_name) or bufts.get(buft_name.upper())
        if buft is None:
            raise errors.UsageError(
                f"unknown buffer type {buft_name!r} in override {pattern!r}",
                hint=f"this llama.cpp build has: {', '.join(sorted(bufts))}",
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise errors.UsageError(f"bad override pattern {pattern!r}: {exc}") from None
        b = pattern.encode()
        encoded.append(b)
        arr[i].pattern = b
        arr[i].buft = buft
    return arr, encoded
