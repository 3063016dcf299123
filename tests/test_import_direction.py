"""The import direction of STYLE.md: library layers never import transformers, nothing imports the CLI.

errors/config/routing/ops/quant (torch only) <- layers <- inject/state/adapters <- io <- models/train/serve <- cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
LEVELS = {
    "errors": 0, "config": 0, "routing": 0, "ops": 0, "quant": 0,
    "layers": 1,
    "inject": 2, "state": 2, "adapters": 2, "merging": 2, "model_state": 2,
    "io": 3, "arith": 3, "quant_merge": 3, "hub": 3, "model_card": 3,
    "default_targets": 0,
    "models": 4, "model_cache": 4, "hf_loading": 4, "model_placement": 4,
    "training": 4, "serve": 4, "plots": 4, "inference": 4,
    "__init__": 4,  # the public API re-exports (models, train and serve may use it)
    "export": 5, "runtimes": 5,  # GGUF / flat-PEFT export and the serving-runtime rules (use models)
    "commands": 6, "cli": 6,
    "__main__": 7,
}  # fmt: skip
HF_ALLOWED = 4  # from this level on, modules may import transformers
THIRD_PARTY_CORE = {"torch", "safetensors"}
# optional packages a core module may import lazily (inside a function, with an ImportError naming the extra)
LAZY_OPTIONAL = {"hub": {"huggingface_hub"}}


def _top(module_path: Path) -> str:
    rel = module_path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "lorakit":
                out += [f"lorakit.{a.name}" for a in node.names]
    return out


MODULES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_level():
    assert {_top(p) for p in MODULES} <= set(LEVELS), "add new top-level modules to LEVELS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_one_way(path):
    level = LEVELS[_top(path)]
    problems = []
    for name in _imports(path):
        root = name.split(".")[0]
        if root == "transformers" and level < HF_ALLOWED:
            problems.append(f"library layer imports {name}")
        if root != "lorakit":
            continue
        parts = name.split(".")
        target = "__init__" if len(parts) == 1 else parts[1]
        if target not in LEVELS:  # `from lorakit import load_model` style: a public name, i.e. the package API
            target = "__init__"
        if target in ("cli", "commands") and _top(path) not in ("cli", "commands", "__main__"):
            problems.append(f"imports the CLI ({name})")
        elif LEVELS[target] > level:
            problems.append(f"imports {name} (level {LEVELS[target]}) from level {level}")
    assert not problems, f"{path.relative_to(SRC)}: {problems}"


def test_core_needs_only_torch_and_safetensors():
    """The library core (levels below models) imports nothing third-party but torch and safetensors."""
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in MODULES:
        if LEVELS[_top(path)] >= HF_ALLOWED:
            continue
        roots = {n.split(".")[0] for n in _imports(path)} - stdlib - {"lorakit", "__future__"}
        roots -= LAZY_OPTIONAL.get(_top(path), set())
        assert roots <= THIRD_PARTY_CORE, f"{path.relative_to(SRC)} imports {roots - THIRD_PARTY_CORE}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def _top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` imported when the module itself is imported (not inside functions or TYPE_CHECKING)."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_no_module_imports_private_names_of_another():
    """`merging.py` once imported four private helpers of `adapters.py`: shared state gets a public home instead."""
    problems = []
    for path in MODULES:
        me = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and node.module != me:
                    problems.append(f"{me} imports {private} from {node.module}")
    assert not problems, problems


def test_submodules_import_each_other_without_cycles():
    """The direction rule inside packages too: module-level imports between lorakit modules form no cycle."""
    names = {_module_name(p): p for p in MODULES}
    graph: dict[str, set[str]] = {m: set() for m in names}
    for me, path in names.items():
        for module, imported in _top_level_imports(path):
            for target in [module, *(f"{module}.{n}" for n in imported)]:
                if target in names and target != me and not me.startswith(target + "."):
                    graph[me].add(target)  # a package's __init__ is its children's parent, not a dependency
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)
