"""Model cards (align/model_card.py): the README.md beside every adapter a stage writes parses as a
Hugging Face card, and its numbers are the stage's manifest's; eval stages add their win-rates; a
folder align did not write is never written into. (test_pipeline: every stage of a chain has one,
and adding win-rates re-runs nothing; test_sft_stage: `align merge` carries it; torchrun tests: the
manifest's process count.) `align push` (align/publish.py): every check before the upload, and what
it hands huggingface_hub - the upload itself cannot run here (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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

    # a README.md the user wrote in its place is never rewritten; the win-rates still reach evaluations.json
    (out / "adapter" / CARD_FILE).write_text("# mine\n")
    record_evaluation(out, tmp_path / "eval-2", report)
    assert (out / "adapter" / CARD_FILE).read_text() == "# mine\n"
    assert len(json.loads((out / EVALUATIONS_FILE).read_text())) == 2

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


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_llama) -> Path:
    return _sft_on_yes(tmp_path_factory.mktemp("push"), tiny_llama, 2e-2, 2)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder held;
    ``repos`` is what the Hub holds already ({repo id: (private, files)})."""

    calls: list = []
    repos: dict = {}

    def __init__(self, token=None):
        self.token = token

    def repo_info(self, repo_id, **options):
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        if repo_id not in FakeHub.repos:
            raise RepositoryNotFoundError(repo_id, response=SimpleNamespace(headers={}, status_code=404, request=None))
        return SimpleNamespace(private=FakeHub.repos[repo_id][0])

    def list_repo_files(self, repo_id, **options):
        return FakeHub.repos[repo_id][1]

    def create_repo(self, repo_id, **options):
        FakeHub.calls.append(("create_repo", repo_id, options))

    def create_branch(self, repo_id, branch, **options):
        FakeHub.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, folder_path, repo_id, **options):
        folder = Path(folder_path)
        files = sorted(p.name for p in folder.iterdir())
        card = ModelCard.load(folder / "README.md")
        FakeHub.calls.append(("upload_folder", repo_id, options["revision"], files, card, self.token))
        return "https://huggingface.co/me/model/commit/abc"


def test_push_hands_the_adapter_and_its_card_to_the_hub(stage, monkeypatch):
    import huggingface_hub

    from align.publish import PushError, push

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (stage / "adapter" / CARD_FILE).unlink()  # a stage from before cards: the card is written from the manifest
    FakeHub.calls, FakeHub.repos = [], {}
    assert push(stage, "me/model", private=True, revision="v1").endswith("/commit/abc")
    (create, repo, options), branch, (upload, _, revision, files, card, token) = FakeHub.calls
    assert (create, repo, options["private"], branch) == (
        "create_repo",
        "me/model",
        True,
        ("create_branch", "me/model", "v1"),
    )
    assert (upload, revision, token) == ("upload_folder", "v1", "hf_test")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert card.data.library_name == "peft" and (stage / "adapter" / CARD_FILE).is_file()

    FakeHub.calls = []
    push(stage, "me/merged", merged=True)  # the adapter merged into its base: a plain transformers folder
    (_, _, _), (_, _, revision, files, card, _) = FakeHub.calls
    assert revision is None and {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert card.data.library_name == "transformers"

    # what the Hub holds already: a public repo is not made private by --private, and an adapter never lands
    # beside a whole model (or back) - both refused before any upload
    FakeHub.calls, FakeHub.repos = [], {"me/public": (False, []), "me/merged": (False, ["config.json"])}
    with pytest.raises(PushError, match="exists and is public"):
        push(stage, "me/public", private=True)
    with pytest.raises(PushError, match="holds a whole model already"):
        push(stage, "me/merged")
    assert FakeHub.calls == []
    # the user's own card (no align marker) is uploaded as it is, never rewritten
    (stage / "adapter" / CARD_FILE).write_text("# my own words\n")
    push(stage, "me/public")
    assert FakeHub.calls[-1][4].text.strip() == "# my own words"
    assert (stage / "adapter" / CARD_FILE).read_text() == "# my own words\n"


def test_push_refuses_before_any_network_with_a_plain_message(stage, tmp_path, monkeypatch):
    from align.publish import PushError, push

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PushError, match="OWNER/NAME"):
        push(stage, "model-without-owner")
    with pytest.raises(PushError, match="not a Hub repository id"):
        push(stage, "me/model name")
    with pytest.raises(PushError, match="not a finished align stage"):
        push(tmp_path, "me/model")
    for status, words in (("collapsed", "collapse alarm"), ("running", "has not finished")):
        copy = tmp_path / status
        copy.mkdir()
        manifest = json.loads((stage / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, "status": status}))
        with pytest.raises(PushError, match=words):
            push(copy, "me/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(stage, "me/model")

    # on the command line: no token, one line naming what to do, exit 2, no traceback
    hidden = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["HF_HOME"] = str(tmp_path / "no-login")
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "push", "--model", str(stage), "--repo", "me/model"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "no Hugging Face token" in proc.stdout and "Traceback" not in proc.stderr
