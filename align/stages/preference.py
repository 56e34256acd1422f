"""What the preference stages share (dpo and orpo in dpo.py, kto in kto.py; stage files never import
each other): the completion log-probabilities, the policy with its reference - one base in memory,
the reference precomputed before step 0 or live - the collapse watch on the chosen answers, and the
train-evaluate-checkup-save end of a run."""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import TrainerCallback

from align.config import RecipeError
from align.data.batching import PairCollator, SharedPromptCollator
from align.eval.health import preference_drift
from align.models.adapters import add_adapter, load_adapter_for_training
from align.models.attention import mask_for
from align.models.loading import autocast, load_base_model
from align.models.modes import evaluating
from align.models.output_layer import next_token_logps
from align.stages.checkup import checkup_status, raise_if_collapsed, run_checkup, with_training_alarm
from align.stages.common import check_longest_batch, final_evaluation, process_state, save_stage
from align.tokens import IGNORE_INDEX


def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed logprobs of the labelled (answer) tokens and their counts, [2B] each: the first answers,
    then the second ones, from PairCollator's 2B rows or SharedPromptCollator's B rows (``split``).

    The model runs from the first answer position on (``logits_to_keep``) and only the labelled
    positions' logits are made, a chunk at a time (``next_token_logps``): no [2B, T, V] tensor.
    """
    labels = batch["labels"]
    labelled = labels != IGNORE_INDEX
    starts = labelled.int().argmax(-1)[labelled.any(-1)]  # each labelled row's first answer token (>= 1)
    first = int(starts.min()) if len(starts) else labels.shape[1] - 1  # the earliest in the batch
    targets = labels[:, first:]
    inputs = {key: batch[key] for key in ("input_ids", "position_ids") if key in batch}
    inputs["attention_mask"] = mask_for(model, batch["attention_mask"])
    logps = next_token_logps(model, targets, **inputs)[0]
    scored = targets != IGNORE_INDEX
    if "split" not in batch:
        return logps.sum(-1), scored.sum(-1)
    # one row a pair: label positions from ``split`` on are the second answer's
    positions = torch.arange(first, labels.shape[1], device=labels.device)
    second = positions[None, :] >= batch["split"][:, None]
    sums = torch.cat([(logps * ~second).sum(-1), (logps * second).sum(-1)])
    return sums, torch.cat([(scored & ~second).sum(-1), (scored & second).sum(-1)])


@torch.no_grad()
def precompute_reference(
    model, rows: list[dict], collator: PairCollator | SharedPromptCollator, batch_size: int, precision: str
) -> list[dict]:
    """The rows with the reference logprobs of both answers (``ref_<side>``), computed once with the
    starting policy."""
    first, second = collator.sides
    device = next(model.parameters()).device
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collator(chunk).items()}
            with autocast(precision):
                sums, _ = completion_logps(model, batch)
            n = len(chunk)
            for row, one, other in zip(chunk, sums[:n].tolist(), sums[n:].tolist()):
                row[f"ref_{first}"], row[f"ref_{second}"] = one, other
    return rows


# Training logs the watch averages: one log holds a few pairs (4 in the shipped recipes), too few to stop
# a run on; five logs smooth that out and still stop a collapsing run within a few steps.
WATCH_WINDOW = 5


class ChosenWatch(TrainerCallback):
    """DPO's and KTO's side of the collapse alarm: training stops when the chosen (desirable) answers'
    log-probability per token falls more than checkup.max_chosen_drop below the reference's while the
    pairs do not separate - both sides pushed down together (health.preference_drift). A fall while they
    separate is likelihood displacement, which healthy DPO runs show: kept as a ``note`` for the
    manifest, and the checkup judges the policy's own answers at the end.

    Held-out logs (eval_steps) are judged as they come, by both sides' fall and the share of pairs
    ranked right; training logs by both sides' mean fall over the last WATCH_WINDOW logs. The figures
    are each process's own batches' (the stages' stats are not gathered), so under DDP one process can
    cross the threshold while the others do not: every process then stops at that step, or those that
    went on would wait for the stopped one in the next gradient all-reduce for ever."""

    def __init__(self, checkup):
        self.checkup = checkup
        self.reason: str | None = None
        self.note: str | None = None
        self._fall = 0.0  # the largest fall the note has described
        self._recent: deque[tuple[float, float | None]] = deque(maxlen=WATCH_WINDOW)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.reason:
            return  # the same on every process: a reason all of them set at once
        found = None
        for where, (chosen, rejected, accuracy) in self._readings(logs or {}):
            drift = preference_drift(chosen, rejected, accuracy, self.checkup.max_chosen_drop)
            if drift is None or (drift == "displacement" and -chosen <= self._fall):
                continue  # within the threshold, or a displacement no larger than the one the note describes
            rest = f"the rejected answers' fell {-rejected:.3f}" if rejected is not None else "no rejected answers"
            rest += f", pairs ranked right {accuracy:.2f}" if accuracy is not None else ""
            said = (
                f"step {state.global_step}: the {where} chosen answers' log-probability fell {-chosen:.3f} per token "
                f"below the start's (threshold checkup.max_chosen_drop {self.checkup.max_chosen_drop}); {rest}"
            )
            if drift == "collapse":
                found = f"{said}: both pushed down together"
                break
            self._fall = -chosen
            self.note = f"{said}: likelihood displacement while the pairs separate, not a collapse by itself"
        if not self.checkup.alarm:
            return  # the recipe's setting, the same on every process
        if any_process(found is not None):
            self.reason = found or (
                f"step {state.global_step}: on another process the chosen answers' log-probability fell more than "
                f"{self.checkup.max_chosen_drop} per token below the start's while the pairs did not separate"
            )
            control.should_training_stop = True

    def _readings(self, logs: dict):
        """(where, (chosen, rejected, accuracy) per-token log-ratios and pair accuracy) in this log."""
        if "eval_chosen_logratio_per_token" in logs:
            figures = ("eval_chosen_logratio_per_token", "eval_rejected_logratio_per_token", "eval_rewards/accuracies")
            yield "held-out", tuple(logs.get(key) for key in figures)
        if "chosen_logratio_per_token" in logs:
            # their accuracy is left out: a few pairs a log make it noisy, and the first log (policy =
            # reference) counts every pair, a tie, as ranked wrong
            self._recent.append((logs["chosen_logratio_per_token"], logs.get("rejected_logratio_per_token")))
            where = f"training (mean of the last {len(self._recent)} logs)" if len(self._recent) > 1 else "training"
            yield where, (*(_mean(column) for column in zip(*self._recent)), None)


def _mean(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it at the same point)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_world_size() == 1:
        return flag
    votes = torch.tensor([float(flag)], device=process_state().device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return bool(votes.item())


def start_policy(cfg, model_path, source: Path | None, steps: int, live: bool, precision: str):
    """A preference stage's policy: the base with a fresh adapter or the `from` stage's, trainable; with
    a live reference and a `from` stage, a frozen copy of the start adapter named "reference".
    Returns (model, the reference adapter's name or None)."""
    quantized = cfg.quantization.mode != "none"
    if cfg.adapter.method == "full":
        raise RecipeError(
            f"{cfg.kind}: adapter.method=full would need a second full model as reference; use an adapter"
        )
    base = load_base_model(cfg.model, cfg.quantization, precision, model_path)
    if source is None:
        model = add_adapter(base, cfg.adapter, cfg.lora, quantized, cfg.train.gradient_checkpointing, steps)
    else:
        frozen_copy = "reference" if live else None
        model = load_adapter_for_training(
            base, source / "adapter", quantized, cfg.train.gradient_checkpointing, frozen_copy=frozen_copy
        )
    model.config.use_cache = False
    if torch.cuda.is_available() and not quantized:  # the reference runs exactly as the policy will at step 0
        model.to(process_state().device)
    return model, ("reference" if live and source is not None else None)


def reference_rows(
    cfg, model, source, rows: tuple[list[dict], list[dict]], collator, none: str | None, live, precision
):
    """(train rows, held-out rows, the plan's reference line, seconds): the rows with the reference's
    logprobs of both answers precomputed, or as they are when the reference is live (every step) or
    ``none`` (the line saying why there is none)."""
    start = "the base with the adapter disabled" if source is None else f"the starting adapter from {source} (frozen)"
    if none or live:
        return *rows, (f"live every step: {start}" if live else none), 0.0
    started = time.time()
    with model.disable_adapter() if source is None else nullcontext():
        train, held_out = (precompute_reference(model, r, collator, cfg.train.batch_size, precision) for r in rows)
    return train, held_out, f"precomputed before step 0 from {start}", round(time.time() - started, 1)


def train_and_save(
    cfg, trainer, train_rows, watch, tokenizer, source, reference_adapter, resume_from, started, output_dir, **manifest
) -> dict | None:
    """A preference stage's steps 5 and 6: the longest-batch check, training, the final held-out
    evaluation; then, on the main process, the checkup and the saved stage (its manifest: ``manifest``
    plus what training measured; a frozen reference copy is not part of the result). Returns the final
    held-out metrics ({} without held-out rows) on the main process, None on the others."""
    check_longest_batch(trainer, train_rows)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final_eval = final_evaluation(trainer, trainer.eval_dataset is not None)
    if not trainer.is_world_process_zero():
        return None
    model = trainer.model
    if reference_adapter:
        model.delete_adapter(reference_adapter)
    precision = manifest["precision"]
    checkup = with_training_alarm(run_checkup(cfg, model, tokenizer, source, precision), watch.reason, watch.note)
    save_stage(
        trainer,
        tokenizer,
        output_dir,
        "adapter",
        started,
        stage=cfg.kind,
        kind=cfg.kind,
        steps=result.global_step,
        train_loss=result.training_loss,
        eval_loss=final_eval.get("eval_loss"),
        **{f"eval_{key}": final_eval.get(f"eval_{name}") for key, name in HELD_OUT_FIGURES[cfg.kind].items()},
        resumed_from=str(resume_from) if resume_from else None,
        checkup=checkup,
        status=checkup_status(cfg, checkup),
        **manifest,
    )
    raise_if_collapsed(cfg, checkup, output_dir)
    return final_eval


# the final held-out metrics a stage kind's manifest keeps, as manifest key -> metric
HELD_OUT_FIGURES = {
    "dpo": {"reward_accuracy": "rewards/accuracies"},
    "orpo": {"reward_accuracy": "rewards/accuracies", "nll_loss": "nll_loss"},
    "kto": {"kl": "kl", "reward_margin": "rewards/margins"},
}
