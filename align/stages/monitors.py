"""What an RL stage is judged by while it trains: its training reward (the proxy) and the monitor
rewards it never trains on (a gold verifier beside a learned reward model), on held-out prompts.

  measure  - one answer per held-out prompt (a fixed seed: the same draw every time), scored by the
             proxy and every monitor: before the first step, every monitor.every steps, after the last
  best     - the measurement with the highest primary monitor (the first named) and the policy's
             adapter weights there, kept in memory and in every checkpoint
  hacking  - the primary monitor significantly below its best while the proxy is at or above its
             value there: over-optimisation of the proxy (Gao et al. 2022), said in words; with
             monitor.on_hacking: stop, the stage stops
  select   - monitor.select: best puts the best measurement's weights back before the stage is saved

Significance is paired: the same prompts, answered with the same seed, scored at the best step and
now; the primary monitor has fallen when the 95% interval of the mean per-prompt difference (normal
approximation, mean +- 1.96 x its standard error) lies wholly below zero. Pairing removes the
prompts' own difficulty from the comparison, so a few dozen held-out prompts can show a real fall.
Each measurement is one more test, so over many measurements a false alarm grows likelier; the
message gives the numbers to judge it by. Measuring draws no random number the update uses and
changes no weight: a stage trains the same with or without monitors.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from align.console import console
from align.data.prompt_data import PromptExample
from align.stages.ranks import spread, unspread
from align.stages.rollouts import sampling, score

BEST_ADAPTER_FILE = "best_adapter.safetensors"  # in RL checkpoints: the weights of the best measurement


def held_out_scores(engine, rewards: dict, held_out: list[PromptExample], cfg) -> dict[str, list[float]] | None:
    """One answer per held-out prompt (the rollout temperature, a fixed seed), scored by each of
    ``rewards`` (name -> reward): name -> the per-prompt scores, in the prompts' order. None without
    held-out prompts."""
    if not held_out:
        return None
    mine = spread(held_out)  # each process answers every N-th prompt; every process gets all the scores
    settings = replace(sampling(cfg, step=0), n=1, seed=cfg.seed + 12345)
    rollouts = engine.generate([p.messages for p in mine], settings)
    return {
        name: unspread(score(reward, mine, rollouts).tolist() if mine else [], len(held_out))
        for name, reward in rewards.items()
    }


def summary(scores: dict[str, list[float]] | None) -> dict[str, float] | None:
    """{name: mean, name_ci: the half-width of its normal-approximation 95% interval}.

    >>> summary({"exact": [1.0, 0.0, 1.0, 0.0]})  # doctest: +ELLIPSIS
    {'exact': 0.5, 'exact_ci': 0.5658...}
    """
    if scores is None:
        return None
    out = {}
    for name, values in scores.items():
        out[name] = _mean(values)
        out[f"{name}_ci"] = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return out


def agreement(scores: dict[str, list[float]] | None) -> dict[str, float]:
    """How often the proxy orders two held-out answers as each monitor does: over every pair of answers
    the monitor scores differently, the share the proxy scores the same way round (a proxy tie counts
    half), as 'proxy_agrees/<monitor>'. 0.5 is chance. It is the proxy's accuracy where the policy is
    now: it falls when the policy finds answers the proxy overrates. Pairs are across prompts (one
    answer each), so a prompt's difficulty is part of what the proxy must see; a monitor that scores
    every answer alike has no entry.

    >>> agreement({"proxy": [0.9, 0.1, 0.5], "exact": [1.0, 0.0, 0.0]})
    {'proxy_agrees/exact': 1.0}
    >>> agreement({"proxy": [0.1, 0.9, 0.9], "exact": [1.0, 0.0, 1.0]})
    {'proxy_agrees/exact': 0.25}
    """
    out = {}
    for name, values in (scores or {}).items():
        if name == "proxy":
            continue
        agree = pairs = 0.0
        for i, (mi, pi) in enumerate(zip(values, scores["proxy"])):
            for mj, pj in zip(values[i + 1 :], scores["proxy"][i + 1 :]):
                if mi != mj:
                    pairs += 1
                    agree += 0.5 if pi == pj else float((mi > mj) == (pi > pj))
        if pairs:
            out[f"proxy_agrees/{name}"] = agree / pairs
    return out


def paired_fall(now: list[float], then: list[float]) -> tuple[float, float]:
    """(mean of now - then per prompt, the upper end of its 95% interval): a fall is significant when
    the upper end is below zero.

    >>> paired_fall([0.0] * 8 + [1.0] * 2, [1.0] * 10)  # doctest: +ELLIPSIS
    (-0.8, -0.5...)
    >>> paired_fall([1.0, 0.0], [0.0, 1.0])[1] > 0
    True
    """
    diffs = [a - b for a, b in zip(now, then)]
    mean = _mean(diffs)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return mean, mean + 1.96 * error


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def build_monitors(cfg, recipe_name: str) -> dict:
    """The stage's monitor.rewards, built (name -> reward): checked before any model loads."""
    from align.stages.common import referenced_dirs
    from reward_models import build_reward

    stages = referenced_dirs(cfg, recipe_name)
    return {name: build_reward(spec, stages, cfg.model.trust_remote_code) for name, spec in cfg.monitor.rewards.items()}


