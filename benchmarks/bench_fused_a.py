"""One matmul for the LoRA ``A`` of q/k/v (and gate/up) vs one per layer, side by side on the default model.

Both variants run on the same model with the same adapter weights and inputs; only `lorakit.layers.set_fused_a`
changes between them. Repetitions alternate (fused first on even repetitions, per-layer first on odd ones) after
one warm-up each, and each report is the median. Configs: r=16 on q,k,v,o and on all linear layers, dropout 0
(fusion needs it). Timed: a training step (forward + backward, batch 4 x 256, every position labelled; the
optimizer step is the same in both and left out) and a prompt forward without autograd (1 x 256). Every
repetition also checks that both variants give the same loss.

Run: python benchmarks/bench_fused_a.py [--reps 5] [--batch 4] [--seq 256] [--threads 1]
Writes benchmarks/results/fused_a.json and prints a Markdown table (ratio < 1: fusion is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.layers import set_fused_a
from lorakit.models import load_model

TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"], "all_linear": "all-linear"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, ids) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


@torch.no_grad()
def _prompt(model, ids) -> float:
    return model(input_ids=ids).logits[:, -1].float().sum().item()


def _timed(fn, model, ids, fused: bool) -> tuple[float, float]:
    set_fused_a(fused)
    _sync(ids.device)
    start = time.perf_counter()
    value = fn(model, ids)
    _sync(ids.device)
    return time.perf_counter() - start, value


def side_by_side(fn, model, ids, reps: int) -> dict:
    """Median seconds of ``fn`` with and without fusion, alternating which goes first."""
    times: dict[str, list[float]] = {"fused": [], "per_layer": []}
    for rep in range(reps + 1):  # repetition 0 warms both up and is not counted
        order = (True, False) if rep % 2 == 0 else (False, True)
        values = {}
        for fused in order:
            seconds, values[fused] = _timed(fn, model, ids, fused)
            if rep:
                times["fused" if fused else "per_layer"].append(seconds)
        if abs(values[True] - values[False]) > 1e-3 * max(1.0, abs(values[False])):
            raise RuntimeError(f"fused and per-layer results differ: {values}")
    fused, per_layer = statistics.median(times["fused"]), statistics.median(times["per_layer"])
    return {"fused_s": fused, "per_layer_s": per_layer, "ratio": fused / per_layer, "samples": times}


def run(config: str, reps: int, batch: int, seq: int, device: torch.device) -> dict:
    model, _ = load_model("smollm2-135m-instruct", device=device)
    lora = lorakit.LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS[config], lora_dropout=0.0, init_lora_weights=False
    )
    lorakit.add_adapter(model, lora)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    result = {"train_step": side_by_side(_train_step, model.train(), ids, reps)}
    result["prompt_forward"] = side_by_side(_prompt, model.eval(), ids[:1], reps)
    return result


def table(results: dict) -> str:
    lines = ["| config | measure | per-layer s | fused s | fused / per-layer |", "|---|---|---|---|---|"]
    for config, measures in results["configs"].items():
        for measure, r in measures.items():
            lines.append(f"| {config} | {measure} | {r['per_layer_s']:.4f} | {r['fused_s']:.4f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fused_a.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
        "reps": args.reps,
        "batch": args.batch,
        "seq": args.seq,
        "configs": {c: run(c, args.reps, args.batch, args.seq, device) for c in TARGETS},
    }
    set_fused_a(False)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
