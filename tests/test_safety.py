"""Safety at the edges: align never deletes what it did not write, never runs code a folder asks for,
and rejects a recipe that would fail (or silently ignore a setting) before anything trains.

Each test here reproduces a case that lost files, ran foreign code or passed a dry run on an earlier
version (issue 12).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, tiny_recipe, write_jsonl

from align.artifacts import OWNER_MARKER, RunFolderError, prepare_run_folder, remove_align_folder, written_by_align
from align.config import RecipeError
from align.recipe import load_recipe, recipe_from_dict

GSM8K = str(FIXTURES / "gsm8k-40.jsonl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def align_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, env=env or ENV, cwd=cwd
    )


# --- data loss -----------------------------------------------------------------------------------


def test_import_gguf_never_replaces_a_users_folder(tmp_path):
    """`align models import-gguf FILE -o DIR` converted and then replaced DIR, files and all."""
    from align.models.resolve import _smollm2_gguf

    target = tmp_path / "my-models"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    proc = align_cli("models", "import-gguf", str(_smollm2_gguf()), "-o", str(target))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is not an empty folder" in proc.stdout and str(target) in proc.stdout
    assert (target / "notes.txt").read_text() == "precious" and sorted(p.name for p in target.iterdir()) == [
        "notes.txt"
    ]


@pytest.mark.parametrize("lookalike", ["config.yaml", "manifest.json", "checkpoints"])
def test_overwrite_spares_a_folder_that_only_looks_like_a_run(tmp_path, lookalike):
    """A config.yaml, a foreign manifest.json or a checkpoints/ folder is not proof that align wrote it."""
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / lookalike).mkdir() if lookalike == "checkpoints" else (folder / lookalike).write_text(
        '{"status": "complete"}'
    )
    with pytest.raises(RunFolderError, match="not written by align"):
        prepare_run_folder(folder, overwrite=True, resume=False)
    with pytest.raises(RunFolderError, match="not written by align"):
        prepare_run_folder(folder, overwrite=False, resume=True)
    assert (folder / "data.csv").read_text() == "a,b\n1,2\n"


def test_overwrite_replaces_what_align_wrote_and_claims_new_folders(tmp_path):
    folder = tmp_path / "run"
    prepare_run_folder(folder, overwrite=False, resume=False)
    assert written_by_align(folder) and json.loads((folder / OWNER_MARKER).read_text())["written_by"] == "align"
    (folder / "old.txt").write_text("old run")
    prepare_run_folder(folder, overwrite=True, resume=False)
    assert not (folder / "old.txt").exists() and (folder / OWNER_MARKER).is_file()
    # a run made before the marker existed is known by the manifest align wrote into it
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(
        json.dumps({"written_at": "2026-11-01T00:00:00", "versions": {"align": "0.1.0"}, "status": "complete"})
    )
    prepare_run_folder(legacy, overwrite=True, resume=False)
    assert not (legacy / "manifest.json").exists()


def test_a_kill_while_replacing_never_leaves_a_half_folder_under_the_runs_name(tmp_path, monkeypatch):
    import align.artifacts as artifacts

    folder = tmp_path / "sft"
    prepare_run_folder(folder, overwrite=False, resume=False)
    (folder / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-3" / "COMPLETE").write_text("")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(artifacts.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_align_folder(folder)
    monkeypatch.undo()
    assert not folder.exists(), "the old run must be renamed away before it is deleted"
    leftovers = list(tmp_path.glob(".sft.replaced-*"))
    assert len(leftovers) == 1
    with pytest.raises(RunFolderError, match="no run to resume"):  # nothing half-deleted to trust
        prepare_run_folder(folder, overwrite=False, resume=True)
    prepare_run_folder(folder, overwrite=False, resume=False)  # the next fresh run sweeps the leftover
    assert not list(tmp_path.glob(".sft.replaced-*"))


@pytest.mark.parametrize("name", ["/some/elsewhere", "../up", "a/b", "..", ".hidden", ""])
def test_recipe_and_stage_names_must_be_plain(name, tmp_path):
    with pytest.raises(RecipeError, match="not a plain name"):
        recipe_from_dict({"name": name, "model": {"name": "x"}, "stages": {"sft": {}}})
    with pytest.raises(RecipeError, match="not a plain name"):
        recipe_from_dict({"name": "ok", "stages": {name or " ": {"kind": "sft"}}})


def test_align_run_with_an_absolute_recipe_name_touches_nothing_outside(tmp_path, tiny_gpt2):
    """`name: /some/elsewhere` made align run replace /some/elsewhere/sft and delete a file beside it."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sft").mkdir(parents=True)
    (elsewhere / "sft" / "config.yaml").write_text("mine: true\n")
    (elsewhere / "keep.txt").write_text("precious")
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, GSM8K, name=str(elsewhere))
    proc = align_cli("run", str(recipe), env={**ENV, "ALIGN_RUNS": str(tmp_path / "runs")})
    assert proc.returncode == 2 and "not a plain name" in proc.stdout, proc.stdout + proc.stderr
    assert (elsewhere / "sft" / "config.yaml").read_text() == "mine: true\n" and (
        elsewhere / "keep.txt"
    ).read_text() == "precious"


