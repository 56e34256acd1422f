"""Recipe schema: one pydantic model per stage, loaded from YAML with dotted overrides.

A recipe file has shared sections at the top (model, quantization, adapter, lora, train, data,
tracking, seed) and an ordered ``stages:`` map. A stage's resolved config is the shared sections
deep-merged with that stage's own section, then the command line's ``key=value`` overrides.
Unknown keys are errors with a suggestion; YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from align.artifacts import EVAL_PAIRS_FILE, NAME_PATTERN, PAIRS_FILE, stage_folder
from align.config import SHARED_SECTIONS, EvalConfig, RecipeError, SFTConfig, StageConfig, _Strict, stage_references
from align.stages.registry import POLICY_KINDS, REGISTRY, default_kind, kinds_making

# What each way of naming another stage needs it to make: (kinds that make it, what that is).
REFERENCE_KINDS = {
    "from": (POLICY_KINDS, "a policy to start from"),
    "reward from": (kinds_making("reward"), "a learned reward (a reward model)"),
    "data from": (kinds_making("pairs"), "preference pairs to train on"),
}

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "apply_override", "validate", "describe_fields"]


class Recipe(_Strict):
    name: str
    description: str = ""
    path: Path | None = None
    shared: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, dict[str, Any]]

    def stage_kind(self, stage: str) -> str:
        return self.stages[stage].get("kind", default_kind(stage))

    def resolve(self, stage: str, overrides: list[str] | None = None) -> StageConfig:
        """The stage's config: shared sections, then its own section, then ``key=value`` overrides."""
        if stage not in self.stages:
            raise RecipeError(f"{self._where()}: no stage '{stage}' (stages: {', '.join(self.stages) or 'none'})")
        merged = deep_merge(self.shared, self.stages[stage])
        merged.setdefault("kind", default_kind(stage))
        for override in overrides or []:
            apply_override(merged, override)
        kind = merged["kind"]
        if kind not in REGISTRY:
            raise RecipeError(
                f"{self._where()}: stage '{stage}' has kind '{kind}', which this version of align does not "
                f"implement yet (available: {', '.join(REGISTRY)})"
            )
        config = validate(REGISTRY[kind].schema, merged, where=f"{self._where()}, stage '{stage}'")
        earlier = list(self.stages)[: list(self.stages).index(stage)]
        for key, source in stage_references(config):
            if source not in earlier:
                raise RecipeError(
                    f"{self._where()}, stage '{stage}': {key}: {source} names no earlier stage (earlier: "
                    f"{', '.join(earlier) or 'none'})"
                )
            wanted, what = REFERENCE_KINDS.get(key, REFERENCE_KINDS["reward from"])
            if self.stage_kind(source) not in wanted:
                raise RecipeError(
                    f"{self._where()}, stage '{stage}': {key}: {source} is a {self.stage_kind(source)} stage, but "
                    f"{what} "
                    f"must come from a stage of kind {' or '.join(wanted)}"
                )
        if config.data.from_stage:
            self._read_pairs_of(config, stage)
        if isinstance(config, EvalConfig):
            trained = [s for s in earlier if self.stage_kind(s) in POLICY_KINDS]
            for key, name in [("policy", config.policy)] + [("baselines", b) for b in config.baseline_sources()]:
                if name is not None and name in self.stages and name not in earlier:
                    raise RecipeError(f"{self._where()}, stage '{stage}': {key}: {name} is not an earlier stage")
                if name in earlier and self.stage_kind(name) not in POLICY_KINDS:
                    raise RecipeError(
                        f"{self._where()}, stage '{stage}': {key}: {name} is a {self.stage_kind(name)} stage, "
                        f"not a policy that answers (kinds {', '.join(POLICY_KINDS)})"
                    )
            if config.policy is None:
                if not trained:
                    raise RecipeError(
                        f"{self._where()}, stage '{stage}': no policy to evaluate (set policy: <stage or folder>)"
                    )
                config.policy = trained[-1]
        return config

    def _read_pairs_of(self, config: StageConfig, stage: str) -> None:
        """`data: {from: sample}`: the sample stage's pairs become this stage's data files (its held-out
        pairs the eval files, unless the stage names its own). Files in the recipe's shared data section
        are not this stage's. The paths are in the resolved config."""
        own = self.stages[stage].get("data") or {}
        if own.get("train"):
            raise RecipeError(
                f"{self._where()}, stage '{stage}': give data.train or data.from ({config.data.from_stage}), not both"
            )
        folder = stage_folder(self.name, config.data.from_stage)
        config.data.train = [str(folder / PAIRS_FILE)]
        sampler = self.resolve(config.data.from_stage).data
        if not own.get("eval") and not own.get("eval_rows"):
            config.data.eval_rows = 0
            config.data.eval = [str(folder / EVAL_PAIRS_FILE)] if sampler.eval or sampler.eval_rows else []

    def dependencies(self, stage: str) -> list[str]:
        """The earlier stages whose artifacts this stage reads (from, reward from, eval's policy and baselines)."""
        config = self.resolve(stage)
        names = [source for _, source in stage_references(config)]
        if isinstance(config, EvalConfig):
            names += [n for n in [config.policy, *config.baseline_sources()] if n in self.stages]
        return list(dict.fromkeys(names))

    def validate_all(self) -> dict[str, StageConfig]:
        return {stage: self.resolve(stage) for stage in self.stages}

    def _where(self) -> str:
        return str(self.path) if self.path else f"recipe '{self.name}'"


