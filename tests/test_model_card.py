"""Model cards (align/model_card.py): the README.md beside every adapter a stage writes parses as a
Hugging Face card, and its numbers are the stage's manifest's; eval stages add their win-rates; a
folder align did not write is never written into. (test_pipeline: every stage of a chain has one,
and adding win-rates re-runs nothing; test_sft_stage: `align merge` carries it; torchrun tests: the
manifest's process count.)"""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from test_checkup import _sft_on_yes

from align.model_card import CARD_FILE, EVALUATIONS_FILE, base_model, record_evaluation


def _number(value: float) -> str:
    return f"{value:.3f}"


def test_a_stage_card_parses_and_says_what_its_manifest_says(tmp_path, tiny_llama):
    out = _sft_on_yes(tmp_path, tiny_llama, 2e-2, 4)
    manifest = json.loads((out / "manifest.json").read_text())
    card = ModelCard.load(out / "adapter" / CARD_FILE)
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["tags"] == ["align", "sft", "lora"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local folder is no Hugging Face id: never written as one
    text = card.text
    assert "adapter_config.json" not in text and "More Information Needed" not in text  # not peft's boilerplate
    report = manifest["data"]["train"]
    assert f"| train | {report['read']} | {report['kept']} | {report['truncated']} | 0 |" in text
    checkup = manifest["checkup"]
    for name, measured in checkup["sets"].items():
        for key, after in measured["after"].items():
            assert f"| {name} | {key} | {_number(measured['before'][key])} | {_number(after)} |" in text, key
    assert f"| steps | {manifest['steps']} |" in text and manifest["processes"] == 1 and "| processes | 1 |" in text
    assert (out / "config.yaml").read_text().strip() in text  # the resolved recipe section

    # an eval that judged it adds its win-rates; judging again in the same folder replaces them
    results = [{"set": "task", "judge": "exact", "baseline": "base", "wins": 5, "ties": 2, "losses": 1}]
    results[0] |= {"win_rate": 0.75, "ci_low": 0.5, "ci_high": 0.9375, "lc_win_rate": 0.7}
    report = {"prompts": {"n": 8}, "sampling": {"temperature": 0.7, "seed": 0}, "results": results}
    record_evaluation(out, tmp_path / "eval", report)
    record_evaluation(out, tmp_path / "eval", {**report, "results": [{**results[0], "wins": 6, "ties": 1}]})
    text = ModelCard.load(out / "adapter" / CARD_FILE).text
    assert "| task | exact | base | 6/1/1 | 0.750 | 0.500-0.938 |" in text and "5/2/1" not in text
    assert list(json.loads((out / EVALUATIONS_FILE).read_text())) == [str(tmp_path / "eval")]

    # a folder align did not write (no owner marker, no align manifest) is never written into
    theirs = tmp_path / "theirs"
    (theirs / "adapter").mkdir(parents=True)
    (theirs / "manifest.json").write_text('{"artifact": "adapter"}')
    record_evaluation(theirs, tmp_path / "eval", report)
    assert sorted(p.name for p in theirs.rglob("*")) == ["adapter", "manifest.json"]


def test_known_bases_are_named_by_their_hub_id_and_license():
    hub_id, license_, text = base_model({"base_model": "smollm2-135m-instruct"})
    assert (hub_id, license_) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0") and "GGUF" in text
    assert base_model({"base_model": "org/model-that-is-not-cached"})[0] == "org/model-that-is-not-cached"