def test_align_run_refuses_at_plan_time_to_replace_a_folder_it_did_not_write(tmp_path, tiny_gpt2):
    runs = tmp_path / "runs"
    (runs / "tiny" / "sft").mkdir(parents=True)
    (runs / "tiny" / "sft" / "config.yaml").write_text("mine: true\n")
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, GSM8K)
    proc = align_cli("run", str(recipe), "--dry-run", env={**ENV, "ALIGN_RUNS": str(runs)})
    assert proc.returncode == 2 and "align did not write" in proc.stdout, proc.stdout + proc.stderr
    assert (runs / "tiny" / "sft" / "config.yaml").read_text() == "mine: true\n"


# --- code execution --------------------------------------------------------------------------------

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast
class Evil(LlamaForCausalLM):
    pass
class EvilRM(LlamaForSequenceClassification):
    pass
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def planted_stage(tmp_path: Path, tiny_llama: Path, kind: str) -> tuple[Path, Path]:
    """A finished-looking stage folder whose config.yaml turns on trust_remote_code and whose model
    folder ships a module that writes a file when imported."""
    from align.config import dump_config
    from align.stages.registry import REGISTRY

    marker = tmp_path / "PWNED"
    stage = tmp_path / f"downloaded-{kind}"
    model = stage / "model"
    shutil.copytree(tiny_llama, model)
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    auto_map = {"AutoModelForCausalLM": "evil.Evil", "AutoModelForSequenceClassification": "evil.EvilRM"}
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}})
    )
    extra = {"reward": {"type": "rule", "name": "answer_format"}} if kind in ("grpo", "ppo") else {}
    cfg = REGISTRY[kind].schema.model_validate({"model": {"name": str(model), "trust_remote_code": True}, **extra})
    (stage / "config.yaml").write_text(dump_config(cfg))
    (stage / "manifest.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "artifact": "model",
                "kind": kind,
                "precision": "fp32",
                "base_model": str(model),
                "base_model_path": str(model),
            }
        )
    )
    return stage, marker


