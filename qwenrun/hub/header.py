"""What a GGUF holds: metadata and per-tensor infos (name, ggml type, shape, bytes).

Contract: two ways to read a `GGUFInfo` without loading any weights:
- `read_local(path)`: the header of a local file, and of every shard of a split model;
- `read_remote(urls)`: the same through HTTP range requests that fetch only the header bytes
  (1 MiB first, doubling until the tensor-info table parses); `read_hub(repo, revision,
  paths)` is that for one quant's files in a hub repo (what `plan` and the quant chooser read).
(The planner's `recipes.estimate` builds the same value from a catalog model's shapes.)
Type names, block sizes and value types come from the `gguf` package's tables
(`GGMLQuantizationType`, `GGML_QUANT_SIZES`, `GGUFValueType`): bytes of a tensor are
n_elements / block_size × type_size, exactly as ggml computes them. The big tokenizer arrays
are dropped from `metadata`; their lengths stay in `array_lengths`.
This module plans nothing, downloads no tensor data and never imports llama_cpp; a missing
file is a `ModelNotFoundError`, a file that is not a (complete) GGUF an `InvalidModelError`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import gguf
import numpy as np

from qwenrun import errors
from qwenrun.engine.loadconfig import is_routed_expert, layer_of
from qwenrun.hub import names

if TYPE_CHECKING:
    import httpx2

INITIAL_FETCH = 1 << 20  # Qwen GGUF headers are 5-10 MB (the vocab): 1 MiB, then doubling
LOCAL_FIRST_READ = 16 << 20  # a local read is cheap; one big read saves re-parsing the vocab
MAX_HEADER = 256 << 20  # no real header comes near this; beyond it the file is corrupt
LONG_ARRAY = 1024  # arrays longer than this are dropped from metadata (lengths kept)
# The vocabulary arrays are dropped whatever their length, so metadata looks the same for a
# tiny test model and a 151,936-token Qwen; `array_lengths` keeps their lengths.
_TOKENIZER_ARRAYS = frozenset(
    {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
     "tokenizer.ggml.merges"}
)  # fmt: skip
HTTP_TIMEOUT_S = 30.0
_MAX_DIMS = 4  # GGML_MAX_DIMS


# ------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: llama.cpp's name, ggml type name, ggml shape (ne0 first) and its bytes."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    n_bytes: int

    # Cached: the planner asks these of every tensor of every quant it tries.
    @functools.cached_property
    def layer(self) -> int | None:
        """N of `blk.N.…`; None for tensors outside the blocks (embeddings, output)."""
        return layer_of(self.name)

    @functools.cached_property
    def is_routed_expert(self) -> bool:
        """Matches llama.cpp's `--cpu-moe` pattern (never a shared expert)."""
        return is_routed_expert(self.name)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFInfo:
    """A model's GGUF header, merged over its shards (or estimated from the catalog)."""

    arch: str
    metadata: Mapping[str, object]
    tensors: tuple[TensorInfo, ...]
    files: tuple[str, ...]
    estimated: bool = False
    array_lengths: Mapping[str, int] = field(default_factory=dict)

    def get(self, key: str, default: object = None) -> object:
        """A metadata value; `block_count` also finds `{arch}.block_count`."""
        if key in self.metadata:
            return self.metadata[key]
        return self.metadata.get(f"{self.arch}.{key}", default)

    def _int(self, key: str) -> int | None:
        value = self.get(key)
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def n_layer(self) -> int:
        """`block_count` (which counts an MTP block when the file has one)."""
        n = self._int("block_count")
        if n is not None:
            return n
        layers = [t.layer for t in self.tensors if t.layer is not None]
        return max(layers) + 1 if layers else 0

    @property
    def vocab_size(self) -> int | None:
        return self._int("vocab_size") or self.array_lengths.get("tokenizer.ggml.tokens")

    @property
    def n_ctx_train(self) -> int | None:
        return self._int("context_length")

    @property
    def file_type(self) -> str | None:
        """`general.file_type` as llama.cpp's ftype name without `MOSTLY_`, e.g. `Q4_K_M`."""
        value = self._int("general.file_type")
        if value is None:
            return None
        try:
            return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
        except ValueError:
            return None

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def routed_expert_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors if t.is_routed_expert)

    def tensor_bytes_by_layer(self) -> dict[int | None, int]:
        """Bytes of all tensors per block; key None holds the rest (embeddings, output)."""
        out: dict[int | None, int] = {}
        for t in self.tensors:
            out[t.layer] = out.get(t.layer, 0) + t.n_bytes
        return out

    def expert_bytes_by_layer(self) -> dict[int, int]:
        """Bytes of the routed-expert tensors per block (what `--n-cpu-moe` moves)."""
        out: dict[int, int] = {}
        for t in self.tensors:
            if t.is_routed_expert and t.layer is not None:
                out[t.layer] = out.get(t.layer, 0) + t.n_bytes
        return out


