"""What each serving runtime does with a PEFT LoRA adapter: the rules behind ``lorakit check``.

Every rule was read from the runtime's own source, at the version named in `SOURCES`; a rule says what the
runtime does with a feature of the adapter: it ``rejects`` it (loading fails), ``ignores`` it (loads, then
serves something else than lorakit computes, usually without a word), ``needs a flag`` (the suggested command
line includes it), or the feature is ``handled`` by ``lorakit export`` (folded into the exported tensors).
An adapter can be served when no rule rejects or ignores one of its features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorakit.export.facts import AdapterFacts
from lorakit.models import EMBEDDED_HUB_IDS

REJECTS, IGNORES, NEEDS_FLAG, HANDLED, NOTE = "rejects", "ignores", "needs flag", "handled", "note"
BLOCKING = (REJECTS, IGNORES)

SOURCES = {
    "vllm": "vLLM, vllm-project/vllm@e745baf: vllm/lora/peft_helper.py (PEFTHelper), vllm/lora/models.py "
    "(expected target modules), LoRAConfig (max_lora_rank in 8..512, default 16)",
    "llama.cpp": "llama.cpp, ggml-org/llama.cpp@0b03ada convert_lora_to_gguf.py and @0650ea8 src/llama-adapter.cpp",
    "lorax": "LoRAX v0.12.1 (predibase/lorax@a7394ba): server/lorax_server/adapters/lora.py, models/model.py, "
    "models/flash_llama.py",
    "tgi": "TGI v3.3.7 (huggingface/text-generation-inference@db931fc): server/text_generation_server/adapters/"
    "lora.py, models/__init__.py",
    "peft": "PEFT >= 0.13 (the version lorakit's tests check against)",
}
RUNTIMES = tuple(SOURCES)
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
# Decoder-only families whose LoRA targets the runtimes list by the same names as Llama.
_LLAMA_LIKE = {"llama", "qwen2", "qwen3"}
_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_TARGETS = _PROJ | {"embed_tokens", "lm_head"}  # packed qkv_proj / gate_up_proj + embedding_modules
LORAX_TARGETS = _PROJ | {"lm_head"}  # flash_llama.ADAPTER_LAYERS
TGI_TARGETS = _PROJ | {"qkv_proj", "c_proj", "c_fc"}  # models/__init__.py adapter_layers


@dataclass(frozen=True)
class Rule:
    """One behaviour of one runtime: ``test(facts)`` returns the finding's text when it applies, else None."""

    runtime: str
    id: str
    severity: str
    test: Callable[[AdapterFacts], str | None]
    fix: str = ""


@dataclass(frozen=True)
class Finding:
    """A rule that applies to an adapter."""

    rule: Rule
    detail: str

    def line(self) -> str:
        fix = f" Fix: {self.rule.fix}" if self.rule.fix and self.rule.severity in BLOCKING else ""
        return f"[{self.rule.severity}] {self.rule.id}: {self.detail}.{fix}"


# ---- tests (each returns a sentence or None) --------------------------------------------------------------
def _modules_to_save(f: AdapterFacts) -> str | None:
    return f"modules_to_save={list(f.modules_to_save)} (full copies of modules)" if f.modules_to_save else None


def _dora(f: AdapterFacts) -> str | None:
    return "use_dora=true (DoRA magnitude vectors)" if f.use_dora else None


def _bias(f: AdapterFacts) -> str | None:
    if f.bias != "none" or f.lora_bias:
        return f"trained biases (bias={f.bias!r}, lora_bias={f.lora_bias})"
    return None


def _extra_tensors(f: AdapterFacts) -> str | None:
    return (
        f"{len(f.extra_tensors)} tensors that are not LoRA factors, e.g. {f.extra_tensors[0]}"
        if f.extra_tensors
        else None
    )


