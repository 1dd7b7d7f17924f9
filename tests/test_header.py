"""GGUF headers: local files, split models, broken files, remote range reads, estimates."""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenrun import catalog, errors
from qwenrun.catalog import ModelShape, ModelSpec, lookup
from qwenrun.hub import header
from qwenrun.hub.header import read_local, read_remote
from qwenrun.planner.recipes import estimate
from qwenrun.synthetic.tiny_gguf import Dims

Q = gguf.GGMLQuantizationType
GiB = 1 << 30
GB = 10**9


# ------------------------------------------------------------------------------ helpers


def _quant_bytes(qtype: gguf.GGMLQuantizationType, rows: int, *lead: int) -> np.ndarray:
    """Random raw bytes for a quantized tensor of `rows` elements per row (numpy order)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.random.default_rng(0).integers(0, 255, (*lead, rows // block * size), np.uint8)


def write_gguf(
    path: Path, *, n_tokens: int = 16, data_mib: float = 0, arch: str = "qwen3moe"
) -> Path:
    """A small GGUF with quantized tensors; `n_tokens` sizes the header, `data_mib` the data."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_uint32(f"{arch}.expert_count", 8)
    w.add_array(f"{arch}.rope.dimension_sections", [11, 11, 10, 0])
    w.add_token_list([f"token-{i:06d}" for i in range(n_tokens)])
    w.add_token_types([1] * n_tokens)
    w.add_chat_template("{{ messages }}")
    # ggml shape (ne0 first) is the reverse of numpy's; raw quant bytes carry the row in bytes.
    w.add_tensor("token_embd.weight", np.zeros((n_tokens, 64), np.float16))
    w.add_tensor("blk.0.attn_q.weight", _quant_bytes(Q.Q8_0, 64, 8), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 256), np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight", _quant_bytes(Q.Q4_K, 256, 8, 4), raw_dtype=Q.Q4_K)
    w.add_tensor("blk.0.ffn_down_shexp.weight", _quant_bytes(Q.Q6_K, 256, 4), raw_dtype=Q.Q6_K)
    if data_mib:
        rows = int(data_mib * (1 << 20)) // 34 // 8
        w.add_tensor("output.weight", _quant_bytes(Q.Q8_0, 256, rows), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reader_view(path: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The gguf package's own reading of a file's tensors, to compare against."""
    return [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes))
        for t in gguf.GGUFReader(path).tensors
    ]


def info_view(info: header.GGUFInfo) -> list[tuple[str, str, tuple[int, ...], int]]:
    return [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in info.tensors]


# ------------------------------------------------------------------------------ local files


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe", "qwen3next"])
def test_read_local_agrees_with_the_gguf_reader(tiny_models, arch: str) -> None:
    path = tiny_models(arch)
    info = read_local(path)
    assert info_view(info) == reader_view(path)
    assert info.arch == arch and not info.estimated
    assert info.files == (str(path),)
    assert info.n_layer == 4
    assert info.get("expert_count") == info.metadata[f"{arch}.expert_count"] == 8
    assert info.get("general.architecture") == arch
    assert isinstance(info.get("tokenizer.chat_template"), str)
    # The vocabulary is dropped from the metadata; its length is kept.
    assert "tokenizer.ggml.tokens" not in info.metadata
    assert info.array_lengths["tokenizer.ggml.tokens"] == info.vocab_size == 265
    assert info.total_bytes == sum(n for *_, n in reader_view(path))


def test_quantized_tensor_types_and_bytes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "q.gguf")
    info = read_local(path)
    by_name = {t.name: t for t in info.tensors}
    q8 = by_name["blk.0.attn_q.weight"]
    assert (q8.ggml_type, q8.shape, q8.n_bytes) == ("Q8_0", (64, 8), 8 * 2 * 34)
    exps = by_name["blk.0.ffn_up_exps.weight"]
    assert (exps.ggml_type, exps.shape, exps.n_bytes) == ("Q4_K", (256, 4, 8), 32 * 144)
    shexp = by_name["blk.0.ffn_down_shexp.weight"]
    assert (shexp.ggml_type, shexp.n_bytes) == ("Q6_K", 4 * 210)
    assert by_name["token_embd.weight"].ggml_type == "F16"
    assert info_view(info) == reader_view(path)
    # Routed experts match llama.cpp's --cpu-moe pattern; shared experts and the router don't.
    assert [t.name for t in info.tensors if t.is_routed_expert] == ["blk.0.ffn_up_exps.weight"]
    assert exps.layer == 0 and by_name["token_embd.weight"].layer is None
    assert info.expert_bytes_by_layer() == {0: 32 * 144}
    by_layer = info.tensor_bytes_by_layer()
    assert sum(by_layer.values()) == info.total_bytes
    assert by_layer[None] == by_name["token_embd.weight"].n_bytes
    assert info.metadata["qwen3moe.rope.dimension_sections"] == (11, 11, 10, 0)


def test_split_model_reads_every_shard_from_any_shard(tmp_path: Path, tiny_models) -> None:
    whole = read_local(tiny_models("qwen35moe"))
    first = tiny_models("qwen35moe", split=2)
    second = first.with_name(first.name.replace("-00001-of-", "-00002-of-"))
    for given in (first, second):
        info = read_local(given)
        assert info.files == (str(first), str(second))
        assert sorted(info_view(info)) == sorted(info_view(whole))
        assert info.n_layer == 4 and info.vocab_size == 265
    # Each shard's own header lists only its tensors.
    assert 0 < len(reader_view(first)) < len(whole.tensors)


def test_missing_shard_is_named(tmp_path: Path, tiny_models) -> None:
    first = tiny_models("qwen3moe", split=2)
    shutil.copy(first, tmp_path / first.name)
    with pytest.raises(errors.ModelNotFoundError) as info:
        read_local(tmp_path / first.name)
    assert "-00002-of-00002.gguf" in info.value.message
    assert info.value.hint


def test_truncated_file_is_invalid(tmp_path: Path, tiny_models) -> None:
    data = tiny_models("qwen3moe").read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[:-100])
    with pytest.raises(errors.InvalidModelError, match="truncated"):
        read_local(cut_data)
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:1000])
    with pytest.raises(errors.InvalidModelError, match="truncated"):
        read_local(cut_header)


@pytest.mark.parametrize("content", [b"", b"GG", b'{"not": "a model"}\n' * 100])
def test_non_gguf_file_is_invalid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(errors.InvalidModelError, match="not a GGUF"):
        read_local(path)


def test_corrupt_lengths_do_not_read_forever(tmp_path: Path) -> None:
    # Magic, version 3, one tensor, one key whose name claims 2^62 bytes.
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") * 2
                     + (1 << 62).to_bytes(8, "little") + b"x" * 64)  # fmt: skip
    with pytest.raises(errors.InvalidModelError, match="corrupt"):
        read_local(path)


def test_unsupported_gguf_version(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + b"\0" * 64)
    with pytest.raises(errors.InvalidModelError, match="version 1"):
        read_local(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="no such file"):
        read_local(tmp_path / "absent.gguf")
    with pytest.raises(errors.ModelNotFoundError, match="folder"):
        read_local(tmp_path)


# ------------------------------------------------------------------------------ remote


@dataclass
class Served:
    """What the loopback server sent: bytes of body per file name, and the requests."""

    root: Path
    honour_range: bool = True
    status: int | None = None  # answer every request with this status instead
    sent: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    auth: dict[str, list[str | None]] = field(default_factory=dict)  # Authorization by file
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            rng = self.headers.get("Range")
            with served.lock:
                served.requests.append((name, rng))
                served.auth.setdefault(name, []).append(self.headers.get("Authorization"))
            if served.status is not None:
                self.send_error(served.status)
                return
            path = served.root / name
            if not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
            if served.honour_range and m:
                start = int(m[1])
                end = min(int(m[2]), size - 1) if m[2] else size - 1
                if start >= size:
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self._send(path, name, start, end + 1)

        def _send(self, path: Path, name: str, start: int, stop: int) -> None:
            with path.open("rb") as f:
                f.seek(start)
                pos = start
                while pos < stop:
                    chunk = f.read(min(64 << 10, stop - pos))
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client read what it needed and hung up
                    pos += len(chunk)
                    with served.lock:
                        served.sent[name] = served.sent.get(name, 0) + len(chunk)

    return Handler


@contextlib.contextmanager
def _serve(served: Served) -> Iterator[str]:
    """Serve `served.root` on a loopback port; yields the base URL of a hub-like folder."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/repo/resolve/main"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Served, str]]:
    served = Served(tmp_path / "www")
    served.root.mkdir()
    with _serve(served) as base:
        yield served, base


