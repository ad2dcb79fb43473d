"""What ``ibkd distill`` adds to sentence-transformers' trainer, as ``TrainerCallback``\\ s: the per-step
training log (loss terms, β, the HSIC/InfoNCE gradient-norm ratio), the NaN policy, and a test hook.

The trainer's own log (console, ``report_to``) averages the loss components over ``logging_steps``; the
JSON-lines log here keeps one exact record per optimizer step, which the reproduction's curves and the
resume test read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from .errors import TrainingStopped

log = logging.getLogger("ibkd.distill")

LOG_NAME = "train_log.jsonl"
TERMS = ("loss", "infonce", "hsic", "mse", "beta", "grad_norm_infonce", "grad_norm_hsic")


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN/Inf; the message names the step, the term and the last good checkpoint."""


class StepTerms:
    """Collects the objective's detached output of every micro-batch of one optimizer step (the loss keeps
    the last one as ``last_output``); the trainer calls :meth:`add` after each forward pass."""

    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def add(self, output: dict) -> None:
        self.outputs.append({k: float(v) for k, v in output.items() if k in TERMS and v.numel() == 1})

    def non_finite(self) -> Optional[str]:
        """The first non-finite term of the newest micro-batch, or None."""
        newest = self.outputs[-1] if self.outputs else {}
        for key in ("infonce", "hsic", "mse", "loss"):  # the term that broke first, then the total
            if key in newest and not math.isfinite(newest[key]):
                return f"{key} loss" if key != "loss" else "loss"
        return None

    def mean(self) -> dict:
        keys = [k for k in TERMS if any(k in o for o in self.outputs)]
        out = {k: sum(o[k] for o in self.outputs if k in o) / sum(k in o for o in self.outputs) for k in keys}
        self.outputs = []
        return out


class TrainLogCallback(TrainerCallback):
    """One JSON line per optimizer step in ``<output_dir>/train_log.jsonl``: step, epoch, the loss terms
    (unweighted HSIC, β), gradient norms of both terms at the student output, learning rate and throughput.
    On resume, lines past the checkpoint's step are dropped so the log matches the weights."""

    def __init__(self, output_dir: Path, terms: StepTerms, rows_per_step: int, is_main: bool) -> None:
        self.path = Path(output_dir) / LOG_NAME
        self.terms, self.rows_per_step, self.is_main = terms, rows_per_step, is_main
        self._started = time.perf_counter()
        self._lr: Optional[float] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.is_main:
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
                self.path.write_text("".join(line + "\n" for line in kept))
        self._started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # the rate this step applies (the scheduler moves on right after it)
            self._lr = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._started
        terms = self.terms.mean()
        if self.is_main:
            record = {"step": state.global_step, "epoch": state.epoch, **terms}
            if terms.get("grad_norm_infonce"):
                record["grad_ratio_hsic_infonce"] = terms.get("grad_norm_hsic", 0.0) / terms["grad_norm_infonce"]
            record["lr"] = self._lr
            record["sentences_per_s"] = self.rows_per_step / elapsed if elapsed > 0 else None
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._started = time.perf_counter()


class NanPolicyCallback(TrainerCallback):
    """``nan_policy=skip``: a step in which any micro-batch gave a non-finite loss does not update the
    weights (the gradients are dropped before the optimizer runs: AdamW skips parameters without a
    gradient, so neither the weights nor the moment estimates move), up to ``max_nan_skips`` steps.
    ``stop`` is handled where the loss is computed (before the backward pass), see the trainer."""

    def __init__(self, parameters: list, max_skips: int) -> None:
        self.parameters, self.max_skips = parameters, max_skips
        self.pending: Optional[str] = None
        self.skips = 0

    def flag(self, what: str) -> None:
        self.pending = self.pending or what

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pending is None:
            return
        self.skips += 1
        log.warning("non-finite %s at step %d: step skipped (%d of at most %d)", self.pending,
                    state.global_step + 1, self.skips, self.max_skips)
        if self.skips > self.max_skips:
            raise NonFiniteLossError(f"non-finite {self.pending} at step {state.global_step + 1}: more than "
                                     f"max_nan_skips={self.max_skips} skipped steps")
        for p in self.parameters:
            p.grad = None
        self.pending = None


class StepDelayCallback(TrainerCallback):
    """Sleeps after each step (``step_delay_s``): lets tests interrupt a run at a known point."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def finite_state(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.state_dict().values() if torch.is_floating_point(p))
