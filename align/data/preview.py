"""`align data preview`: a stage's data as the model will see it - templated examples with the trained
tokens highlighted (labels not -100) - and the row report of every file."""

from __future__ import annotations

from rich.text import Text

from align.console import console
from align.data.sft_data import encode_files
from align.tokens import IGNORE_INDEX


def preview(data, tokenizer, n: int) -> None:
    """Prints the first ``n`` training examples of ``data`` (a DataConfig) and the row reports of its
    train and eval files."""
    console.print("[bold]legend:[/] [bold green]trained tokens[/] / [dim]masked tokens (labels -100)[/]\n")
    reports = []
    for name, paths in (("train", data.train), ("eval", data.eval)):
        if not paths:
            continue
        examples, report = encode_files(paths, tokenizer, data, name)
        reports.append(report)
        for index, example in enumerate(examples[:n] if name == "train" else []):
            text = Text()
            for token, label in zip(example.input_ids, example.labels):
                text.append(tokenizer.decode([token]), style="bold green" if label != IGNORE_INDEX else "dim")
            console.rule(
                f"{name} example {index + 1}: {len(example.input_ids)} tokens, {example.trained_tokens} trained"
                + (" (truncated)" if example.truncated else "")
            )
            console.print(text)
    console.rule("row report")
    for report in reports:
        console.print(report.summary())
        for problem in report.problems[:10]:
            console.print(f"  [red]-[/] {problem}")