@pytest.mark.slow
def test_read_remote_fetches_only_the_header(server: tuple[Served, str]) -> None:
    served, base = server
    # A header of about 3 MiB (the vocab) over 24 MiB of tensor data: like a real Qwen GGUF,
    # the first 1 MiB is not enough, so the range has to grow.
    path = write_gguf(served.root / "big.gguf", n_tokens=150_000, data_mib=24)
    size = path.stat().st_size
    local = read_local(path)
    info = read_remote([f"{base}/big.gguf"])
    assert info_view(info) == info_view(local)
    assert dict(info.metadata) == dict(local.metadata)
    assert info.array_lengths["tokenizer.ggml.tokens"] == 150_000
    assert info.files == (f"{base}/big.gguf",)
    # Everything before the tensor data (give or take alignment padding); 150,000 token
    # strings alone are 3 MB.
    header_size = size - local.total_bytes
    assert header_size > header.INITIAL_FETCH  # the test exercises growing
    assert len(served.requests) >= 2
    assert all(rng and rng.startswith("bytes=") for _, rng in served.requests)
    assert served.sent["big.gguf"] <= 2 * header_size + header.INITIAL_FETCH
    assert served.sent["big.gguf"] < size / 4


def test_read_remote_split_model_from_the_first_url(
    server: tuple[Served, str], tiny_models
) -> None:
    served, base = server
    first = tiny_models("qwen3next", split=2)
    for shard in first.parent.glob("*-of-00002.gguf"):
        shutil.copy(shard, served.root / shard.name)
    info = read_remote([f"{base}/{first.name}"])
    assert len(info.files) == 2 and info.files[1].endswith("-00002-of-00002.gguf")
    assert info_view(info) == info_view(read_local(first))
    second = first.name.replace("00001-of", "00002-of")
    assert set(served.sent) == {first.name, second}
    # Both URLs, in any order, read the same model.
    both = read_remote([f"{base}/{second}", f"{base}/{first.name}"])
    assert both.files == info.files and info_view(both) == info_view(info)


