"""The layers of docs/ARCHITECTURE.md, checked on the source: data flows top to bottom, never back up.

    cli -> pipeline -> recipe -> stages -> (data, models, losses, rollout, eval, rewards) -> utilities -> config

Every import counts, including those inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

from align.stages.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # (module prefix, rank): a module may import its own rank or lower
    ("align.cli", 6),
    ("align.pipeline", 5),
    ("align.standalone_eval", 5),
    ("align.recipe", 4),
    ("align.publish", 3),
    ("align.stages", 3),
    ("align.data", 2),
    ("align.models", 2),
    ("align.losses", 2),
    ("align.rollout", 2),
    ("align.eval", 2),
    ("reward_models", 2),
    ("align.artifacts", 1),
    ("align.model_card", 1),
    ("align.console", 1),
    ("align.faults", 1),
    ("align.tracking", 1),
    ("align.quiet", 1),
    ("align.config", 0),
    ("align.tokens", 0),
]
PACKAGE_RANK = 1  # align/__init__.py: a start-up hook (quiet.py), run before any other module
# Arrows against the layers that are known and have an issue; the list may only shrink.
KNOWN = {
    # the recipe schema checks rule names and options when a recipe is read; typed reward specs
    # (issue 14, item 2) move the spec types into config and this check up to the recipe layer
    ("align.config.rewards", "reward_models"),
}


def rank(module: str) -> int | None:
    if module == "align":
        return PACKAGE_RANK
    for prefix, value in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return value
    return None


def known(module: str, target: str) -> bool:
    return any(module == source and (target == prefix or target.startswith(prefix + ".")) for source, prefix in KNOWN)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in found if name.split(".")[0] in ("align", "reward_models")}


def sources() -> dict[str, set[str]]:
    files = [*(ROOT / "align").rglob("*.py"), *(ROOT / "reward_models").rglob("*.py")]
    return {module_name(path): imports(path) for path in files}


def test_no_import_goes_up_a_layer():
    wrong = []
    for module, targets in sources().items():
        assert rank(module) is not None, f"{module} is in no layer; add it to LAYERS (and to docs/ARCHITECTURE.md)"
        for target in targets:
            target_rank = rank(target)
            if target_rank is not None and target_rank > rank(module) and not known(module, target):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_known_exceptions_still_exist():
    """An exception that was fixed must leave KNOWN, so it cannot come back unnoticed."""
    table = sources()
    fixed = {(source, prefix) for source, prefix in KNOWN if not any(known(source, t) for t in table[source])}
    assert not fixed, f"fixed, remove from KNOWN: {fixed}"


def test_no_stage_imports_another_stage():
    """Stage files (the registry's runners) never import each other; they share code through the helper modules
    (common.py, preference.py, rollouts.py, rl_*.py, ranks.py, checkup.py)."""
    stage_modules = {entry.runs.partition(":")[0] for entry in REGISTRY.values()}
    table = sources()
    wrong = [
        f"{m} -> {t}"
        for m in stage_modules
        for t in table[m]
        if any(t == s or t.startswith(s + ".") for s in stage_modules - {m})
    ]
    assert not wrong, wrong


def test_config_and_registry_import_only_the_bottom():
    table = sources()
    assert {t for t in table["align.stages.registry"] if rank(t) != 0} == set()
    config = {m: targets for m, targets in table.items() if m == "align.config" or m.startswith("align.config.")}
    assert set(config) >= {"align.config", "align.config.rewards", "align.config.stages"}
    for module, targets in config.items():  # the package imports itself only; rewards also reads the rule names
        outside = {t for t in targets if not t.startswith(("align.config", "reward_models.rules"))}
        assert not outside, (module, outside)
        assert module == "align.config.rewards" or not {t for t in targets if t.startswith("reward_models")}, module


def test_the_middle_packages_point_one_way():
    """Within rank 2 the arrows go one way: models may read data (a tokenizer's chat template), data never
    imports models (it pads and masks token ids; what a model's attention accepts is models/attention.py);
    the maths (losses) imports no model, rollout, data or reward code; reward_models never imports the stages."""
    table = sources()

    def imports_of(prefix: str) -> set[str]:
        return {t for m, targets in table.items() if m == prefix or m.startswith(prefix + ".") for t in targets}

    assert not {t for t in imports_of("align.data") if t.startswith("align.models")}
    assert not {t for t in imports_of("align.losses") if t.startswith(("align.models", "align.rollout", "align.data"))}
    assert not {t for t in imports_of("reward_models") if t.startswith("align.stages")}


def test_rollout_engines_form_no_cycle():
    """engine.py (protocol, shared records) imports no engine; only engines.py knows them all."""
    table = sources()
    assert not {
        t
        for t in table["align.rollout.engine"]
        if t.startswith(("align.rollout.hf", "align.rollout.vllm", "align.rollout.server", "align.rollout.engines"))
    }
    engines = ("align.rollout.hf", "align.rollout.vllm", "align.rollout.server", "align.rollout.verify")
    for engine in (*engines, "align.rollout.scoring"):
        assert not {t for t in table[engine] if t.startswith("align.rollout.engines")}, engine
