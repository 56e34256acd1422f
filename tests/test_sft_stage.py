"""`align sft` end to end on tiny models: outputs, adapters training, merge, resume, accumulation
(RELIABILITY 2, 7, 21-24)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, load_tiny, tiny_recipe, write_jsonl
from safetensors.torch import load_file

from align.recipe import load_recipe
from align.stages.sft import run_sft

GSM8K = str(FIXTURES / "gsm8k-40.jsonl")


def cli(*args, cwd=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"align {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def sft(tmp_path, model_dir, overrides=(), name="run", **sections):
    recipe = load_recipe(tiny_recipe(tmp_path / f"{name}.yaml", model_dir, GSM8K, **sections))
    cfg = recipe.resolve("sft", list(overrides))
    return run_sft(cfg, tmp_path / name, recipe_name="tiny"), cfg


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_cli_end_to_end(tmp_path, tiny_llama):
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_llama, GSM8K, data={"eval_rows": 4, "max_rows": 12})
    out = tmp_path / "out"
    proc = cli("sft", "--recipe", recipe, "lora.r=2", "train.max_steps=3", "--output-dir", out)
    assert "align sft - tiny" in proc.stdout and "optimizer steps" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == 3
    assert manifest["data"]["train"]["read"] == 40
    assert manifest["eval_loss"] is not None and manifest["eval_loss_start"] is not None
    assert "r: 2" in (out / "config.yaml").read_text()
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").stat().st_size > 0
    losses = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]

    # a second run never clobbers the first
    again = cli("sft", "--recipe", recipe, "--output-dir", out, check=False)
    assert again.returncode == 2 and "already holds a run" in again.stdout and "Traceback" not in again.stderr
    # a typo is caught before anything loads, with a suggestion
    typo = cli("sft", "--recipe", recipe, "lora.alhpa=3", "--output-dir", tmp_path / "typo", check=False)
    assert typo.returncode == 2 and "did you mean 'lora.alpha'" in typo.stdout
    assert not (tmp_path / "typo").exists()

    gen = cli("generate", "--model", out, "--prompt", "What is 2+2?", "--max-new-tokens", "4", "--engine", "hf")
    assert "assistant:" in gen.stdout and "engine: hf" in gen.stdout
    cli("merge", "--model", out, "--output", tmp_path / "merged")
    merged = load_tiny(tmp_path / "merged")
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "merged" / "README.md")  # the stage's card, as a merged model's
    assert card.data.library_name == "transformers" and "merged into its base by `align merge`" in card.text
    assert ModelCard.load(out / "adapter" / "README.md").data.library_name == "peft"

    from align.models.trained import load_trained

    adapted, tokenizer = load_trained(out)
    ids = torch.tensor([tokenizer("Natalia sold clips to 48 of her friends")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_every_lora_weight_trains_and_saved_equals_trained(tmp_path, tiny_gpt2):
    out, _ = sft(tmp_path, tiny_gpt2, ["train.max_steps=3", "train.save_steps=3"])
    final = adapter_tensors(out)
    lora_b = {k: v for k, v in final.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero
    # the exported adapter is bit-identical to the trainer's last checkpoint of the same weights
    checkpoint = load_file(str(out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    # and a fresh load serves exactly those weights
    from align.models.trained import load_trained

    model, _ = load_trained(out)
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in final.items():
        loaded = next(v for k, v in state.items() if k.replace(".default", "") == key)
        assert torch.equal(loaded, value)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, tiny_gpt2):
    overrides = ["train.max_steps=6", "train.save_steps=3", "train.save_total_limit=3", "data.max_rows=16"]
    full, _ = sft(tmp_path, tiny_gpt2, overrides, name="full")

    # What a SIGKILL during step 6's save leaves: checkpoint-3 complete, checkpoint-6 torn (no marker,
    # no optimizer state), no final adapter or manifest; metrics.jsonl still has steps 4-6 in it.
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    for name in ("adapter", "manifest.json", "loss.png"):
        target = killed / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    torn = killed / "checkpoints" / "checkpoint-6"
    (torn / "COMPLETE").unlink()
    (torn / "optimizer.pt").unlink()

    recipe = load_recipe(tiny_recipe(tmp_path / "resume.yaml", tiny_gpt2, GSM8K))
    run_sft(recipe.resolve("sft", overrides), killed, recipe_name="tiny", resume=True)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-3")
    a, b = adapter_tensors(full), adapter_tensors(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # steps 4-6 are logged once (the pre-kill lines are trimmed), with the same losses
    losses = lambda run: [
        (r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert losses(full) == losses(killed) and [s for s, _ in losses(killed)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_config_and_overwrite_spares_foreign_folders(tmp_path, tiny_gpt2):
    from align.artifacts import RunFolderError
    from align.data.loading import DataError

    out, _ = sft(tmp_path, tiny_gpt2, ["train.max_steps=2", "train.save_steps=1"])
    recipe = load_recipe(tiny_recipe(tmp_path / "again.yaml", tiny_gpt2, GSM8K))
    with pytest.raises(RunFolderError, match="train.lr"):
        run_sft(recipe.resolve("sft", ["train.max_steps=2", "train.lr=0.5"]), out, recipe_name="tiny", resume=True)
    # a failing run (bad data) never deletes the earlier run, even with --overwrite
    before = adapter_tensors(out)
    with pytest.raises(DataError):
        run_sft(recipe.resolve("sft", ["data.train=/nonexistent.jsonl"]), out, recipe_name="tiny", overwrite=True)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(out).items())
    # --overwrite never deletes a folder align did not write
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(RunFolderError, match="not written by align"):
        run_sft(recipe.resolve("sft", ["train.max_steps=1"]), foreign, recipe_name="tiny", overwrite=True)
    assert (foreign / "thesis.txt").read_text() == "precious"


def test_gradient_accumulation_is_normalised_by_tokens_of_the_whole_step(tmp_path, tiny_llama):
    # One SGD step, no clipping: equal weights afterwards means equal gradients.
    base = ["train.optim=sgd", "train.lr=1.0", "train.max_grad_norm=0", "train.max_steps=1", "data.max_rows=8"]
    results = []
    for batch, accum in ((8, 1), (1, 8), (2, 4)):
        out, _ = sft(
            tmp_path,
            tiny_llama,
            base + [f"train.batch_size={batch}", f"train.grad_accum={accum}"],
            name=f"b{batch}x{accum}",
        )
        results.append(adapter_tensors(out))
    from align.data.sft_data import load_sft_data
    from align.models.loading import load_tokenizer

    cfg = load_recipe(tiny_recipe(tmp_path / "len.yaml", tiny_llama, GSM8K)).resolve("sft", base)
    trained = load_sft_data(cfg.data, load_tokenizer(cfg.model), cfg.seed).train
    assert len({e.trained_tokens for e in trained}) > 4  # different lengths: per-micro-batch means would differ
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(other[key], results[0][key], atol=1e-6, rtol=1e-5)
    assert any(v.abs().sum() > 0 for k, v in results[0].items() if "lora_B" in k)


def test_overfit_one_conversation_then_greedy_generation_stops(tmp_path, tiny_llama):
    """pad == eos: the end-of-turn token is trained, so the model learns to stop (RELIABILITY 2)."""
    from align.models.trained import load_trained
    from align.rollout.engine import Sampling
    from align.rollout.hf import HFEngine

    chat = {
        "messages": [
            {"role": "user", "content": "Say the magic words."},
            {"role": "assistant", "content": "open sesame"},
        ]
    }
    data = write_jsonl(tmp_path / "one.jsonl", [chat] * 8)
    recipe = load_recipe(tiny_recipe(tmp_path / "one.yaml", tiny_llama, str(data)))
    cfg = recipe.resolve("sft", ["adapter.method=full", "train.lr=2e-2", "train.max_steps=60", "train.batch_size=8"])
    out = run_sft(cfg, tmp_path / "one", recipe_name="tiny")
    model, tokenizer = load_trained(out)
    rollout = HFEngine(model, tokenizer).generate([chat["messages"][:1]], Sampling(temperature=0, max_new_tokens=20))[0]
    assert rollout.text == "open sesame" and rollout.finish_reason == "stop"
    # it stopped on its own: the raw continuation ends in the end-of-turn token well before the limit
    from align.data.templating import encode_prompt

    prompt = torch.tensor([encode_prompt(tokenizer, chat["messages"][:1])])
    with torch.no_grad():
        raw = model.generate(
            input_ids=prompt,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = raw[0, prompt.shape[1] :].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 20


def test_qlora_nf4_trains_on_cpu(tmp_path, tiny_llama):
    out, _ = sft(tmp_path, tiny_llama, ["quantization.mode=nf4", "train.max_steps=2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == "nf4"
    assert all(v.abs().sum() > 0 for k, v in adapter_tensors(out).items() if "lora_B" in k)
    from align.models.trained import load_trained, merge

    model, tokenizer = load_trained(out)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # merging adds the deltas to the dequantized NF4 weights the adapter was trained with
    merge(out, tmp_path / "merged")
    merged = load_tiny(tmp_path / "merged")
    ids = torch.tensor([tokenizer("Natalia sold clips to 48 of her friends")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["embed_tokens", "lm_head", "embed_tokens, lm_head"])
def test_merging_an_adapter_on_one_side_of_tied_embeddings_leaves_the_other_as_trained(tmp_path, tiny_llama, side):
    """A LoRA on a tied embedding changes the input lookup only, one on lm_head the output layer only; a
    side without one still reads the base weight. peft's merge_and_unload adds the delta to the one shared weight
    (max logit difference 91 and 20 on a tiny Llama), so the merge unties them first: the merged model
    computes what the trained one did."""
    from align.models.trained import load_trained, merge

    out, _ = sft(
        tmp_path, tiny_llama, [f"adapter.target_modules=[q_proj, {side}]", "train.max_steps=3", "train.lr=5e-2"]
    )
    model, tokenizer = load_trained(out)
    assert model.get_base_model().config.tie_word_embeddings
    factors = {"embed_tokens": "lora_embedding_A", "lm_head": "lm_head.lora_B"}
    for factor in (factors[name] for name in side.split(", ")):
        assert any(factor in k and v.abs().sum() > 0 for k, v in adapter_tensors(out).items()), factor
    merge(out, tmp_path / "merged")
    merged = load_tiny(tmp_path / "merged")
    ids = torch.tensor([tokenizer("Natalia sold clips to 48 of her friends")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_packing_trains_through_the_stage(tmp_path, tiny_gpt2):
    out, _ = sft(tmp_path, tiny_gpt2, ["data.packing=true", "data.max_length=512", "train.max_steps=2"])
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


# Every optimizer micro-step appends the unpadded rows it trained on to ROWS_DIR/rank<RANK>.jsonl.
RECORD_ROWS = """
import json, os