def test_read_hub_reads_a_quant_in_a_repo_folder(monkeypatch, tiny_models) -> None:
    # What `plan` and the quant chooser read: one quant's shards at one commit, through the
    # hub's `resolve` URLs (a redirect to storage, as on the real hub), header bytes only.
    from qwenrun.testing.hub_server import HubServer

    first = tiny_models("qwen3moe", split=2)
    second = first.with_name(first.name.replace("-00001-of-", "-00002-of-"))
    paths = ["Q8_0/M-Q8_0-00001-of-00002.gguf", "Q8_0/M-Q8_0-00002-of-00002.gguf"]
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        commit = hub.add_repo("acme/M-GGUF", {paths[0]: first, paths[1]: second})
        info = header.read_hub("acme/M-GGUF", commit, paths)
        assert info_view(info) == info_view(read_local(first))
        assert [f.rsplit("/", 2)[-2:] for f in info.files] == [p.split("/") for p in paths]
        gets = [r for r in hub.requests if r.method == "GET" and "/_content/" in r.path]
        assert len(gets) == 2 and all((r.range or "").startswith("bytes=0-") for r in gets)


@pytest.mark.slow
def test_read_remote_from_a_server_that_ignores_range(server: tuple[Served, str]) -> None:
    served, base = server
    served.honour_range = False
    path = write_gguf(served.root / "norange.gguf", n_tokens=1000, data_mib=48)
    info = read_remote([f"{base}/norange.gguf"])
    assert info_view(info) == info_view(read_local(path))
    # The body was read only as far as the header and the connection then closed: what the
    # server got out before noticing is socket buffers, far less than the file.
    assert served.sent["norange.gguf"] < path.stat().st_size / 2


def test_read_remote_truncated_file(server: tuple[Served, str]) -> None:
    served, base = server
    data = write_gguf(served.root / "whole.gguf", data_mib=1).read_bytes()
    (served.root / "cut.gguf").write_bytes(data[: len(data) - 4096])
    with pytest.raises(errors.InvalidModelError, match="truncated"):
        read_remote([f"{base}/cut.gguf"])