def test_a_folders_own_config_never_switches_on_remote_code(tmp_path, tiny_llama):
    from align.models.reward import load_reward_model
    from align.models.trained import load_trained

    stage, marker = planted_stage(tmp_path, tiny_llama, "sft")
    model, _ = load_trained(stage)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    (tmp_path / "rm").mkdir()
    rm_stage, marker = planted_stage(tmp_path / "rm", tiny_llama, "rm")
    model, _ = load_reward_model(rm_stage)
    assert type(model).__name__ == "LlamaForSequenceClassification" and not marker.exists()
    proc = align_cli("generate", "--model", str(stage), "--engine", "hf", "--prompt", "hi", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists() and not (tmp_path / "PWNED").exists()
    # the plant is real: asked for on the user's own command line, the module does run
    load_trained(stage, trust_remote_code=True)
    assert (tmp_path / "PWNED").read_text() == "remote code ran"


# --- validation before anything runs -----------------------------------------------------------------


def recipe_dict(**stages) -> dict:
    return {"name": "check", "model": {"name": "smollm2-135m-instruct"}, "stages": stages}


REWARD = {"type": "rule", "name": "answer_format"}


@pytest.mark.parametrize(
    "stages, message",
    [
        ({"sft": {}, "reward": {}, "dpo": {"from": "reward"}}, "from: reward is a rm stage"),
        ({"sft": {}, "grpo": {"reward": {"type": "learned", "from": "sft"}}}, "reward from: sft is a sft stage"),
        (
            {
                "sft": {},
                "eval": {
                    "policy": "sft",
                    "judges": {"rm": {"type": "learned", "from": "sft"}},
                    "data": {"eval": "x.jsonl"},
                },
            },
            "judge from: sft is a sft stage",
        ),
        (
            {
                "sft": {},
                "reward": {},
                "eval": {"policy": "reward", "judges": {"f": REWARD}, "data": {"eval": "x.jsonl"}},
            },
            "policy: reward is a rm stage",
        ),
    ],
)
def test_from_must_name_a_stage_of_the_right_kind(stages, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe_dict(**stages))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "rule", "name": "gsm8k_exat"}, "unknown rule 'gsm8k_exat' - did you mean 'gsm8k_exact'"),
        (
            {"type": "rule", "name": "length_penalty", "target_word": 50},
            "no key 'target_word' - did you mean 'target_words'",
        ),
        ({"type": "learnd", "from": "reward"}, "did you mean 'learned'"),
        ({"type": "judge", "model": "smollm2-135m-instruct", "mode": "pairwse"}, "mode must be pairwise or pointwise"),
        ([{"type": "rule", "name": "answer_format", "weight": "high"}], r"reward\[0\]: weight must be a number"),
        ({"type": "learned"}, "needs from or path"),
    ],
)
def test_reward_specs_are_checked_when_the_recipe_is_read(spec, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe_dict(grpo={"reward": spec}))


def test_dry_run_catches_a_misspelt_rule_before_any_stage(tmp_path, tiny_gpt2):
    recipe = tiny_recipe(
        tmp_path / "r.yaml",
        tiny_gpt2,
        GSM8K,
        stages={"sft": {}, "grpo": {"from": "sft", "reward": {"type": "rule", "name": "answer_fromat"}}},
    )
    proc = align_cli("run", str(recipe), "--dry-run", env={**ENV, "ALIGN_RUNS": str(tmp_path / "runs")})
    assert proc.returncode == 2 and "did you mean 'answer_format'" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "key, expected",
    [
        ("train.learning_rate", "train.lr"),
        ("lora.lora_alpha", "lora.alpha"),
        ("train.epoch", "train.epochs"),
        ("train.batch", "train.batch_size"),
        ("lora_alpha", "lora.alpha"),
        ("train.gradient_accumulation_steps", "train.grad_accum"),
        ("data.max_seq_length", "data.max_length"),
        ("lora.alhpa", "lora.alpha"),
    ],
)
def test_unknown_keys_suggest_the_right_key(key, expected):
    section, _, leaf = key.rpartition(".")
    stage = {section: {leaf: 1}} if section else {leaf: 1}
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(recipe_dict(sft=stage))
    assert f"did you mean '{expected}'?" in str(error.value)


@pytest.mark.parametrize(
    "kind, key, value",
    [
        ("dpo", "data.packing", True),
        ("rm", "data.packing", True),
        ("grpo", "train.grad_accum", 4),
        ("ppo", "train.optim", "sgd"),
        ("grpo", "train.eval_steps", 10),
        ("ppo", "lora.loraplus_lr_ratio", 16.0),
        ("grpo", "data.packing", True),
    ],
)
def test_settings_a_stage_would_ignore_are_rejected_for_that_stage(kind, key, value):
    section, _, name = key.partition(".")
    extra = {"reward": REWARD} if kind in ("grpo", "ppo") else {}
    with pytest.raises(RecipeError, match=f"{key}={value!r} has no effect in a {kind} stage"):
        recipe_from_dict(recipe_dict(**{kind: {section: {name: value}, **extra}}))
    recipe_from_dict(recipe_dict(sft={section: {name: value}}))  # where the key is used, it is accepted