def recording(original, rows_dir):
    def training_step(self, model, inputs, *args, **kwargs):
        if "ends" in inputs:  # reward pairs in one row each: [prompt, chosen, rejected] ends at the rejected end
            n = len(inputs["input_ids"])
            rows = [ids[: end + 1].tolist() for ids, end in zip(inputs["input_ids"], inputs["ends"][n:])]
        else:
            rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        with open(os.path.join(rows_dir, "rank%s.jsonl" % os.environ.get("RANK", "0")), "a") as f:
            f.write(json.dumps({"step": self.state.global_step + 1, "rows": rows}) + "\\n")
        return original(self, model, inputs, *args, **kwargs)
    return training_step
"""

LAUNCH = (
    RECORD_ROWS
    + """
import runpy, sys
import transformers

transformers.Trainer.training_step = recording(transformers.Trainer.training_step, os.environ["ROWS_DIR"])
sys.argv = ["align", *sys.argv[1:]]
runpy.run_module("align.cli", run_name="__main__", alter_sys=True)
"""
)


def record_rows_here(monkeypatch, rows_dir: Path) -> None:
    """The same recorder, installed in this process for a single-process reference run."""
    from transformers import Trainer

    rows_dir.mkdir(parents=True, exist_ok=True)
    namespace: dict = {}
    exec(RECORD_ROWS, namespace)
    monkeypatch.setattr(Trainer, "training_step", namespace["recording"](Trainer.training_step, str(rows_dir)))


def torchrun_recorded(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, Path]:
    """`torchrun --nproc_per_node 2 align ARGS` (gloo on CPU) with every rank's rows recorded."""
    launcher, rows_dir = tmp_path / "launch.py", tmp_path / "ddp-rows"
    launcher.write_text(LAUNCH)
    rows_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ROWS_DIR": str(rows_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 process(es)" in " ".join(proc.stdout.split())
    return proc, rows_dir


