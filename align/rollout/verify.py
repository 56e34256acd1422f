"""What every vLLM-backed engine shares: proving that the engine samples from the trainer's policy.

An engine that is not the trainer's own forward (vLLM in this process, vLLM behind a server) must
show after every weight sync that it computes what the trainer computes (RELIABILITY 14):

- the **probe**: the engine's logprobs of a fixed sequence must match the trainer's (mean absolute
  difference per token) within a tolerance set by the coarser precision of the two;
- the **faithfulness check** (at start-up and every ``FAITHFULNESS_EVERY`` syncs): the engine's own
  greedy answers to real prompts, scored by the trainer (logprob gap and greedy agreement).

A sync that fails either leaves the engine refusing to sample (``failed``) until one passes.
``VerifiedEngine`` holds that logic once, and how a generate call becomes vLLM requests and rollouts; an
engine supplies four primitives: ``_push`` (serve a new policy version), ``_score`` (its temperature-1
logprobs of given tokens), ``_greedy`` and ``_sample`` (the sampled ids and logprobs of each request).
"""

from __future__ import annotations

import time

import torch

from align.models.loading import DTYPES
from align.rollout.engine import Rollout, Sampling, SyncError, encode_prompts, finish, stop_token_ids
from align.rollout.scoring import score_rollouts, trainer_view

# Mean |engine - trainer| logprob over the probe's tokens that still counts as in sync. fp32
# engines agree to ~1e-5 here. bf16 logits carry ~3 significant digits: SmolLM2 QLoRA measured
# means of 0.02-0.04 (lora sync) and up to 0.075 (merged sync: deltas rounded into bf16 weights)
# between a bf16 engine and a bf16-autocast trainer, single tokens up to 0.16. So in bf16 the
# probe catches a wrong adapter, base or scaling, not a sync skipped after a small step. The
# tolerance is that of the coarser side (``coarsest``): an fp32 engine (the CPU default) against
# a bf16 trainer measured 0.027 on SmolLM2 QLoRA, the trainer's own rounding.
SYNC_TOLERANCE = {"fp32": 1e-3, "bf16": 0.15, "fp16": 0.1}
# Real prompts whose greedy answers are checked at start-up and after every sync (``faithfulness``):
# a short fact, a GSM8K question, an open request.
FAITHFULNESS_PROMPTS = (
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write one sentence about the sea.",
)
FAITHFULNESS_TOKENS = 16
# Syncs between two faithfulness checks (version 0, the start, is always checked). The check was most of a
# sync's time (BENCHMARKS.md); the probe still runs after every sync, and every
# RL step already compares the engine's logprobs of its samples with the trainer's (logprob_mismatch_*).
FAITHFULNESS_EVERY = 8
# Where the engine's greedy token is not the trainer's argmax, a logprob gap below this is a near
# tie that rounding may flip (bf16 logits carry ~3 digits), not a different model.
NEAR_TIE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}
MIN_GREEDY_AGREEMENT = 0.75
# The probe is plain text, not a chat: it checks weights, not behaviour (the faithfulness check asks real
# questions through the chat template). Every token after the first is compared, so no forward pass is
# spent on an unscored prompt. Its length costs the engine; the trainer's forward through a 4-bit base costs
# about the same whatever the length (every layer is dequantized), so a shorter probe would save little more
# (BENCHMARKS.md).
PROBE = "Count from one to ten in words: one two three four five six seven eight nine ten."


