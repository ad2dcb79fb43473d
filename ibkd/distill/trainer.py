"""The IBKD trainer: stage 1 ``distill``, stage 2 ``finetune`` and the baselines, in one loop.

Stage 1 (unlabeled sentences + teacher vectors t):  ``InfoNCE(P(s), t) + β·HSIC(x, s)`` with x the pooled
embedding-layer output of the student (layer 0). Stage 2 (anchor, positive[, hard negative]):
``InfoNCE(P(a), P([p; n])) + β·HSIC(x_a, a)`` with x the pooled penultimate layer. Baselines by
``method``: ``ibkd``, ``contrastive`` (β = 0), ``mse`` (stage 1: ‖P(s) − t‖²) and ``none`` (evaluate the
initial student).

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` rows each (a micro-batch is one
contrastive batch). With ``grad_cache_chunk`` the micro-batch is embedded in chunks without grad, the
loss is backpropagated to the embeddings, and each chunk is re-embedded with grad (GradCache; the RNG
state of each chunk is replayed so dropout masks match). Under ``torchrun`` every rank embeds its slice
of the micro-batch; embeddings are all-gathered with gradient and every rank computes the loss over the
whole batch; encoder gradients are summed across ranks (each rank holds only its own rows' share), so
gradients equal the single-process run on the full batch.

Checkpoints (``<output>/checkpoint-last.pt``) are written atomically and hold everything ``resume``
needs: model, projection, optimizer, scheduler, scaler, RNG states and the data position.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import losses as ibkd_losses
from ._io import atomic_write, fsync_dir
from ..losses import rank_and_world_size as dist_info
from .data import DataError, LabeledData, read_labeled, read_sentences, stsb_sentences
from .config import METHODS, STAGES, ConfigError, TrainConfig
from .models import Encoder, autocast_context, build_student

log = logging.getLogger("ibkd.distill.trainer")

CHECKPOINT_NAME = "checkpoint-last.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; names the step and the component."""


# -- the objective ---------------------------------------------------------------------------------

def build_loss(cfg: TrainConfig, student_dim: int, teacher_dim: Optional[int] = None) -> nn.Module:
    """The library objective of ``cfg``'s stage: :class:`ibkd.losses.IBKDLoss` (stage 1, teacher vectors of
    ``teacher_dim``) or :class:`ibkd.losses.SupervisedIBKDLoss` (stage 2), with the per-term gradient norms
    tracked for the training log."""
    d = cfg.stage_defaults()
    common = dict(method=cfg.method, temperature=d["temperature"], beta=d["beta"], gamma=d["gamma"],
                  normalize_hsic_inputs=cfg.normalize_hsic_inputs, projection_init=cfg.projection_init,
                  beta_target_ratio=cfg.beta_target_ratio, beta_calibration_steps=cfg.beta_calibration_steps,
                  gather_across_devices=cfg.gather_across_devices, track_grad_norms=True, backend=cfg.backend)
    try:
        if cfg.stage == "distill":
            return ibkd_losses.IBKDLoss(student_dim, teacher_dim or student_dim, projection_dim=cfg.projection_dim,
                                        **common)
        return ibkd_losses.SupervisedIBKDLoss(student_dim, projection_dim=d["projection_dim"], **common)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# -- data ------------------------------------------------------------------------------------------

