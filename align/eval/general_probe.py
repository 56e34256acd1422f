"""The general-ability probe: what a stage cost the model outside its task (the alignment tax).

A stage that teaches one task can narrow the model: it forces the task's template onto questions
asked another way and forgets how to talk. The checkup's task prompts cannot see that. This probe
reads fixed reference texts of other kinds (align/data/general: chit-chat, worked word problems,
summaries, from held-out parts of installed data sets) and measures how likely the model finds their
answers: the mean log-likelihood per answer token, teacher-forced, so it needs no judge, no sampling
and no network, and it is exact and repeatable. It is measured for the stage's start, its end and the
base model; a fall from the start past checkup.max_general_drop (nats per token) raises the alarm.

Why log-likelihood: InstructGPT measured the tax on public benchmarks and reduced it by mixing the
pretraining objective back into PPO, i.e. by keeping the likelihood of general text; a falling
likelihood of good general answers is the same quantity measured directly, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.data.templating import Encoded
from align.tokens import IGNORE_INDEX

BUILTIN = Path(__file__).resolve().parent.parent / "data" / "general"


def probe_files(source: str) -> dict[str, Path]:
    """{kind: file}: 'builtin' is align/data/general/*.jsonl; a folder, its *.jsonl; a file, itself."""
    path = BUILTIN if source == "builtin" else Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"checkup.general: {path} holds no .jsonl files")
        return {f.stem: f for f in files}
    if not path.is_file():
        raise FileNotFoundError(f"checkup.general: {path} is neither 'builtin', a .jsonl file nor a folder of them")
    return {path.stem: path}


def probe_texts(source: str, tokenizer, max_rows: int) -> dict[str, list[Encoded]]:
    """{kind: encoded conversations} (labels on the answers only), the first max_rows of each file; a
    bad row stops the stage with the row report's message."""
    from align.config import DataConfig
    from align.data.sft_data import encode_files

    texts = {}
    for kind, path in probe_files(source).items():
        examples, report = encode_files([str(path)], tokenizer, DataConfig(max_length=256), f"general {kind}")
        report.raise_if_bad()
        texts[kind] = examples[:max_rows]
    return texts


def first_prompts(source: str) -> dict[str, list[dict]]:
    """{kind: the first row's first user turn}: what the checkup asks the start and the end to answer,
    so a reader sees what the numbers mean."""
    import json

    prompts = {}
    for kind, path in probe_files(source).items():
        with path.open(encoding="utf-8") as f:
            row = json.loads(f.readline())
        messages = row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}]
        prompts[kind] = [next(m for m in messages if m["role"] == "user")]
    return prompts


@torch.no_grad()
def log_likelihood(model, texts: dict[str, list[Encoded]], pad_id: int, precision: str, batch_size: int = 4):
    """{kind: mean log-likelihood per answer token} under the model as it is (adapter state included),
    and "mean": the mean over the kinds (each kind weighs the same, whatever its length).

    Logits are made only from the batch's first answer token on (``logits_to_keep``): a [B, T, V]
    tensor over a 49k vocabulary would be most of the probe's time and memory."""
    import torch.nn.functional as F

    from align.models.loading import autocast

    device = next(model.parameters()).device
    result = {}
    for kind, examples in texts.items():
        total, tokens = 0.0, 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in chunk], device=device)
            labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in chunk], device=device)
            mask = (
                torch.arange(width, device=device)[None]
                < torch.tensor([len(e.input_ids) for e in chunk])[:, None].to(device)
            ).long()
            first = int((labels != IGNORE_INDEX).float().argmax(-1).min())  # the earliest answer token in the batch
            keep = width - first + 1  # logits from the position that predicts it
            with autocast(precision):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            targets = labels[:, width - keep + 1 :]
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total -= nll.item()
            tokens += int((targets != IGNORE_INDEX).sum().item())
        result[kind] = total / max(tokens, 1)
    result["mean"] = sum(result.values()) / len(result)
    return result


def probe_reason(general: dict, max_drop: float) -> str | None:
    """The alarm's reason when the mean log-likelihood fell from the start by more than max_drop.

    >>> probe_reason({"before": {"mean": -1.20}, "after": {"mean": -1.50}}, 0.2)
    'general ability: log-likelihood of the reference texts fell from -1.200 to -1.500 nats per token (threshold -0.2)'
    >>> probe_reason({"before": {"mean": -1.20}, "after": {"mean": -1.30}}, 0.2) is None
    True
    """
    before, after = general["before"]["mean"], general["after"]["mean"]
    if before - after > max_drop:
        return (
            f"general ability: log-likelihood of the reference texts fell from {before:.3f} to {after:.3f} "
            f"nats per token (threshold -{max_drop})"
        )
    return None
