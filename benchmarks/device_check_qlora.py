"""QLoRA checks that need CUDA (run by a session that is lent a GPU; this one was not).

1. lorakit's NF4 codes vs bitsandbytes' CUDA kernel (its decision-tree quantizer, not the torch path tested on
   CPU): packed codes equal, dequantized values equal (no double quant), absmax codes within one level (with).
2. NF4Linear on CUDA: forward and input gradient equal an nn.Linear holding the dequantized weight (fp32 1e-5,
   bf16 compute 1e-2); peak CUDA memory of fwd+bwd holds no second dense weight per layer.
3. LoRA on a bnb Linear4bit (CUDA) trains; gradients equal the torch backend's (1e-4).

Every check records ``ok`` and can fail; the script exits non-zero when one did.

Run: python benchmarks/device_check_qlora.py [OUT]   (default OUT: benchmarks/results/device_check_qlora.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.quant import NF4Linear, dequantized_weight
from lorakit.quant.bnb import to_bnb_linear4bit
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4


def codes_vs_bnb_cuda() -> dict:
    import bitsandbytes.functional as F

    out = {}
    for shape in [(576, 576), (1536, 576), (3, 577)]:
        w = torch.randn(shape, device="cuda") * 0.02
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        q = quantize_nf4(w)
        packed_dq, state_dq = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        q_dq = quantize_nf4(w, double_quant=True)
        out[str(shape)] = {
            "codes_equal": torch.equal(packed.reshape(-1), q.packed),
            "codes_differ_frac": (packed.reshape(-1) != q.packed).float().mean().item(),
            "values_equal": torch.equal(F.dequantize_4bit(packed, state), dequantize_nf4(q)),
            "dq_codes_equal": torch.equal(packed_dq.reshape(-1), q_dq.packed),
            "dq_absmax_max_code_diff": (state_dq.absmax.int() - q_dq.absmax.int()).abs().max().item(),
        }
        r = out[str(shape)]
        r["ok"] = r["codes_equal"] and r["values_equal"] and r["dq_codes_equal"] and r["dq_absmax_max_code_diff"] <= 1
    return out


def nf4linear_cuda() -> dict:
    torch.manual_seed(0)
    out = {}
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        layer = NF4Linear.from_linear(nn.Linear(576, 1536).cuda(), compute_dtype=dtype)
        ref = nn.Linear(576, 1536, device="cuda", dtype=dtype)
        with torch.no_grad():
            ref.weight.copy_(layer.dequantized_weight())
            ref.bias.copy_(layer.bias)
        x = torch.randn(4, 256, 576, device="cuda", dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        peak = _peak_extra(layer, x)
        ref_peak = _peak_extra(ref, x_ref)
        dense = 576 * 1536 * torch.finfo(dtype).bits / 8
        out[str(dtype)] = {
            "grad_max_diff": (x.grad - x_ref.grad).abs().max().item(),
            "grad_ok": torch.allclose(x.grad.float(), x_ref.grad.float(), atol=tol * 10, rtol=tol),
            "peak_extra_mib": peak / 2**20,
            "dense_linear_peak_extra_mib": ref_peak / 2**20,
            "dense_weight_mib": dense / 2**20,
            # at most one transient dense weight beyond what a plain Linear's fwd+bwd needs (no second copy)
            "memory_ok": peak <= ref_peak + dense,
        }
        out[str(dtype)]["ok"] = out[str(dtype)]["grad_ok"] and out[str(dtype)]["memory_ok"]
    return out


def _peak_extra(module: nn.Module, x: torch.Tensor) -> int:
    """Peak CUDA bytes allocated by a forward + backward of ``module`` on ``x``, above what was allocated before.

    One unmeasured pass first: the first matmul of a process allocates cuBLAS' workspace for good, which would land
    in whichever module ran first (the likely cause of the 2026-11-30 H200 run's 76.6 MiB for NF4Linear fp32, run
    first, vs 25.1 MiB for the dense layer).
    """
    module(x).float().pow(2).sum().backward()
    x.grad = None
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    module(x).float().pow(2).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def lora_on_bnb_cuda() -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(576, 576).cuda()
    results = {}
    for backend, layer in [("bnb", to_bnb_linear4bit(lin)), ("torch", NF4Linear.from_linear(lin))]:
        wrapped = lorakit.layers.wrap(layer)
        torch.manual_seed(1)
        wrapped.update_layer("a", r=8, lora_alpha=16, lora_dropout=0.0, init=False, use_rslora=False)
        wrapped.set_active(["a"])
        x = torch.randn(8, 576, device="cuda")
        wrapped(x).pow(2).sum().backward()
        results[backend] = (wrapped.lora_A["a"].weight.grad, dequantized_weight(layer, torch.float32))
    (ga, wa), (gb, wb) = results["bnb"], results["torch"]
    weight_diff, grad_diff = (wa - wb).abs().max().item(), (ga - gb).abs().max().item()
    return {"weight_max_diff": weight_diff, "lora_grad_max_diff": grad_diff, "ok": grad_diff <= 1e-4}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    sys.path.insert(0, str(Path(__file__).parent))
    from provenance import finish, provenance

    prov = provenance()
    report = {"device": torch.cuda.get_device_name(), "nf4linear": nf4linear_cuda()}
    try:
        report["codes_vs_bnb_cuda"] = codes_vs_bnb_cuda()
        report["lora_on_bnb"] = lora_on_bnb_cuda()
    except ImportError as exc:
        report["bnb"] = {"ok": False, "error": f"bitsandbytes is not installed: {exc}"}  # a check not run fails
    report["provenance"] = finish(prov)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "device_check_qlora.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = _failed(report)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def _failed(report: dict, path: str = "") -> list[str]:
    """Every entry of the report whose ``ok`` is False, by its path."""
    failed = [path or "report"] if report.get("ok") is False else []
    for key, value in report.items():
        if isinstance(value, dict):
            failed += _failed(value, f"{path}.{key}" if path else key)
    return failed


if __name__ == "__main__":
    main()
