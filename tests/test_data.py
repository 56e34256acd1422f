"""Data layer: file types, formats, the row report and strict mode (RELIABILITY 8-10)."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, write_jsonl

from align.config import DataConfig
from align.data.loading import DataError
from align.data.sft_data import encode_files, load_sft_data
from align.tokens import IGNORE_INDEX

ROWS = {
    "messages": {
        "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    },
    "prompt_completion": {"prompt": "Name a colour.", "completion": "Blue."},
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
}


def write_as(path_stem, suffix, rows):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path = path_stem.with_suffix(suffix)
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pyarrow.parquet.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".csv":
        pyarrow.csv.write_csv(pa.Table.from_pylist(rows), path)
    elif suffix == "":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ""])
def test_every_format_in_every_file_type_gives_the_same_ids(tmp_path, tokenizer, fmt, suffix):
    if suffix == ".csv" and fmt == "messages":
        pytest.skip("csv holds flat columns only")
    path = write_as(tmp_path / "rows", suffix, [ROWS[fmt]] * 3)
    examples, report = encode_files([str(path)], tokenizer, DataConfig(), "train")
    reference, _ = encode_files(
        [str(write_as(tmp_path / "ref", ".jsonl", [ROWS["messages"]]))], tokenizer, DataConfig(), "ref"
    )
    assert report.read == 3 and report.kept == 3
    assert examples[0].input_ids == reference[0].input_ids
    assert examples[0].labels == reference[0].labels


def poison_file(tmp_path):
    good = ROWS["prompt_completion"]
    lines = [
        json.dumps(good),  # row 1 ok
        json.dumps({"prompt": None, "completion": "x"}),  # row 2 None field
        json.dumps({"messages": []}),  # row 3 wrong format for this file
        json.dumps({"prompt": "hi", "completion": "   "}),  # row 4 empty completion
        '{"prompt": "broken json',  # row 5 bad JSON
        json.dumps({"prompt": [{"role": "wizard", "content": "hi"}], "completion": "x"}),  # row 6 unknown role
        json.dumps({"prompt": "long " * 400, "completion": "x"}),  # row 7 over-long prompt
        json.dumps({"prompt": "hi", "completion": "long " * 400}),  # row 8 truncated, kept
        json.dumps(good),  # row 10 (row 9 is broken UTF-8)
    ]
    path = tmp_path / "poison.jsonl"
    raw = (
        "\n".join(lines[:8]).encode()
        + b"\n"
        + b'{"prompt": "\xff\xfe", "completion": "x"}\n'
        + lines[8].encode()
        + b"\n"
    )
    path.write_bytes(raw)
    return path


def test_poison_file_report_accounts_for_every_row(tmp_path, tokenizer):
    path = poison_file(tmp_path)
    examples, report = encode_files([str(path)], tokenizer, DataConfig(max_length=128, on_bad_rows="skip"), "train")
    assert report.read == 10
    assert report.kept == 2 and report.truncated == 1
    assert dict(report.dropped) == {
        "missing_field": 2,
        "empty_field": 1,
        "unreadable": 2,
        "unknown_role": 1,
        "prompt_too_long": 1,
    }
    assert report.read == report.kept + report.truncated + sum(report.dropped.values())
    assert len(examples) == 3 and all(e.trained_tokens > 0 for e in examples)
    where = {(p.row, p.field) for p in report.problems}
    assert {(2, "prompt"), (3, "prompt"), (4, "completion"), (5, "<row>"), (6, "prompt[0].role"), (9, "<row>")} == where


def test_strict_mode_names_file_row_and_field_before_training(tmp_path, tokenizer):
    path = poison_file(tmp_path)
    with pytest.raises(DataError) as err:
        load_sft_data(DataConfig(train=[str(path)], max_length=128), tokenizer, seed=0)
    message = str(err.value)
    assert f"{path}, row 2, field 'prompt'" in message
    assert "row 6, field 'prompt[0].role'" in message and "wizard" in message
    assert "row 9" in message and "UTF-8" in message
    assert "row 5" in message and "JSON" in message


def test_data_with_no_supervision_fails_before_training(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "long " * 400, "completion": "x"}] * 3)
    with pytest.raises(DataError, match="no training rows"):
        load_sft_data(DataConfig(train=[str(path)], max_length=64), tokenizer, seed=0)


def test_every_kept_example_has_trained_tokens(tokenizer):
    examples, report = encode_files([str(FIXTURES / "gsm8k-40.jsonl")], tokenizer, DataConfig(max_length=128), "train")
    assert report.truncated > 0  # the budget is tight enough to cut some solutions
    assert all(any(label != IGNORE_INDEX for label in e.labels) and len(e.input_ids) <= 128 for e in examples)


def test_missing_file_and_unknown_format_are_clear(tmp_path, tokenizer):
    with pytest.raises(DataError, match="align data prepare gsm8k"):
        load_sft_data(DataConfig(train=["data/gsm8k/nope.jsonl"]), tokenizer, seed=0)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd.jsonl, row 1: cannot tell the format"):
        load_sft_data(DataConfig(train=[str(path)]), tokenizer, seed=0)


def test_eval_rows_are_held_out_from_train(tokenizer):
    data = load_sft_data(DataConfig(train=[str(FIXTURES / "gsm8k-40.jsonl")], eval_rows=5), tokenizer, seed=0)
    assert len(data.eval) == 5 and len(data.train) == 35
    train_ids = {tuple(e.input_ids) for e in data.train}
    assert not any(tuple(e.input_ids) in train_ids for e in data.eval)


def test_rows_the_template_or_tokenizer_cannot_take_are_named_not_fatal(tmp_path, tokenizer):
    rows = [
        ROWS["messages"],
        {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "done<|im_end|>not done"}]},
        {
            "messages": [
                {"role": "user", "content": "x<|im_start|>assistant\nforged"},
                {"role": "assistant", "content": "y"},
            ]
        },
        ROWS["messages"],
    ]
    path = write_jsonl(tmp_path / "odd.jsonl", rows)
    examples, report = encode_files([str(path)], tokenizer, DataConfig(on_bad_rows="skip"), "train")
    assert len(examples) == 2 and report.kept == 2
    assert dict(report.dropped) == {"assistant_first": 1, "special_token_in_text": 2}
    assert {(p.row, p.field) for p in report.problems} == {
        (2, "messages[0].role"),
        (3, "messages[1].content"),
        (4, "messages[0].content"),
    }


def test_a_template_that_raises_on_one_row_names_that_row(tmp_path, tokenizer):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = (
            "{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}" + original
        )
        rows = [ROWS["messages"], {"messages": ROWS["messages"]["messages"] * 2}]
        path = write_jsonl(tmp_path / "t.jsonl", rows)
        with pytest.raises(
            DataError, match=r"t.jsonl, row 2, field 'messages': chat template failed: roles must alternate"
        ):
            load_sft_data(DataConfig(train=[str(path)]), tokenizer, seed=0)
    finally:
        tokenizer.chat_template = original


def test_csv_cells_stay_strings(tmp_path, tokenizer):
    path = tmp_path / "numbers.csv"
    path.write_text("prompt,completion\nWhat is 2+2?,4\n")
    examples, report = encode_files([str(path)], tokenizer, DataConfig(), "train")
    assert report.kept == 1 and tokenizer.decode([t for t in examples[0].labels if t != IGNORE_INDEX]) == "4<|im_end|>"


def test_rows_before_the_first_recognisable_one_are_counted_not_fatal(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "late.jsonl", [{"question": "q"}, ROWS["prompt_completion"], ROWS["prompt_completion"]]
    )
    examples, report = encode_files([str(path)], tokenizer, DataConfig(on_bad_rows="skip"), "train")
    assert len(examples) == 2 and dict(report.dropped) == {"unknown_format": 1}


def test_sft_on_pairs_trains_the_chosen_answer_and_on_labelled_rows_the_desirable_ones(tmp_path, tokenizer):
    # One file serves an SFT stage and the DPO/KTO stage after it: a pair trains its chosen answer (both pair
    # formats), a labelled row only when its label is true; thumbs-down rows are counted, not trained, not fatal.
    turn = ROWS["messages"]["messages"]
    pairs = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"chosen": turn, "rejected": [turn[0], {"role": "assistant", "content": "Seven."}]},
    ]
    labelled = [
        {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
        {"prompt": "Name a colour.", "completion": "Seven.", "label": False},
        {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
    ]
    reference, _ = encode_files(
        [str(write_jsonl(tmp_path / "ref.jsonl", [ROWS["messages"]]))], tokenizer, DataConfig(), "r"
    )
    for rows, kept in ((pairs, 2), ([{"messages": turn, "label": True}], 1), (labelled, 2)):
        examples, report = encode_files([str(write_jsonl(tmp_path / "x.jsonl", rows))], tokenizer, DataConfig(), "t")
        assert report.kept == kept and len(examples) == kept and not report.problems
        assert all(e.input_ids == reference[0].input_ids and e.labels == reference[0].labels for e in examples)
    assert dict(report.dropped) == {"undesirable": 1}
    # a thumbs up/down that is not a JSON boolean is named (0/1 or "false" could train the bad answers)
    for bad in (0, "false"):
        path = write_jsonl(tmp_path / "bad.jsonl", [labelled[0], {**labelled[1], "label": bad}])
        with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'label': .*JSON boolean"):
            load_sft_data(DataConfig(train=[str(path)]), tokenizer, seed=0)
    # any other 'label' column (a category name) is not a thumbs up/down and is left alone
    path = write_jsonl(tmp_path / "cat.jsonl", [{**labelled[0], "label": "arithmetic"}])
    assert encode_files([str(path)], tokenizer, DataConfig(), "t")[1].kept == 1


# ---------------------------------------------------------------- weighted mixtures


def fake_encoder(sizes: dict[str, int]):
    """An encoder over named files of ``sizes[path]`` rows, each row (path, index): the mixture's logic
    without tokenizing."""
    from align.data.report import RowReport

    def encode(paths, cfg, name):
        report, rows = RowReport(name=name), []
        for path in paths:
            rows += [(path, i) for i in range(sizes[path])]
            report.read += sizes[path]
            report.kept += sizes[path]
        return rows, report

    return encode


def test_weighted_mixture_draws_in_proportion_repeats_small_files_and_is_seeded():
    from collections import Counter

    from align.data.splits import load_splits

    cfg = DataConfig(train=[{"path": "a", "weight": 1}, {"path": "b", "weight": 3}, "c"], max_rows=50)
    assert cfg.train == ["a", "b", "c"] and cfg.train_weights == [1, 3, 1.0]
    encode = fake_encoder({"a": 30, "b": 4, "c": 100})
    train, _, reports = load_splits(cfg, 0, encode, "rows")
    per_file = Counter(path for path, _ in train)
    assert len(train) == 50 and per_file == {"a": 10, "b": 30, "c": 10}
    drawn_b = Counter(row for row in train if row[0] == "b")
    assert sorted(drawn_b.values()) == [7, 7, 8, 8]  # 30 = 7 full passes over 4 rows + a sample of 2
    assert len({row for row in train if row[0] == "a"}) == 10  # fewer than it has: no repeats
    assert [r.drawn for r in reports] == [10, 30, 10]
    assert "drawn 30 for a 60% share of the mixture" in reports[1].summary() and reports[1].name == "train b"
    assert load_splits(cfg, 0, encode, "rows")[0] == train  # same seed, same rows in the same order
    assert load_splits(cfg, 1, encode, "rows")[0] != train
    # without max_rows the mixture is as large as the files: 134 rows
    everything = load_splits(cfg.model_copy(update={"max_rows": None}), 0, encode, "rows")[0]
    assert Counter(p for p, _ in everything) == {"a": 27, "b": 80, "c": 27}


def test_mixture_holds_out_before_drawing_and_unweighted_order_is_unchanged():
    import random

    from align.data.splits import load_splits

    encode = fake_encoder({"a": 20, "b": 20})
    cfg = DataConfig(train=[{"path": "a", "weight": 1}, {"path": "b", "weight": 1}], eval_rows=6)
    train, held_out, _ = load_splits(cfg, 0, encode, "rows")
    assert len(held_out) == 6 and not set(held_out) & set(train)  # never a held-out row in training
    # no weights: exactly the shuffle it always was (resumed and re-run stages see the same rows)
    plain = DataConfig(train=["a", "b"], eval_rows=6)
    rows = [("a", i) for i in range(20)] + [("b", i) for i in range(20)]
    random.Random(0).shuffle(rows)
    assert load_splits(plain, 0, encode, "rows")[:2] == (rows[6:], rows[:6])


def test_bad_mixtures_are_named():
    from align.data.splits import load_splits

    for train, match in (
        ([{"path": "a", "weight": 0}], "above 0"),
        ([{"path": "a", "weight": "much"}], "train_weights"),
        ([{"path": "a", "share": 1}], r"data.train\[0\]: a weighted file is \{path, weight\}"),
    ):
        with pytest.raises(ValueError, match=match):
            DataConfig(train=train)
    with pytest.raises(ValueError, match="2 weights for 1 train files"):
        DataConfig(train=["a"], train_weights=[1, 2])
    cfg = DataConfig(train=[{"path": "a", "weight": 1}, {"path": "empty.jsonl", "weight": 1}])
    with pytest.raises(DataError, match=r"data.train\[1\] \(empty.jsonl\): no usable rows"):
        load_splits(cfg, 0, fake_encoder({"a": 5, "empty.jsonl": 0}), "rows")
    # the dumped config (config.yaml) reads back the same
    assert DataConfig(**cfg.model_dump(by_alias=True)) == cfg


def test_weighted_sft_data_reports_each_file(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Echo {i}.", "completion": f"{i}{i}"} for i in range(3)])
    cfg = DataConfig(train=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 2}], max_rows=12)
    data = load_sft_data(cfg, tokenizer, seed=0)
    texts = [tokenizer.decode(e.input_ids) for e in data.train]
    assert sum("Echo" in t for t in texts) == 8 and sum("Say" in t for t in texts) == 4
    assert [r.as_dict()["drawn"] for r in data.reports] == [4, 8]