class BatchSource:
    """Deterministic batches: epoch e visits a permutation drawn from (seed, e); position = micro-batch
    index within the epoch. Yields text groups (stage 1: [sentences]; stage 2: [anchors, positives
    (, hard negatives)]) and the teacher rows (stage 1)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise DataError(f"the training set has {n} examples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = n // batch_size  # the last incomplete batch is dropped

    def indices(self, epoch: int, index: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(self.n, generator=gen)
        return perm[index * self.batch_size:(index + 1) * self.batch_size].numpy()


class DistillData:
    groups = 1

    def __init__(self, sentences: list, teacher: np.ndarray):
        self.sentences, self.teacher = sentences, teacher

    def __len__(self):
        return len(self.sentences)

    def batch(self, idx: np.ndarray):
        texts = [[self.sentences[i] for i in idx]]
        return texts, torch.from_numpy(np.asarray(self.teacher[idx], dtype=np.float32))


class FinetuneData:
    def __init__(self, data: LabeledData):
        self.data = data
        self.groups = 3 if data.hard_negatives is not None else 2

    def __len__(self):
        return len(self.data)

    def batch(self, idx: np.ndarray):
        d = self.data
        texts = [[d.anchors[i] for i in idx], [d.positives[i] for i in idx]]
        if d.hard_negatives is not None:
            texts.append([d.hard_negatives[i] for i in idx])
        return texts, None


# -- evaluation ------------------------------------------------------------------------------------

def sts_spearman(encoder: Encoder, path: str, batch_size: int = 128, device=None) -> float:
    """Spearman ×100 of cosine similarity on an STS-B file (:func:`ibkd.distill.evaluation.evaluate_sts`)."""
    from .evaluation import evaluate_sts

    if device is not None:
        encoder.to(device)
    return float(evaluate_sts(encoder.encode, path, batch_size=batch_size)["spearman"])


# -- checkpoints -----------------------------------------------------------------------------------

def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def export_student(student: Encoder, loss: nn.Module, folder: Path) -> None:
    """Save the student (AutoModel + sentence-transformers folder) with the loss's state beside it
    (``ibkd_projection.safetensors``: P and β, not used at inference); replaces ``folder`` only once fully
    written."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save(tmp)
    ibkd_losses.save_loss_state(loss, tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(folder.parent)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the trainer -----------------------------------------------------------------------------------

@dataclass
class StepResult:
    terms: dict = field(default_factory=dict)
    loss: float = 0.0
    grad_norms: dict = field(default_factory=dict)
    skipped: bool = False
    beta: float = 0.0


class Trainer:
    def __init__(self, cfg: TrainConfig, student: Encoder, loss: nn.Module, data, *, device=None):
        self.cfg, self.student, self.loss, self.data = cfg, student, loss, data
        self.rank, self.world = dist_info()
        self.device = torch.device(device or "cpu")
        self.student.to(self.device)
        self.loss.to(self.device)
        self.groups = data.groups if data is not None else 1
        defaults = cfg.stage_defaults()
        self.hsic_layer = defaults["hsic_layer"]
        self.needs_inputs = loss.uses_inputs
        self.output = Path(cfg.output_dir)
        self.params = [p for p in list(student.parameters()) + list(loss.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step = 0
        self.epoch, self.position = 0, 0
        self.best_metric, self.best_step = None, None
        self.nan_skips = 0
        if data is not None and cfg.method != "none":
            if cfg.per_device_train_batch_size % self.world:
                raise ConfigError(f"batch_size {cfg.per_device_train_batch_size} must be divisible by the world size {self.world}")
            self.batches = BatchSource(len(data), cfg.per_device_train_batch_size, cfg.seed)
            steps_per_epoch = self.batches.batches_per_epoch // cfg.gradient_accumulation_steps
            if steps_per_epoch < 1:
                raise DataError(f"one optimizer step needs {cfg.gradient_accumulation_steps} batches of {cfg.per_device_train_batch_size}; "
                                f"the training set has {len(data)} examples")
            self.total_steps = int(cfg.max_steps or max(1, math.floor(cfg.num_train_epochs * steps_per_epoch)))
        else:
            self.total_steps = 0
        warmup = int(cfg.warmup_ratio * self.total_steps)

        def schedule(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    # -- embedding ---------------------------------------------------------------------------
    def _local_texts(self, groups: list) -> list:
        """This rank's slice of each group, concatenated (rank r gets rows [r·b, (r+1)·b) of each)."""
        b = len(groups[0]) // self.world
        return [t for g in groups for t in g[self.rank * b:(self.rank + 1) * b]]

    def _embed(self, texts: list):
        batch = self.student.tokenize(texts, device=self.device)
        with autocast_context(self.device, self.cfg.amp):
            out = self.student(batch, hidden_layers=[self.hsic_layer] if self.needs_inputs else [])
        s = out["embedding"].float()
        x = out["layers"][self.hsic_layer].float() if self.needs_inputs else None
        return s, x

    # -- one micro-batch: loss, backward ------------------------------------------------------
    def forward_backward(self, groups: list, teacher: Optional[torch.Tensor], *, loss_scale: float = 1.0) -> StepResult:
        """Loss over the (global) micro-batch and its gradients accumulated into ``.grad``. Each rank embeds
        its own rows; the loss gathers every rank's rows (:mod:`ibkd.losses.distributed`), and
        :meth:`sync_grads` averages the encoder gradients as DDP would."""
        local_texts = self._local_texts(groups)
        chunk = self.cfg.grad_cache_chunk
        cached = chunk is not None and chunk < len(local_texts)
        if cached:  # GradCache pass 1: embeddings without grad, remembering each chunk's RNG state
            rng_states, s_parts, x_parts = [], [], []
            with torch.no_grad():
                for start in range(0, len(local_texts), chunk):
                    rng_states.append(self._capture_rng())
                    s_c, x_c = self._embed(local_texts[start:start + chunk])
                    s_parts.append(s_c)
                    x_parts.append(x_c)
            s_local = torch.cat(s_parts).requires_grad_(True)
            x_local = torch.cat(x_parts).requires_grad_(True) if self.needs_inputs else None
        else:
            s_local, x_local = self._embed(local_texts)
        for name, tensor in (("student embeddings", s_local), ("student input representation", x_local)):
            if tensor is not None and not torch.isfinite(tensor).all():
                return self._non_finite(name)
        out = self._loss(s_local, x_local, teacher)
        terms = {k: out[k] for k in ("infonce", "hsic", "mse") if k in out}
        for name, value in terms.items():
            if not torch.isfinite(value):
                return self._non_finite(f"{name} loss")
        total = out["loss"]
        result = StepResult(terms={k: float(v) for k, v in terms.items()}, loss=float(total.detach()),
                            beta=float(out["beta"]))
        for key in ("infonce", "hsic", "mse"):
            if f"grad_norm_{key}" in out:
                result.grad_norms[key] = float(out[f"grad_norm_{key}"])
        self.scaler.scale(total * loss_scale).backward()
        if cached:  # GradCache pass 2: re-embed each chunk with grad, backprop the cached embedding grads
            for i, start in enumerate(range(0, len(local_texts), chunk)):
                stop = start + chunk
                self._restore_rng(rng_states[i])
                s_c, x_c = self._embed(local_texts[start:stop])
                outs, grads = [s_c], [s_local.grad[start:stop]]
                if x_c is not None:
                    outs.append(x_c)
                    grads.append(x_local.grad[start:stop])
                torch.autograd.backward(outs, grads)
        return result

    def _loss(self, s_local: torch.Tensor, x_local: Optional[torch.Tensor], teacher: Optional[torch.Tensor]) -> dict:
        """The library objective on this rank's rows (stage 2: s_local holds the local anchors, positives
        and hard negatives one after the other)."""
        if self.cfg.stage == "distill":
            b = s_local.shape[0]
            t = teacher[self.rank * b:(self.rank + 1) * b].to(self.device)
            return self.loss(s_local, t, x_local)
        columns = s_local.chunk(self.groups)
        x_anchor = x_local[: columns[0].shape[0]] if x_local is not None else None
        return self.loss(columns[0], columns[1], x_anchor, negatives=list(columns[2:]))

    def _capture_rng(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def _restore_rng(self, state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def _non_finite(self, component: str) -> StepResult:
        if self.cfg.nan_policy == "skip":
            self.nan_skips += 1
            log.warning("non-finite %s at step %d: skipped (%d so far)", component, self.step + 1, self.nan_skips)
            if self.nan_skips > self.cfg.max_nan_skips:
                raise NonFiniteLossError(f"non-finite {component} at step {self.step + 1}: more than "
                                         f"{self.cfg.max_nan_skips} skipped steps; last good checkpoint kept")
            return StepResult(skipped=True)
        raise NonFiniteLossError(f"non-finite {component} at step {self.step + 1}; stopped, the last good "
                                 f"checkpoint in {self.output} is intact")

    def sync_grads(self) -> None:
        """Average the encoder gradients over ranks, as DDP does (the loss scaled each rank's share for
        that; its own parameters are averaged by the loss itself)."""
        if self.world == 1:
            return
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- optimizer step -------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches from the current data position."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        agg = StepResult()
        for _ in range(cfg.gradient_accumulation_steps):
            if self.position >= self.batches.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            groups, teacher = self.data.batch(self.batches.indices(self.epoch, self.position))
            self.position += 1
            res = self.forward_backward(groups, teacher, loss_scale=1.0 / cfg.gradient_accumulation_steps)
            if res.skipped:
                self.optimizer.zero_grad(set_to_none=True)
                return res
            for k, v in res.terms.items():
                agg.terms[k] = agg.terms.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            for k, v in res.grad_norms.items():
                agg.grad_norms[k] = agg.grad_norms.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            agg.loss += res.loss / cfg.gradient_accumulation_steps
            agg.beta = res.beta
        self.sync_grads()
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return agg

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "student": self.student.model.state_dict(), "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": _rng_state(), "step": self.step, "epoch": self.epoch,
            "position": self.position, "best_metric": self.best_metric, "best_step": self.best_step,
            "nan_skips": self.nan_skips, "total_steps": self.total_steps, "config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.model.load_state_dict(state["student"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_metric, self.best_step, self.nan_skips = state["best_metric"], state["best_step"], state["nan_skips"]

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            atomic_torch_save(self.state_dict(), self.output / CHECKPOINT_NAME)
        self._barrier()

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    # -- the loop ------------------------------------------------------------------------------
    def evaluate(self, path: Optional[str]) -> Optional[float]:
        if not path:
            return None
        return sts_spearman(self.student, path, batch_size=self.cfg.per_device_eval_batch_size, device=self.device)

    def fit(self) -> dict:
        cfg = self.cfg
        self.output.mkdir(parents=True, exist_ok=True)
        log_path = self.output / "train_log.jsonl"
        ckpt = self.output / CHECKPOINT_NAME
        if cfg.resume and ckpt.exists():
            self.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False))
            log.info("resumed from %s at step %d", ckpt, self.step)
            if self.rank == 0 and log_path.exists():  # drop log lines past the checkpoint
                kept = [l for l in log_path.read_text().splitlines() if json.loads(l).get("step", 0) <= self.step]
                log_path.write_text("".join(l + "\n" for l in kept))
        elif self.rank == 0 and log_path.exists():
            log_path.unlink()
        dev_path, sentences_per_step = cfg.resolve_path(cfg.dev), cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.groups
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.stage}/{cfg.method}", unit="step",
                       dynamic_ncols=True)
        self.student.train()
        self.loss.train()
        log_file = open(log_path, "a") if self.rank == 0 else None
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                res = self.train_step()
                elapsed = time.perf_counter() - started
                if res.skipped:
                    continue
                record = {"step": self.step, "epoch": self.epoch, "loss": res.loss, **res.terms, "beta": res.beta,
                          **{f"grad_norm_{k}": v for k, v in res.grad_norms.items()},
                          "lr": self.scheduler.get_last_lr()[0], "sentences_per_s": sentences_per_step / elapsed,
                          "nan_skips": self.nan_skips}
                evaluated = cfg.eval_steps and dev_path and (self.step % cfg.eval_steps == 0 or self.step == self.total_steps)
                if evaluated:
                    metric = self.evaluate(dev_path) if self.rank == 0 else None
                    if self.rank == 0:
                        record["dev_spearman"] = metric
                        if self.best_metric is None or metric > self.best_metric:
                            self.best_metric, self.best_step = metric, self.step
                            export_student(self.student, self.loss, self.output / "best")
                    self._barrier()
                    self.student.train()
                if log_file is not None and (self.step % cfg.logging_steps == 0 or evaluated):
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if self.step % cfg.save_steps == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if bar is not None:
                    post = {k: f"{v:.4g}" for k, v in res.terms.items()}
                    post.update(lr=f"{record['lr']:.2e}", sent_s=f"{record['sentences_per_s']:.0f}")
                    if "dev_spearman" in record:
                        post["dev"] = f"{record['dev_spearman']:.2f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if cfg.step_delay_s:
                    time.sleep(cfg.step_delay_s)
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()
        summary = {"steps": self.step, "best_dev_spearman": self.best_metric, "best_step": self.best_step,
                   "nan_skips": self.nan_skips}
        if self.rank == 0:
            export_student(self.student, self.loss, self.output / "final")
            if cfg.plot and log_path.exists():
                plot_log(log_path, self.output / "loss_curves.png")
        self._barrier()
        return summary


def plot_log(log_path: Path, png_path: Path) -> None:
    """Loss terms, their gradient norms at the student output and the lr against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("loss", "infonce", "hsic", "mse"):
        if key in rows[0]:
            axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_title("loss terms")
    axes[0].set_yscale("log") if all(r["loss"] > 0 for r in rows) else None
    for key in [k for k in rows[0] if k.startswith("grad_norm_")]:
        axes[1].plot(steps, [r[key] for r in rows], label=key[len("grad_norm_"):])
    axes[1].set_title("gradient norm at the student output")
    axes[2].plot(steps, [r["lr"] for r in rows])
    axes[2].set_title("learning rate")
    dev = [(r["step"], r["dev_spearman"]) for r in rows if r.get("dev_spearman") is not None]
    if dev:
        ax = axes[2].twinx()
        ax.plot(*zip(*dev), "o-", color="tab:red", label="dev Spearman")
        ax.legend(loc="lower right")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# -- building a run from a config ---------------------------------------------------------------------

def setup_distributed(cfg: TrainConfig) -> torch.device:
    """Init the process group under torchrun (WORLD_SIZE > 1) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available() or str(cfg.device).startswith("cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1:
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device(cfg.device if cfg.device != "auto" else "cuda")
    return torch.device("cpu")


def _compact_student(student: Encoder, teacher: Encoder, folder: str) -> Encoder:
    """The layer-subset ``student`` with its word embeddings factorized through the table in ``folder``
    (up-projection fitted by least squares; :mod:`ibkd.distill.compact`)."""
    from .compact import factorize_student, load_compact_table

    try:
        table, meta = load_compact_table(folder, teacher.tokenizer, vocab_size=teacher.config.vocab_size)
    except (FileNotFoundError, ValueError) as exc:  # DataError is a ValueError too
        raise ConfigError(f"compact_embeddings: {exc}") from None
    compact = factorize_student(student, table, up_init="lstsq")
    log.info("compact student: %d x %d table from %s (%s)", table.shape[0], table.shape[1], folder,
             meta.get("method", "unknown method"))
    return compact


def build_run(cfg: TrainConfig, device=None) -> Trainer:
    """Load models and data for ``cfg`` and return a ready :class:`Trainer`."""
    from .teacher_cache import build_teacher_cache, load_teacher_matrix

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = device or setup_distributed(cfg)
    rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    needs_teacher = cfg.stage == "distill" and cfg.method != "none" and not cfg.teacher_embeddings
    teacher = None
    if needs_teacher or cfg.student_layers or cfg.fresh_student:
        if cfg.teacher is None:
            raise ConfigError("a teacher is needed (teacher: default, a folder or a hub id)")
        teacher = Encoder.load(cfg.resolve_path(cfg.teacher) if cfg.teacher not in ("default",) else "default",
                               max_length=cfg.max_length)
    student = build_student(teacher, student=cfg.resolve_path(cfg.student) if cfg.student else None,
                            layers=cfg.student_layers, fresh=cfg.fresh_student, pooling=cfg.pooling,
                            normalize=cfg.normalize, max_length=cfg.max_length, seed=cfg.seed)
    if cfg.compact_embeddings:
        student = _compact_student(student, teacher, cfg.resolve_path(cfg.compact_embeddings))
    data = None
    if cfg.stage == "distill":
        if not cfg.corpus:
            raise ConfigError("stage distill needs a corpus")
        sentences, stats = read_sentences(cfg.resolve_path(cfg.corpus), column=cfg.corpus_column, limit=cfg.corpus_limit)
        if cfg.extra_stsb_sentences:
            extra = stsb_sentences(cfg.resolve_path(cfg.extra_stsb_sentences))
            sentences = list(dict.fromkeys(sentences + extra))
        if rank == 0:
            log.info("corpus: %s; %d sentences in total", stats, len(sentences))
        if cfg.method != "none":
            if len(sentences) < cfg.per_device_train_batch_size:
                raise DataError(f"the corpus has {len(sentences)} sentences, fewer than one batch of {cfg.per_device_train_batch_size}")
            if cfg.teacher_embeddings:
                matrix = load_teacher_matrix(cfg.resolve_path(cfg.teacher_embeddings), len(sentences))
                if cfg.pca_dim:
                    from .teacher_cache import pca

                    matrix = pca(matrix, cfg.pca_dim)
            else:
                cache_dir = cfg.resolve_path(cfg.cache_dir) or str(Path(cfg.output_dir) / "teacher_cache")
                if rank == 0:
                    matrix = build_teacher_cache(teacher, sentences, cache_dir, batch_size=cfg.teacher_batch_size,
                                                 device=device, progress=cfg.progress, pca_dim=cfg.pca_dim)
                if world > 1:
                    dist.barrier()
                    if rank:
                        matrix = build_teacher_cache(teacher, sentences, cache_dir, progress=False, pca_dim=cfg.pca_dim)
            data = DistillData(sentences, matrix)
            teacher_dim = int(matrix.shape[1])
        else:
            teacher_dim = teacher.dim if teacher is not None else student.dim
        del teacher
        loss = build_loss(cfg, student.dim, teacher_dim)
    else:
        if cfg.method != "none":
            if not cfg.train_file:
                raise ConfigError("stage finetune needs train_file (csv sent0,sent1[,hard_neg] or scored pairs)")
            labeled = read_labeled(cfg.resolve_path(cfg.train_file), min_score=cfg.min_score)
            if rank == 0:
                log.info("train file: %s%s", labeled.stats,
                         "" if labeled.hard_negatives is not None else " (no hard negatives)")
            data = FinetuneData(labeled)
        loss = build_loss(cfg, student.dim)
    return Trainer(cfg, student, loss, data, device=device)


def run(cfg: TrainConfig) -> dict:
    """Train (unless method is none), then report STS-B dev/test Spearman of the selected student."""
    trainer = build_run(cfg)
    summary = trainer.fit() if cfg.method != "none" else {"steps": 0}
    rank, _ = dist_info()
    if rank == 0:
        best = Path(cfg.output_dir) / "best"
        if cfg.method == "none":
            export_student(trainer.student, trainer.loss, Path(cfg.output_dir) / "final")
        elif summary.get("best_step") is not None and best.exists():
            trainer.student = Encoder.load(str(best))
            trainer.student.to(trainer.device)
        summary["student"] = str(best if summary.get("best_step") is not None else Path(cfg.output_dir) / "final")
        for split in ("dev", "test"):
            path = cfg.resolve_path(getattr(cfg, split))
            if path and Path(path).exists():
                summary[f"{split}_spearman"] = trainer.evaluate(path)
        with open(Path(cfg.output_dir) / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
    return summary