def test_read_remote_not_a_gguf(server: tuple[Served, str]) -> None:
    served, base = server
    (served.root / "index.html").write_text("<html>not a model</html>" * 100)
    with pytest.raises(errors.InvalidModelError, match="not a GGUF"):
        read_remote([f"{base}/index.html"])


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, errors.ModelNotFoundError), (403, errors.AuthError), (500, errors.DownloadError)],
)
def test_read_remote_http_errors(server: tuple[Served, str], status: int, error: type) -> None:
    served, base = server
    served.status = status
    with pytest.raises(error) as info:
        read_remote([f"{base}/model.gguf"])
    assert str(status) in info.value.message and info.value.hint


def test_read_remote_missing_shard(server: tuple[Served, str], tiny_models) -> None:
    served, base = server
    first = tiny_models("qwen3moe", split=2)
    shutil.copy(first, served.root / first.name)
    with pytest.raises(errors.ModelNotFoundError, match="00002-of-00002"):
        read_remote([f"{base}/{first.name}"])


def test_the_token_goes_to_the_hub_only(
    server: tuple[Served, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = server
    write_gguf(served.root / "m.gguf")
    hub = base.split("/repo/")[0]
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken")
    # (huggingface_hub's session may call the endpoint on its own: only m.gguf counts.)
    read_remote([f"{base}/m.gguf"])
    assert set(served.auth.pop("m.gguf")) == {"Bearer hf_testtoken"}
    # Another origin (the same files on another port) gets no token ...
    with _serve(served) as elsewhere:
        read_remote([f"{elsewhere}/m.gguf"])
    assert set(served.auth.pop("m.gguf")) == {None}
    # ... and headers given by the caller are sent as they are.
    read_remote([f"{base}/m.gguf"], headers={"Authorization": "Bearer other"})
    assert set(served.auth.pop("m.gguf")) == {"Bearer other"}


def test_read_remote_refuses_in_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.OfflineError):
        read_remote(["http://127.0.0.1:9/x.gguf"])


def test_read_remote_unreachable_server() -> None:
    with pytest.raises(errors.DownloadError):
        read_remote(["http://127.0.0.1:9/x.gguf"])  # discard port: nothing listens


# ------------------------------------------------------------------------------ estimates

# Published file sizes (reference/catalog.md §2.2: HF tree-API GiB, web-UI GB, or exact
# bytes). llama.cpp's own mixes on qwen3moe/qwen3next come out within 0.3 % (the recipe is
# llama.cpp's rule by rule); 5 % is the bar for the rest, because unsloth's "UD-" quants and
# their Qwen3.5 uploads choose types per tensor from their own measurements and re-upload
# with other choices (3.5-35B UD-Q4_K_XL: 19.7 or 20.7 GiB in two sources). Known larger
# gaps are listed with their own bound and the reason.
_PUBLISHED: list[tuple[str, str, float, float]] = [
    # model, quant, bytes, tolerance
    ("qwen3-30b-a3b", "Q8_0", 32.48 * GB, 0.005),
    ("qwen3-30b-a3b", "Q6_K", 25.10 * GB, 0.005),
    ("qwen3-30b-a3b", "Q6_K_L", 25.26 * GB, 0.005),
    ("qwen3-30b-a3b", "Q5_K_M", 21.74 * GB, 0.005),
    ("qwen3-30b-a3b", "Q5_K_S", 21.10 * GB, 0.005),
    ("qwen3-30b-a3b", "BF16", 61.10 * GB, 0.005),
    ("qwen3-30b-a3b", "Q4_K_M", 18.6 * GB, 0.02),  # "≈ 18.6 GB", third-party 18.4-19.0
    ("qwen3-30b-a3b-thinking-2507", "Q4_K_M", 17.28 * GiB, 0.005),
    ("qwen3-30b-a3b-thinking-2507", "IQ4_XS", 15.25 * GiB, 0.005),
    ("qwen3-30b-a3b-thinking-2507", "Q3_K_M", 13.70 * GiB, 0.005),
    ("qwen3-30b-a3b-thinking-2507", "UD-Q5_K_XL", 20.27 * GiB, 0.05),
    ("qwen3-30b-a3b-thinking-2507", "UD-Q3_K_XL", 12.88 * GiB, 0.05),
    ("qwen3-30b-a3b-instruct-2507", "UD-Q4_K_XL", 17_690_497_440, 0.05),
    ("qwen3-coder-30b-a3b-instruct", "UD-Q4_K_XL", 17_665_334_432, 0.05),
    ("qwen3-coder-30b-a3b-instruct", "UD-Q8_K_XL", 32.5 * GB, 0.05),
    ("qwen3-235b-a22b-instruct-2507", "UD-Q4_K_XL", 134.3 * GB, 0.05),
    ("qwen3-235b-a22b-instruct-2507", "UD-Q3_K_XL", 104 * GB, 0.05),
    ("qwen3-coder-480b-a35b-instruct", "BF16", 960 * GB, 0.005),
    ("qwen3-coder-480b-a35b-instruct", "UD-Q4_K_XL", 276 * GB, 0.05),
    ("qwen3-coder-480b-a35b-instruct", "UD-Q2_K_XL", 180 * GB, 0.05),
    ("qwen3-coder-480b-a35b-instruct", "UD-IQ1_M", 150 * GB, 0.05),
    ("qwen3-next-80b-a3b-thinking", "Q8_0", 84.8 * GB, 0.005),
    ("qwen3-next-80b-a3b-thinking", "Q6_K", 65.5 * GB, 0.005),
    ("qwen3-next-80b-a3b-thinking", "Q5_K_M", 56.7 * GB, 0.005),
    ("qwen3-next-80b-a3b-thinking", "Q5_0", 55 * GB, 0.01),
    ("qwen3-next-80b-a3b-thinking", "Q4_K_M", 48.4 * GB, 0.005),
    ("qwen3-next-80b-a3b-thinking", "IQ4_XS", 39.72 * GiB, 0.005),
    ("qwen3-next-80b-a3b-thinking", "Q3_K_M", 35.67 * GiB, 0.005),
    # unsloth's 2025 upload for Next-Thinking keeps the dense parts lighter than its 2026
    # uploads (Coder-Next, Qwen3.5), which the UD recipe follows.
    ("qwen3-next-80b-a3b-thinking", "UD-Q4_K_XL", 42.78 * GiB, 0.08),
    ("qwen3-next-80b-a3b-thinking", "UD-Q3_K_XL", 33.06 * GiB, 0.12),
    ("qwen3-coder-next", "Q4_K_M", 45.20 * GiB, 0.005),
    ("qwen3-coder-next", "UD-Q4_K_XL", 46.20 * GiB, 0.05),
    ("qwen3-coder-next", "UD-Q5_K_XL", 55.45 * GiB, 0.05),
    # unsloth's IQ4_XS for Coder-Next and Qwen3.5 is smaller than any llama.cpp IQ4_XS mix
    # (its experts must go below IQ4_XS); bartowski's Qwen3.5/3.6 IQ4_XS are larger.
    ("qwen3-coder-next", "IQ4_XS", 35.79 * GiB, 0.12),
    ("qwen3.5-35b-a3b", "IQ4_XS", 16.29 * GiB, 0.08),
    ("qwen3.5-122b-a10b", "IQ4_XS", 56.09 * GiB, 0.09),
    ("qwen3.5-122b-a10b", "IQ4_XS", 63.77 * GiB, 0.05),  # bartowski
    ("qwen3.5-397b-a17b", "IQ4_XS", 176.7 * GiB, 0.12),
    ("qwen3.6-35b-a3b", "IQ4_XS", 18.35 * GiB, 0.06),  # bartowski
    ("qwen3.5-35b-a3b", "Q8_0", 34.37 * GiB, 0.005),
    ("qwen3.5-35b-a3b", "Q6_K", 26.87 * GiB, 0.05),
    ("qwen3.5-35b-a3b", "Q5_K_M", 24.45 * GiB, 0.05),
    ("qwen3.5-35b-a3b", "Q4_K_M", 20.50 * GiB, 0.05),
    ("qwen3.5-35b-a3b", "Q3_K_M", 15.23 * GiB, 0.05),
    ("qwen3.5-35b-a3b", "UD-Q5_K_XL", 24.57 * GiB, 0.05),
    ("qwen3.5-35b-a3b", "UD-Q4_K_XL", 20.71 * GiB, 0.05),
    ("qwen3.5-35b-a3b", "UD-Q3_K_XL", 15.46 * GiB, 0.05),
    ("qwen3.6-35b-a3b", "Q6_K", 27.30 * GiB, 0.05),
    ("qwen3.6-35b-a3b", "Q4_K_M", 20.61 * GiB, 0.05),
    ("qwen3.6-35b-a3b", "UD-Q4_K_XL", 20.82 * GiB, 0.05),
    ("qwen3.5-122b-a10b", "Q8_0", 120.95 * GiB, 0.005),
    ("qwen3.5-122b-a10b", "Q6_K", 94.07 * GiB, 0.05),
    ("qwen3.5-122b-a10b", "Q5_K_M", 85.23 * GiB, 0.05),
    ("qwen3.5-122b-a10b", "Q4_K_M", 71.28 * GiB, 0.05),
    ("qwen3.5-122b-a10b", "Q4_K_M", 72.29 * GiB, 0.05),  # bartowski
    ("qwen3.5-122b-a10b", "Q3_K_M", 52.55 * GiB, 0.05),
    ("qwen3.5-122b-a10b", "UD-Q4_K_XL", 71.74 * GiB, 0.05),
    ("qwen3.5-122b-a10b", "UD-Q3_K_XL", 53.06 * GiB, 0.05),
    ("qwen3.5-397b-a17b", "Q8_0", 392.6 * GiB, 0.005),
    ("qwen3.5-397b-a17b", "Q6_K", 304.2 * GiB, 0.05),
    ("qwen3.5-397b-a17b", "Q5_K_M", 273.5 * GiB, 0.05),
    ("qwen3.5-397b-a17b", "Q4_K_M", 227.3 * GiB, 0.05),
    ("qwen3.5-397b-a17b", "UD-Q4_K_XL", 228.4 * GiB, 0.05),
    ("qwen3.5-397b-a17b", "IQ2_M", 114.6 * GiB, 0.05),
    # unsloth's 397B 3-bit files are lighter than llama.cpp's Q3_K_M (35B, 122B are not).
    ("qwen3.5-397b-a17b", "Q3_K_M", 165.2 * GiB, 0.08),
    ("qwen3.5-397b-a17b", "UD-Q3_K_XL", 166.5 * GiB, 0.08),
]


@pytest.mark.parametrize(
    ("model", "quant", "published", "tolerance"),
    _PUBLISHED,
    ids=[f"{m}:{q}:{p / GiB:.1f}" for m, q, p, _ in _PUBLISHED],
)
def test_estimate_matches_published_sizes(
    model: str, quant: str, published: float, tolerance: float
) -> None:
    info = estimate(lookup(model), quant)
    assert info.total_bytes == pytest.approx(published, rel=tolerance)


# catalog.md §3.5: Q4_K_M's routed experts per layer (gate/up Q4_K, down Q4_K or Q6_K by
# llama.cpp's use_more_bits), exact bytes.
@pytest.mark.parametrize(
    ("model", "q4_layer", "q6_layer", "q6_layers"),
    [
        ("qwen3-30b-a3b", 339_738_624, 391_643_136, 24),
        ("qwen3-235b-a22b", 1_358_954_496, 1_566_572_544, 46),
        ("qwen3-coder-480b-a35b-instruct", 4_246_732_800, 4_895_539_200, 30),
        ("qwen3-next-80b-a3b-instruct", 905_969_664, 1_044_381_696, 24),
        ("qwen3.5-35b-a3b", 452_984_832, 522_190_848, 20),
        ("qwen3.5-122b-a10b", 1_358_954_496, 1_566_572_544, 24),
        ("qwen3.5-397b-a17b", 3_623_878_656, 4_177_526_784, 30),
    ],
)
def test_q4_k_m_expert_bytes_per_layer(
    model: str, q4_layer: int, q6_layer: int, q6_layers: int
) -> None:
    spec = lookup(model)
    per_layer = estimate(spec, "Q4_K_M").expert_bytes_by_layer()
    assert len(per_layer) == spec.shape.n_layer
    assert set(per_layer.values()) == {q4_layer, q6_layer}
    assert sum(1 for b in per_layer.values() if b == q6_layer) == q6_layers


def test_estimate_follows_llama_cpp_rules_for_dense_tensors() -> None:
    info = estimate(lookup("qwen3.5-35b-a3b"), "IQ4_XS")
    types = {t.name: t.ggml_type for t in info.tensors}
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "IQ4_XS"
    assert types["blk.3.attn_v.weight"] == "Q5_K"  # n_gqa >= 4
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # routers stay F32
    assert types["blk.0.ssm_conv1d.weight"] == "F32"
    assert types["blk.0.ssm_a"] == types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_up_exps.weight"] == "IQ4_XS"


def test_estimate_is_marked_and_carries_the_shape_as_metadata() -> None:
    spec = lookup("qwen3.6-35b-a3b")
    info = estimate(spec, "q4_k_m")
    assert info.estimated and info.files == ()
    assert info.arch == "qwen35moe" and info.n_layer == 40
    assert info.get("full_attention_interval") == 4
    assert info.vocab_size == 248_320 and info.n_ctx_train == 262_144
    assert info.file_type == "Q4_K_M"
    assert info.get("qwenrun.quant") == "Q4_K_M"


def test_estimate_with_the_mtp_block() -> None:
    spec = lookup("qwen3.5-122b-a10b")
    plain, mtp = estimate(spec, "UD-Q4_K_XL"), estimate(spec, "UD-Q4_K_XL", include_mtp=True)
    assert mtp.n_layer == plain.n_layer + 1 == 49
    assert 48 in mtp.expert_bytes_by_layer() and 48 not in plain.expert_bytes_by_layer()
    # catalog.md §2.2: the MTP repo's UD-Q4_K_XL is 73.25 GiB against 71.74 without.
    assert mtp.total_bytes == pytest.approx(73.25 * GiB, rel=0.05)


def test_estimate_of_an_unknown_quant_is_a_usage_error() -> None:
    with pytest.raises(errors.UsageError, match="Q9_Z"):
        estimate(lookup("qwen3-30b-a3b"), "Q9_Z")


@pytest.mark.slow
def test_every_ladder_quant_has_a_recipe_and_sizes_fall_down_the_ladder() -> None:
    ladder = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_S"]
    for spec in catalog.CATALOG:
        sizes = {q: estimate(spec, q).total_bytes for q in catalog.QUANT_LADDER}
        main = [sizes[q] for q in ladder]
        assert main == sorted(main, reverse=True), spec.name
        assert sizes["BF16"] > sizes["Q8_0"]


def _tiny_spec(arch: str) -> ModelSpec:
    """A catalog entry with the tiny generator's shape, to compare layouts against its files."""
    d = Dims()
    hybrid = arch != "qwen3moe"
    shape = ModelShape(
        arch=arch,  # type: ignore[arg-type]
        n_layer=4, n_embd=d.n_embd, n_head=d.n_head, n_head_kv=d.n_head_kv,
        head_dim=d.head_dim, n_expert=d.n_expert, n_expert_used=d.n_expert_used,
        expert_ff=d.expert_ff, shared_expert_ff=d.shexp_ff if hybrid else 0, vocab_size=265,
        n_ctx_native=32768, full_attention_interval=d.full_attention_interval if hybrid else 1,
        ssm_state=d.ssm_state if hybrid else 0, ssm_groups=d.ssm_groups if hybrid else 0,
        ssm_v_heads=d.ssm_v_heads if hybrid else 0, ssm_conv_kernel=d.ssm_conv if hybrid else 0,
    )  # fmt: skip
    return ModelSpec(f"tiny-{arch}", f"tiny-{arch}", (), shape, "hybrid", {}, (), 0.0, 0.0)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe", "qwen3next"])
def test_estimated_layout_matches_a_real_file_of_the_same_shape(tiny_models, arch: str) -> None:
    # tiny_gguf's tensors are the ones the pinned llama.cpp loads: same names, shapes, bytes.
    real = read_local(tiny_models(arch))
    est = estimate(_tiny_spec(arch), "F32")
    assert sorted(info_view(est)) == sorted(info_view(real))
