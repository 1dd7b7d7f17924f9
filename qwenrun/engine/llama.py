"""The engine: one loaded model and its context; load with a placement, stream tokens.

Contract: an `Engine` loads a GGUF with a `LoadConfig` (placement through llama.cpp's tensor
buffer-type overrides built by `native`; workers, devices and split through `rpc.prepare`),
creates its context, and streams generated text through `Generation`. It uses
llama-cpp-python 0.3.36's low-level bindings only (through `native.bindings()`, so importing
this module loads nothing):

- decoding: `llama_decode` on a reused one-token batch, a native sampler chain, and
  `llama_token_to_piece`, with nothing in the per-token loop that the loop does not need;
- the KV cache persists across `generate` calls; a new prompt evaluates only the tokens
  after the common prefix with what the cache holds. Attention-only models trim the cache
  to that prefix; hybrid models (recurrent state, which cannot be trimmed) go back to the
  latest checkpoint at or before it (`checkpoints.py`: taken while prompts are evaluated,
  at the positions a chat comes back to), or evaluate everything when none applies;
- a prompt of at least `promptcache.MIN_TOKENS` tokens is saved to the prompt cache on disk
  (`promptcache.py`), and a later prompt (in any process) with the same model, settings and
  token prefix loads that state instead of evaluating it; `GenStats` says how many prompt
  tokens were reused and from where, `cache_report()` what the checkpoints and the disk hold;
- what llama.cpp actually placed where (overridden tensors, buffer sizes) is read from its
  log (`llamalog`) and kept as `Engine.placement`.

The values it hands out are in `values.py` (`SamplingParams`, `GenStats`, `CacheReport`),
the sampler chain is built by `sampler.py`.

It does not choose a placement (the planner does), render templates (template.py) or print.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from qwenrun import errors
from qwenrun.engine import promptcache, rpc
from qwenrun.engine.checkpoints import (
    ChatMarks,
    CheckpointStore,
    partial_flag,
    positions,
    read_state,
    write_state,
)
from qwenrun.engine.llamalog import LOG, OOM_RE, PlacementReport, load_failure, parse_placement
from qwenrun.engine.loadconfig import KV_TYPES, LoadConfig
from qwenrun.engine.native import bindings, loaded, override_array
from qwenrun.engine.sampler import sampler_chain
from qwenrun.engine.values import CacheReport, GenStats, ModelMeta, Reuse, SamplingParams
from qwenrun.text import clean

# --------------------------------------------------------------------------------------
# The engine


_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


def _check_file(path: Path) -> None:
    """Catch what llama.cpp would only report as a NULL model, with a clear message."""
    if not path.exists():
        raise errors.ModelNotFoundError(
            f"model file not found: {path}", hint="check the path, or `qwenrun list`"
        )
    if path.is_dir():
        raise errors.InvalidModelError(f"{path} is a folder, not a GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise errors.InvalidModelError(
            f"{path.name} is not a GGUF file (it does not start with the GGUF magic)",
            hint="pass a .gguf model file",
        )


class Engine:
    """One loaded model and its context. Not thread-safe: one generation at a time."""

    config: LoadConfig
    meta: ModelMeta
    placement: PlacementReport
    n_ctx: int
    n_batch: int
    _vocab: Any
    _mem: Any
    _recurrent: bool

    def __init__(self) -> None:  # use Engine.load
        self._model: Any = None
        self._ctx: Any = None
        self._keep: tuple[Any, ...] = ()
        self._cache: list[int] = []
        self.checkpoints = CheckpointStore(max_count=0)
        self._marks: ChatMarks | None = None
        self._disk: promptcache.PromptCache | None = None
        # How many tokens of what the context holds are in a disk entry already (loaded or
        # saved): a prompt is saved again only when it adds MIN_TOKENS beyond that.
        self._disk_base = 0
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.log_lines: list[str] = []

    # ---- loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        config: LoadConfig | None = None,
        *,
        verbose: bool = False,
        on_progress: Callable[[float], None] | None = None,
    ) -> Engine:
        config = config or LoadConfig()
        path = Path(path)
        _check_file(path)
        # A bad QWENRUN_PROMPT_CACHE is an error before seconds of loading, not after.
        disk_cap = config.prompt_cache
        if disk_cap is None:
            disk_cap = promptcache.cap_from_env()
        lc = bindings()
        self = cls()
        self.config = config
        LOG.echo = verbose
        mark = LOG.mark()

        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = config.placement.n_gpu_layers
        mparams.load_mode = lc.LLAMA_LOAD_MODE_MMAP if config.mmap_enabled() else 0
        mparams.use_extra_bufts = config.extra_bufts
        if config.lazy_table is not None:  # else llama.cpp's AUTO (lazy above 4 GiB)
            mparams.lazy_mode = lc.LLAMA_LAZY_MODE_ON if config.lazy_table else 0
        chosen = rpc.prepare(config.placement, mparams)  # workers, devices, split: first
        patterns = config.placement.override_patterns()
        arr, encoded = override_array(patterns) if patterns else (None, [])
        if arr is not None:
            mparams.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        # An exception (Ctrl-C above all) raised inside a ctypes callback would be printed
        # and swallowed; the callback stores it, cancels the load, and it is raised after.
        interrupted: list[BaseException] = []

        def _progress(p: float, _user: Any) -> bool:
            try:
                if on_progress is not None:
                    on_progress(float(p))
            except BaseException as exc:
                interrupted.append(exc)
                return False  # false cancels the load
            return True

        progress_cb = lc.llama_progress_callback(_progress)
        mparams.progress_callback = progress_cb
        # The override array and its strings must outlive the model (llama.cpp keeps the
        # pointer in the model's params), so the engine holds them until close().
        self._keep = (arr, encoded, progress_cb, chosen)

        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if interrupted:
            if model:
                lc.llama_model_free(model)
            raise interrupted[0]
        if not model:
            lines = [ln for _, ln in LOG.since(mark)]
            raise load_failure(path, lines)
        self._model = model

        cparams = lc.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = min(config.n_ubatch, config.n_batch)
        cparams.n_seq_max = 1
        cparams.n_outputs_max = config.n_outputs_max  # one token's logits per batch
        # A plan always sets the threads (the physical cores by default); a load without
        # one (tests, the CPU check) takes every CPU.
        threads = config.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        kv = KV_TYPES.get(config.kv_type.lower())
        if kv is None:
            self.close()
            raise errors.UsageError(
                f"unknown KV cache type {config.kv_type!r}",
                hint=f"use one of {', '.join(KV_TYPES)}",
            )
        cparams.type_k = kv.ggml_id
        cparams.type_v = kv.ggml_id
        cparams.no_perf = False
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lines = [ln for _, ln in LOG.since(mark)]
            self.close()
            reason = next((ln for ln in reversed(lines) if ln.strip()), "")
            if OOM_RE.search("\n".join(lines)):
                raise errors.OutOfMemoryError(
                    f"not enough memory for a context of {config.n_ctx} tokens",
                    hint="try a smaller --ctx, or --kv-type q8_0",
                )
            raise errors.BackendError(
                f"llama.cpp could not create a context of {config.n_ctx} tokens: {reason.strip()}",
                hint="try a smaller --ctx, or a quantized KV cache with flash attention",
            )
        self._ctx = ctx
        rpc.harden_connections(config.placement.rpc_workers)
        self._vocab = lc.llama_model_get_vocab(model)
        self._mem = lc.llama_get_memory(ctx)
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_batch = int(config.n_batch)
        self._recurrent = bool(
            lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model)
        )
        self.log_lines = [ln for _, ln in LOG.since(mark)]
        self.placement = parse_placement(self.log_lines, config.placement.n_gpu_layers)
        self.meta = self._read_meta(path)
        if self._recurrent:
            self.checkpoints = CheckpointStore()
        self._marks = self._chat_marks()
        if disk_cap > 0:
            self._disk = self._open_prompt_cache(path, config, disk_cap)
        return self

    def _chat_marks(self) -> ChatMarks | None:
        """`<|im_start|>` and `assistant\\n` as this vocabulary spells them (None if the
        model has no such special token: checkpoints then go a few tokens before the end)."""
        start = self.tokenize("<|im_start|>", special=True)
        if len(start) != 1 or self.token_text(start[0]) != "<|im_start|>":
            return None
        return ChatMarks(start[0], tuple(self.tokenize("assistant\n", special=False)))

    def _open_prompt_cache(
        self, path: Path, config: LoadConfig, cap: int
    ) -> promptcache.PromptCache | None:
        lc = bindings()
        try:
            model = promptcache.model_identity(path)
        except OSError:
            return None  # an unreadable shard: no cache, the model itself loaded
        on_gpu = bool(lc.llama_supports_gpu_offload()) and config.placement.n_gpu_layers != 0
        key = promptcache.key_for(
            model,
            promptcache.build_identity(lc),
            kv_type=config.kv_type,
            flash_attn=config.flash_attn,
            on_gpu=on_gpu,
        )
        return promptcache.PromptCache(promptcache.folder(), cap, key)

    def _read_meta(self, path: Path) -> ModelMeta:
        lc = bindings()
        meta: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(lc.llama_model_meta_count(self._model)):
            k = lc.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace") if k >= 0 else ""
            if not key or key.startswith("tokenizer.ggml."):
                continue  # the vocab arrays: large and useless here
            n = lc.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf))
            if n >= 0:
                meta[key] = buf.value.decode("utf-8", "replace")
        template_ptr = lc.llama_model_chat_template(self._model, None)
        template = template_ptr.decode("utf-8") if template_ptr else None
        arch = meta.get("general.architecture", "")
        bos = lc.llama_vocab_bos(self._vocab)
        eos = lc.llama_vocab_eos(self._vocab)
        return ModelMeta(
            path=str(path),
            arch=arch,
            n_layer=int(lc.llama_model_n_layer(self._model)),
            n_ctx_train=int(lc.llama_model_n_ctx_train(self._model)),
            n_vocab=int(lc.llama_vocab_n_tokens(self._vocab)),
            chat_template=template,
            bos_token=self.token_text(bos) if bos >= 0 else "",
            eos_token=self.token_text(eos) if eos >= 0 else "",
            is_recurrent=self._recurrent,
            metadata=meta,
        )

    def close(self) -> None:
        if self._disk is not None:
            self._disk.wait()  # a prompt being saved is finished, not cut short
        lc = loaded()
        if lc is None:
            return
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None
        self._keep = ()
        LOG.trim()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown the bindings may already be gone.
        with contextlib.suppress(Exception):
            self.close()

    # ---- tokens

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Text → token ids; `special` parses `<|im_start|>` and friends as single tokens."""
        lc = bindings()
        # The last guard of `qwenrun.text`'s rule: text is cleaned (and the user told) where
        # it enters; one that slips through must still not kill the engine at `encode`.
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            data = clean(text)[0].encode("utf-8")
        cap = len(data) + 8
        arr = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), arr, cap, False, special)
        if n < 0:
            cap = -n
            arr = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), arr, cap, False, special)
        return list(arr[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token adds to the text.

        Control tokens (`<|im_end|>`, `<|im_start|>`) render as nothing, as in llama.cpp's
        own detokenizer; user-defined ones such as `<think>` keep their text, because the
        thinking splitter needs to see them.
        """
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._to_piece(token, special=False)
            self._pieces[token] = piece
        return piece

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        lc = bindings()
        n = lc.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, big, -n, 0, special)
            return big.raw[:n]
        return self._piece_buf.raw[:n]

    def token_text(self, token: int) -> str:
        """A token's own text, special tokens included (`<|im_end|>`)."""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(bindings().llama_vocab_is_eog(self._vocab, token))

    # ---- generation

    def reset(self) -> None:
        """Forget the KV cache (and recurrent state): the next prompt is evaluated whole."""
        bindings().llama_memory_clear(self._mem, True)
        self._cache = []
        self.checkpoints.clear()
        self._disk_base = 0

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)

    def common_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the context holds now."""
        return _common_prefix(self._cache, tokens)

    def cache_report(self) -> CacheReport:
        store = self.checkpoints
        return CacheReport(
            checkpoints=self._recurrent,
            checkpoint_count=store.count,
            checkpoint_bytes=store.bytes,
            checkpoint_max_count=store.max_count,
            checkpoint_max_bytes=store.max_bytes,
            disk=self._disk.report() if self._disk is not None else None,
        )

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams | None = None,
        max_tokens: int = 512,
        cancel: threading.Event | None = None,
    ) -> Generation:
        prompt = list(prompt_tokens)
        if not prompt:
            raise errors.UsageError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise errors.ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.n_ctx}",
                hint="shorten the prompt or raise --ctx",
            )
        return Generation(self, prompt, sampling or SamplingParams(), max_tokens, cancel)

    def _reuse_prefix(self, prompt: list[int]) -> Reuse:
        """Keep (or load) as much of `prompt` as possible; the caller evaluates the rest.

        What the context holds is kept up to the common prefix: trimmed there on an
        attention-only model; on a hybrid, whose recurrent state cannot be trimmed, taken
        back to the latest checkpoint at or before it. When that leaves MIN_TOKENS or more to
        evaluate, the prompt cache on disk is asked for a longer prefix. Anything refused on
        the way clears the context: a full evaluation is always correct.
        """
        lc = bindings()
        cache = self._cache
        # The last prompt token must be evaluated again to get its logits.
        common = min(_common_prefix(cache, prompt), len(prompt) - 1)
        ckpt = None
        if common == len(cache) or not self._recurrent:
            planned = common
        else:
            ckpt = self.checkpoints.best(common)
            planned = ckpt.n_tokens if ckpt is not None else 0
        if self._disk is not None and len(prompt) - planned >= promptcache.MIN_TOKENS:
            loaded_n = self._load_from_disk(prompt, planned)
            if loaded_n > 0:
                return Reuse(loaded_n, "disk")
            if loaded_n < 0:
                return Reuse(0, "")  # a refused entry cleared the context
        if common == len(cache):
            return Reuse(common, "cache" if common else "")
        if not self._recurrent:
            if common > 0 and lc.llama_memory_seq_rm(self._mem, 0, common, -1):
                self._cut(common)
                return Reuse(common, "cache")
        elif ckpt is not None and self.checkpoints.restore(self._ctx, self._mem, ckpt):
            self._cut(ckpt.n_tokens)
            return Reuse(ckpt.n_tokens, "checkpoint")
        self.reset()
        return Reuse(0, "")

    def _cut(self, n: int) -> None:
        """The context now holds only the first `n` tokens of the cache."""
        del self._cache[n:]
        self.checkpoints.drop_after(n)
        self._disk_base = min(self._disk_base, n)

    def _load_from_disk(self, prompt: list[int], better_than: int) -> int:
        """Load the disk entry that keeps most of `prompt`, if it keeps more than
        `better_than` tokens. Returns the tokens kept; 0 if none was loaded (the context is
        untouched); -1 if llama.cpp refused an entry (the context is cleared, the entry
        removed)."""
        disk = self._disk
        assert disk is not None
        limit = len(prompt) - 1
        best: tuple[int, promptcache.Entry, promptcache.Section | None] | None = None
        for entry in disk.candidates(prompt):
            if entry.n_tokens >= self.n_ctx:
                continue  # another context size saved it: fine there, too big here
            common = min(_common_prefix(entry.tokens, prompt), limit)
            part = None
            if common >= entry.n_tokens or not self._recurrent:
                use = min(common, entry.n_tokens)
            else:
                fits = [p for p in entry.partials if p.n_tokens <= common]
                part = max(fits, key=lambda p: p.n_tokens, default=None)
                use = part.n_tokens if part is not None else 0
            if best is None or use > best[0]:
                best = (use, entry, part)
        if best is None or best[0] <= max(better_than, promptcache.BUCKET_TOKENS - 1):
            return 0
        use, entry, part = best
        # Every byte is checked against its sha256 before llama.cpp sees it.
        full = disk.read(entry, entry.full)
        partial = disk.read(entry, part) if part is not None and full is not None else None
        if full is None or (part is not None and partial is None):
            return 0
        lc = bindings()
        ok = write_state(self._ctx, full, 0)
        ok = ok and lc.llama_memory_seq_pos_max(self._mem, 0) == entry.n_tokens - 1
        if ok and partial is not None:
            ok = write_state(self._ctx, partial, partial_flag())
        if ok and use < entry.n_tokens:
            ok = bool(lc.llama_memory_seq_rm(self._mem, 0, use, -1))
        if not ok:
            disk.discard(entry)
            self.reset()
            return -1
        self._cache = list(prompt[:use])
        self.checkpoints.clear()
        if partial is not None:
            self.checkpoints.add(use, partial)
        self._disk_base = use
        disk.used(entry, use)
        return use

    def _prefill(self, prompt: list[int], start: int, cancel: threading.Event | None) -> bool:
        """Evaluate `prompt[start:]`, stopping at checkpoint positions (hybrids) to save one.
        False if cancelled (what was evaluated stays, with its checkpoints)."""
        stops = positions(prompt, start, self._marks) if self.checkpoints.enabled else []
        at = start
        for stop in [*stops, len(prompt)]:
            if not self._decode_chunk(prompt[at:stop], cancel):
                return False
            if stop < len(prompt):
                self.checkpoints.save(self._ctx, stop)
            at = stop
        return True

    def _save_to_disk(self, prompt: list[int]) -> None:
        """After a prompt is evaluated: save it to the disk cache if it is worth it.

        Only the copy out of llama.cpp happens here (the context holds exactly the prompt
        now, before the first generated token); hashing and writing run in the background.
        """
        disk = self._disk
        n = len(prompt)
        least = promptcache.MIN_TOKENS
        if disk is None or n < least or n - self._disk_base < least:
            return
        # No copy (hundreds of MiB for a long context) of a state the cache would not keep.
        if not disk.would_keep(int(bindings().llama_state_seq_get_size_ext(self._ctx, 0, 0))):
            return
        full = read_state(self._ctx, 0)
        if full is None:
            return
        partials = [(c.n_tokens, c.data) for c in self.checkpoints.share(n - 1)]
        disk.save_async(promptcache.Snapshot(list(prompt), full, partials))
        self._disk_base = n

    def _decode_chunk(self, tokens: list[int], cancel: threading.Event | None = None) -> bool:
        """Evaluate `tokens` in batches; False if `cancel` was set between two batches.

        The cache grows only by batches that were evaluated, so it stays true either way.
        """
        lc = bindings()
        for start in range(0, len(tokens), self.n_batch):
            if cancel is not None and cancel.is_set():
                return False
            chunk = tokens[start : start + self.n_batch]
            arr = (lc.llama_token * len(chunk))(*chunk)
            rc = lc.llama_decode(self._ctx, lc.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                # The cache may hold part of the chunk: forget it rather than trust it.
                self.reset()
                raise errors.BackendError(
                    f"llama_decode failed with code {rc} while evaluating the prompt",
                    hint="the context may be full; raise --ctx or start a new conversation",
                )
            self._cache.extend(chunk)
        return True

    @functools.cached_property
    def _eog_ids(self) -> list[int]:
        # Once per engine: the scan asks the vocabulary about each of its ~150k tokens.
        is_eog = bindings().llama_vocab_is_eog
        return [t for t in range(self.meta.n_vocab) if is_eog(self._vocab, t)]


class Generation:
    """A stream of decoded text pieces from one `Engine.generate` call.

    Iterate it to run the model. UTF-8 characters split across tokens come out whole;
    every token counts against `max_tokens`, including bytes held back for an unfinished
    character. After the loop ends, `finish_reason` and `stats` are set.
    """

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        cancel: threading.Event | None,
    ) -> None:
        self._engine = engine
        self._prompt = prompt
        self._sampling = sampling
        self._max_tokens = max_tokens
        self._cancel = cancel
        self._forced: deque[int] = deque()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stats: GenStats | None = None
        self._iter: Iterator[str] | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    def force_text(self, text: str) -> None:
        """Decode these tokens next instead of sampling (e.g. close a thinking block)."""
        self._forced.extend(self._engine.tokenize(text, special=True))

    def forced_length(self, text: str) -> int:
        """How many tokens `force_text(text)` would add (they count against `max_tokens`)."""
        return len(self._engine.tokenize(text, special=True))

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._iter is None:
            self._iter = self._run()
        return next(self._iter)

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)

    def _run(self) -> Iterator[str]:
        eng = self._engine
        lc = bindings()
        ctx, vocab = eng._ctx, eng._vocab
        t0 = time.perf_counter()
        lc.llama_perf_context_reset(ctx)
        chain = sampler_chain(self._sampling, eng.meta.n_vocab, eng._eog_ids)
        try:
            reuse = eng._reuse_prefix(self._prompt)
            reuse = Reuse(reuse.n_tokens, reuse.source, time.perf_counter() - t0)
            n_keep = reuse.n_tokens
            new = self._prompt[n_keep:]
            if not eng._prefill(self._prompt, n_keep, self._cancel):
                # Ctrl-C during a long prompt: stop before the first token.
                self.finish_reason = "cancelled"
                t = time.perf_counter()
                n_eval = len(eng._cache) - n_keep
                self.stats = self._stats(lc, chain, t0, t, 0.0, t, n_eval, reuse)
                return
            t_prefill = time.perf_counter()  # the save below is not prefill either
            eng._save_to_disk(self._prompt)

            # The hot loop: sample, piece, decode. Everything else is kept out of it or
            # made O(1): a reused one-token batch, cached pieces, bound locals.
            sample, accept = lc.llama_sampler_sample, lc.llama_sampler_accept
            decode, is_eog = lc.llama_decode, lc.llama_vocab_is_eog
            tok_arr = (lc.llama_token * 1)()
            batch = lc.llama_batch_get_one(tok_arr, 1)
            pieces = eng._pieces
            token_bytes = eng.token_bytes
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            forced, cancel, tokens, cache = self._forced, self._cancel, self.tokens, eng._cache
            max_tokens = self._max_tokens
            room = eng.n_ctx - len(cache)
            t_first = 0.0
            reason = "length"
            while len(tokens) < max_tokens:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if forced:
                    tok = forced.popleft()
                    accept(chain, tok)
                else:
                    tok = sample(chain, ctx, -1)
                    if is_eog(vocab, tok):
                        tokens.append(tok)
                        reason = "stop"
                        break
                tokens.append(tok)
                if not t_first:
                    t_first = time.perf_counter()
                piece = pieces.get(tok)
                text = utf8.decode(piece if piece is not None else token_bytes(tok))
                if text:
                    yield text
                if len(tokens) >= max_tokens:
                    break  # no need to evaluate a token nothing will follow
                if room <= 1:
                    reason = "length"  # the context is full
                    break
                tok_arr[0] = tok
                if decode(ctx, batch) != 0:
                    raise errors.BackendError(
                        "llama_decode failed during generation",
                        hint="the context may be full; raise --ctx",
                    )
                cache.append(tok)
                room -= 1
            tail = utf8.decode(b"", final=True)
            if tail:
                yield tail
            self.finish_reason = reason
            t_end = time.perf_counter()
            self.stats = self._stats(lc, chain, t0, t_prefill, t_first, t_end, len(new), reuse)
        finally:
            lc.llama_sampler_free(chain)

    def _stats(
        self,
        lc: ModuleType,
        chain: Any,
        t0: float,
        t_prefill: float,
        t_first: float,
        t_end: float,
        n_eval_prompt: int,
        reuse: Reuse,
    ) -> GenStats:
        pc = lc.llama_perf_context(self._engine._ctx)
        ps = lc.llama_perf_sampler(chain)
        n = len(self.tokens)
        prefill_s = t_prefill - t0 - reuse.seconds
        # Decode speed: tokens after the first, over the time after the first.
        decode_s = (t_end - t_first) if t_first else 0.0
        return GenStats(
            prompt_tokens=len(self._prompt),
            eval_prompt_tokens=n_eval_prompt,
            generated_tokens=n,
            ttft_ms=((t_first or t_end) - t0) * 1000,
            prefill_tok_s=n_eval_prompt / prefill_s if prefill_s > 0 else 0.0,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            decode_wall_ms=decode_s * 1000,
            llama_eval_ms=float(pc.t_eval_ms + pc.t_p_eval_ms),
            llama_sample_ms=float(ps.t_sample_ms),
            reused_tokens=reuse.n_tokens,
            reused_from=reuse.source,
            reuse_ms=reuse.seconds * 1000,
        )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n
