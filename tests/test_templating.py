"""Prompt-masked labels (RELIABILITY 1-4): exactly the assistant turns are trained, each with its end token."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.data.formats import RowError
from align.data.templating import TemplateError, encode_conversation, encode_prompt
from align.tokens import IGNORE_INDEX

WORDS = [
    "hello",
    "the answer is 42",
    " spaced",
    "x",
    "émoji 🙂",
    "#### 7",
    "line\nbreak",
    "tool output {}",
    "assistant",
]


def labelled_runs(encoded):
    """Contiguous labelled spans, as token lists."""
    runs, current = [], []
    for label in encoded.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(st.sampled_from(WORDS))})
    for _ in range(draw(st.integers(1, 5))):
        messages.append({"role": "user", "content": draw(st.sampled_from(WORDS))})
        if draw(st.booleans()):
            messages.append({"role": "tool", "content": draw(st.sampled_from(WORDS))})
        # assistant text that also occurs in a user turn must still be located by position, not by search
        messages.append({"role": "assistant", "content": draw(st.sampled_from(WORDS))})
    return messages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_exactly_assistant_turns_are_trained(tokenizer, messages):
    encoded = encode_conversation(tokenizer, messages, max_length=4096)
    eos = tokenizer.eos_token
    # Each labelled span decodes to one assistant message followed by its end-of-turn token.
    decoded = [tokenizer.decode(run) for run in labelled_runs(encoded)]
    expected = [m["content"] + eos for m in messages if m["role"] == "assistant"]
    assert decoded == expected
    # labels equal input ids wherever they are set
    assert all(label == i for label, i in zip(encoded.labels, encoded.input_ids) if label != IGNORE_INDEX)
    # pad == eos in SmolLM2: every turn still has a labelled terminator
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert sum(label == tokenizer.eos_token_id for label in encoded.labels) == len(expected)


def test_prompt_ids_are_a_prefix_and_match_the_rollout_prompt(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4"},  # leading space: a BPE merge across the boundary would differ
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    encoded = encode_conversation(tokenizer, messages, max_length=4096)
    prompt = encode_prompt(tokenizer, messages[:1])
    assert encoded.input_ids[: len(prompt)] == prompt
    assert encoded.prompt_length == len(prompt)
    # the prompt of the second turn is a prefix too
    second = encode_prompt(tokenizer, messages[:3])
    assert encoded.input_ids[: len(second)] == second
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt)])


def test_real_multi_turn_conversations(tokenizer):
    rows = [json.loads(line) for line in (FIXTURES / "chitchat-30.jsonl").read_text().splitlines()]
    for row in rows:
        encoded = encode_conversation(tokenizer, row["messages"], max_length=100_000)
        trailing = row["messages"]
        while trailing[-1]["role"] != "assistant":
            trailing = trailing[:-1]
        expected = [m["content"] + tokenizer.eos_token for m in trailing if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in labelled_runs(encoded)] == expected


def test_exactly_one_bos(tokenizer):
    from conftest import TOKENIZER_DIR
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # SmolLM2: the template renders <|im_start|> (its BOS) and the tokenizer adds nothing
    ids = encode_conversation(tokenizer, messages, 512).input_ids
    assert ids[:2] == tokenizer("<|im_start|>system", add_special_tokens=False)["input_ids"][:2]
    # a tokenizer that adds a BOS by itself (Llama style) gets exactly one, whether or not its
    # template also renders bos_token
    adds_bos = AutoTokenizer.from_pretrained(TOKENIZER_DIR, add_bos_token=True, bos_token="<|endoftext|>")
    bos = adds_bos.bos_token_id
    assert adds_bos("a")["input_ids"][0] == bos
    for template in (adds_bos.chat_template, "{{ bos_token }}" + adds_bos.chat_template):
        adds_bos.chat_template = template
        for encoded in (encode_conversation(adds_bos, messages, 512).input_ids, encode_prompt(adds_bos, messages[:1])):
            assert encoded[0] == bos and encoded.count(bos) == 1


def test_template_that_is_not_prefix_stable_raises(tokenizer):
    original = tokenizer.chat_template
    try:
        # renders the number of messages first, so a longer conversation changes earlier text
        tokenizer.chat_template = "{{ messages|length }}" + original
        with pytest.raises(TemplateError):
            encode_conversation(
                tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 512
            )
    finally:
        tokenizer.chat_template = original


def test_truncation_keeps_trained_tokens_or_drops(tokenizer):
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    prompt_len = len(encode_prompt(tokenizer, long_answer[:1]))
    encoded = encode_conversation(tokenizer, long_answer, max_length=prompt_len + 5)
    assert encoded.truncated and len(encoded.input_ids) == prompt_len + 5 and encoded.trained_tokens == 5
    with pytest.raises(RowError) as err:
        encode_conversation(tokenizer, long_answer, max_length=prompt_len)
    assert err.value.reason == "prompt_too_long"