def test_an_empty_data_file_and_a_model_without_weights_are_named(tmp_path, tiny_gpt2):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, str(empty))
    proc = align_cli("sft", "--recipe", str(recipe), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"{empty}: the data file has no rows" in proc.stdout, proc.stdout + proc.stderr
    hollow = tmp_path / "hollow-model"
    hollow.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gpt2 / name, hollow / name)
    recipe = tiny_recipe(tmp_path / "r2.yaml", hollow, GSM8K)
    proc = align_cli("sft", "--recipe", str(recipe), "--output-dir", str(tmp_path / "out2"))
    assert proc.returncode == 2 and f"{hollow}: a config.json but no model weights" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    proc = align_cli("generate", "--model", str(hollow), "--engine", "hf", "--prompt", "hi")
    assert proc.returncode == 2 and "no model weights" in proc.stdout, proc.stdout + proc.stderr


# --- faults ----------------------------------------------------------------------------------------


def test_dead_run_alarm_fires_on_zero_advantage_without_truncation():
    from align.stages.rl_log import DeadRunAlarm

    alarm = DeadRunAlarm(patience=3, max_new_tokens=64)
    assert alarm.check(0.0, 0.4, zero_advantage=True) is None and alarm.check(0.1, 0.3, zero_advantage=True) is None
    assert "every advantage is zero" in alarm.check(0.0, 0.2, zero_advantage=True)
    alarm = DeadRunAlarm(patience=2, max_new_tokens=64)
    alarm.check(0.0, 0.0, zero_advantage=True)
    assert (
        alarm.check(0.0, 0.5, zero_advantage=False) is None and alarm.streak == 0
    )  # a step with signal resets the streak


def test_grpo_whose_groups_all_tie_stops_even_when_completions_end(tmp_path, yes_no_model):
    """The yes/no model ends every answer within 4 tokens; a marker it never writes gives each group
    identical (zero) rewards: no truncation, but no signal either."""
    from align.stages.grpo import run_grpo

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * 16)
    recipe = tiny_recipe(
        tmp_path / "g.yaml",
        yes_no_model,
        str(data),
        adapter={"method": "lora"},
        stages={
            "grpo": {
                "reward": {"type": "rule", "name": "contains_marker", "marker": "zebra"},
                "rollout": {"engine": "hf", "prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 8},
                "grpo": {"dead_steps": 2},
                "train": {"max_steps": 6, "batch_size": 8},
            }
        },
    )
    out = run_grpo(load_recipe(recipe).resolve("grpo"), tmp_path / "out", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert manifest["steps"] == 2 and "every advantage is zero" in manifest["stopped_early"]
    assert all(m["truncated_fraction"] < 1.0 for m in metrics)


# --- quiet -----------------------------------------------------------------------------------------


def test_expected_load_reports_are_silenced_and_unexpected_ones_kept(tmp_path, tiny_llama):
    """A reward model's base always lacks its head ('score.weight MISSING'); that report is noise.
    A report naming any other weight is real and must still reach the user."""
    import logging

    from align.config import ModelConfig, QuantizationConfig
    from align.models.reward import load_reward_base

    class Keep(logging.Handler):  # our own handler: caplog's sees a record twice when another test
        def __init__(self):  # has switched transformers' propagation on
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(keep)
    try:
        load_reward_base(ModelConfig(name=str(tiny_llama)), QuantizationConfig(mode="none"), "fp32", tiny_llama)
        assert not [m for m in keep.messages if "LOAD REPORT" in m]
        report_both_ways(logger)
    finally:
        logger.removeHandler(keep)
    shown = [m for m in keep.messages if "LOAD REPORT" in m]
    assert len(shown) == 1 and "up_proj" in shown[0]


def report_both_ways(logger) -> None:
    from align.quiet import expected_missing_weights

    report = "LlamaForSequenceClassification LOAD REPORT from: x\nKey | Status | \n----+----+-\n{} | MISSING | \n"
    with expected_missing_weights(("score.weight",), ""):
        logger.warning(report.format("score.weight"))
        logger.warning(report.format("model.layers.0.mlp.up_proj.weight"))


# --- the longest batch before step 0 --------------------------------------------------------------


def test_memory_check_runs_the_longest_batch_and_leaves_no_trace(tmp_path, tiny_gpt2, monkeypatch):
    """With LoRA dropout on (it draws random numbers) a run with the check equals one without it,
    bit for bit; the check saw the longest rows of the data."""
    from safetensors.torch import load_file

    import align.stages.common as common
    import align.stages.sft as sft_stage
    from align.stages.sft import run_sft

    seen = []
    real = common.check_longest_batch

    def spy(trainer, rows):
        seen.append(max(common.row_length(r) for r in rows))
        real(trainer, rows)
        assert all(p.grad is None for p in trainer.model.parameters())

    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, GSM8K, lora={"r": 4, "alpha": 8, "dropout": 0.3}))
    cfg = recipe.resolve("sft", ["train.max_steps=3"])
    monkeypatch.setattr(sft_stage, "check_longest_batch", spy)
    checked = run_sft(cfg, tmp_path / "checked", recipe_name="tiny")
    monkeypatch.setattr(sft_stage, "check_longest_batch", lambda trainer, rows: None)
    unchecked = run_sft(cfg, tmp_path / "unchecked", recipe_name="tiny")
    a, b = (load_file(str(out / "adapter" / "adapter_model.safetensors")) for out in (checked, unchecked))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert seen and seen[0] > 0


