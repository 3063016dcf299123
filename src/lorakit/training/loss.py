"""Causal-LM loss that only computes logits where there is a label, a chunk of rows at a time.

With masked prompts most positions carry no loss, yet a plain forward projects every position onto the
whole vocabulary (49k x 576 for SmolLM2: a fifth of the model's FLOPs). Running the decoder, gathering the
labelled positions and applying the output head to those alone gives the same loss for less compute and
memory. Models whose head does more than a projection (logit soft-capping or scaling) use the plain path.

For text rows every position is labelled and the (n_labelled, vocab) logits are still the largest activation
of a step (8 x 256 rows x 49k fp32 = 400 MB, and the cross-entropy keeps a second copy plus their gradient).
A plain ``nn.Linear`` head therefore runs fused with the cross-entropy, ``CE_CHUNK_ROWS`` rows at a time: each
chunk's logits give its loss and, right away, the chunk's gradient with respect to the hidden states (and the
head weight when it trains), so only one chunk of logits ever exists and backward just scales the stored
gradients. Same math as the unchunked path, including under autocast (the head runs in the autocast dtype and
the cross-entropy in fp32, as ``head(h).float()`` would).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.training.data import IGNORE_INDEX

# Labelled positions per chunk of the fused head + cross-entropy; 0 turns chunking off (one head(...) call).
CE_CHUNK_ROWS = 1024


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, head)`` when logits are exactly ``head(decoder(...).last_hidden_state)``, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get_decoder is None or get_head is None or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    if getattr(config, "model_type", "") not in _PLAIN_HEAD_TYPES:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


# Families whose causal-LM head is a bare projection of the decoder's last hidden state.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo", "olmo2", "smollm3"})


def _is_plain_linear(head: torch.nn.Module) -> bool:
    """True when ``head(x)`` is exactly ``F.linear(x, head.weight, head.bias)`` (no wrapper, no hooks)."""
    return (
        isinstance(head, torch.nn.Linear)
        and type(head).forward is torch.nn.Linear.forward
        and not (head._forward_hooks or head._forward_pre_hooks)
    )


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(hidden @ weight.T + bias, labels)``, ``chunk`` rows at a time.

    Logits are computed in the dtype of ``hidden``/``weight``, the softmax in fp32. In fp32 the gradient is
    taken in forward from the logits already at hand (d(loss)/d(hidden) and, if the head trains, a fp32
    d(loss)/d(weight)) and backward only multiplies by the incoming scalar: no second pass over the vocabulary.
    In a lower precision that multiplication does not commute with rounding d(loss)/d(logits) to it, so backward
    recomputes each chunk's logits and rounds ``(softmax - onehot) * grad_out`` exactly as autograd would.
    Extra memory either way: one (chunk, vocab) fp32 block.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):  # noqa: D102 - see the class docstring
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.early = any(needs) and hidden.dtype == weight.dtype == torch.float32
        grads = _empty_grads(hidden, weight, bias, needs) if ctx.early else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight, bias).float()  # (chunk, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, labels[rows, None]).squeeze(1)).sum()
            if ctx.early:
                _accumulate(grads, rows, logits, lse, labels[rows], hidden, weight, None)
        ctx.chunk, ctx.needs = chunk, needs
        ctx.save_for_backward(*grads) if ctx.early else ctx.save_for_backward(hidden, weight, bias, labels)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        if ctx.early:
            return *(None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors), None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        grads = _empty_grads(hidden, weight, bias, ctx.needs)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = F.linear(hidden[rows], weight, bias).float()
            _accumulate(grads, rows, logits, torch.logsumexp(logits, dim=-1), labels[rows], hidden, weight, grad_out)
        g_h, g_w, g_b = grads
        return (
            g_h,
            None if g_w is None else g_w.to(weight.dtype),
            None if g_b is None else g_b.to(bias.dtype),
            None,
            None,
        )


def _empty_grads(hidden, weight, bias, needs) -> list[torch.Tensor | None]:
    """Buffers for d/d(hidden) (its dtype) and fp32 accumulators for d/d(weight), d/d(bias); None if not needed."""
    f32 = torch.float32
    return [
        torch.empty_like(hidden) if needs[0] else None,
        torch.zeros(weight.shape, dtype=f32, device=weight.device) if needs[1] else None,
        torch.zeros(bias.shape, dtype=f32, device=bias.device) if needs[2] else None,
    ]


def _accumulate(grads, rows, logits, lse, labels, hidden, weight, grad_out) -> None:
    """Add one chunk's gradients to ``grads``; ``logits`` (fp32) are overwritten by d(loss)/d(logits)."""
    d = logits.sub_(lse[:, None]).exp_()  # softmax, in place
    d[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    if grad_out is not None:
        d.mul_(grad_out)
    g_h, g_w, g_b = grads
    d_low = d.to(hidden.dtype)  # what autograd hands the head's backward: the fp32 gradient rounded once
    if g_h is not None:
        g_h[rows] = d_low @ weight
    if g_w is not None:  # products of the rounded values, summed in fp32
        g_w.addmm_(d_low.t().float(), hidden[rows].float())
    if g_b is not None:
        g_b.add_(d_low.float().sum(0))


def chunked_head_loss(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, reduction: str = "mean", chunk: int = 1024
) -> torch.Tensor:
    """``F.cross_entropy(head(hidden).float(), labels, reduction=reduction)`` without all the logits at once.

    Args:
        hidden: (n, hidden_size) states at the labelled positions.
        head: A plain ``nn.Linear`` output head (a tied embedding weight is fine).
        labels: (n,) target ids, none of them ``IGNORE_INDEX``.
        reduction: ``"mean"`` or ``"sum"``.
        chunk: Rows per chunk (> 0).
    """
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what autocast does to F.linear: both operands in its dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        total = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / labels.numel()
    raise ConfigError(f"reduction={reduction!r}: expected 'mean' or 'sum'")


def causal_lm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: str = "mean",
    split_head: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose (shifted) label is not ``IGNORE_INDEX``.

    Args:
        model: A Hugging Face causal LM (possibly LoRA-wrapped).
        batch: ``input_ids``, ``labels`` and ``attention_mask`` (padded) or ``position_ids`` (packed; see
            `lorakit.training.packing`), each (batch, seq).
        reduction: ``"mean"`` over learned tokens or ``"sum"``.
        split_head: Run the decoder and the head separately when that is exact (see the module docstring);
            False always calls ``model(...)`` (FSDP needs its root module's forward to run).
        chunk_size: Labelled positions per chunk of the fused head + cross-entropy on the split-head path
            (``None``: ``CE_CHUNK_ROWS``; 0: one unchunked ``head(...)`` call). Heads that are not a plain
            ``nn.Linear`` (an adapter on ``lm_head``, hooks) are never chunked.
    """
    labels = batch["labels"][:, 1:]  # (batch, seq-1): token t predicts label t+1
    keep = labels != IGNORE_INDEX
    parts = _split_head(model) if split_head else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], **_attention_inputs(batch)).last_hidden_state
        chunk = CE_CHUNK_ROWS if chunk_size is None else chunk_size
        if chunk > 0 and _is_plain_linear(head):
            return chunked_head_loss(hidden[:, :-1][keep], head, labels[keep], reduction, chunk)
        logits = head(hidden[:, :-1][keep])  # (n_learned, vocab)
    else:
        out = model(input_ids=batch["input_ids"], **_attention_inputs(batch))
        logits = out.logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)


def _attention_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``attention_mask`` of a padded batch, or ``position_ids`` of a packed one.

    From restarting position ids (and no 2-D mask) Hugging Face models build the block-diagonal mask, but only
    without a KV cache, so ``use_cache=False`` goes along (the models' default would create one).
    """
    if "position_ids" in batch and "attention_mask" not in batch:
        return {"position_ids": batch["position_ids"], "use_cache": False}
    return {"attention_mask": batch["attention_mask"]}
