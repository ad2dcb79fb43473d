"""``ibkd distill`` / ``ibkd finetune``: IBKD on sentence-transformers' ``SentenceTransformerTrainer``.

Stage 1 trains on unlabeled sentences whose ``label`` column holds the teacher's vectors (from the teacher
cache); stage 2 on (anchor, positive[, negative]) pairs. The loss is the one users import,
:mod:`ibkd.integrations.sentence_transformers` over :mod:`ibkd.losses` (``CachedIBKD*`` with
``grad_cache_chunk``), with the defaults of :mod:`ibkd.losses`. Evaluation is sentence-transformers'
``EmbeddingSimilarityEvaluator`` on STS-B. What the trainer does not do itself is added here:

* the loss's own state (the projection P, a calibrated β) in every checkpoint and in the exported student;
* a checksum manifest in every checkpoint, verified before ``--resume`` uses it (:mod:`.integrity`);
* one lock and one owner per output folder (:mod:`.run_folder`), and a resume that refuses a changed config;
* the NaN policy and a per-step JSON log of the loss terms and their gradient ratio (:mod:`.callbacks`);
* a batch order that is a function of (seed, epoch) only, so a resumed run sees the same batches.

Resume is exact: after ``kill -9``, ``--resume`` continues from the newest complete checkpoint (weights, P,
β, optimizer, scheduler, RNG states, data position) and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import losses as ibkd_losses
from ..integrations import sentence_transformers as st_losses
from ._io import atomic_write_dir, atomic_write_text
from .callbacks import (NanPolicyCallback, NonFiniteLossError, StepDelayCallback, StepTerms, TrainLogCallback,
                        finite_state)
from .config import RUNTIME_FIELDS, ConfigError, TrainConfig, load_saved_config, write_resolved_config
from .preflight import check_against_model, preflight, resolve_amp, resolve_device
from .evaluator import sts_evaluator
from .inputs import (build_student_encoder, corpus_sentences, distill_dataset, finetune_dataset, load_teacher,
                     teacher_vectors, to_sentence_transformer)
from .integrity import newest_valid_checkpoint, write_checksums
from .run_folder import claim_output_dir

__all__ = ["NonFiniteLossError", "build_loss", "last_checkpoint", "run"]

log = logging.getLogger("ibkd.distill")


# -- the objective -------------------------------------------------------------------------------------

def build_loss(cfg: TrainConfig, model, teacher_dim: Optional[int] = None):
    """The sentence-transformers loss of ``cfg``'s stage over the library objective, with the per-term
    gradient norms tracked for the log."""
    d = cfg.stage_defaults()
    layer = d["hsic_layer"]
    layer = -2 if layer == "penultimate" else -1 if layer == "last" else int(layer)
    kwargs = dict(method=cfg.method, temperature=d["temperature"], beta=d["beta"], gamma=d["gamma"],
                  normalize_hsic_inputs=cfg.normalize_hsic_inputs, projection_init=cfg.projection_init,
                  beta_target_ratio=d["beta_target_ratio"], beta_calibration_steps=cfg.beta_calibration_steps,
                  gather_across_devices=cfg.gather_across_devices, track_grad_norms=True, backend=cfg.backend,
                  input_layer=layer, length_chunk_size=cfg.length_chunk_size or None)
    if cfg.grad_cache_chunk:
        kwargs["mini_batch_size"] = cfg.grad_cache_chunk
    try:
        if cfg.stage == "distill":
            cls = st_losses.CachedIBKDDistillationLoss if cfg.grad_cache_chunk else st_losses.IBKDDistillationLoss
            return cls(model, teacher_dim, projection=cfg.projection, projection_dim=cfg.projection_dim, **kwargs)
        cls = st_losses.CachedIBKDSupervisedLoss if cfg.grad_cache_chunk else st_losses.IBKDSupervisedLoss
        return cls(model, projection_dim=d["projection_dim"] if cfg.projection else None, **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# -- the trainer ---------------------------------------------------------------------------------------

class _EpochPermutation:
    """The sample order of one epoch, drawn from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class EpochSeededBatchSampler(DefaultBatchSampler):
    """Shuffled batches whose order depends only on (seed, epoch). sentence-transformers' default draws every
    epoch from one generator seeded once per process, so a run resumed in its second epoch (a fresh process)
    would see the first epoch's order again."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0) -> None:
        super().__init__(_EpochPermutation(len(dataset), seed), batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)


class DistillationTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` that keeps the IBKD loss's state with the model, checksums its
    checkpoints, watches the loss for NaN/Inf, and collects the loss terms of each step."""

    def __init__(self, *args, step_terms: StepTerms, nan_policy: str, nan_callback: NanPolicyCallback,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_terms, self.nan_policy, self.nan_callback = step_terms, nan_policy, nan_callback

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training and not return_outputs:
            self.step_terms.add(self.loss.last_output)
            bad = self.step_terms.non_finite() or (None if torch.isfinite(result).all() else "loss")
            if bad and self.nan_policy == "stop":
                raise NonFiniteLossError(self._nan_message(bad))
            if bad:
                self.nan_callback.flag(bad)
        return result

    def _nan_message(self, term: str) -> str:
        step = self.state.global_step + 1
        good = last_checkpoint(self.args.output_dir)
        where = (f"the last good checkpoint is {good}: continue with --resume (and --allow_config_change "
                 "learning_rate with a lower --learning_rate)") if good else "no checkpoint was saved before it"
        return f"non-finite {term} at step {step}; {where}"

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if not finite_state(self.model):  # a checkpoint never holds diverged weights
            raise NonFiniteLossError(f"the weights became non-finite by step {self.state.global_step}: not saved")
        super()._save(output_dir, state_dict)
        ibkd_losses.save_loss_state(self.loss.ibkd, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, checkpoint_path: str) -> None:
        super()._load_from_checkpoint(checkpoint_path)
        ibkd_losses.load_loss_state(self.loss.ibkd, checkpoint_path)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # the manifest last: a checkpoint without one was not completely written
            write_checksums(Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")


# -- checkpoints and resume ----------------------------------------------------------------------------

def last_checkpoint(output_dir) -> Optional[Path]:
    """The newest complete, verified ``checkpoint-<step>`` of a run (:func:`.integrity.newest_valid_checkpoint`:
    an unfinished one is skipped with a warning, a damaged one raises naming the file)."""
    return newest_valid_checkpoint(output_dir)


def check_resumable(cfg: TrainConfig, output_dir: Path) -> None:
    """``--resume`` continues the same run: a field that changes the result (batch size, seed, lr, steps,
    data, loss, ...) must match the saved config unless named in ``allow_config_change``."""
    saved = load_saved_config(output_dir)
    if saved is None:
        raise ConfigError(f"--resume: {output_dir} holds no run to resume (no config.yaml); start it without --resume")
    saved = TrainConfig.canonical(saved)
    allowed = set(cfg.allow_config_change or ())
    now = cfg.to_dict()
    # a field newer than the saved run is compared as its default (what that run trained with)
    saved = {**TrainConfig().to_dict(), **saved}
    changed = [f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in sorted(now)
               if k not in RUNTIME_FIELDS and k not in allowed and saved.get(k) != now[k]]
    if changed:
        raise ConfigError(f"--resume: the config differs from the saved run in {', '.join(changed)}; restore it, "
                          f"or pass --allow_config_change {','.join(c.split(' ')[0] for c in changed)}")


# -- the run -------------------------------------------------------------------------------------------

def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def training_arguments(cfg: TrainConfig, device: str, evaluate: bool) -> SentenceTransformerTrainingArguments:
    """The run's settings in sentence-transformers' (Hugging Face's) arguments."""
    metric = "eval_sts-dev_spearman_cosine"
    amp = resolve_amp(cfg.amp, device)
    if evaluate and cfg.save_steps % cfg.eval_steps:
        raise ConfigError(f"save_steps ({cfg.save_steps}) must be a multiple of eval_steps ({cfg.eval_steps}): the "
                          "best dev checkpoint must be saved to be exported")
    return SentenceTransformerTrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps or -1, max_grad_norm=cfg.max_grad_norm or 0.0,
        bf16=amp == "bf16", fp16=amp == "fp16", use_cpu=device == "cpu",
        logging_steps=cfg.logging_steps, report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_steps if evaluate else None,
        load_best_model_at_end=evaluate, metric_for_best_model=metric if evaluate else None,
        greater_is_better=True if evaluate else None,
        disable_tqdm=not cfg.progress or not _is_main(), dataloader_drop_last=True,
        batch_sampler=EpochSeededBatchSampler, ddp_find_unused_parameters=True,
    )


def _export(trainer_or_model, loss, folder: Path) -> None:
    """The student (sentence-transformers folder with its model card) and the loss state beside it, with
    checksums; ``folder`` is replaced only once complete (:func:`._io.atomic_write_dir`)."""
    def fill(tmp: Path) -> None:
        if isinstance(trainer_or_model, SentenceTransformerTrainer):
            trainer_or_model.save_model(str(tmp))
        else:
            trainer_or_model.save(str(tmp))
        if loss is not None:
            ibkd_losses.save_loss_state(loss.ibkd, tmp)
        write_checksums(tmp)

    atomic_write_dir(folder, fill)


def _evaluate(model, cfg: TrainConfig) -> dict:
    scores = {}
    if cfg.no_eval:
        return scores
    for split in ("dev", "test"):
        path = cfg.resolve_path(getattr(cfg, split), split)
        if path:
            result = sts_evaluator(path, f"sts-{split}", cfg.per_device_eval_batch_size)(model)
            scores[f"{split}_spearman"] = 100 * float(result[f"sts-{split}_spearman_cosine"])
    return scores


def run(cfg: TrainConfig) -> dict:
    """Train (unless ``method`` is none), export ``<output_dir>/final`` and report its STS-B dev/test
    Spearman ×100. Returns the summary also written to ``summary.json``."""
    preflight(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out, device, main = Path(cfg.output_dir), resolve_device(cfg.device), _is_main()
    lock = claim_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite_output_dir) if main else None
    try:
        checkpoint = None
        if cfg.resume:
            check_resumable(cfg, out)
            # the claim already found and verified it (hashing every file); other ranks look for themselves
            checkpoint = lock.resume_from if lock is not None else last_checkpoint(out)
            if checkpoint is None:
                log.warning("--resume: no complete checkpoint in %s: starting from step 0", out)
        if main:
            write_resolved_config(cfg, out)
        torch.manual_seed(cfg.seed)
        teacher = load_teacher(cfg)
        if teacher is not None:
            check_against_model(cfg, teacher.num_layers, teacher.config.max_position_embeddings)
        # before the training arguments start the process group: under it, Hugging Face's save_pretrained writes
        # on the main process only, and the model goes through a folder
        model = to_sentence_transformer(build_student_encoder(cfg, teacher), device)
        summary = {"steps": 0}
        if cfg.method == "none":
            del teacher
            if main:
                _export(model, None, out / "final")
        else:
            args = training_arguments(cfg, device, evaluate=bool(cfg.eval_steps and cfg.dev and not cfg.no_eval))
            teacher_dim = None
            if cfg.stage == "distill":
                sentences = corpus_sentences(cfg)
                with args.main_process_first(desc="teacher cache"):
                    vectors = teacher_vectors(cfg, teacher, sentences, device)
                dataset, teacher_dim = distill_dataset(sentences, vectors), int(vectors.shape[1])
            else:
                dataset = finetune_dataset(cfg)
            del teacher
            loss = build_loss(cfg, model, teacher_dim)
            terms, params = StepTerms(), [p for p in list(model.parameters()) + list(loss.parameters())]
            nan_callback = NanPolicyCallback(params, cfg.max_nan_skips)
            rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * (
                1 if cfg.stage == "distill" else len(dataset.column_names))
            callbacks = [TrainLogCallback(out, terms, rows, main), nan_callback]
            if cfg.step_delay_s:
                callbacks.append(StepDelayCallback(cfg.step_delay_s))
            evaluator = (sts_evaluator(cfg.resolve_path(cfg.dev, "dev"), "sts-dev", cfg.per_device_eval_batch_size)
                         if args.eval_strategy != "no" else None)
            trainer = DistillationTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                          evaluator=evaluator, callbacks=callbacks, step_terms=terms,
                                          nan_policy=cfg.nan_policy, nan_callback=nan_callback)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            summary = {"steps": trainer.state.global_step, "nan_skips": nan_callback.skips,
                       "best_checkpoint": trainer.state.best_model_checkpoint}
            if main:
                _export(trainer, loss, out / "final")
        if main:
            summary.update(_evaluate(model, cfg), student=str(out / "final"), log=str(out / "train_log.jsonl"))
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
            if cfg.plot and (out / "train_log.jsonl").exists():
                from .plotting import plot_training_log

                plot_training_log(out / "train_log.jsonl", out / "loss_curves.png")
        return summary
    finally:
        if lock is not None:
            lock.release()