def recorded_rows(rows_dir: Path, rank: int) -> dict[int, list[tuple]]:
    steps: dict[int, list[tuple]] = {}
    for record in map(json.loads, (rows_dir / f"rank{rank}.jsonl").read_text().splitlines()):
        steps.setdefault(record["step"], []).extend(map(tuple, record["rows"]))
    return steps


def assert_ddp_matches_one_process(
    ddp_rows: Path, one_rows: Path, ddp: Path, one: Path, per_rank: int, steps: int
) -> None:
    """Each rank trained on its own rows, the two ranks together on exactly the single process's
    global batch at every step, and the weights and logged losses came out the same."""
    rank0, rank1, single = recorded_rows(ddp_rows, 0), recorded_rows(ddp_rows, 1), recorded_rows(one_rows, 0)
    assert sorted(rank0) == sorted(rank1) == sorted(single) == list(range(1, steps + 1))
    for step in single:
        assert len(rank0[step]) == len(rank1[step]) == per_rank and len(single[step]) == 2 * per_rank
        assert not set(rank0[step]) & set(rank1[step]), f"step {step}: both ranks trained on the same rows"
        assert sorted(rank0[step] + rank1[step]) == sorted(single[step])
    # Tolerance: fp32 throughout, no dropout, plain SGD (update = lr * gradient, no Adam rescaling).
    # The runs differ only in summation order (gloo all-reduce of two half-batch gradients vs one
    # backward over four rows) and in padding width, which the attention mask removes (RELIABILITY 5);
    # that is float rounding: measured 1.5e-8 (SFT, weights moving by 2e-2) and 6e-7 (RM, lr 1.0 on
    # the head, moving by 0.2). atol 1e-5 leaves room for other thread counts and is still 2000x below
    # the movement; duplicated or missing rows give another gradient, an error of the movement's order.
    a, b = adapter_tensors(ddp), adapter_tensors(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    init = {k: v for k, v in a.items() if "lora_B" in k}  # lora_B starts at zero: how far training moved it
    assert max(v.abs().max().item() for v in init.values()) > 1e-3
    losses = lambda run: [
        (r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert [s for s, _ in losses(ddp)] == [s for s, _ in losses(one)] == list(range(1, steps + 1))
    for (_, x), (_, y) in zip(losses(ddp), losses(one)):
        assert x == pytest.approx(y, rel=1e-5)


DDP_EXACT = ["train.optim=sgd", "train.lr=1.0", "train.max_grad_norm=0", "train.max_steps=2", "data.max_rows=8"]


@pytest.mark.heavy
def test_multi_process_ddp_on_cpu_shards_rows_and_equals_one_process(tmp_path, tiny_llama, monkeypatch):
    """torchrun with 2 processes (gloo), batch 2 each, equals one process with batch 4: each rank
    trains on different rows, together the same global batch, to the same adapter weights."""
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_llama, GSM8K)
    _, ddp_rows = torchrun_recorded(
        tmp_path, "sft", "--recipe", recipe, *DDP_EXACT, "train.batch_size=2", "--output-dir", tmp_path / "ddp"
    )
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["steps"] == 2
    record_rows_here(monkeypatch, tmp_path / "one-rows")
    run_sft(
        load_recipe(recipe).resolve("sft", DDP_EXACT + ["train.batch_size=4"]), tmp_path / "one", recipe_name="tiny"
    )
    assert_ddp_matches_one_process(
        ddp_rows, tmp_path / "one-rows", tmp_path / "ddp", tmp_path / "one", per_rank=2, steps=2
    )


def test_remote_code_in_a_model_folder_never_runs(tmp_path, tiny_llama):
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_llama, folder)
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig as EvilConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", folder, GSM8K))
    # transformers falls back to its own Llama classes when remote code is not trusted
    run_sft(recipe.resolve("sft", ["train.max_steps=1"]), tmp_path / "out", recipe_name="tiny")
    assert not marker.exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "complete"


def test_no_unsafe_loading_in_the_source():
    root = Path(__file__).resolve().parent.parent
    for path in list((root / "align").rglob("*.py")) + list((root / "reward_models").rglob("*.py")):
        text = path.read_text()
        assert "yaml.load(" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            if "trust_remote_code=True" in line:
                raise AssertionError(f"{path}: {line.strip()}")


def test_data_preview_highlights_and_reports(tmp_path, tiny_llama):
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_llama, GSM8K, data={"max_length": 128})
    proc = cli("data", "preview", "--recipe", recipe, "-n", "1")
    text = " ".join(proc.stdout.split())
    assert "train example 1:" in text and "trained" in text
    assert "train: read 40 = kept" in text and "truncated" in text
