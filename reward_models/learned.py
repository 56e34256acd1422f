"""A trained Bradley-Terry reward model (an `align rm` stage folder) as a reward."""

from __future__ import annotations

import torch

from align.data.batching import PaddingCollator
from align.data.templating import encode_conversation, end_of_turn_ids
from align.models.reward import load_reward_model, reward_scores
from align.tokens import IGNORE_INDEX


class LearnedReward:
    """Scores (prompt messages, completion) with the ids the reward model was trained on:
    the prompt with the generation prompt, then the answer through its end-of-turn token."""

    def __init__(self, folder, batch_size: int = 8, trust_remote_code: bool = False):
        from pathlib import Path

        from align.models.trained import stage_config

        self.model, self.tokenizer = load_reward_model(folder, trust_remote_code)
        data = stage_config(Path(folder)).data  # score with the system prompt and length budget it was trained with
        self.system_prompt, self.max_length = data.system_prompt, data.max_length
        if torch.cuda.is_available() and not getattr(self.model, "is_loaded_in_4bit", False):
            self.model.to("cuda")
        self.name = f"learned:{folder}"
        self.batch_size = batch_size
        self.collate = PaddingCollator(self.tokenizer.pad_token_id)
        self.eot_ids = end_of_turn_ids(self.tokenizer)

    def encode(self, prompt: list[dict], completion: str) -> list[int]:
        if self.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": self.system_prompt}] + prompt
        encoded = encode_conversation(
            self.tokenizer, prompt + [{"role": "assistant", "content": completion}], 1 << 30, self.eot_ids
        )
        last = max(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
        return encoded.input_ids[: min(last + 1, self.max_length)]  # training cut answers at max_length too

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = self.collate([{"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)} for ids in chunk])
            scores += reward_scores(
                self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            ).tolist()
        return scores