def adapter_weights(policy) -> dict[str, torch.Tensor]:
    """A copy of the trained adapter's weights (peft's "default"), on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(policy, adapter_name="default").items()}


class HeldOut:
    """An RL stage's held-out measurements, its best one and the reward-hacking alarm (module docstring).
    ``resume_from`` (a checkpoint folder) brings back the start, the best and its weights."""

    def __init__(self, cfg, engine, policy, reward, monitors: dict, held_out, loop: dict, resume_from: Path | None):
        self.cfg, self.engine, self.policy, self.held_out = cfg, engine, policy, held_out
        self.rewards = {"proxy": reward, **monitors}
        self.primary = next(iter(monitors), None)
        self.hacking: str | None = None
        self.end: dict | None = None
        self._last: tuple[int, dict | None] | None = None
        saved = loop.get("held_out")
        if saved is not None:  # resumed
            self.start, self.best = saved["start"], saved["best"]
            self.best_weights = None
            if self.best is not None:
                from safetensors.torch import load_file

                self.best_weights = load_file(str(resume_from / BEST_ADAPTER_FILE))
        else:
            self.start = held_out_scores(engine, self.rewards, held_out, cfg)
            self.best = {"step": 0, "scores": self.start} if self.primary and self.start else None
            self.best_weights = adapter_weights(policy) if self.best else None  # the start may stay the best

    def after_step(self, step: int, log) -> str | None:
        """Measures after the step when monitor.every says so (into the step's row); returns why the stage
        must stop (monitor.on_hacking: stop and the alarm went off), else None."""
        every = self.cfg.monitor.every
        if not (self.held_out and every and step % every == 0):
            return None
        scores = held_out_scores(self.engine, self.rewards, self.held_out, self.cfg)
        self._last = (step, scores)
        log.add(**{f"held_out/{key}": value for key, value in {**summary(scores), **agreement(scores)}.items()})
        return self._judge(step, scores)

    def _judge(self, step: int, scores: dict[str, list[float]]) -> str | None:
        if self.best is None:
            return None
        best = self.best["scores"]
        p = self.primary
        if sum(scores[p]) >= sum(best[p]):  # a new best (ties: the later, further-trained policy)
            self.best = {"step": step, "scores": scores}
            self.best_weights = adapter_weights(self.policy)
            return None
        fall, upper = paired_fall(scores[p], best[p])
        proxy_now, proxy_then = _mean(scores["proxy"]), _mean(best["proxy"])
        if upper < 0 and proxy_now >= proxy_then and self.hacking is None:
            self.hacking = (
                f"step {step}: reward hacking - monitor {p!r} is {_mean(scores[p]):.3f}, below its best "
                f"{_mean(best[p]):.3f} at step {self.best['step']} (paired fall {-fall:.3f}, 95% interval "
                f"excludes 0) while the proxy is {proxy_now:.3f}, at or above its {proxy_then:.3f} there"
            )
            console.print(f"[bold yellow]{self.hacking}[/]")
            if self.cfg.monitor.on_hacking == "stop":
                return self.hacking
        return None

    def finish(self, step: int) -> None:
        """The end: the last step's own measurement when it had one, else measured now; then, with
        monitor.select: best, the best measurement's weights go back into the policy."""
        if self._last and self._last[0] == step:
            self.end = self._last[1]
        else:
            self.end = held_out_scores(self.engine, self.rewards, self.held_out, self.cfg)
            if self.end is not None:
                self._judge(step, self.end)
        if self.selected_step(step) != step:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, self.best_weights, adapter_name="default")
            console.print(
                f"kept the policy of step {self.best['step']}, the best by monitor {self.primary!r} (monitor.select: "
                f"best; the last step was {step})"
            )

    def selected_step(self, last: int) -> int:
        """The step whose policy the stage outputs: the best measurement's with monitor.select: best."""
        return self.best["step"] if self.best is not None and self.cfg.monitor.select == "best" else last

    def state(self) -> dict:
        """The loop state a checkpoint keeps: the start and the best measurement (per-prompt scores)."""
        return {"held_out": {"start": self.start, "best": self.best}}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The extra tensor files a checkpoint keeps: the best measurement's adapter weights."""
        return {BEST_ADAPTER_FILE: self.best_weights} if self.best_weights is not None else {}

    def manifest(self, last: int) -> dict:
        start, end = summary(self.start), summary(self.end)
        record = {
            "eval_reward_start": start["proxy"] if start else None,
            "eval_reward_end": end["proxy"] if end else None,
            "held_out_start": start,
            "held_out_end": end,
            "proxy_agreement": {"start": agreement(self.start), "end": agreement(self.end)} if self.primary else None,
        }
        if self.best is not None:
            record["monitor"] = {
                "primary": self.primary,
                "best_step": self.best["step"],
                "at_best": summary(self.best["scores"]),
                "hacking": self.hacking,
                "selected_step": self.selected_step(last),
            }
        return record

    def plot(self, output_dir: Path, last: int) -> Path | None:
        """overoptimization.png of this stage's measurements (plot_overoptimization)."""
        return plot_overoptimization(output_dir, summary(self.start), summary(self.end), last)

    def line(self) -> str | None:
        """'held-out, one answer per prompt: proxy 0.500 -> 0.700, exact 0.400 -> 0.300' (None without any)."""
        start, end = summary(self.start), summary(self.end)
        if not start or not end:
            return None
        agrees = [(key.split("/", 1)[1], a, agreement(self.end).get(key)) for key, a in agreement(self.start).items()]
        return "held-out, one answer per prompt: " + ", ".join(
            [f"{name} {start[name]:.3f} -> {end[name]:.3f}" for name in self.rewards]
            + [f"proxy orders answers as {n} does {a:.2f} -> {b:.2f}" for n, a, b in agrees if b is not None]
        )


