"""Reward models: the base LM with a scalar head, scored at the last real token.

The model is transformers' *ForSequenceClassification (num_labels=1) for the head, and peft's
SEQ_CLS task saves that head beside the adapter. We do not use its built-in pooling, which finds
the last token by comparing ids with pad_token_id: with pad == eos (SmolLM2) it would skip the
end-of-turn token every answer ends with. We pool by the attention mask instead, so right, left
and no padding give the same score.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.config import ModelConfig, QuantizationConfig, RecipeError
from align.models.attention import mask_for
from align.models.loading import DTYPES, bnb_config, disable_bnb_cpu_repacking, load_tokenizer, read_stage_manifest
from align.models.unwrap import inner_model

HEAD_NAMES = ("score", "classifier")


class MissingRewardHead(RuntimeError):
    pass


def load_reward_base(
    model_cfg: ModelConfig,
    quant: QuantizationConfig,
    precision: str,
    path: Path,
    full_finetune: bool = False,
    head: str = "new",
):
    """The base with a scalar head. ``head``: 'new' (a stage about to train it) or 'adapter' (it is
    loaded from the saved adapter next); either way transformers' 'score.weight MISSING' is expected."""
    from transformers import AutoModelForSequenceClassification

    from align.quiet import expected_missing_weights

    quantization = None if full_finetune else bnb_config(quant, DTYPES[precision])
    instead = (
        "reward head: a new scalar head on the base, trained by this stage"
        if head == "new"
        else "reward head: loaded from the trained adapter"
    )
    with expected_missing_weights(
        tuple(f"{name}.{part}" for name in HEAD_NAMES for part in ("weight", "bias")), instead
    ):
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=torch.float32 if full_finetune else DTYPES[precision],
            quantization_config=quantization,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision,
        )
    if quantization is not None:
        disable_bnb_cpu_repacking(model)
    return model


def _head(model):
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return getattr(model, name)
    raise MissingRewardHead(f"{type(model).__name__} has no scalar head ({' or '.join(HEAD_NAMES)})")


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per row [B], read at each row's last attended token (any padding side)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).int().argmax(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return _scores_at(model, input_ids, attention_mask, position_ids, rows, last)


def pair_scores(model, batch: dict) -> torch.Tensor:
    """[2B] scores of a pair batch, the chosen answers then the rejected ones, from either layout:
    PairCollator's 2B padded rows or SharedPromptCollator's B shared-prompt rows."""
    if "ends" not in batch:
        return reward_scores(model, batch["input_ids"], batch["attention_mask"])
    mask = mask_for(model, batch["attention_mask"])
    n = batch["input_ids"].shape[0]
    rows = torch.arange(n, device=mask.device).repeat(2)
    return _scores_at(model, batch["input_ids"], mask, batch["position_ids"], rows, batch["ends"])


def _scores_at(model, input_ids, attention_mask, position_ids, rows, positions) -> torch.Tensor:
    """The head applied to the final hidden state at (rows[i], positions[i]).

    The forward goes through ``model`` itself (so a DDP wrapper synchronises gradients); its own
    pad-id pooled logits are ignored and the head is applied to the final hidden state instead.
    """
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = output.hidden_states[-1]  # after the final norm, as the head expects
    head = _head(inner_model(model))
    pooled = hidden[rows, positions]
    return head(pooled.to(next(head.parameters()).dtype)).squeeze(-1).float()


def check_head_saved(adapter_dir: Path) -> None:
    """A reward adapter without its head would score with a random head: refuse it."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise MissingRewardHead(f"{adapter_dir}: no adapter_model.safetensors")
    with safe_open(str(weights), "pt") as handle:
        if not any(name in key for key in handle.keys() for name in HEAD_NAMES):
            raise MissingRewardHead(
                f"{weights} holds no reward head ({' or '.join(HEAD_NAMES)} weights); it cannot score"
            )


def load_reward_model(folder: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer) from a finished `rm` stage folder, in eval mode; remote code only when the
    caller (the user's command or recipe) asks, never because the folder's config says so."""
    from peft import PeftModel

    from align.models.trained import stage_config

    folder = Path(folder)
    manifest = read_stage_manifest(folder)
    if manifest.get("kind") != "rm" or manifest.get("status") != "complete":
        raise FileNotFoundError(f"{folder}: not a finished reward-model stage")
    cfg = stage_config(folder, trust_remote_code)
    artifact = folder / manifest["artifact"]
    tokenizer = load_tokenizer(cfg.model, artifact)
    if manifest["artifact"] == "model":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(artifact, trust_remote_code=trust_remote_code)
    else:
        check_head_saved(artifact)
        base = load_reward_base(
            cfg.model, cfg.quantization, manifest["precision"], Path(manifest["base_model_path"]), head="adapter"
        )
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, artifact)
    model.eval()
    return model, tokenizer


def value_head_for(policy, init: str, reward_dir: Path | None) -> torch.nn.Linear:
    """A linear value head on the final hidden state: zeros, or the learned reward model's head."""
    hidden = (
        policy.get_base_model().config.hidden_size if hasattr(policy, "get_base_model") else policy.config.hidden_size
    )
    head = torch.nn.Linear(hidden, 1, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if init == "reward":
        from safetensors.torch import load_file

        if reward_dir is None:
            raise RecipeError("ppo.value_head_init=reward needs reward: {type: learned, ...}")
        tensors = load_file(str(reward_dir / "adapter" / "adapter_model.safetensors"))
        score = next(
            (
                v
                for k, v in tensors.items()
                if k.endswith(".weight") and any(f".{n}." in k for n in HEAD_NAMES) and v.shape == head.weight.shape
            ),
            None,
        )
        if score is None:
            raise RecipeError(
                f"{reward_dir}: no reward head of shape {tuple(head.weight.shape)} to start the value head from"
            )
        with torch.no_grad():
            head.weight.copy_(score.float())
    return head.to(next(policy.parameters()).device)
