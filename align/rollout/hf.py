"""Generation with transformers' `generate`: left-padded batches, prompts encoded exactly as in training.

This is the fallback engine and the reference for the others; the RL issue grows it into a
RolloutEngine with per-token logprobs and weight sync.
"""

from __future__ import annotations

import torch

from align.data.templating import encode_prompt, end_of_turn_ids


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Completions (text, end-of-turn stripped) for each conversation's next assistant turn."""
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(end_of_turn_ids(tokenizer)),
        pad_token_id=pad,
        **sampling,
    )
    return [tokenizer.decode(row[longest:], skip_special_tokens=True).strip() for row in output]
