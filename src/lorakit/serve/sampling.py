"""Per-request token choice (greedy, temperature, top-p with a seeded generator) and stop-string handling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

_MIN_TEMPERATURE = 1e-30  # below it sampling is the argmax anyway (ties aside)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability mass reaches ``top_p``.
        stop: Strings that end the output (not included in it).
        seed: Seed of this request's own ``torch.Generator`` (None: a random seed).
        ignore_eos: Go on past end-of-sequence tokens until ``max_tokens`` or a stop string (vLLM's
            ``ignore_eos``: a fixed output length, for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or from the OS when None): each request samples independently."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def choose_token(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token id from one row's next-token ``logits`` (vocab,)."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    # shifted so the largest is 0 before dividing: a tiny temperature sends the others to -inf, never to +inf/NaN;
    # floored where float32 still holds it (a denormal double such as 2e-313 would become a division by zero)
    temperature = max(params.temperature, _MIN_TEMPERATURE)
    scaled = (logits.float() - logits.max().float()) / temperature  # (vocab,), <= 0
    probs = torch.softmax(scaled, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= params.top_p  # mass before this token already enough
        drop[0] = False  # the most likely token always stays (a top_p below float32's range, e.g. 5e-324, is 0 here)
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


class TextStream:
    """Decodes a request's generated tokens into text deltas, holding back what could still become a stop string.

    A delta never contains a stop string or the start of one, nor a half-decoded UTF-8 character (U+FFFD at the
    end), so streamed and non-streamed outputs are the same text.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return ``(delta, hit_stop)``. After a stop hit the text is final."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        safe = len(self.text.rstrip("\ufffd"))
        safe -= max((k for s in self.stop for k in range(1, len(s)) if self.text[:safe].endswith(s[:k])), default=0)
        return self._take(safe), False

    def flush(self) -> str:
        """Whatever is still held back (the output ended without a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
