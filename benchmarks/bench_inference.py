"""Inference overhead of an unmerged adapter, measured round by round: the issue-#5 inference table with its range.

Four models on the embedded default model, r=16 q,k,v,o with random (non-zero) adapter weights: the base,
lorakit unmerged, lorakit merged, PEFT unmerged. Each round times, for every model, one prompt forward (4 prompts)
and one greedy ``generate`` of ``new_tokens`` tokens; the order of the models rotates from round to round, and
each model's time is divided by the base's time of the same round. Reported: the median and the range of those
per-round ratios over all rounds (the first round warms up and is dropped), so a noisy machine shows as a wide
range instead of a misleading single number. Used by ``bench_issue5.py --inference-only``.
"""

from __future__ import annotations

import copy
import time

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODELS = ("base", "lorakit", "lorakit_merged", "peft")
PROMPT = "Write a haiku about autumn leaves falling in the quiet forest at dusk."


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _models(device: str):
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    import lorakit
    from lorakit.models import load_model

    base, tok = load_model("smollm2-135m-instruct")
    base.to(device).eval()
    ours = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN))
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(ours, "default").values():
            t.normal_(0, 0.01)
    merged = copy.deepcopy(ours)
    lorakit.merge(merged)
    theirs = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=16, lora_alpha=32, target_modules=ATTN))
    with torch.no_grad():  # random non-zero adapters on both sides (timing should not depend on values)
        for name, t in theirs.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                t.normal_(0, 0.01)
    models = {"base": base, "lorakit": ours.eval(), "lorakit_merged": merged.eval(), "peft": theirs.eval()}
    return models, tok


def worker(threads: int, rounds: int, new_tokens: int, device: str) -> dict:
    """Time every model ``rounds`` times (after one warm-up round); returns raw times and per-round ratios."""
    import torch

    torch.set_num_threads(threads)
    models, tok = _models(device)
    ids = tok([PROMPT] * 4, return_tensors="pt").to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    times: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("forward", "generate") for m in MODELS}
    with torch.no_grad():
        for rnd in range(rounds + 1):  # round 0 warms up
            order = MODELS[rnd % len(MODELS) :] + MODELS[: rnd % len(MODELS)]
            for m in order:
                _sync(device)
                start = time.perf_counter()
                models[m](**ids)
                _sync(device)
                mid = time.perf_counter()
                models[m].generate(**ids, **kw)
                _sync(device)
                if rnd:
                    times[f"forward_{m}"].append(mid - start)
                    times[f"generate_{m}"].append(time.perf_counter() - mid)
    ratios = {
        f"{k}_{m}": [t / b for t, b in zip(times[f"{k}_{m}"], times[f"{k}_base"])]
        for k in ("forward", "generate")
        for m in MODELS[1:]
    }
    return {"seconds": times, "ratio_to_base_same_round": ratios}