# ------------------------------------------------------------------------------ parsing


class _NeedMore(Exception):
    """The buffer ends before the header does; `needed` is a lower bound on its size."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


_NP_TYPES: Mapping[gguf.GGUFValueType, Any] = gguf.GGUFReader.gguf_scalar_to_np


@dataclass
class _Header:
    metadata: dict[str, object]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo]
    offsets: list[int]  # relative to data_offset
    data_offset: int

    @property
    def data_end(self) -> int:
        """The least file size that holds every tensor's bytes."""
        ends = [o + t.n_bytes for o, t in zip(self.offsets, self.tensors, strict=True)]
        return self.data_offset + max(ends, default=0)


class _Cursor:
    """Reads GGUF's little- (or big-) endian fields from a buffer that may be cut short."""

    def __init__(self, buf: bytes | bytearray, name: str) -> None:
        self.buf = memoryview(buf)
        self.name = name
        self.pos = 0
        self.endian = "<"

    def need(self, n: int) -> int:
        """Claim n bytes; return where they start."""
        if n > MAX_HEADER:
            raise errors.InvalidModelError(
                f"{self.name} is corrupt: its header claims a field of {n:,} bytes",
                hint="download the file again",
            )
        start = self.pos
        if start + n > len(self.buf):
            raise _NeedMore(start + n)
        self.pos = start + n
        return start

    def u32(self) -> int:
        value: int = struct.unpack_from(self.endian + "I", self.buf, self.need(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack_from(self.endian + "Q", self.buf, self.need(8))[0]
        return value

    def string(self) -> str:
        n = self.u64()
        start = self.need(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.need(self.u64())

    def value_type(self) -> gguf.GGUFValueType:
        raw = self.u32()
        try:
            return gguf.GGUFValueType(raw)
        except ValueError:
            raise errors.InvalidModelError(
                f"{self.name} is corrupt: unknown metadata value type {raw}",
                hint="download the file again",
            ) from None

    def scalars(self, vtype: gguf.GGUFValueType, count: int) -> np.ndarray:
        dtype = np.dtype(_NP_TYPES[vtype]).newbyteorder(self.endian)
        start = self.need(dtype.itemsize * count)
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start)


def _value(cur: _Cursor, vtype: gguf.GGUFValueType) -> object:
    if vtype == gguf.GGUFValueType.STRING:
        return cur.string()
    if vtype == gguf.GGUFValueType.ARRAY:
        raise errors.InvalidModelError(
            f"{cur.name} is corrupt: nested metadata arrays", hint="download the file again"
        )
    return cur.scalars(vtype, 1)[0].item()


def _array(cur: _Cursor, keep_short: bool) -> tuple[tuple[object, ...] | None, int]:
    """An array value: (items, length); items None when it is not kept (long, or not wanted)."""
    vtype = cur.value_type()
    count = cur.u64()
    keep = keep_short and count <= LONG_ARRAY
    if vtype == gguf.GGUFValueType.STRING:
        if keep:
            return tuple(cur.string() for _ in range(count)), count
        for _ in range(count):
            cur.skip_string()
        return None, count
    if vtype == gguf.GGUFValueType.ARRAY:
        raise errors.InvalidModelError(
            f"{cur.name} is corrupt: nested metadata arrays", hint="download the file again"
        )
    items = cur.scalars(vtype, count)
    return (tuple(items.tolist()) if keep else None), count


def _open(cur: _Cursor) -> int:
    """Magic and version; sets the byte order. Returns the version."""
    if len(cur.buf) >= 4 and bytes(cur.buf[:4]) != b"GGUF":
        raise errors.InvalidModelError(
            f"{cur.name} is not a GGUF file (it does not start with 'GGUF')",
            hint="qwenrun runs llama.cpp GGUF models; convert or download a .gguf",
        )
    cur.need(4)
    version = cur.u32()
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped not in (2, 3):
            raise errors.InvalidModelError(
                f"{cur.name} has GGUF version {version}; only versions 2 and 3 are readable",
                hint="re-download or re-convert the model with a current llama.cpp",
            )
        cur.endian, version = ">", swapped
    return int(version)


def _tensor(cur: _Cursor) -> tuple[TensorInfo, int]:
    name = cur.string()
    n_dims = cur.u32()
    if not 1 <= n_dims <= _MAX_DIMS:
        raise errors.InvalidModelError(
            f"{cur.name} is corrupt: tensor {name} has {n_dims} dimensions",
            hint="download the file again",
        )
    shape = tuple(cur.u64() for _ in range(n_dims))
    raw_type = cur.u32()
    offset = cur.u64()
    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
        raise errors.UnsupportedModelError(
            f"{cur.name}: tensor {name} has ggml type {raw_type}, unknown to the gguf package",
            hint="upgrade the gguf package (pip install -U gguf), or use another quant",
        ) from None
    return TensorInfo(name, qtype.name, shape, tensor_bytes(qtype, shape, name)), offset


def tensor_bytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...], name: str) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    if shape[0] % block:
        raise errors.InvalidModelError(
            f"tensor {name}: rows of {shape[0]} are not whole {qtype.name} blocks of {block}",
            hint="the file is corrupt; download it again",
        )
    return n // block * type_size


