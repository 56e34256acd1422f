"""The transformers engine: batched `generate` with left padding and a KV cache, on the policy itself.

Works on anything the loader builds, 4-bit QLoRA policies with adapters included, and samples
from the very object the trainer updates, so it can never be stale: ``sync_weights`` only
points it at the policy. It is the fallback when vLLM is absent and the reference in tests.

Sampling is done by our own logits processor (``_Sampler``) rather than generate's warpers:
transformers does not return the logprob of the sampled token under the warped distribution
without keeping [steps, B, V] scores, and its warpers would pick up defaults from the model's
generation_config. Ours applies temperature, top-k, top-p, draws from a seeded generator,
records the logprob, and forces that token; generate itself runs greedy.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from align.models.loading import autocast
from align.models.modes import evaluating
from align.rollout.engine import Rollout, Sampling, encode_prompts, finish, stop_token_ids


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering: removed entries become -inf. [B, V] -> [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


class _Sampler(LogitsProcessor):
    """Draws the next token itself and records its logprob; returns scores that force it."""

    def __init__(self, sampling: Sampling, generator: torch.Generator):
        self.sampling = sampling
        self.generator = generator
        self.logprobs: list[torch.Tensor] = []  # [B] per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.sampling.temperature == 0:
            logp = scores.log_softmax(-1)
            chosen = scores.argmax(-1)
        else:
            logp = filter_logits(
                scores / self.sampling.temperature, self.sampling.top_k, self.sampling.top_p
            ).log_softmax(-1)
            chosen = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(-1)
        self.logprobs.append(logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter(-1, chosen.unsqueeze(-1), 0.0)


class HFEngine:
    """An Engine (rollout/engine.py) on transformers' generate. ``batch_size`` bounds sequences per generate call."""

    name = "hf"

    def __init__(self, policy, tokenizer, precision: str = "fp32", batch_size: int = 32):
        self.policy = policy
        self.tokenizer = tokenizer
        self.precision = precision
        # The policy's own forward draws the tokens. In fp32 that is the trainer's computation (rescored
        # logprobs agree to ~1e-5); under bf16 autocast the KV-cached decode rounds differently from
        # the trainer's full forward (0.031 nats/token measured, BENCHMARKS.md), so the RL loops
        # correct it like any other sampler's.
        self.samples_from_trainer = precision == "fp32"
        self.batch_size = batch_size
        self.version = 0
        self.eos_ids = stop_token_ids(tokenizer, policy)

    def describe(self) -> str:
        return f"hf (transformers generate, batches of {self.batch_size}, {self.precision})"

    def sync_weights(self, policy) -> None:
        """Nothing to copy: this engine samples from the policy object the trainer updates."""
        self.policy = policy
        self.version += 1

    def _generation_config(self, sampling: Sampling) -> GenerationConfig:
        # Every processor that a model's generation_config could switch on is set to neutral here,
        # because generate fills unset fields from it; sampling itself happens in _Sampler.
        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            stop_strings=list(sampling.stop) or None,
            use_cache=True,
        )

    @torch.no_grad()
    def _generate_rows(
        self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator, streamer=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw completion ids [B, new] and logprobs [B, new] for left-padded prompts."""
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        device = next(self.policy.parameters()).device
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampler = _Sampler(sampling, generator)
        with autocast(self.precision):
            output = self.policy.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(sampling),
                logits_processor=LogitsProcessorList([sampler]),
                tokenizer=self.tokenizer if sampling.stop else None,
                streamer=streamer,
            )
        return output[:, longest:].cpu(), torch.stack(sampler.logprobs, dim=1).cpu()

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Rollout]:
        """n samples per conversation, prompt-major: rollouts[i * n + j] answers conversation i."""
        return self.generate_ids(encode_prompts(self.tokenizer, conversations), sampling)

    def generate_ids(self, prompts: list[list[int]], sampling: Sampling) -> list[Rollout]:
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        generator = torch.Generator(device=next(self.policy.parameters()).device).manual_seed(sampling.seed)
        rollouts = []
        with evaluating(self.policy):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                ids, logps = self._generate_rows([p for _, p in chunk], sampling, generator)
                for (index, prompt), row_ids, row_logps in zip(chunk, ids.tolist(), logps.tolist()):
                    completion, logprobs, reason, text = finish(
                        self.tokenizer, row_ids, row_logps, self.eos_ids, sampling.stop
                    )
                    rollouts.append(Rollout(index, list(prompt), completion, logprobs, reason, text, self.version))
        return rollouts

    def stream(self, conversation: list[dict], sampling: Sampling) -> Iterator[str]:
        """Text pieces of one answer as they are generated (for `align chat`)."""
        prompt = encode_prompts(self.tokenizer, [conversation])[0]
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generator = torch.Generator(device=next(self.policy.parameters()).device).manual_seed(sampling.seed)
        self.policy.eval()
        worker = threading.Thread(target=self._generate_rows, args=([prompt], sampling, generator, streamer))
        worker.start()
        yield from streamer
        worker.join()

    def close(self) -> None:
        pass
