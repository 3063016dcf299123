"""GPU checks for lorakit, run on a CUDA machine (the device tool); every check also has a CPU twin in tests/.

Writes a JSON report to $OUT/device_check.json (or ./device_check.json) and prints one line per check.
The SmolLM2-135M architecture is built from its config.json with random weights (the GGUF file is too large
to carry there), which is enough for numerics, dtype handling and speed.

Run: PYTHONPATH=src python scripts/device_check.py --config-dir DIR_WITH_SMOLLM2_CONFIG_AND_TOKENIZER
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

import lorakit
from lorakit import LoraConfig

REPORT: dict = {}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def record(name: str, ok: bool, **info) -> None:
    REPORT[name] = {"ok": bool(ok), **info}
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {json.dumps(info, default=str)}", flush=True)


def guarded(fn):
    def run(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a device check reports every failure and goes on
            record(fn.__name__, False, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-1500:])

    return run


def _randomize(model, name="default", seed=0, scale=0.02):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(model, name).values():
            t.copy_((torch.randn(t.shape, generator=gen) * scale).to(t.device, t.dtype))


def _smollm(config_dir: Path, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).to(DEV).eval()


@guarded
def peft_parity_on_device(config_dir: Path, tmp: Path) -> None:
    from peft import PeftModel

    model = _smollm(config_dir)
    base = copy.deepcopy(model)
    lorakit.add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    _randomize(model)
    ids = torch.randint(0, 49152, (2, 64), device=DEV)
    with torch.no_grad():
        ours = model(ids).logits
        lorakit.save_adapter(model, tmp / "a")
        theirs = PeftModel.from_pretrained(base, tmp / "a").eval()(ids).logits
        diff = (ours - theirs).abs().max().item()
        lorakit.merge(model)
        merged = (model(ids).logits - ours).abs().max().item()
        lorakit.unmerge(model)
        back = (model(ids).logits - ours).abs().max().item()
    record(
        "peft_parity_on_device",
        diff < 1e-3 and merged < 1e-3 and back < 1e-4,
        peft_diff=diff,
        merge_diff=merged,
        unmerge_diff=back,
        tf32=torch.backends.cuda.matmul.allow_tf32,
    )


@guarded
def bf16_base_gets_fp32_adapters() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    model = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).train()
    lorakit.add_adapter(model, LoraConfig(r=8, target_modules="all-linear"))
    _randomize(model)
    ids = torch.randint(0, 256, (4, 32), device=DEV)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    dtypes = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    ok = all(g is not None and torch.isfinite(g).all() for g in grads) and dtypes == {"torch.float32"}
    record("bf16_base_gets_fp32_adapters", ok, loss=loss.item(), adapter_dtypes=sorted(dtypes), n_grads=len(grads))


@guarded
def autocast_grads_match_fp32(config_dir: Path) -> None:
    model = _smollm(config_dir).train()
    lorakit.add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    _randomize(model, scale=0.05)
    ids = torch.randint(0, 49152, (2, 128), device=DEV)

    def grads(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad]), loss.item()

    g32, l32 = grads(False)
    g16, l16 = grads(True)
    rel = ((g16 - g32).norm() / g32.norm()).item()
    record(
        "autocast_grads_match_fp32",
        rel < 0.05 and abs(l16 - l32) < 0.05,
        rel_grad_err=rel,
        loss_fp32=l32,
        loss_bf16=l16,
    )


@guarded
def compile_matches_eager(config_dir: Path) -> None:
    model = _smollm(config_dir)
    lorakit.add_adapter(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    _randomize(model)
    ids = torch.randint(0, 49152, (2, 64), device=DEV)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)
        start = time.perf_counter()
        out = compiled(ids).logits
        diff = (out - eager).abs().max().item()
    record("compile_matches_eager", diff < 1e-2, max_diff=diff, compile_s=time.perf_counter() - start)


def _median_time(fn, reps=7) -> float:
    fn()
    torch.cuda.synchronize() if DEV == "cuda" else None
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize() if DEV == "cuda" else None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# What the training-step check demands (it fails otherwise): lorakit's step no slower than this x PEFT's, peak
# memory no more than this x PEFT's, the same first loss (B = 0: both are the base model), and training that lowers
# the loss on the repeated batch.
MAX_STEP_RATIO = 1.10
MAX_PEAK_RATIO = 1.05
FIRST_LOSS_RTOL = 1e-2


def _train_step_run(make, base, ids) -> dict:
    """Time one adapter kind's bf16-autocast training step; the losses of its first and last steps."""
    model = make(copy.deepcopy(base)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    torch.cuda.reset_peak_memory_stats()
    step_s = _median_time(step)
    return {"step_s": step_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "first_loss": losses[0],
            "last_loss": losses[-1]}  # fmt: skip


@guarded
def train_step_vs_peft(config_dir: Path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = _smollm(config_dir)
    ids = torch.randint(0, 49152, (8, 512), device=DEV)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    kw = dict(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.05)
    out = {
        "lorakit": _train_step_run(lambda m: lorakit.add_adapter(m, LoraConfig(**kw)), base, ids),
        "peft": _train_step_run(lambda m: get_peft_model(m, PeftLoraConfig(**kw)), base, ids),
    }
    ours, theirs = out["lorakit"], out["peft"]
    ratio = ours["step_s"] / theirs["step_s"]
    peak_ratio = ours["peak_gib"] / theirs["peak_gib"]
    checks = {
        f"step time <= {MAX_STEP_RATIO}x PEFT's": ratio <= MAX_STEP_RATIO,
        f"peak memory <= {MAX_PEAK_RATIO}x PEFT's": peak_ratio <= MAX_PEAK_RATIO,
        "same first loss as PEFT": abs(ours["first_loss"] - theirs["first_loss"])
        <= FIRST_LOSS_RTOL * abs(theirs["first_loss"]),
        "loss went down": all(r["last_loss"] < r["first_loss"] for r in out.values()),
    }
    failed = [name for name, ok in checks.items() if not ok]
    record("train_step_vs_peft", not failed, **out, ratio=ratio, peak_ratio=peak_ratio, failed=failed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-dir", required=True, type=Path)
    parser.add_argument("--extra", nargs="*", default=[], help="names of extra checks (see EXTRA)")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    tmp = out_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    REPORT["env"] = {
        "device": DEV,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if DEV == "cuda" else None,
    }
    peft_parity_on_device(args.config_dir, tmp)
    bf16_base_gets_fp32_adapters()
    autocast_grads_match_fp32(args.config_dir)
    compile_matches_eager(args.config_dir)
    if DEV == "cuda":
        train_step_vs_peft(args.config_dir)
    for name in args.extra:
        EXTRA[name](args.config_dir, tmp)
    (out_dir / "device_check.json").write_text(json.dumps(REPORT, indent=2, default=str))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    failed = [name for name, r in REPORT.items() if isinstance(r, dict) and r.get("ok") is False]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


EXTRA: dict = {}

if __name__ == "__main__":
    main()
