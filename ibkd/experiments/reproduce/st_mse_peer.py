"""The field's own distillation recipe as a peer row: sentence-transformers' ``MSELoss`` trained by a plain
``SentenceTransformerTrainer`` (their "model distillation by layer reduction" recipe: the student is the
teacher with layers removed, regressed onto the teacher's vectors).

Everything except the loss and the trainer class is the IBKD rows' own: the same student start (the teacher
layers of ``student_layers``), the same sentences with the same teacher vectors (the shared teacher cache),
the same steps, batch size, learning-rate schedule, warm-up and seed, and the same batch order per seed (the
application's ``EpochSeededBatchSampler``, passed as the trainer's documented ``batch_sampler`` argument). So a
difference against ibkd's own ``mse`` row measures the two implementations of one recipe, and a difference
against the IBKD rows measures the objective.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...distill.config import TrainConfig
from ...distill.inputs import (build_student_encoder, corpus_sentences, distill_dataset, load_teacher,
                               teacher_vectors, to_sentence_transformer)
from ...distill.preflight import preflight, resolve_device
from ...distill.trainer import training_arguments

STUDENT_FOLDER = "student"


def train_st_mse(cfg: TrainConfig) -> dict:
    """Train ``cfg``'s layer-subset student with sentence-transformers' ``MSELoss`` on the teacher vectors;
    the student is saved (sentence-transformers folder) to ``<output_dir>/student``. Returns
    ``{"steps", "student", "log_history"}``."""
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MSELoss

    preflight(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device, out = resolve_device(cfg.device), Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg)
    model = to_sentence_transformer(build_student_encoder(cfg, teacher), device)
    sentences = corpus_sentences(cfg)
    vectors = teacher_vectors(cfg, teacher, sentences, device)
    del teacher
    args = training_arguments(cfg, device, evaluate=False)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=distill_dataset(sentences, vectors),
                                         loss=MSELoss(model))
    trainer.train()
    model.save(str(out / STUDENT_FOLDER))
    return {"steps": trainer.state.global_step, "student": str(out / STUDENT_FOLDER),
            "log_history": list(trainer.state.log_history)}


def loss_curve(log_history: list) -> dict:
    """The per-step ``loss`` and learning rate Hugging Face's trainer logged (the rows' curve format)."""
    steps = [r for r in log_history if "loss" in r and "step" in r]
    return {"step": [r["step"] for r in steps], "mse": [r["loss"] for r in steps],
            "lr": [r.get("learning_rate") for r in steps]}


def run_st_mse_row(row, ctx, folder: Path, evaluate) -> dict:
    """A reproduce row (kind ``st_mse``): train in ``folder`` from scratch (a peer row is short; it is not
    resumed), then score the student with ``evaluate(encoder) -> dict`` like every other row."""
    import shutil

    from ...distill.models import Encoder

    shutil.rmtree(folder, ignore_errors=True)
    cfg = TrainConfig.from_dict({**row.train, "output_dir": str(folder), "overwrite_output_dir": True,
                                 "save_steps": 10 ** 9})
    started = time.perf_counter()
    summary = train_st_mse(cfg)
    train_seconds = time.perf_counter() - started
    for stale in folder.glob("checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    student = Encoder.load(summary["student"], max_length=cfg.max_length)
    curve = loss_curve(summary["log_history"])
    return {"steps": summary["steps"], "train_seconds": train_seconds, "student": summary["student"],
            "student_path": STUDENT_FOLDER, **evaluate(student), "curve": curve,
            "curve_stats": {"mse_last": curve["mse"][-1] if curve["mse"] else None}}
