"""`DecodeEngine`: a static KV cache and a lean decode step over packed weights, each row with its own adapter.

The cache is allocated once, ``(layers, max_batch, kv_heads, max_len, head_dim)`` for keys and for values. Running
rows always occupy slots ``0..rows-1`` (`keep` compacts when rows leave), so a step's attention reads a view of
the cache, never a copy. Each row has its own length: a decode step writes each row's new key/value at that row's
position and masks columns past it, so rows of different lengths decode together without padding. Prompts are
prefilled right-padded into fresh slots (padding columns sit past the row's length: masked, then overwritten).

Prompts that start like an earlier prompt under the same adapter reuse that start's keys and values from a
`lorakit.inference.prefix.PrefixCache` and compute only the rest: a decode step over several new tokens per row
(each row's start copied into its slot, its own positions, a causal mask over the columns).

On CUDA the decode step is captured as a CUDA graph per batch shape and replayed (`lorakit.inference.graphs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.inference import llama, native
from lorakit.inference.adapters import ProjectionAdapters
from lorakit.inference.batch_adapters import BatchAdapters
from lorakit.inference.graphs import GRAPH_FORMATS, DecodeGraphs, GraphCaptureError
from lorakit.inference.prefix import PrefixCache
from lorakit.inference.weights import PackedWeight

log = logging.getLogger(__name__)


class DecodeEngine:
    """Fast batched prefill/decode of a Llama-family model with per-row (unmerged) adapters.

    Args:
        model: A transformers Llama-family causal LM, possibly with lorakit adapters (see `llama.unsupported_reason`).
        weights: Format of the frozen base weights (`lorakit.inference.weights.WEIGHT_FORMATS`); adapters stay fp32.
        max_batch: Most rows decoding together.
        max_len: Most tokens (prompt + generated) per row; default: the model's context, at most 4096.
        compile: ``torch.compile`` the decode step (measured on CPU, see the README; not with ``cuda_graphs``).
        cuda_graphs: Replay the decode step as CUDA graphs (`lorakit.inference.graphs`); default: on for a CUDA
            model with fp32/fp16/bf16 weights. The prefix cache, adapters and rows work as without.
        prefix_cache_mb: Memory for earlier prompts' keys and values (`lorakit.inference.prefix`), reused by
            prompts that start the same way under the same adapter; 0 turns the prefix cache off.

    Raises:
        ConfigError: The model is not one the fast path supports, or a bad size / format.
    """

    def __init__(
        self, model: nn.Module, *, weights: str = "fp32", max_batch: int = 8, max_len: int | None = None,
        compile: bool = False, prefix_cache_mb: float = 256.0, cuda_graphs: bool | None = None,
    ) -> None:  # fmt: skip
        reason = llama.unsupported_reason(model)
        if reason is not None:
            raise ConfigError(f"the fast decode path does not support this model: {reason}; use model.generate")
        context = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        max_len = min(context, 4096) if max_len is None else max_len
        if max_batch < 1 or not 1 < max_len <= context:
            raise ConfigError(f"max_batch must be >= 1 and max_len in 2..{context}, got {max_batch} and {max_len}")
        if not prefix_cache_mb >= 0:
            raise ConfigError(f"prefix_cache_mb must be >= 0 (0: off), got {prefix_cache_mb}")
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20))
        self.model, self.fmt, self.max_batch, self.max_len = model, weights, max_batch, max_len
        self.dims = llama.Dims.of(model)
        param = next(model.parameters())
        self.device = param.device
        self.embed = model.model.embed_tokens.weight.detach()
        self.lm_head = PackedWeight(model.lm_head.weight, getattr(model.lm_head, "bias", None), weights)
        self.final_norm = model.model.norm.weight.detach().float()
        self.blocks = [self._block(i, layer) for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]  # (1, T)
            cos, sin = model.model.rotary_emb(self.embed[:1].float()[None], positions)  # (1, T, D)
        self.cos, self.sin = cos[0].float(), llama.signed_sin(sin[0].float())  # (T, D); sin with signs folded in
        self.keys = self.values = torch.zeros(len(self.blocks), max_batch, self.dims.kv_heads, 0, self.dims.head_dim)
        self.rows: list[str | None] = []  # each running row's adapter (None: the base model)
        self.lengths: list[int] = []  # tokens in the cache per row
        self._born: list[int] = []  # per row, the adapters' epoch at its prefill (see `remember`)
        self._first = 0  # slot of row 0 (only `only_row` moves it)
        self.adapters = BatchAdapters(model, self.blocks, weights, self.prefix)
        self._step: Callable = torch.compile(self._decode_hidden, dynamic=True) if compile else self._decode_hidden
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not (on_cuda and weights in GRAPH_FORMATS and not compile):
            raise ConfigError(f"cuda_graphs needs a CUDA model with weights in {GRAPH_FORMATS} and compile=False; "
                              f"got device {self.device}, weights {weights!r}, compile={compile}")  # fmt: skip
        use = on_cuda and weights in GRAPH_FORMATS and not compile if cuda_graphs is None else cuda_graphs
        self.graphs: DecodeGraphs | None = DecodeGraphs(self) if use else None
        # decode steps through lorakit's fused C kernels (`lorakit.inference.native`) on a CPU that can build them
        self._native = self.device.type == "cpu" and not compile and native.library() is not None
        # int8 on such a CPU: every projection (and every re-pack) is a `native.Int8Weight`, so a whole layer per call
        self._fuse_layers = self._native and weights == "int8"

    def _block(self, index: int, layer: nn.Module) -> llama.Block:
        path = f"model.layers.{index}"
        mods = {key: [layer.get_submodule(p) for p in parts] for key, parts in llama.FUSED.items()}
        proj = {key: llama.fuse(m, self.fmt) for key, m in mods.items()}
        versions = {key: llama.weight_versions(m) for key, m in mods.items()}
        ln1 = layer.input_layernorm.weight.detach().float()
        ln2 = layer.post_attention_layernorm.weight.detach().float()
        none = ProjectionAdapters([], [])
        return llama.Block(path, ln1, ln2, proj, versions, dict.fromkeys(proj, none), dict.fromkeys(proj))

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weights one decode step reads (every projection and the LM head)."""
        return self.lm_head.nbytes + sum(p.nbytes for b in self.blocks for p in b.proj.values())

    def sync_adapters(self) -> None:
        """Bring the batch's adapter factors and the packed base weights up to date with the model.

        Cheap when nothing changed; runs before every prefill (`lorakit.inference.batch_adapters`).
        """
        self.adapters.sync(self.rows)

    def _reserve(self, length: int) -> None:
        """Grow the cache (doubling, up to max_len) to hold ``length`` columns; existing rows are kept."""
        have = self.keys.shape[3]
        if length <= have:
            return
        size = min(self.max_len, max(length, 2 * have, 256))
        shape = (*self.keys.shape[:3], size, self.dims.head_dim)
        keys, values = torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)
        keys[:, :, :, :have], values[:, :, :, :have] = self.keys, self.values
        self.keys, self.values = keys, values
        if self.graphs is not None:  # they read the old cache
            self.graphs.clear()

    # ---- rows ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every row (the cache memory stays allocated)."""
        self.rows, self.lengths, self._born = [], [], []

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only rows ``indices`` (in that order), moved to slots ``0..len-1``."""
        indices = list(indices)
        if indices != list(range(len(indices))):
            idx = torch.tensor(indices, device=self.device)
            self.keys[:, : len(indices)] = self.keys[:, idx]
            self.values[:, : len(indices)] = self.values[:, idx]
        self.rows = [self.rows[i] for i in indices]
        self.lengths = [self.lengths[i] for i in indices]
        self._born = [self._born[i] for i in indices]

    @contextmanager
    def only_row(self, index: int) -> Iterator[None]:
        """Inside the block the engine runs row ``index`` alone, in its own slot (a failure probe).

        Nothing a decode step does inside is kept: the row's length is restored, and the key/value column a step
        wrote sits past that length, where the next real step overwrites it.
        """
        saved = self.rows, self.lengths, self._born, self._first
        self.rows, self.lengths, self._born = [self.rows[index]], [self.lengths[index]], [self._born[index]]
        self._first += index
        try:
            yield
        finally:
            self.rows, self.lengths, self._born, self._first = saved

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> Tensor:
        """Add rows for ``prompts`` (token ids, each with its adapter); return next-token logits ``(n, vocab)``."""
        n, width, first = len(prompts), max(len(p) for p in prompts), len(self.rows)
        if first + n > self.max_batch:
            raise ConfigError(f"{first} rows run and {n} more do not fit max_batch={self.max_batch}")
        if min(len(p) for p in prompts) < 1 or width >= self.max_len:
            raise ConfigError(f"prompts need 1..{self.max_len - 1} tokens (max_len), got up to {width}")
        self.rows, self.lengths = self.rows + list(adapters), self.lengths + [len(p) for p in prompts]
        self._born = self._born + [-1] * n
        try:
            self.sync_adapters()
            self._born[first:] = [self.adapters.epoch] * n
            self._reserve(width)
            hidden, last = self._prefill_rows(prompts, adapters, first)  # (n, S, hidden), (n,)
        except BaseException:
            self.keep(range(first))
            raise
        for r, (prompt, adapter) in enumerate(zip(prompts, adapters)):  # offered to the prefix cache
            if adapter in self.adapters.broken:  # its rows ran without it (NaN logits): not its keys/values
                continue
            cols = slice(0, len(prompt))
            keys, values = self.keys[:, first + r, :, cols], self.values[:, first + r, :, cols]
            self.prefix.add(adapter, self.adapters.versions.get(adapter, ()), prompt, keys, values)
        return self._logits(hidden[torch.arange(n, device=self.device), last], adapters)  # (n, vocab)

    def _prefill_rows(
        self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None], first: int
    ) -> tuple[Tensor, Tensor]:
        """Fill slots ``first..`` with the prompts' keys/values; each row's hidden states and its last index.

        Rows whose prompt starts like a cached one copy that start into their slot and compute only the rest.
        """
        hits = [self.prefix.match(a, p) for p, a in zip(prompts, adapters)]
        starts = [m for m, _ in hits]
        rest = max(len(p) - m for p, m in zip(prompts, starts))
        if not any(starts) or max(starts) + rest > self.max_len:  # no reuse (or padding would pass max_len)
            width = max(len(p) for p in prompts)
            self.adapters.set_masks(adapters, repeat=width)
            ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], device=self.device)  # (n, S)
            return self._prefill_hidden(ids, first), torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        span = max(starts) + rest
        self._reserve(span)
        for r, (m, entry) in enumerate(hits):
            if entry is not None:
                self.keys[:, first + r, :, :m] = entry.keys[:, :, :m]
                self.values[:, first + r, :, :m] = entry.values[:, :, :m]
        self.prefix.hit_tokens += sum(starts)
        self.adapters.set_masks(adapters, repeat=rest)
        ids = torch.tensor([list(p[m:]) + [0] * (rest - len(p) + m) for p, m in zip(prompts, starts)],
                           device=self.device)  # fmt: skip
        start = torch.tensor(starts, device=self.device)
        hidden = self._extend_hidden(ids, start, span, first, causal_only=False)
        return hidden, torch.tensor([len(p) - m - 1 for p, m in zip(prompts, starts)], device=self.device)

    def remember(self, index: int, tokens: Sequence[int]) -> None:
        """Offer row ``index``'s keys/values to the prefix cache: a finished chat answer, reused by the next turn.

        ``tokens`` are the row's prompt and generated tokens; its cache holds the first ``lengths[index]`` of them
        (the last generated token was never fed back). Skipped when an adapter changed since the row's prefill
        (its keys/values would mix two versions) or its adapter is broken.
        """
        n, adapter = self.lengths[index], self.rows[index]
        if len(tokens) < n:
            raise ValueError(f"row {index} holds {n} tokens, {len(tokens)} given")
        if self._born[index] != self.adapters.epoch or adapter in self.adapters.broken:
            return
        cols, slot = slice(0, n), self._first + index
        keys, values = self.keys[:, slot, :, cols], self.values[:, slot, :, cols]
        self.prefix.add(adapter, self.adapters.versions.get(adapter, ()), list(tokens[:n]), keys, values)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Feed one token per running row (``(rows,)``); return the next-token logits ``(rows, vocab)``."""
        if any(length >= self.max_len for length in self.lengths):
            raise ConfigError(f"a row reached max_len={self.max_len}; stop it before the next decode step")
        self.adapters.set_masks(self.rows)
        pos = torch.tensor(self.lengths, device=self.device)  # (rows,)
        span = max(self.lengths) + 1
        self._reserve(span)
        hidden = self._graph_step(tokens.to(self.device), pos) if self.graphs is not None else None
        if hidden is None:
            hidden = self._step(tokens.to(self.device), pos, span, len(set(self.lengths)) == 1)
        self.lengths = [n + 1 for n in self.lengths]
        return self._logits(hidden, self.rows)

    def _graph_step(self, tokens: Tensor, pos: Tensor) -> Tensor | None:
        """The decode step through `graphs`; None (and graphs off from now on) if capturing fails.

        Only a failed capture falls back; an error while replaying a recorded graph is raised like any other.
        """
        try:
            return self.graphs.decode_hidden(tokens, pos)
        except GraphCaptureError as exc:  # a kernel that cannot be captured: decode eagerly from now on
            log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
            self.graphs = None
            return None

    def _logits(self, hidden: Tensor, rows: Sequence[str | None]) -> Tensor:
        logits = self.lm_head(llama.rms_norm(hidden, self.final_norm, self.dims.eps))  # (n, vocab)
        if self.adapters.broken:
            bad = [i for i, name in enumerate(rows) if name in self.adapters.broken]
            logits[bad] = float("nan")  # what these rows compute alone (see lorakit.inference.adapters)
        return logits

    # ---- the math -----------------------------------------------------------------------------------------
    def _prefill_hidden(self, ids: Tensor, first: int) -> Tensor:
        n, s = ids.shape
        x = self.embed[ids].float()  # (n, S, hidden)
        cos, sin = self.cos[None, None, :s], self.sin[None, None, :s]  # (1, 1, S, D)
        for i, block in enumerate(self.blocks):
            x = self._layer(i, block, x, cos, sin, slice(first, first + n), None)
        return x

    def _decode_hidden(self, tokens: Tensor, pos: Tensor, span: int, same_length: bool) -> Tensor:
        if self._native:  # on a CPU: lorakit's fused kernels
            return self._native_decode(self.embed[tokens].float(), pos, span, self._first)
        return self._extend_hidden(tokens[:, None], pos, span, self._first, causal_only=same_length)[:, 0]

    def _extend_hidden(self, ids: Tensor, start: Tensor, span: int, first: int, causal_only: bool) -> Tensor:
        """Hidden states of ``ids (rows, W)`` at positions ``start + 0..W-1`` over each row's cached columns.

        Rows sit in slots ``first..``; ``causal_only``: every row has the same length and W is 1, so each sees
        every column up to ``span`` and no mask is needed (SDPA gives the same numbers).
        """
        n, w = ids.shape
        x = self.embed[ids].float()  # (rows, W, hidden)
        pos = start[:, None] + torch.arange(w, device=start.device)  # (rows, W)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (rows, 1, W, D)
        mask = None
        if not causal_only:
            cols = torch.arange(span, device=pos.device)
            mask = (cols <= pos[..., None])[:, None]  # (rows, 1, W, span)
        # where each row's new keys/values go in a layer's cache viewed as (slots * Hkv * T, D)
        kv, size = self.dims.kv_heads, self.keys.shape[3]
        slots = torch.arange(first, first + n, device=pos.device)
        heads = torch.arange(kv, device=pos.device)
        where = ((slots[:, None, None] * kv + heads[None, :, None]) * size + pos[:, None]).reshape(-1)  # rows*Hkv*W
        for i, block in enumerate(self.blocks):
            x = self._layer(i, block, x, cos, sin, (where, span, first), mask)
        return x

    def _native_decode(self, x: Tensor, pos: Tensor, span: int, first: int) -> Tensor:
        """The decode step's hidden states, one token per row (``x (rows, hidden)`` at ``pos``), in lorakit's kernels.

        The same math as `_layer` with fewer, fused calls (`lorakit.inference.native`): RMSNorm in one call; the
        rotary embedding, the q layout and the cache writes of k and v in one; attention over each row's own
        ``pos + 1`` columns (no mask); per-row adapters computing only each row's own rank columns.
        """
        n, eps = x.shape[0], self.dims.eps
        cos, sin, valid = self.cos[pos], self.sin[pos], pos + 1  # (rows, D), (rows, D), (rows,)
        if self._fuse_layers:
            x = x.contiguous()  # a fresh tensor (the embedding lookup), updated in place layer by layer
            for i, block in enumerate(self.blocks):  # each layer in one call, the same kernels in the same order
                projs = [(block.proj[k].native, block.adapters[k], block.masks[k]) for k in llama.FUSED]
                native.decode_layer(x, block.ln1, block.ln2, eps, projs, cos, sin, self.keys[i], self.values[i],
                                    first, pos, valid, span)  # fmt: skip
            return x
        for i, block in enumerate(self.blocks):
            keys, values = self.keys[i], self.values[i]  # (slots, Hkv, T, D)
            qkv = block.linear("qkv", native.rms_norm(x, block.ln1, eps))
            q = native.rope_cache(qkv, cos, sin, keys, values, first, pos, span)  # (rows, H, D); k, v written
            attn = native.attend_one(q, keys[first : first + n, :, :span], values[first : first + n, :, :span], valid)
            x = x + block.linear("o", attn.view(n, -1))
            x = x + llama.mlp(block, native.rms_norm(x, block.ln2, eps))
        return x

    def _layer(
        self, i: int, block: llama.Block, x: Tensor, cos: Tensor, sin: Tensor, where: slice | tuple[Tensor, int],
        mask: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """One decoder layer.

        ``where`` is the prefill's slots (a slice), or a decode / extension's flat cache index, span and first slot.
        """
        n, s, hidden = x.shape
        q, k, v = llama.attention_inputs(block, self.dims, llama.rms_norm(x, block.ln1, self.dims.eps), cos, sin)
        keys, values = self.keys[i], self.values[i]  # (slots, Hkv, T, D)
        if isinstance(where, slice):  # prefill: fresh slots, positions 0..S-1
            keys[where, :, :s], values[where, :, :s] = k, v
            attn = llama.attend(q, k, v, None, causal=True)
        else:  # decode: one new column per row, at its own position
            index, span, lo = where
            d = self.dims.head_dim
            keys.view(-1, d).index_copy_(0, index, k.reshape(-1, d))
            values.view(-1, d).index_copy_(0, index, v.reshape(-1, d))
            attn = llama.attend(q, keys[lo : lo + n, :, :span], values[lo : lo + n, :, :span], mask, causal=False)
        x = x + block.linear("o", attn.reshape(n * s, -1)).reshape(n, s, hidden)
        h = llama.rms_norm(x, block.ln2, self.dims.eps).reshape(n * s, hidden)
        return x + llama.mlp(block, h).reshape(n, s, hidden)