def _patterns(f: AdapterFacts) -> str | None:
    if f.rank_pattern or f.alpha_pattern:
        return f"per-module scaling rank_pattern={f.rank_pattern}, alpha_pattern={f.alpha_pattern}"
    return None


def _rslora(f: AdapterFacts) -> str | None:
    return "use_rslora=true (scale alpha/sqrt(r))" if f.use_rslora else None


def _scaling_global_r(f: AdapterFacts) -> str | None:
    """Runtimes that scale every module by the config's alpha / r lose rank_pattern and alpha_pattern."""
    found = _patterns(f)
    return f"{found}: it scales every module by the config's lora_alpha / r" if found else None


def _vllm_rank(f: AdapterFacts) -> str | None:
    if f.max_rank > VLLM_MAX_RANKS[-1]:
        return f"rank {f.max_rank} is above the largest --max-lora-rank vLLM accepts ({VLLM_MAX_RANKS[-1]})"
    return None


def _vllm_rank_flag(f: AdapterFacts) -> str | None:
    if VLLM_DEFAULT_MAX_RANK < f.max_rank <= VLLM_MAX_RANKS[-1]:
        return f"rank {f.max_rank} is above the default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}"
    return None


def _outside(allowed: set[str]) -> Callable[[AdapterFacts], str | None]:
    def test(f: AdapterFacts) -> str | None:
        if f.base_info is None or f.base_info.arch not in _LLAMA_LIKE:
            return None
        outside = sorted(f.targets - allowed)
        return f"targets {outside} are outside the modules it adapts ({sorted(allowed)})" if outside else None

    return test


def _partial_layers(f: AdapterFacts) -> str | None:
    if f.partial_targets:
        return (
            f"{sorted(f.partial_targets)} are adapted in some layers only (layers_to_transform); a module type "
            f"missing from any layer is dropped for all layers"
        )
    return None


def _unknown_arch(f: AdapterFacts) -> str | None:
    if f.base_info is None:
        return "the base model could not be resolved, so the target list was not checked (pass --model)"
    if f.base_info.arch not in _LLAMA_LIKE:
        return f"architecture {f.base_info.arch!r}: the target list was not checked"
    return None


def _gguf_targets(f: AdapterFacts) -> str | None:
    if f.base_info is None:
        return None
    missing = [m for m in f.modules if f.base_info.tensor_name(m) is None]
    if "lm_head" in f.targets and f.base_info.tied_output:
        missing.append("lm_head (tied to the token embedding in this base)")
    return f"modules with no GGUF tensor in architecture {f.base_info.arch!r}: {missing[:4]}" if missing else None


def _no_base_name(f: AdapterFacts) -> str | None:
    return "no base_model_name_or_path: AutoPeftModel cannot find the base" if f.base == "BASE" else None


