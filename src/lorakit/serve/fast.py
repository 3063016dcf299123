"""`FastBatcher`: the serve scheduler with every forward pass run by `lorakit.inference.DecodeEngine`.

Same scheduling as `Batcher` (requests join between steps, each row with its own adapter), but the rows live in
the engine's static KV cache: a joining request is prefilled into the next free slot, a leaving one's slot is
filled by compaction, and a decode step is one engine call for the whole batch with one argmax for its greedy
rows. The transformers forward, ``DynamicCache`` splicing and `lorakit.route` are not used.
"""

from __future__ import annotations

import torch

from lorakit.inference import DecodeEngine
from lorakit.serve.batcher import Batcher
from lorakit.serve.request import Event, GenRequest, RowState
from lorakit.serve.sampling import TextStream, make_generator


class FastBatcher(Batcher):
    """A `Batcher` whose prefill and decode steps run on ``engine`` (built over the same model).

    Args:
        model: The served model (adapters are loaded into it by the registry, as with `Batcher`).
        tokenizer: Its tokenizer.
        engine: The decode engine; its ``max_batch`` caps ``max_batch_size`` and its ``max_len`` the context.
        **kwargs: `Batcher` options (``routed``, ``metrics``).
    """

    def __init__(self, model, tokenizer, *, engine: DecodeEngine, **kwargs) -> None:
        kwargs["max_batch_size"] = min(kwargs.get("max_batch_size", engine.max_batch), engine.max_batch)
        super().__init__(model, tokenizer, **kwargs)
        self.engine = engine
        self.context = min(self.context, engine.max_len)

    def _prefill(self, group: list[GenRequest]) -> None:
        """Prefill ``group`` into the engine's next slots; requests that finish at once leave again."""
        first = len(self._running)
        adapters = [r.adapter if self.routed else None for r in group]
        logits = self.engine.prefill([r.prompt_ids for r in group], adapters)  # (n, vocab)
        greedy = logits.argmax(-1).tolist()
        rows, alive = [], []
        for i, req in enumerate(group):
            if self.metrics:
                self.metrics.prompt_tokens(len(req.prompt_ids))
            row = RowState(req, TextStream(self.tokenizer, req.params.stop), make_generator(req.params.seed))
            row.pos = len(req.prompt_ids)
            rows.append(row)
            if not self._emit(row, logits[i], greedy[i]):
                alive.append(first + i)
        self._running.extend(rows)  # engine rows and scheduler rows line up
        if len(alive) < len(group):
            self._keep([*range(first), *alive])

    def _decode(self) -> None:
        rows = self._running
        try:
            logits = self.engine.decode(torch.tensor([r.last for r in rows]))  # (rows, vocab)
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
            for r in rows:
                self._finish(r.req, Event("", "error", error=f"{type(exc).__name__}: {exc}"))
            self._running = []
            self.engine.reset()
            return
        if self.metrics:
            self.metrics.batch(len(rows))
        greedy = logits.argmax(-1).tolist()  # one device-to-host copy for the whole batch
        alive = []
        for i, r in enumerate(rows):
            r.pos += 1
            if not self._emit(r, logits[i], greedy[i]):
                alive.append(i)
        if len(alive) < len(rows):
            self._keep(alive)

    def _keep(self, indices: list[int]) -> None:
        self._running = [self._running[i] for i in indices]
        self.engine.keep(indices)

    def _shutdown(self) -> None:
        super()._shutdown()
        self.engine.reset()
