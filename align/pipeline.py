"""`align run`: a recipe's stages in order, in one process, each passed its inputs by stage name.

    1. validate  - every stage's config (schema, `from:` names), every data file read and row-checked
                   with the model's tokenizer: a bad row stops the run before any stage starts
    2. plan      - per stage a fingerprint: the hash of its resolved config, its data files' contents
                   and its input stages' fingerprints; what to do with it:
                     skip    its folder holds a complete run with this fingerprint, made from the
                             input artifacts that are there now (their hashes are in its manifest)
                     resume  an interrupted run of this fingerprint: go on from its last complete
                             checkpoint (the attempt is recorded in runs/<recipe>/run.json first)
                     run     never run, or changed (config, data or an input stage): replaced
    3. run       - stage after stage; a stage downstream of one that runs always runs too

Only what changes a stage's artifacts is fingerprinted: logging, checkpoint and wandb keys are not,
so `train.save_steps=10` never re-trains anything. The base model is fingerprinted by its name and
revision, not its weights (hashing an 8B model on every run would cost minutes).
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.artifacts import config_changes, file_hash, flatten, stage_folder, write_atomic, written_by_align
from align.config import RecipeError, StageConfig, reward_specs
from align.console import console
from align.model_card import CARD_FILE
from align.recipe import Recipe
from align.stages.registry import REGISTRY

# Keys that change how a stage logs or checkpoints, not what it produces.
NOT_FINGERPRINTED = (
    "tracking.",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
)


@dataclass
class StagePlan:
    name: str
    kind: str
    config: StageConfig
    output: Path
    inputs: list[str]
    fingerprint: str
    rows: str = ""
    steps: str = ""
    action: str = "run"  # skip | resume | run
    reason: str = ""
    extra: dict = field(default_factory=dict)


class Pipeline:
    def __init__(self, recipe: Recipe, overrides: list[str] | None = None):
        self.recipe = recipe
        self.folder = stage_folder(recipe.name)
        self.overrides = overrides or []
        self.state_file = self.folder / "run.json"

    # 1 + 2. Validate and plan --------------------------------------------------------------------
    def plan(self, only: str | None = None, start: str | None = None, force: bool = False) -> list[StagePlan]:
        names = list(self.recipe.stages)
        for flag, name in (("--only", only), ("--from", start)):
            if name is not None and name not in names:
                raise RecipeError(f"{flag} {name}: no such stage (stages: {', '.join(names)})")
        configs = {name: self.recipe.resolve(name, stage_overrides(self.overrides, name, names)) for name in names}
        plans: dict[str, StagePlan] = {}
        for name in names:
            cfg = configs[name]
            inputs = self.recipe.dependencies(name)
            fingerprint = _fingerprint(cfg, {dep: plans[dep].fingerprint for dep in inputs})
            plans[name] = StagePlan(name, cfg.kind, cfg, self.folder / name, inputs, fingerprint)
        selected = [only] if only else names[names.index(start) :] if start else names
        tokenizers: dict = {}
        for name in names:
            plan = plans[name]
            plan.rows, plan.steps = describe_data(plan.config, tokenizers)
            if name not in selected:
                plan.action, plan.reason = "skip", "not selected"
                continue
            upstream = [dep for dep in plan.inputs if plans[dep].action in ("run", "resume")]
            plan.action, plan.reason = self._action(plan, force or bool(start), upstream)
        for (
            name
        ) in selected:  # a folder align would replace must be one align wrote: say so now, not after earlier stages
            plan = plans[name]
            if (
                plan.action != "skip"
                and plan.output.is_dir()
                and any(plan.output.iterdir())
                and not written_by_align(plan.output)
            ):
                raise RecipeError(
                    f"stage '{name}' writes to {plan.output}, which holds files align did not write; "
                    "move them away or rename the recipe (name:)"
                )
        for name in selected:  # a selected stage's inputs must be there when they are not run now
            for dep in plans[name].inputs:
                if plans[dep].action == "skip" and not _complete(plans[dep].output):
                    raise RecipeError(
                        f"stage '{name}' needs '{dep}', which has not finished ({plans[dep].output}); run it first "
                        f"(align run {self.recipe.path} --only {dep}) or drop --only/--from"
                    )
        return [plans[name] for name in names]

    def _action(self, plan: StagePlan, force: bool, upstream: list[str]) -> tuple[str, str]:
        manifest = _manifest(plan.output)
        recorded = (manifest.get("pipeline") or {}) if manifest else {}
        if force:
            return "run", "forced (--force/--from)"
        if upstream:
            return "run", f"input stage(s) {', '.join(upstream)} run first"
        if manifest and manifest.get("status") == "complete":
            if recorded.get("fingerprint") != plan.fingerprint:
                return "run", "changed since it ran: " + _config_changes(
                    plan
                ) if recorded else "finished outside align run; re-run to record its inputs"
            stale = [
                dep
                for dep, digest in (recorded.get("inputs") or {}).items()
                # the legacy hash (README inside: runs made before cards) only when the current one differs
                if digest != self._artifact_hash(dep) and digest != self._artifact_hash(dep, skip=())
            ]
            if stale:
                return "run", f"input stage(s) {', '.join(stale)} were re-made since it ran"
            return "skip", "up to date"
        if manifest and manifest.get("status") == "collapsed":  # never built on, never resumed: it would collapse again
            reasons = "; ".join((manifest.get("checkup") or {}).get("collapse") or [])
            return (
                "run",
                f"the collapse alarm stopped it last time ({reasons}); change its config or set checkup.alarm=false",
            )
        attempt = self._attempts().get(plan.name, {})
        if plan.output.exists() and attempt.get("fingerprint") == plan.fingerprint:
            return "resume", "interrupted; resuming from its last complete checkpoint"
        if plan.output.exists():
            return "run", "a different, unfinished run is in its folder; replaced"
        return "run", "not run yet"

    # 3. Run ----------------------------------------------------------------------------------------
    def run(self, plans: list[StagePlan]) -> None:
        from align.stages.common import process_state

        started = time.time()
        # Under torchrun every process runs this loop with the same plans; process 0 holds the lock and
        # writes the pipeline's state, and all of them finish a stage before any reads its outputs.
        state = process_state()
        state.wait_for_everyone()  # every process planned from the same files before any is written
        main = state.is_main_process
        console.quiet = console.quiet or not main  # process 0 prints for all of them
        if main:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = _exclusive_lock(self.folder / ".lock")
        for plan in plans:
            if plan.action == "skip":
                continue
            inputs = {dep: self._artifact_hash(dep) for dep in plan.inputs}
            if main:
                self._record_attempt(plan.name, plan.fingerprint)
            console.rule(f"[bold]stage {plan.name}[/] ({plan.kind}): {plan.action} - {plan.reason}")
            provenance = {
                "pipeline": {
                    "fingerprint": plan.fingerprint,
                    "inputs": inputs,
                    "recipe": str(self.recipe.path or self.recipe.name),
                }
            }
            run_stage(plan, self.recipe.name, resume=plan.action == "resume", provenance=provenance)
            state.wait_for_everyone()
            gc.collect()
            _release_freed_memory()
        if main:
            lock.close()
        console.rule(f"[bold green]align run {self.recipe.name}: done in {time.time() - started:.0f}s[/]")

    def _artifact_hash(self, stage: str, skip: tuple[str, ...] = (CARD_FILE,)) -> str | None:
        folder = self.folder / stage
        manifest = _manifest(folder)
        if not manifest or manifest.get("status") != "complete":
            return None
        artifact = folder / manifest.get("artifact", "adapter")
        # the model card is documentation: an eval stage adding its win-rates changes no artifact (runs made
        # before cards recorded the hash with peft's README in it: `skip=()` gives that one)
        return file_hash(artifact, skip=skip) if artifact.exists() else None

    def _attempts(self) -> dict:
        return (
            json.loads(self.state_file.read_text(encoding="utf-8")).get("stages", {})
            if self.state_file.is_file()
            else {}
        )

    def _record_attempt(self, stage: str, fingerprint: str) -> None:
        """Written before a stage starts, so a killed run knows which fingerprint it was making."""
        attempts = self._attempts()
        attempts[stage] = {"fingerprint": fingerprint, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_file, json.dumps({"recipe": self.recipe.name, "stages": attempts}, indent=2) + "\n")


def stage_overrides(overrides: list[str], stage: str, stages: list[str]) -> list[str]:
    """`sft.train.lr=1e-4` is for stage sft only (the prefix is dropped); `seed=1` is for every stage."""
    mine = []
    for override in overrides:
        head, _, rest = override.partition(".")
        if head in stages and "=" in rest:
            if head == stage:
                mine.append(rest)
        else:
            mine.append(override)
    return mine


def run_stage(plan: StagePlan, recipe_name: str, resume: bool, provenance: dict) -> Path:
    """One stage through the same function its own command calls; a fresh run replaces the folder
    (only ever a folder align wrote: prepare_run_folder refuses anything else)."""
    runner = REGISTRY[plan.kind].runner
    return runner(
        plan.config, plan.output, recipe_name=recipe_name, overwrite=not resume, resume=resume, provenance=provenance
    )


def describe_data(cfg: StageConfig, tokenizers: dict) -> tuple[str, str]:
    """(rows, work) for the plan, from the stage's own data loader: reading every row here is the
    validation - a bad row raises DataError naming file, row and field before any stage runs.
    Pairs a sample stage has yet to write are read (and checked) when this stage starts."""
    from align.models.loading import load_tokenizer
    from align.models.resolve import resolve_model

    if cfg.data.from_stage and not all(Path(p).exists() for p in [*cfg.data.train, *cfg.data.eval]):
        steps = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else "-"
        return f"pairs from {cfg.data.from_stage} (made when it runs)", steps

    key = (cfg.model.name, cfg.model.revision, cfg.model.chat_template)
    if key not in tokenizers:  # stages of one recipe share a model: one tokenizer load
        tokenizers[key] = load_tokenizer(cfg.model, resolve_model(cfg.model.name, cfg.model.revision))
    return REGISTRY[cfg.kind].planner(cfg, tokenizers[key])


def _fingerprint(cfg: StageConfig, inputs: dict[str, str]) -> str:
    config = {
        k: v
        for k, v in flatten(cfg.model_dump(mode="json", by_alias=True)).items()
        if not k.startswith(NOT_FINGERPRINTED)
    }
    if config.get("ptx.coef") == 0:  # ptx off trains as before the term existed: keep those runs' fingerprints
        config = {k: v for k, v in config.items() if not k.startswith("ptx.")}
    # Pairs made by an input stage are not hashed as data: its fingerprint and artifact hash cover them
    # (hashing them would change this fingerprint between the plan that makes them and the next run).
    made = [
        p
        for p in [*cfg.data.train, *cfg.data.eval]
        if cfg.data.from_stage and Path(p).parent.name == cfg.data.from_stage
    ]
    ptx_files = getattr(getattr(cfg, "ptx", None), "data", [])  # an RL stage's ptx term reads them too
    files = {
        path: file_hash(Path(path))
        for path in [*cfg.data.train, *cfg.data.eval, *ptx_files]
        if Path(path).exists() and path not in made
    }
    # A Python reward's file is part of what the stage computes: editing it reruns the stage.
    from reward_models.python import function_file

    files_of_code = [function_file(spec.function) for spec in reward_specs(cfg) if spec.type == "python"]
    code = {str(path): file_hash(path) for path in files_of_code if path is not None and path.is_file()}
    parts = {
        "config": config,
        "data": files,
        "inputs": inputs,
        **({"code": code} if code else {}),
    }  # old runs keep theirs
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _config_changes(plan: StagePlan) -> str:
    """Which keys differ from the config the finished run saved (config.yaml), for the plan."""
    import yaml

    saved = plan.output / "config.yaml"
    if not saved.is_file():
        return "config"
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    changed = config_changes(old, plan.config.model_dump(mode="json", by_alias=True), ignore=NOT_FINGERPRINTED)
    if not changed:
        return "data files, a Python reward's file or an input stage changed"
    return ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")


def _manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _complete(folder: Path) -> bool:
    manifest = _manifest(folder)
    return bool(manifest and manifest.get("status") == "complete")


def _exclusive_lock(path: Path):
    """One `align run` per recipe folder at a time; the OS drops the lock when the process dies,
    even by SIGKILL, so a killed run never leaves a stale lock behind."""
    import fcntl

    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RecipeError(f"another align run is using {path.parent}; wait for it to finish") from None
    return handle


def _release_freed_memory() -> None:
    """Give what the finished stage freed back to the system before the next one starts: the GPU's
    cached blocks, and on Linux the C heap's free pages, which glibc otherwise keeps for the process
    (malloc_trim is glibc's own call for this; its share of the quickstart's 8.3 -> 6.3 GB is not
    measured apart from the KV-cache sizing that came with it)."""
    import ctypes
    import sys

    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def print_plan_table(recipe: Recipe, plans: list[StagePlan]) -> None:
    from rich.table import Table

    table = Table(title=f"align run {recipe.path or recipe.name}", title_justify="left")
    for column in ("stage", "kind", "inputs", "data", "work", "last took", "action", "why"):
        table.add_column(column, overflow="fold")
    style = {"skip": "dim", "resume": "yellow", "run": "bold green"}
    for plan in plans:
        seconds = (_manifest(plan.output) or {}).get("seconds")  # the last finished run of this stage: an estimate
        table.add_row(
            plan.name,
            plan.kind,
            ", ".join(plan.inputs) or "-",
            plan.rows,
            plan.steps,
            f"{seconds:.0f}s" if seconds else "-",
            f"[{style[plan.action]}]{plan.action}[/]",
            plan.reason,
        )
    console.print(table)
    model = plans[0].config.model.name
    console.print(f"model: {model}; outputs: {stage_folder(recipe.name)}/<stage>/")