_FLAT = "`lorakit export ADAPTER --to peft --out DIR` folds every module's scale into B"
_DROP = "retrain without it, or merge it (`lorakit merge`) and serve the merged model"
RULES: tuple[Rule, ...] = (
    Rule("vllm", "vllm-modules-to-save", REJECTS, _modules_to_save, _DROP),
    Rule("vllm", "vllm-dora", REJECTS, _dora, _DROP),
    Rule("vllm", "vllm-rank-limit", REJECTS, _vllm_rank, "resize it: `lorakit resize ADAPTER --rank 512 --out DIR`"),
    Rule("vllm", "vllm-max-lora-rank", NEEDS_FLAG, _vllm_rank_flag),
    Rule("vllm", "vllm-bias", NEEDS_FLAG, _bias),
    Rule("vllm", "vllm-targets", REJECTS, _outside(VLLM_TARGETS), "retrain with targets in the supported list"),
    Rule("vllm", "vllm-scaling-patterns", IGNORES, _scaling_global_r, _FLAT),
    Rule("vllm", "vllm-unchecked-arch", NOTE, _unknown_arch),
    Rule("llama.cpp", "llamacpp-modules-to-save", REJECTS, _modules_to_save, _DROP),
    Rule("llama.cpp", "llamacpp-dora", REJECTS, _dora, _DROP),
    Rule("llama.cpp", "llamacpp-bias", REJECTS, _bias, _DROP),
    Rule("llama.cpp", "llamacpp-extra-tensors", REJECTS, _extra_tensors, _DROP),
    Rule("llama.cpp", "llamacpp-targets", REJECTS, _gguf_targets, "retrain without those targets"),
    Rule("llama.cpp", "llamacpp-rslora", HANDLED, _rslora),
    Rule("llama.cpp", "llamacpp-scaling-patterns", HANDLED, _patterns),
    Rule("llama.cpp", "llamacpp-unresolved-base", NOTE, _unknown_arch),
    Rule("lorax", "lorax-modules-to-save", IGNORES, _modules_to_save, _DROP),
    Rule("lorax", "lorax-dora", IGNORES, _dora, _DROP),
    Rule("lorax", "lorax-bias", IGNORES, _bias, _DROP),
    Rule("lorax", "lorax-targets", IGNORES, _outside(LORAX_TARGETS), "retrain with targets in the supported list"),
    Rule("lorax", "lorax-partial-layers", IGNORES, _partial_layers, "adapt every layer of each target"),
    Rule("lorax", "lorax-scaling-patterns", IGNORES, _scaling_global_r, _FLAT),
    Rule("tgi", "tgi-modules-to-save", IGNORES, _modules_to_save, _DROP),
    Rule("tgi", "tgi-dora", IGNORES, _dora, _DROP),
    Rule("tgi", "tgi-bias", IGNORES, _bias, _DROP),
    Rule("tgi", "tgi-targets", IGNORES, _outside(TGI_TARGETS), "retrain with targets in the supported list"),
    Rule("tgi", "tgi-partial-layers", IGNORES, _partial_layers, "adapt every layer of each target"),
    Rule("tgi", "tgi-scaling-patterns", IGNORES, _scaling_global_r, _FLAT),
    Rule("peft", "peft-no-base-name", NOTE, _no_base_name),
)


def check(facts: AdapterFacts, runtime: str) -> list[Finding]:
    """Every rule of ``runtime`` that applies to the adapter, in table order."""
    if runtime not in SOURCES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    return [Finding(r, d) for r in RULES if r.runtime == runtime and (d := r.test(facts)) is not None]


def servable(findings: list[Finding]) -> bool:
    """True when no finding makes the runtime refuse the adapter or serve something else."""
    return not any(f.rule.severity in BLOCKING for f in findings)


def command(facts: AdapterFacts, runtime: str) -> str:
    """The command line that serves the adapter with ``runtime`` (flags follow from the findings)."""
    name, path, base = (
        facts.name,
        facts.path,
        EMBEDDED_HUB_IDS.get(facts.base.lower(), facts.base),
    )  # lorakit's names -> Hub ids
    gguf = facts.base_info.gguf_path if facts.base_info and facts.base_info.gguf_path else "BASE.gguf"
    if runtime == "vllm":
        rank = next((r for r in VLLM_MAX_RANKS if r >= facts.max_rank), VLLM_MAX_RANKS[-1])
        bias = " --enable-lora-bias" if _bias(facts) else ""
        return f"vllm serve {base} --enable-lora --lora-modules {name}={path} --max-lora-rank {rank}{bias}"
    if runtime == "llama.cpp":
        return (
            f"lorakit export {path} --to gguf --out {name}.gguf && "
            f"llama-server -m {gguf} --lora {name}.gguf   # or llama-cli ... --lora {name}.gguf"
        )
    if runtime == "lorax":
        return (
            f"lorax-launcher --model-id {base}   # then per request: "
            f'"parameters": {{"adapter_id": "{path}", "adapter_source": "local"}}'
        )
    if runtime == "tgi":
        return f"text-generation-launcher --model-id {base} --lora-adapters {name}={path}"
    return f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{path}")'