def recipe_files(folder: str | Path = "recipes") -> list[Path]:
    """The recipes under a folder; recipes/accelerate/ holds accelerate launch configs, not recipes."""
    return sorted(p for p in Path(folder).rglob("*.yaml") if "accelerate" not in p.relative_to(folder).parts)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return recipe_from_dict(raw, path=path)


def recipe_from_dict(raw: dict[str, Any], path: Path | None = None) -> Recipe:
    raw = dict(raw)
    where = str(path) if path else "recipe"
    name = raw.pop("name", path.stem if path else "recipe")
    description = raw.pop("description", "")
    stages = raw.pop("stages", None)
    if not isinstance(stages, dict) or not stages:
        raise RecipeError(f"{where}: a recipe needs a non-empty 'stages:' mapping (e.g. stages: {{sft: {{}}}})")
    for key in raw:
        if key not in SHARED_SECTIONS:
            raise RecipeError(
                f"{where}: unknown key "
                f"'{key}'{_suggest(key, _known_keys(StageConfig) + ['name', 'description', 'stages'])}"
            )
    for what, value in [("name", name)] + [("stage name", stage) for stage in stages]:
        if not isinstance(value, str) or not NAME_PATTERN.match(value) or ".." in value:
            raise RecipeError(
                f"{where}: {what} {value!r} is not a plain name - use letters, digits, '-', '_' and '.', "
                "no '/' and no '..' (it becomes a folder under runs/)"
            )
    stages = {stage: (section or {}) for stage, section in stages.items()}
    recipe = Recipe(name=str(name), description=str(description), path=path, shared=raw, stages=stages)
    recipe.validate_all()
    return recipe


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` over ``base``, recursively. Shares nothing with either, so overrides
    applied to the result never leak into the recipe (a second resolve would see them)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(config: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as YAML (so 1e-4, true, [q_proj] get their types)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{override}' is not of the form key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    # yaml reads "1e-4" as a string (YAML 1.1); numbers like that are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    parts = key.strip().split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = value


def validate(schema: type[StageConfig], data: dict[str, Any], where: str) -> StageConfig:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        known = _known_keys(schema)
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'{_suggest(key, known)}")
            else:
                lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise RecipeError(f"{where}: " + "; ".join(lines)) from None


def _known_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        keys.append(prefix + (field.alias or name))
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


# Names users bring from transformers, TRL, peft and axolotl -> align's name for the same setting.
KEY_ALIASES = {
    "learning_rate": "lr",
    "lora_alpha": "alpha",
    "lora_r": "r",
    "rank": "r",
    "lora_dropout": "dropout",
    "epoch": "epochs",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "batch": "batch_size",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "warmup": "warmup_ratio",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "seq_len": "max_length",
    "steps": "max_steps",
    "optimizer": "optim",
    "scheduler": "lr_scheduler",
    "lr_scheduler_type": "lr_scheduler",
    "max_grad_norm_clip": "max_grad_norm",
}


def _suggest(key: str, known: list[str]) -> str:
    section, _, leaf = key.rpartition(".")
    if leaf in KEY_ALIASES:  # a known alias beats spelling similarity ('learning_rate' is not 'logging_steps')
        target = KEY_ALIASES[leaf]
        same_section = [k for k in known if k == (f"{section}.{target}" if section else target)]
        anywhere = [k for k in known if k.rpartition(".")[2] == target]
        if same_section or anywhere:
            return f" - did you mean '{(same_section or anywhere)[0]}'?"
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not matches:
        # 'alpha' or 'lora_alpha' written at the wrong level: match on the last part.
        leaf = key.split(".")[-1].replace("_", "")
        by_leaf = [k for k in known if k.split(".")[-1].replace("_", "") in (leaf, leaf.removeprefix("lora"))]
        matches = by_leaf[:1]
    return f" - did you mean '{matches[0]}'?" if matches else ""


def describe_fields(schema: type[BaseModel] = SFTConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field; used by `align recipes keys`."""
    rows = []
    for name, field in schema.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.extend(describe_fields(sub, prefix + name + "."))
        else:
            default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
            rows.append((prefix + (field.alias or name), field.description or "", default))
    return rows


def stage_only_fields() -> dict[str, list[tuple[str, str, Any]]]:
    """Per stage kind, the keys it has beyond the shared sections (dpo.*, reward.*, rollout.*, ...)."""
    shared = {key for key, _, _ in describe_fields(StageConfig)}
    return {
        kind: [row for row in describe_fields(entry.schema) if row[0] not in shared] for kind, entry in REGISTRY.items()
    }
