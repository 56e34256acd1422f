"""The win-rate report: report.json (every number), report.md (a table and example pairs),
winrate.png (bars with 95% intervals) and the console table. Files are written atomically.

``report`` is the dict run_eval builds: policy, baselines, judges, sampling, prompts (with its
held-out ``sets``) and ``results``, one row per set x judge x baseline (the fields of
``winrate.summarize`` plus set, judge, baseline and position_bias). ``samples`` are the rows of
samples.jsonl. Each set gets its own table; with one set the tables read as before sets existed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rich import box
from rich.table import Table

from align.artifacts import write_atomic
from align.console import console

VERDICT = {1.0: "win", 0.5: "tie", 0.0: "loss"}


def write_report(folder: Path, report: dict, samples: list[dict], examples: int) -> None:
    write_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(folder / "report.md", markdown(report, samples, examples))
    plot(report, folder / "winrate.png")


def _interval(row: dict) -> str:
    return f"{row['win_rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def _fidelity(model: dict) -> str:
    """How far the engine's logprobs of its own answers were from the trainer's (vLLM); '' for hf."""
    m = model.get("engine_trainer_mismatch")
    if not m:
        return ""
    mean, worst = m["logprob_mismatch_mean"], m["logprob_mismatch_max"]
    return f" (engine vs trainer logprobs: mean {mean:.4f}, max {worst:.3f} per token)"


def _bias(row: dict) -> str:
    return "-" if row["position_bias"] is None else f"{row['position_bias']:.2f}"


def by_set(report: dict) -> dict[str, list[dict]]:
    """The result rows grouped by held-out set, in the report's order."""
    groups: dict[str, list[dict]] = {}
    for row in report["results"]:
        groups.setdefault(row.get("set", "held_out"), []).append(row)
    return groups


def markdown(report: dict, samples: list[dict], examples: int) -> str:
    policy, s, prompts = report["policy"], report["sampling"], report["prompts"]
    sets = prompts.get("sets", {})
    where = (
        "; ".join(f"`{name}` {info['n']} from {', '.join(info['files'])}" for name, info in sets.items())
        if len(sets) > 1
        else f"from {', '.join(prompts['files'])}"
    )
    lines = [
        f"# Win-rate of {policy['name']}",
        "",
        f"{prompts['n']} held-out prompts {where}. Sampling, the same for every model: "
        f"temperature {s['temperature']}, top_p {s['top_p']}, top_k {s['top_k']}, "
        f"at most {s['max_new_tokens']} new tokens, seed {s['seed']}.",
        "",
        f"- policy `{policy['name']}`: {policy['description']}; sampled by {policy['engine']}{_fidelity(policy)}",
        *(
            f"- baseline `{b['name']}`: {b['description']}; sampled by {b['engine']}{_fidelity(b)}"
            for b in report["baselines"]
        ),
    ]
    groups = by_set(report)
    for set_name, rows in groups.items():
        if len(groups) > 1:
            lines += ["", f"## Set `{set_name}` ({sets[set_name]['n']} prompts)"]
        lines += [
            "",
            "| judge | baseline | wins | ties | losses | win-rate [95% CI] | LC win-rate "
            "| length policy / baseline | position bias |",
            "|---|---|---:|---:|---:|---|---:|---|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['judge']} | {row['baseline']} | {row['wins']} | {row['ties']} | {row['losses']} "
                f"| {_interval(row)} | "
                f"{row['lc_win_rate']:.3f} | {row['policy_length']:.1f} / {row['baseline_length']:.1f} | {_bias(row)} |"
            )
    lines += [
        "",
        "Win-rate = (wins + ties / 2) / prompts; the interval resamples the prompts "
        f"({report['bootstrap']} bootstrap resamples). "
        "LC win-rate: the win-rate at equal answer length, from a logistic fit of the outcome on "
        "tanh(length difference / its std) "
        f"(AlpacaEval 2); lengths in {report['length_unit']}. Scores within {report['tie_margin']} are ties. "
        "Position bias: the share "
        "of prompts where a pairwise judge picked the same slot in both orders.",
    ]
    for baseline in report["baselines"]:
        name = baseline["name"]
        lines += ["", f"## Examples against {name}"]
        for sample in _examples(samples, examples, list(groups)):
            verdicts = "; ".join(_verdict(judge, by_baseline[name]) for judge, by_baseline in sample["judges"].items())
            lines += [
                "",
                f"### Prompt {sample['index'] + 1}" + (f" (set `{sample['set']}`)" if len(groups) > 1 else ""),
                "",
                _fenced(_prompt_text(sample["prompt"])),
                "",
                f"**policy ({policy['name']})**",
                "",
                _fenced(sample["policy"]),
                "",
                f"**baseline ({name})**",
                "",
                _fenced(sample["baselines"][name]),
                "",
                f"**verdict**: {verdicts}",
            ]
    return "\n".join(lines) + "\n"


