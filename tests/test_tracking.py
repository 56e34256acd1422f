"""Tracking in every stage: wandb (offline) and trackio (local store) receive what metrics.jsonl holds.

One `align run` on tiny models - sft, then grpo and ppo from it, then an eval - with both trackers
on; the stores are read back and compared with the stage folders' own files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_jsonl

YES = {"type": "rule", "name": "contains_marker", "marker": "yes"}


def read_trackio(store: Path, project: str) -> dict[str, list[dict]]:
    """{run name: its logs} from trackio's local store, read in a fresh process (TRACKIO_DIR is read at import)."""
    code = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        f"print(json.dumps({{r: S.get_logs({project!r}, r) for r in S.get_runs({project!r})}}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TRACKIO_DIR": str(store)}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_wandb_history(stage: Path) -> list[dict]:
    """The history rows of the stage's offline wandb run. wandb 0.2x+ no longer ships a Python reader: its
    .wandb file is a LevelDB-style log (a 7-byte header, 32 KiB blocks of records: crc32, length, type -
    full / first / middle / last) of protobuf Records, which this reads."""
    import struct

    from wandb.proto import wandb_internal_pb2

    [run_file] = stage.glob("wandb/offline-run-*/run-*.wandb")
    data, position, pending, rows = run_file.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4) and pending:  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def metrics(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def test_rl_and_eval_stages_log_to_wandb_and_trackio(tmp_path, tiny_llama):
    rl = {"reward": YES, "train": {"max_steps": 3, "lr": 1e-2, "batch_size": 4}}
    rollout = {"engine": "hf", "max_new_tokens": 3, "log_samples_every": 2}
    recipe = tiny_recipe(
        tmp_path / "tracked.yaml",
        tiny_llama,
        str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Pick one.", "completion": "yes"}] * 8)),
        tracking={"wandb": True, "trackio": True, "project": "tracked"},
        stages={
            "sft": {"train": {"max_steps": 2, "logging_steps": 1}},
            "grpo": {
                "from": "sft",
                **rl,
                "data": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * 8))},
                "rollout": {**rollout, "prompts_per_step": 2, "samples_per_prompt": 2},
            },
            "ppo": {
                "from": "sft",
                **rl,
                "data": {"train": str(tmp_path / "prompts.jsonl")},
                "rollout": {**rollout, "prompts_per_step": 4, "samples_per_prompt": 1},
            },
            "eval": {
                "policy": "grpo",
                "baselines": ["sft"],
                "judges": {"yes": YES},
                "data": {"eval": str(tmp_path / "prompts.jsonl"), "max_eval_rows": 4},
                "rollout": {"engine": "hf", "max_new_tokens": 3},
            },
        },
    )
    store = tmp_path / "trackio"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(store), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)  # no key: align must choose offline itself
    out = tmp_path / "runs" / "tiny"  # align run writes runs/<recipe>/<stage> under the working directory
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "run", str(recipe)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = read_trackio(store, "tracked")
    # Trainer stages are named recipe/kind by transformers; align's own loops add the start time
    by_stage = {name.split("/")[1].rsplit("-", 2)[0]: logs for name, logs in runs.items()}

    # RL stages: every metrics.jsonl number, at its step, in both trackers; the rollouts table as rollouts.jsonl
    for stage in ("grpo", "ppo"):
        folder = out / stage
        expected = metrics(folder)
        assert [r["step"] for r in expected] == [1, 2, 3]
        ids = json.loads((folder / "tracking.json").read_text())
        assert ids["name"] in runs
        logged = {(r["step"], k): v for r in by_stage[stage] for k, v in r.items() if isinstance(v, float)}
        history = {(r["_step"], k): v for r in read_wandb_history(folder) for k, v in r.items()}
        for record in expected:
            for key in ("reward_mean", "loss", "time/step"):
                assert logged[(record["step"], key)] == pytest.approx(record[key]), (stage, key)
                assert history[(record["step"], key)] == pytest.approx(record[key]), (stage, key)
        samples = [json.loads(line) for line in (folder / "rollouts.jsonl").read_text().splitlines()]
        assert sorted({s["step"] for s in samples}) == [1, 2]  # the first step and every 2nd
        assert all(s["reward"] == float("yes" in s["completion"]) for s in samples)  # the rule's own score
        tables = [r for r in by_stage[stage] if "rollouts" in r]
        assert [t["step"] for t in tables] == [1, 2]
        rows = [row for t in tables for row in t["rollouts"]["_value"]]
        assert [(r["completion"], r["reward"]) for r in rows] == [(s["completion"], s["reward"]) for s in samples]

    # eval: the report's win-rates, named judge/baseline/figure
    [result] = json.loads((out / "eval" / "report.json").read_text())["results"]
    [final] = [r for r in by_stage["eval"] if "yes/sft/win_rate" in r]
    assert final["yes/sft/win_rate"] == pytest.approx(result["win_rate"])
    assert final["yes/sft/wins"] == result["wins"]
    [table] = [r for r in by_stage["eval"] if "samples" in r]
    assert len(table["samples"]["_value"]) == 4
    # a Trainer stage logs through transformers' callbacks, to the same project
    assert any("train/loss" in r for r in by_stage["sft"])
    assert list((out / "sft").glob("wandb/offline-run-*/run-*.wandb")) or list(tmp_path.glob("wandb/offline-run-*"))


def test_trackio_asked_for_but_not_installed_is_a_recipe_error(monkeypatch):
    import importlib.util

    from align.config import TrackingConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ValueError, match="trackio is not installed: pip install trackio"):
        TrackingConfig(trackio=True)
    assert TrackingConfig(trackio=False).trackio is False
