"""Batch composition and packing (RELIABILITY 5, 6) on tiny Llama (RoPE) and GPT-2 (learned positions)."""

from __future__ import annotations

import torch
from conftest import load_tiny

from align.data.batching import PackedCollator, PaddingCollator, as_rows, pack
from align.data.templating import encode_conversation
from align.tokens import IGNORE_INDEX

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "user", "content": "Tell me a long story about a cat"},
        {"role": "assistant", "content": "Once upon a time a cat sat. " * 3},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "The end."},
    ],
]


def token_logprobs(model, batch) -> torch.Tensor:
    """Sum of log p(label) per row over labelled positions (labels shifted as in training)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def encoded(tokenizer):
    return [encode_conversation(tokenizer, chat, 512) for chat in CHATS]


def test_padding_side_and_batch_mates_do_not_change_results(tiny_model_dir, tokenizer):
    model = load_tiny(tiny_model_dir)
    examples = encoded(tokenizer)
    collate = PaddingCollator(tokenizer.pad_token_id)
    alone = torch.cat([token_logprobs(model, collate(as_rows([e]))) for e in examples])
    right = token_logprobs(model, collate(as_rows(examples)))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    # left padding, with position ids from the attention mask (what generation does)
    batch = collate(as_rows(examples))
    lengths = batch["attention_mask"].sum(-1)
    width = batch["input_ids"].shape[1]
    left = {k: torch.stack([torch.roll(row, int(width - n)) for row, n in zip(v, lengths)]) for k, v in batch.items()}
    left["position_ids"] = (left["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(token_logprobs(model, left), alone, atol=1e-5, rtol=0)


def test_padding_is_masked_by_length_not_by_token_id(tokenizer):
    # pad == eos: the trained eos must survive collation
    batch = PaddingCollator(tokenizer.pad_token_id)(as_rows(encoded(tokenizer)))
    eos = tokenizer.eos_token_id
    for row, example in zip(batch["labels"], encoded(tokenizer)):
        assert (row == eos).sum() == sum(label == eos for label in example.labels) > 0
        assert (row[len(example.labels) :] == IGNORE_INDEX).all()


def test_packing_equals_unpacked_and_isolates_examples(tiny_model_dir, tokenizer):
    model = load_tiny(tiny_model_dir)
    examples = encoded(tokenizer)
    rows = pack(examples, max_length=512)
    assert len(rows) == 1  # all three fit in one row
    row = rows[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == 3  # positions restart at every example
    packed = PackedCollator(tokenizer.pad_token_id)([row])
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
    # each example's logits inside the pack equal its logits alone
    bounds = starts + [len(row["input_ids"])]
    for a, b in zip(bounds, bounds[1:]):
        ids = torch.tensor([row["input_ids"][a:b]])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
        torch.testing.assert_close(packed_logits[a:b], alone, atol=1e-5, rtol=1e-5)
    # per-example loss: packed == unpacked (first label of each example is ignored in the pack)
    packed_lp = token_logprobs(model, packed)
    collate = PaddingCollator(tokenizer.pad_token_id)
    unpacked_lp = token_logprobs(model, collate(as_rows(examples))).sum()
    torch.testing.assert_close(packed_lp.sum(), unpacked_lp, atol=1e-4, rtol=0)


def test_changing_one_packed_example_leaves_the_others_bit_identical(tiny_model_dir, tokenizer):
    model = load_tiny(tiny_model_dir)
    examples = encoded(tokenizer)
    row = pack(examples, 512)[0]
    changed = dict(row, input_ids=list(row["input_ids"]))
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    # alter the first example's tokens (keep its length)
    for i in range(starts[0] + 1, starts[1]):
        changed["input_ids"][i] = 100 + i
    collate = PackedCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**{k: v for k, v in collate([row]).items() if k != "labels"}).logits[0]
        after = model(**{k: v for k, v in collate([changed]).items() if k != "labels"}).logits[0]
    assert not torch.equal(before[starts[0] : starts[1]], after[starts[0] : starts[1]])
    assert torch.equal(before[starts[1] :], after[starts[1] :])


def test_packed_rows_never_exceed_max_length(tokenizer):
    examples = encoded(tokenizer) * 7
    rows = pack(examples, max_length=128)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e.input_ids) for e in examples)