def _examples(samples: list[dict], n: int, sets: list[str]) -> list[dict]:
    """The first n samples of each set (the first n overall with one set)."""
    if len(sets) <= 1:
        return samples[:n]
    return [s for name in sets for s in [x for x in samples if x.get("set") == name][:n]]


def _verdict(judge: str, detail: dict) -> str:
    outcome = VERDICT[detail["outcome"]]
    if "p_policy_wins" in detail:
        return f"{judge}: {outcome} (P(policy better) {detail['p_policy_wins']:.3f})"
    return f"{judge}: {outcome} ({detail['policy']:.3g} vs {detail['baseline']:.3g})"


def _prompt_text(messages: list[dict]) -> str:
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _fenced(text: str) -> str:
    """A code block that shows the text verbatim, whatever backticks it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def plot(report: dict, path: Path) -> None:
    """Horizontal bars, one per baseline x judge: win-rate with its 95% interval, the
    length-controlled win-rate as a diamond, and a line at 0.5 (as good as the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    several = len(by_set(report)) > 1
    labels = [f"{r['set'] + ': ' if several else ''}vs {r['baseline']}\n({r['judge']})" for r in rows]
    y = list(range(len(rows)))[::-1]  # first row on top
    rates = [r["win_rate"] for r in rows]
    errors = [[r["win_rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["win_rate"] for r in rows]]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(rows)), dpi=120)
    ax.barh(y, rates, xerr=errors, color="tab:blue", alpha=0.7, capsize=4, label="win-rate (95% CI)")
    ax.scatter([r["lc_win_rate"] for r in rows], y, marker="D", color="black", zorder=3, label="length-controlled")
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel(
        f"win-rate of {report['policy']['name']}\n({report['prompts']['n']} prompts; 0.5 = as good as the baseline)"
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")  # long names grow the image rather than being cut
    plt.close(fig)
    os.replace(tmp, path)


def short_labels(names: list[str], width: int = 16) -> dict[str, str]:
    """A short, unique label per name for an 80-column table: a path becomes its last part, a long
    name is cut; clashes get a number. Names that are already short stay as they are."""
    labels: dict[str, str] = {}
    for name in dict.fromkeys(names):
        short = name.rstrip("/").rsplit("/", 1)[-1] if "/" in name else name
        short = short if len(short) <= width else short[: width - 1] + "~"
        label, n = short, 2
        while label in labels.values():
            label, n = f"{short[: width - 2]}{n}", n + 1
        labels[name] = label
    return labels


def print_table(report: dict) -> None:
    """The win-rate table; judges and baselines named by long paths get short labels, and the full
    names are printed once above the table, so an 80-column terminal does not wrap any row."""
    rows = report["results"]
    groups = by_set(report)
    judges = short_labels([r["judge"] for r in rows], width=12)
    baselines = short_labels([r["baseline"] for r in rows], width=12)
    for kind, labels in (("judge", judges), ("baseline", baselines)):
        for name, label in labels.items():
            if label != name:
                console.print(f"[dim]{kind} {label} = {name}[/]", soft_wrap=True)
    for set_name, set_rows in groups.items():
        n = report["prompts"].get("sets", {}).get(set_name, {}).get("n", report["prompts"]["n"])
        named = f" of set {set_name}" if len(groups) > 1 else ""
        console.print(
            _table(
                f"win-rate of {report['policy']['name']} on {n} held-out prompts{named}", set_rows, judges, baselines
            )
        )
    console.print(
        "[dim]win: (wins + ties/2) / prompts; LC: length-controlled win-rate; length: mean answer tokens, "
        "policy/baseline; bias: how often a pairwise judge's verdict flipped with the answer order[/]"
    )


def _table(title: str, rows: list[dict], judges: dict[str, str], baselines: dict[str, str]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("judge", "baseline", "W/T/L", "win", "95% CI", "LC", "length", "bias"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        style = "green" if row["ci_low"] > 0.5 else "red" if row["ci_high"] < 0.5 else ""
        interval = f"{row['ci_low']:.3f}-{row['ci_high']:.3f}"
        table.add_row(
            judges[row["judge"]],
            baselines[row["baseline"]],
            f"{row['wins']}/{row['ties']}/{row['losses']}",
            f"{row['win_rate']:.3f}",
            f"[{style}]{interval}[/]" if style else interval,
            f"{row['lc_win_rate']:.3f}",
            f"{row['policy_length']:.0f}/{row['baseline_length']:.0f}",
            _bias(row),
        )
    return table