def plot_overoptimization(output_dir: Path, start: dict | None, end: dict | None, last_step: int) -> Path | None:
    """overoptimization.png: the held-out proxy and each monitor at every measurement (start, every
    monitor.every steps, end), with their 95% intervals, against the RL step and - where the step's KL
    to the reference was logged - against sqrt(KL), the axis on which over-optimisation is usually
    drawn (Gao et al. 2022: the gold score rises, peaks and falls while the proxy keeps rising).
    None without held-out measurements."""
    from align.tracking import read_metrics

    if not start or not end:
        return None
    names = [key for key in start if not key.endswith("_ci")]
    rows = [r for r in read_metrics(output_dir / "metrics.jsonl") if f"held_out/{names[0]}" in r]
    points = [(0, 0.0, start)] + [
        (
            r["step"],
            r.get("kl"),
            {n: r[f"held_out/{n}"] for n in names} | {f"{n}_ci": r[f"held_out/{n}_ci"] for n in names},
        )
        for r in rows
    ]
    if points[-1][0] != last_step:
        points.append((last_step, None, end))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_kl = all(kl is not None for _, kl, _ in points)
    fig, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(10 if with_kl else 6, 3.5), dpi=120, squeeze=False)
    xs = [("RL step", [step for step, _, _ in points])]
    if with_kl:
        xs.append(("sqrt(KL to the reference)", [max(kl, 0.0) ** 0.5 for _, kl, _ in points]))
    for ax, (label, x) in zip(axes[0], xs):
        for name in names:
            y = [values[name] for _, _, values in points]
            ci = [values[f"{name}_ci"] for _, _, values in points]
            ax.errorbar(x, y, yerr=ci, marker="o", capsize=3, label=name if name != "proxy" else "proxy (trained on)")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out reward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = output_dir / "overoptimization.png"
    fig.savefig(path)
    plt.close(fig)
    return path