def test_memory_check_names_the_batch_that_does_not_fit():
    from align.stages.common import BatchTooLarge, check_longest_batch

    class Args:
        per_device_train_batch_size = 2

    class Trainer:  # just what check_longest_batch uses of a transformers Trainer
        args, model, batches = Args(), torch.nn.Linear(2, 2), []

        def data_collator(self, rows):
            return rows

        def _prepare_inputs(self, batch):
            return batch

        def compute_loss_context_manager(self):
            import contextlib

            return contextlib.nullcontext()

        def compute_loss(self, model, batch):
            self.batches.append([len(r["input_ids"]) for r in batch])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    trainer = Trainer()
    rows = [{"input_ids": [1] * n} for n in (5, 300, 12, 280, 7)]
    with pytest.raises(
        BatchTooLarge, match=r"longest batch \(2 rows of up to 300 tokens\) does not fit.*train.batch_size"
    ):
        check_longest_batch(trainer, rows)
    assert trainer.batches == [[300, 280]]


# --- offline ---------------------------------------------------------------------------------------

SOCKET_GUARD = """
import socket, sys
attempts = []
def _local(address):
    host = address[0] if isinstance(address, tuple) else address
    local = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")
    return not isinstance(address, tuple) or host in local or str(host).startswith("127.")
_connect = socket.socket.connect
def guarded_connect(self, address):
    if self.family != socket.AF_UNIX and not _local(address):
        attempts.append(repr(address))
        open(sys.argv[1], "a").write(repr(address) + "\\n")
        raise OSError("network blocked by the test")
    return _connect(self, address)
socket.socket.connect = guarded_connect
_getaddrinfo = socket.getaddrinfo
def guarded_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1", "0.0.0.0") and not str(host).startswith("127."):
        open(sys.argv[1], "a").write("lookup " + str(host) + "\\n")
        raise OSError("network blocked by the test")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = guarded_getaddrinfo
from align.cli import main
sys.argv = ["align"] + sys.argv[2:]
main()
"""


