"""The architecture matrix: every causal-LM family people fine-tune, on a tiny random config, against PEFT.

Per family: ``target_modules=None`` selects exactly what PEFT selects (or both refuse, naming the choices); five
AdamW steps lower the loss; the saved adapter loads in real PEFT with the same logits; merged equals unmerged.
The README's table is this file's output (``benchmarks/results/arch_matrix.md``, rewritten when it changes).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
from arch_families import FAMILIES, build

import lorakit
from lorakit import ConfigError, LoraConfig, TargetNotFoundError
from lorakit.layers import LoraLayer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "arch_matrix.md"
START, END = "<!-- arch-matrix:start -->", "<!-- arch-matrix:end -->"
TOL = 1e-5


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(seed))  # (2, 12) token ids


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(1)).logits  # (2, 12, 64)


def _peft_default(family: str) -> list[str] | None:
    """The modules PEFT adapts with ``target_modules=None``; None where PEFT has no default for the family.

    peft 0.21 converts the config of transformers-v5 MoE models (Mixtral) before it looks up the default, so a
    None there ends up as "no targets" and fails; its table still names q_proj, v_proj for Mixtral, and that
    (resolved by PEFT itself) is what we compare with.
    """
    import peft
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    model = build(family)
    try:
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2))
    except ValueError:  # "Please specify `target_modules`" (or the MoE case above)
        if model.config.model_type not in TABLE:
            return None
        wrapped = peft.get_peft_model(
            build(family), peft.LoraConfig(r=2, target_modules=TABLE[model.config.model_type])
        )
    names = [n for n, m in wrapped.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    return sorted(names)


def _our_default(family: str) -> list[str] | None:
    try:
        return sorted(lorakit.find_targets(build(family), LoraConfig(r=2)))
    except TargetNotFoundError as e:
        assert "as in PEFT" in str(e) and "all-linear" in str(e)
        return None


def _train(model, steps: int = 5) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps + 1):
        loss = model(input_ids=_ids(), labels=_ids()).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return losses[0], losses[-1]


@functools.cache
def matrix_row(family: str) -> dict:
    """Runs every check of ``family``; returns its table row (the test functions assert on it)."""
    from peft import PeftModel

    ours, theirs = _our_default(family), _peft_default(family)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in ours}) if ours else None
    targets = leaves or "all-linear"
    torch.manual_seed(0)
    model = lorakit.add_adapter(build(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    first, last = _train(model)
    expected = _logits(model)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        peft_model = PeftModel.from_pretrained(build(family), tmp).eval()
        peft_diff = (_logits(peft_model) - expected).abs().max().item()
    lorakit.merge(model)
    merge_diff = (_logits(model) - expected).abs().max().item()
    adapted_names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    adapted = len(adapted_names)
    if isinstance(targets, str):  # show what "all-linear" selected
        targets = f"all-linear: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in adapted_names}))}"
    return {
        "family": family, "model_type": model.config.model_type, "ours": ours, "peft": theirs,
        "default": ", ".join(leaves) if leaves else "none: pass target_modules (PEFT refuses too)",
        "trained": targets if isinstance(targets, str) else ", ".join(targets), "adapted": adapted,
        "loss": (first, last), "peft_diff": peft_diff, "merge_diff": merge_diff,
    }  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_targets_equal_peft(family):
    row = matrix_row(family)
    assert row["ours"] == row["peft"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_lowers_the_loss_and_peft_loads_the_adapter(family):
    row = matrix_row(family)
    assert row["adapted"] > 0
    assert row["loss"][1] < row["loss"][0]
    assert row["peft_diff"] < TOL, f"PEFT's logits differ by {row['peft_diff']:.2e}"
    assert row["merge_diff"] < TOL, f"merged logits differ by {row['merge_diff']:.2e}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if "MoE" in f])
def test_fused_expert_parameters_get_a_clear_error(family):
    model = build(family)
    with pytest.raises(ConfigError, match=r"names parameters, not modules: .*experts\.gate_up_proj.*target_parameters"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj", "experts.gate_up_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # nothing was touched


def render_table() -> str:
    """The README table, from `matrix_row` of every family."""
    ok = "✓"
    lines = [
        "| family | model_type | `target_modules=None` (lorakit = PEFT) | trained (r=4) | 5 steps lower the loss "
        "| PEFT loads it, same logits | merged = unmerged |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        row = matrix_row(family)
        cells = [
            family, f"`{row['model_type']}`", row["default"], row["trained"],
            ok if row["loss"][1] < row["loss"][0] else "✗",
            ok if row["peft_diff"] < TOL else "✗", ok if row["merge_diff"] < TOL else "✗",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_readme_table_is_the_generated_one():
    table = render_table()
    if not RESULTS.is_file() or RESULTS.read_text(encoding="utf-8") != table:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table, encoding="utf-8")  # the committed file is what this test generates
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme, f"README.md needs the {START} ... {END} block"
    section = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == table.strip(), f"README's architecture matrix is stale: paste {RESULTS} between the markers"