def served_lora(policy):
    """The active peft LoRA config of ``policy``, or None for a model without adapters."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        return None
    config = policy.peft_config[policy.active_adapter]
    if getattr(config, "peft_type", None) is None or config.peft_type.value != "LORA":
        raise ValueError(f"vLLM serves LoRA adapters only; this policy uses {config.peft_type.value}. Use engine hf")
    if getattr(config, "lora_bias", False):
        raise ValueError("vLLM cannot serve LoRA adapters with lora_bias (a bias on lora_B); use engine hf")
    if getattr(config, "use_dora", False) or config.modules_to_save:
        raise ValueError("vLLM cannot serve DoRA adapters or adapters with modules_to_save; use engine hf")
    return config


def compute_precision(policy) -> str:
    """The coarsest dtype the policy's forward computes in, from its weights and 4-bit layers' compute dtype.

    A real trained QLoRA stage loaded at its manifest precision (bf16 where precision was auto)
    computes its NF4 matmuls in bf16; measured against an fp32 engine its probe differed by 0.013
    on average (SmolLM2, 5 AdamW steps), while the same adapter on an fp32-computing base synced
    at 7e-6. Calling that a failed sync (fp32 tolerance 1e-3) would blame the engine for the
    trainer's own rounding.
    """
    names = {dtype: name for name, dtype in DTYPES.items()}
    found = {names[p.dtype] for p in policy.parameters() if p.dtype in names}
    found |= {names[m.compute_dtype] for m in policy.modules() if getattr(m, "compute_dtype", None) in names}
    return coarsest(*found) if found else "fp32"


def coarsest(*precisions: str) -> str:
    """The precision with the largest sync tolerance among ``precisions``."""
    return max(precisions, key=SYNC_TOLERANCE.__getitem__)


def sampling_options(sampling: Sampling, per_request: int, eos_ids: set[int]) -> dict:
    """vLLM's sampling parameters for ``sampling``: keywords of its SamplingParams, and the same names in a
    completions request to its server (seeds are per request, added by the engine)."""
    return dict(
        n=per_request,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        stop_token_ids=sorted(eos_ids),
        logprobs=0,  # the sampled token's own logprob
    )


class VerifiedEngine:
    """The probe, the faithfulness check and the sync bookkeeping of an engine that is not the trainer.

    Subclasses call ``_prepare_checks`` in their constructor, ``_advance(policy, 0, push=...)`` once
    serving, and implement ``_push``, ``_score`` and ``_greedy``.
    """

    samples_from_trainer = False  # sampling is the engine's computation, not the trainer's forward

    def _prepare_checks(self, policy, tokenizer, precision: str, engine_precision: str) -> None:
        """What the checks need: tolerances from both precisions, the probe and the real prompts, tokenized."""
        self.tokenizer = tokenizer
        self.precision = precision  # the trainer's autocast: the probe scores the policy under it
        self.engine_precision = engine_precision  # the weights the engine computes with
        # The coarsest of the three sets how close engine and trainer can be: a policy loaded in
        # bf16 (a stage trained at precision auto, a 4-bit base computing in bf16) computes in
        # bf16 whatever ``precision`` says.
        self.trainer_precision = coarsest(precision, compute_precision(policy))
        self.tolerance = max(SYNC_TOLERANCE[self.trainer_precision], SYNC_TOLERANCE[self.engine_precision])
        self.eos_ids = stop_token_ids(tokenizer, policy)
        self.version = 0
        self.failed: str | None = None  # why the last sync failed; generate refuses while set
        self.fidelity: dict[str, float] = {}
        self.sync_seconds: dict[str, float] = {}
        probe = tokenizer(PROBE)["input_ids"]  # with the tokenizer's BOS, if it adds one
        self.probe = Rollout(0, probe[:1], probe[1:], [], "length", "")  # every token but the first is scored
        self.faithfulness_prompts = encode_prompts(
            tokenizer, [[{"role": "user", "content": q}] for q in FAITHFULNESS_PROMPTS]
        )

    # --- what an engine supplies -------------------------------------------------------------
    def _push(self, policy, version: int) -> None:
        """Serve ``policy``'s current weights as ``version``."""
        raise NotImplementedError

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """The engine's temperature-1 logprob of each completion token after its prompt."""
        raise NotImplementedError

    def _greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """The engine's greedy answer ids to each prompt, ending at an end-of-turn id or ``max_tokens``."""
        raise NotImplementedError

    def _sample(
        self, requests: list[tuple[int, list[int]]], sampling: Sampling, per_request: int
    ) -> list[list[tuple[list[int], list[float]]]]:
        """For each (prompt index, prompt ids) request: ``per_request`` samples as (ids, logprobs), seeded
        ``sampling.seed + prompt index``, stopping at an end-of-turn id, a stop string or max_new_tokens."""
        raise NotImplementedError

    # --- generation --------------------------------------------------------------------------
    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Rollout]:
        """n samples per conversation, prompt-major: rollouts[i * n + j] answers conversation i."""
        return self.generate_ids(encode_prompts(self.tokenizer, conversations), sampling)

    def generate_ids(self, prompts: list[list[int]], sampling: Sampling) -> list[Rollout]:
        self._refuse_if_failed()
        # vLLM refuses n > 1 for greedy sampling; those become n separate single requests.
        copies, per_request = (sampling.n, 1) if sampling.temperature == 0 else (1, sampling.n)
        requests = [(index, prompt) for index, prompt in enumerate(prompts) for _ in range(copies)]
        rollouts = []
        for (index, prompt), samples in zip(requests, self._sample(requests, sampling, per_request)):
            for ids, logprobs in samples:
                completion, logprobs, reason, text = finish(self.tokenizer, ids, logprobs, self.eos_ids, sampling.stop)
                rollouts.append(Rollout(index, list(prompt), completion, logprobs, reason, text, self.version))
        return rollouts

    def stream(self, conversation: list[dict], sampling: Sampling):
        """The answer comes in one piece (neither vLLM's offline LLM nor align's server client streams tokens)."""
        yield self.generate([conversation], sampling)[0].text

    # --- the checks --------------------------------------------------------------------------
    def probe_difference(self, policy) -> float:
        """Largest |engine - trainer| logprob over the probe's completion tokens (temperature 1)."""
        return self.probe_differences(policy).max().item()

    def probe_differences(self, policy) -> torch.Tensor:
        """|engine - trainer| logprob of each of the probe's completion tokens (temperature 1)."""
        probe = self.probe
        trainer = torch.tensor(score_rollouts(policy, [probe], self.tokenizer.pad_token_id, 1.0, self.precision)[0])
        engine = torch.tensor(self._score([probe.prompt_ids], [probe.completion_ids])[0])
        return (engine - trainer).abs()

    def faithfulness(self, policy) -> dict[str, float]:
        """The engine's own greedy answers to a few real prompts, scored by the trainer.

        The fixed probe checks one sequence the policy never wrote; this checks what the engine
        actually produces: mean and max |engine - trainer| logprob per token of its answers, and
        greedy agreement - the share of answer positions where the engine's token is also the
        trainer's most likely one (within a near-tie margin set by precision). A bf16 CPU engine
        once answered "What is the capital of France?" with "L'Etoile, ..." while the trainer
        said Paris: a near tie flipped at the first token, which agreement shows and a probe cannot.
        """
        prompts = self.faithfulness_prompts
        answers = [a or [self.tokenizer.eos_token_id] for a in self._greedy(prompts, FAITHFULNESS_TOKENS)]
        engine = self._score(prompts, answers)
        rollouts = [Rollout(i, p, a, [], "length", "") for i, (p, a) in enumerate(zip(prompts, answers))]
        trainer, agree = trainer_view(
            policy, rollouts, self.tokenizer.pad_token_id, self.precision, NEAR_TIE[self.trainer_precision]
        )
        diffs = torch.tensor([abs(e - t) for es, ts in zip(engine, trainer) for e, t in zip(es, ts)])
        return {
            "engine_mismatch_mean": diffs.mean().item(),
            "engine_mismatch_max": diffs.max().item(),
            "engine_greedy_agreement": agree,
        }

    def sync_weights(self, policy) -> None:
        """Make the engine sample from ``policy``'s current weights, and prove it did."""
        self._advance(policy, self.version + 1, push=True)

    def _refuse_if_failed(self) -> None:
        if self.failed:
            raise SyncError(f"{self.failed}; refusing to sample from weights that do not match the trainer's")

    def _advance(self, policy, version: int, push: bool) -> None:
        clock = time.perf_counter
        try:
            started = clock()
            if push:
                self._push(policy, version)
            pushed = clock()
            difference = self.probe_differences(policy).mean().item()
            probed = clock()
            due = version % FAITHFULNESS_EVERY == 0
            fidelity = self.faithfulness(policy) if due and difference <= self.tolerance else {}
            # where a sync's time goes (logged by the RL stages as time/sync_*; bench_rl reports them)
            self.sync_seconds = {
                "time/sync_push": pushed - started,
                "time/sync_probe": probed - pushed,
                "time/sync_faithfulness": clock() - probed,
            }
        except Exception as error:
            self.failed = f"weight sync to version {version} failed: {error}"
            raise SyncError(self.failed) from error
        self.failed = self._sync_problem(version, difference, fidelity)
        if self.failed:
            raise SyncError(self.failed)
        self.version = version
        self.last_sync_difference = difference
        self.fidelity = fidelity

    def _sync_problem(self, version: int, difference: float, fidelity: dict[str, float]) -> str | None:
        """Why the engine does not serve the trainer's policy after syncing ``version``, or None."""
        where = f"({self.engine_precision} engine, {self.trainer_precision} trainer)"
        if not difference <= self.tolerance:
            return (
                f"after syncing version {version} the engine's probe logprobs differ from the trainer's "
                f"by {difference:.3g} on average (> {self.tolerance:g} {where})"
            )
        if fidelity and not fidelity["engine_mismatch_mean"] <= self.tolerance:
            return (
                f"after syncing version {version} the engine's logprobs of its own answers to real prompts "
                "differ from the trainer's "
                f"by {fidelity['engine_mismatch_mean']:.3g} per token on average (> {self.tolerance:g} {where})"
            )
        if fidelity and not fidelity["engine_greedy_agreement"] >= MIN_GREEDY_AGREEMENT:
            return (
                f"after syncing version {version} the engine's greedy answers agree with the trainer's most "
                f"likely tokens at only {fidelity['engine_greedy_agreement']:.0%} of positions "
                f"(< {MIN_GREEDY_AGREEMENT:.0%} {where}): it answers like another model"
            )
        return None