def test_a_tiny_align_run_opens_no_socket_to_the_outside(tmp_path, tiny_llama):
    """No hub, telemetry or tracker traffic: every connect to a non-local address and every name
    lookup is recorded (and refused). HF_HUB_OFFLINE is deliberately not set: align must not need it."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say yes.", "reference": "yes"}] * 4)
    recipe = tiny_recipe(
        tmp_path / "r.yaml",
        tiny_llama,
        GSM8K,
        stages={
            "sft": {"train": {"max_steps": 2}},
            "eval": {
                "policy": "sft",
                "baselines": ["base"],
                "judges": {"format": {"type": "rule", "name": "answer_format"}},
                "data": {"eval": str(prompts)},
                "rollout": {"engine": "auto", "max_new_tokens": 4},
                "bootstrap": 100,
            },
        },
    )
    log = tmp_path / "network.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    proc = subprocess.run(
        [sys.executable, "-c", SOCKET_GUARD, str(log), "run", str(recipe)],
        capture_output=True,
        text=True,
        env={**env, "ALIGN_RUNS": str(tmp_path / "runs")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "eval" / "report.json").is_file()
    assert not log.exists(), log.read_text()


def test_vllms_expected_startup_warnings_are_filtered_and_others_kept():
    """align/vllm_logging.json is what VLLM_LOGGING_CONFIG_PATH points vLLM at: loaded as vLLM would,
    its handler drops the warnings about align's own engine settings and passes anything else."""
    import io
    import logging.config

    from align.quiet import vllm_logging_config

    config = json.loads(Path(vllm_logging_config()).read_text())
    stream = io.StringIO()
    config["handlers"]["vllm"]["stream"] = stream
    config["loggers"] = {"vllm-test": config["loggers"]["vllm"]}
    logging.config.dictConfig(config)
    logger = logging.getLogger("vllm-test.engine.arg_utils")
    logger.warning("The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, ...")
    logger.warning("libtcmalloc is not found in LD_PRELOAD. For best performance, ...")
    logger.warning("KV cache is too small for the requested max_model_len")
    assert stream.getvalue().splitlines() == ["vllm WARNING KV cache is too small for the requested max_model_len"]


def test_rl_memory_check_runs_a_worst_case_micro_batch_without_a_trace(tmp_path, tiny_llama, monkeypatch):
    from align.data.prompt_data import load_prompts
    from align.models.loading import load_tokenizer
    from align.stages.common import BatchTooLarge
    from align.stages.rl_setup import check_longest_rollout_batch, load_policy

    data = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Hi."}, {"prompt": "A much longer question, with many more words in it?"}]
    )
    recipe = load_recipe(
        tiny_recipe(
            tmp_path / "g.yaml",
            tiny_llama,
            str(data),
            lora={"r": 4, "alpha": 8, "dropout": 0.5},
            stages={
                "grpo": {
                    "reward": REWARD,
                    "rollout": {"engine": "hf", "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 7},
                    "train": {"batch_size": 3},
                }
            },
        )
    )
    cfg = recipe.resolve("grpo")
    tokenizer = load_tokenizer(cfg.model, tiny_llama)
    prompts, _, _ = load_prompts(cfg.data, tokenizer, cfg.seed)
    policy, _, _ = load_policy(cfg, tiny_llama, "fp32", None, needs_reference=False)
    policy.train()
    seen = []
    real_forward = type(policy).forward

    def spy(self, *args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(policy), "forward", spy)
    state = torch.get_rng_state()
    check_longest_rollout_batch(policy, prompts, cfg, "fp32", tokenizer.pad_token_id)
    longest = max(len(p.prompt_ids) for p in prompts)
    assert seen == [(3, longest + 7)]  # train.batch_size rows of the longest prompt + max_new_tokens
    assert torch.equal(torch.get_rng_state(), state) and all(p.grad is None for p in policy.parameters())

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(type(policy), "forward", out_of_memory)
    with pytest.raises(BatchTooLarge, match=rf"3 rows of {longest} prompt \+ 7 new tokens"):
        check_longest_rollout_batch(policy, prompts, cfg, "fp32", tokenizer.pad_token_id)