def _parse_header(buf: bytes | bytearray, name: str) -> _Header:
    """Parse a GGUF header from the first bytes of a file; `_NeedMore` when they are too few."""
    cur = _Cursor(buf, name)
    _open(cur)
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise errors.InvalidModelError(
            f"{name} is corrupt: it claims {n_tensors:,} tensors and {n_kv:,} metadata keys",
            hint="download the file again",
        )
    metadata: dict[str, object] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.value_type()
        if vtype == gguf.GGUFValueType.ARRAY:
            items, lengths[key] = _array(cur, keep_short=key not in _TOKENIZER_ARRAYS)
            if items is not None:
                metadata[key] = items
        else:
            metadata[key] = _value(cur, vtype)
    tensors, offsets = [], []
    for _ in range(n_tensors):
        info, offset = _tensor(cur)
        tensors.append(info)
        offsets.append(offset)
    align = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0:
        raise errors.InvalidModelError(f"{name} has a bad general.alignment: {align!r}")
    data_offset = -(-cur.pos // align) * align
    return _Header(metadata, lengths, tensors, offsets, data_offset)


# ------------------------------------------------------------------------------ sources


class _FileSource:
    """The first bytes of a local file."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.path = path
        self.size = path.stat().st_size
        self.buf = b""

    def read_to(self, n: int) -> bytes:
        with self.path.open("rb") as f:
            self.buf = f.read(min(n, self.size))
        return self.buf

    @property
    def exhausted(self) -> bool:
        return len(self.buf) >= self.size


def _read_header(source: _FileSource | _HttpSource, first: int = INITIAL_FETCH) -> _Header:
    """Grow the prefix read from `source` until its header parses."""
    n = first
    while True:
        buf = source.read_to(n)
        try:
            return _parse_header(buf, source.name)
        except _NeedMore as more:
            if source.exhausted:
                if len(buf) < 4:
                    raise errors.InvalidModelError(
                        f"{source.name} is not a GGUF file ({len(buf)} bytes)",
                        hint="qwenrun runs llama.cpp GGUF models; download a .gguf",
                    ) from None
                raise _truncated(source.name, len(buf), more.needed) from None
            if more.needed > MAX_HEADER:
                raise errors.InvalidModelError(
                    f"{source.name} is corrupt: its header would be over {MAX_HEADER >> 20} MiB",
                    hint="download the file again",
                ) from None
            n = min(max(2 * n, more.needed), MAX_HEADER)


def _truncated(name: str, have: int, need: int) -> errors.InvalidModelError:
    return errors.InvalidModelError(
        f"{name} is truncated: it has {have:,} bytes, its header needs at least {need:,}",
        hint="the download did not finish: download the file again",
    )


def _check_complete(name: str, size: int | None, header: _Header) -> None:
    if size is not None and size < header.data_end:
        raise errors.InvalidModelError(
            f"{name} is truncated: it has {size:,} bytes, its tensors need {header.data_end:,}",
            hint="the download did not finish: download the file again",
        )


def _merge(headers: Sequence[_Header], files: Sequence[str], estimated: bool = False) -> GGUFInfo:
    first = headers[0].metadata
    arch = first.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise errors.InvalidModelError(
            f"{files[0]} has no general.architecture", hint="the file is not a llama.cpp model"
        )
    _check_split(headers, files)
    tensors = tuple(t for h in headers for t in h.tensors)
    return GGUFInfo(
        arch=arch,
        metadata=MappingProxyType(dict(first)),
        tensors=tensors,
        files=tuple(files),
        estimated=estimated,
        array_lengths=MappingProxyType(dict(headers[0].array_lengths)),
    )


def _check_split(headers: Sequence[_Header], files: Sequence[str]) -> None:
    """Each shard says which one it is (`split.no`, 0-based) and how many there are."""
    count = headers[0].metadata.get("split.count")
    if count is None:
        return
    if int(str(count)) != len(headers):
        raise errors.InvalidModelError(
            f"{files[0]} is part of a model split into {count} files, but {len(headers)} given",
            hint="keep llama.cpp's shard names (…-00001-of-0000N.gguf) and all shards together",
        )
    for i, (h, f) in enumerate(zip(headers, files, strict=True)):
        no = h.metadata.get("split.no")
        if no is not None and int(str(no)) != i:
            raise errors.InvalidModelError(
                f"{f} says it is shard {int(str(no)) + 1}, expected shard {i + 1}",
                hint="the shards come from different models or were renamed; download again",
            )
    expected = headers[0].metadata.get("split.tensors.count")
    have = sum(len(h.tensors) for h in headers)
    if expected is not None and int(str(expected)) != have:
        raise errors.InvalidModelError(
            f"{files[0]}: the shards hold {have} tensors, the split metadata says {expected}",
            hint="the shards come from different models or versions; download them again",
        )


# ------------------------------------------------------------------------------ local


def read_local(path: str | os.PathLike[str]) -> GGUFInfo:
    """The header of a local GGUF; for a split model (any shard given), of all its shards."""
    p = Path(path).expanduser()
    if not p.exists():
        raise errors.ModelNotFoundError(
            f"no such file: {p}", hint="check the path, or name a catalog model instead"
        )
    if p.is_dir():
        raise errors.ModelNotFoundError(
            f"{p} is a folder, not a GGUF file",
            hint="pass the .gguf file itself (for a split model, its -00001-of-N file)",
        )
    # Siblings sit next to the given path (HF cache snapshots hold symlinks: don't resolve).
    shard_names = names.shard_names(p.name) or [p.name]
    paths = [p.with_name(n) for n in shard_names]
    for i, shard in enumerate(paths):
        if not shard.is_file():
            raise errors.ModelNotFoundError(
                f"missing shard {shard.name} ({i + 1} of {len(paths)}) of the split model {p.name}",
                hint=f"a split model needs all {len(paths)} files in one folder; download it again",
            )
    headers = []
    for shard in paths:
        source = _FileSource(shard)
        header = _read_header(source, LOCAL_FIRST_READ)
        _check_complete(shard.name, source.size, header)
        headers.append(header)
    return _merge(headers, [str(s) for s in paths])


# ------------------------------------------------------------------------------ remote


class _HttpSource:
    """The first bytes of a remote file, fetched with growing Range requests.

    A server that ignores Range answers 200 with the whole file: then the body is read only
    as far as needed and the connection closed, so no more than the header comes down.
    """

    def __init__(self, client: httpx2.Client, url: str, headers: Mapping[str, str]) -> None:
        self.client = client
        self.url = url
        self.name = _url_name(url)
        self.headers = dict(headers)
        self.buf = bytearray()
        self.size: int | None = None
        self.exhausted = False
        self.fetched = 0  # bytes received, for tests and --debug

    def read_to(self, n: int) -> bytes:
        if len(self.buf) < n and not self.exhausted:
            self._fetch(len(self.buf), n)
        return bytes(self.buf)

    def _fetch(self, start: int, end: int) -> None:
        import httpx2

        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}"}
        request = self.client.build_request(
            "GET", self.url, headers=headers, timeout=HTTP_TIMEOUT_S
        )
        try:
            response = self.client.send(request, stream=True)
            try:
                self._take(response, start, end)
            finally:
                response.close()
        except httpx2.TransportError as err:
            raise errors.DownloadError(
                f"could not read the header of {self.name} ({type(err).__name__})",
                hint="check the network connection and try again",
            ) from err

    def _take(self, response: httpx2.Response, start: int, end: int) -> None:
        status = response.status_code
        if status == 416:  # the range starts at or after the end of the file
            self.exhausted = True
            return
        _raise_for_status(status, self.name)
        skip = 0
        if status == 206:
            self.size = _content_range_total(response.headers.get("content-range"))
        else:  # 200: the server sends the whole file from byte 0
            length = response.headers.get("content-length")
            self.size = int(length) if length and length.isdigit() else None
            skip = start
        for chunk in _limited(response.iter_bytes(), skip + end - start):
            self.fetched += len(chunk)
            self.buf += chunk[skip:] if skip else chunk
            skip = max(0, skip - len(chunk))
        # Fewer bytes than asked for: the file ends there.
        self.exhausted = len(self.buf) < end or (
            self.size is not None and len(self.buf) >= self.size
        )


def _limited(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """The chunks of a body up to `limit` bytes, the last one cut; stops reading there."""
    got = 0
    for chunk in chunks:
        if got + len(chunk) >= limit:
            yield chunk[: limit - got]
            return
        got += len(chunk)
        yield chunk


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes \d+-\d+/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _raise_for_status(status: int, name: str) -> None:
    if status < 400:
        return
    if status in (401, 403):
        raise errors.AuthError(
            f"the server refused access to {name} (HTTP {status})",
            hint="for a gated or private repo, accept its terms on the hub and set HF_TOKEN "
            "to an access token with read permission",
        )
    if status == 404:
        raise errors.ModelNotFoundError(
            f"{name} is not there (HTTP 404)", hint="check the repo and the file name"
        )
    raise errors.DownloadError(
        f"reading the header of {name} failed: HTTP {status}", hint="try again later"
    )


def _url_name(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1] or url


def _expand_urls(urls: Sequence[str]) -> list[str]:
    """Shard URLs in shard order; one URL of a split model stands for all its shards."""
    if len(urls) != 1:
        shards = [names.split_name(_url_name(u)) for u in urls]
        if None in shards:
            return list(urls)
        numbered = zip([s.number if s else 0 for s in shards], urls, strict=True)
        return [u for _, u in sorted(numbered, key=lambda p: p[0])]
    base, _, name = urls[0].rpartition("/")
    all_names = names.shard_names(_url_name(urls[0]))
    if all_names is None or "?" in name:
        return list(urls)
    return [f"{base}/{n}" for n in all_names]


def read_remote(urls: Sequence[str], headers: Mapping[str, str] | None = None) -> GGUFInfo:
    """The header of a remote GGUF (all shards, in order) through HTTP range requests.

    `headers` go with every request (pass auth headers here); without them, requests to the
    hub's own origin (`HF_ENDPOINT`) carry huggingface_hub's headers, including the token,
    and other hosts get none. The requests go through huggingface_hub's shared HTTP session,
    so proxies and certificates behave as for every other hub call. Only header bytes are
    fetched: a prefix of each shard, doubled from 1 MiB until its tensor table parses.
    """
    if not urls:
        raise errors.UsageError("no URL to read a GGUF header from")
    # The hub's session and headers only when a header is read over HTTP: the planner, which
    # reads local headers, must not pay for importing huggingface_hub.
    from qwenrun.hub.session import headers_for, offline

    if offline():
        raise errors.OfflineError(
            "offline mode is on (HF_HUB_OFFLINE): cannot read a remote GGUF header",
            hint="unset HF_HUB_OFFLINE, or plan from the catalog's estimate instead",
        )
    from huggingface_hub.utils import get_session

    client = get_session()
    all_urls = _expand_urls(urls)
    parsed = []
    for url in all_urls:
        h = dict(headers_for(url) if headers is None else headers)
        h.setdefault("Accept-Encoding", "identity")  # offsets are of the raw bytes
        source = _HttpSource(client, url, h)
        header = _read_header(source)
        _check_complete(source.name, source.size, header)
        parsed.append(header)
    return _merge(parsed, all_urls)


def read_hub(repo: str, revision: str, paths: Sequence[str]) -> GGUFInfo:
    """The header of one quant of a hub repo (its files, in shard order, at one commit),
    read with range requests through `resolve` URLs, as a download would fetch them."""
    from huggingface_hub import hf_hub_url

    from qwenrun.hub.session import hub_endpoint

    endpoint = hub_endpoint()
    return read_remote([hf_hub_url(repo, p, revision=revision, endpoint=endpoint) for p in paths])
