"""What a run trains on: the teacher, the student (as a SentenceTransformer) and the training dataset, whose
``label`` column holds the teacher's vectors (stage 1) from the teacher cache."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from .config import ConfigError, TrainConfig
from .data import DataError, read_labeled, read_sentences, stsb_sentences
from .models import Encoder, build_student

log = logging.getLogger("ibkd.distill")


def load_teacher(cfg: TrainConfig) -> Optional[Encoder]:
    """The teacher when the run needs one: teacher vectors to compute, or a student cut from its layers."""
    needs = (cfg.stage == "distill" and cfg.method != "none" and not cfg.teacher_embeddings) \
        or cfg.student_layers or cfg.fresh_student
    if not needs:
        return None
    if cfg.teacher is None:
        raise ConfigError("a teacher is needed (teacher: default, a folder or a hub id)")
    spec = cfg.teacher if cfg.teacher == "default" else cfg.resolve_path(cfg.teacher, "teacher")
    return Encoder.load(spec, max_length=cfg.max_length)


def build_student_encoder(cfg: TrainConfig, teacher: Optional[Encoder]) -> Encoder:
    try:
        student = build_student(teacher, student=cfg.resolve_path(cfg.student, "student") if cfg.student else None,
                                layers=cfg.student_layers, fresh=cfg.fresh_student, pooling=cfg.pooling,
                                normalize=cfg.normalize, max_length=cfg.max_length, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.compact_embeddings or cfg.compact_init == "pca":
        # the layer-subset student with its word embeddings factorized (a small table + up-projection)
        from .compact import compact_student_from_config

        student = compact_student_from_config(student, teacher, cfg)
    return student


def to_sentence_transformer(encoder: Encoder, device: str):
    """The same network as a ``SentenceTransformer`` (Transformer, Pooling[, Normalize]): the model
    sentence-transformers' trainer trains and saves. Goes through the encoder's sentence-transformers folder,
    which is also what the exported student is."""
    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory(prefix="ibkd-student-") as folder:
        encoder.save(folder)
        model = SentenceTransformer(folder, device=device, trust_remote_code=True)
    model.max_seq_length = encoder.max_length
    return model


def corpus_sentences(cfg: TrainConfig) -> list:
    if not cfg.corpus:
        raise ConfigError("stage distill needs a corpus (--corpus)")
    sentences, stats = read_sentences(cfg.resolve_path(cfg.corpus, "corpus"), column=cfg.corpus_column,
                                      limit=cfg.corpus_limit)
    if cfg.extra_stsb_sentences:
        extra = stsb_sentences(cfg.resolve_path(cfg.extra_stsb_sentences, "extra_stsb_sentences"))
        sentences = list(dict.fromkeys(sentences + extra))
    log.info("corpus: %s; %d sentences in total", stats, len(sentences))
    if len(sentences) < cfg.per_device_train_batch_size:
        raise DataError(f"the corpus has {len(sentences)} sentences, fewer than one batch of "
                        f"{cfg.per_device_train_batch_size}")
    return sentences


def teacher_vectors(cfg: TrainConfig, teacher: Optional[Encoder], sentences: list, device: str) -> np.ndarray:
    """One teacher vector per sentence: a given ``.npy``, or the (verified, content-addressed) cache,
    computed once."""
    from .teacher_cache import build_teacher_cache, load_teacher_matrix, pca

    if cfg.teacher_embeddings:
        matrix = load_teacher_matrix(cfg.resolve_path(cfg.teacher_embeddings, "teacher_embeddings"), len(sentences))
        return pca(matrix, cfg.pca_dim) if cfg.pca_dim else matrix
    cache_dir = cfg.resolve_path(cfg.cache_dir, "cache_dir") or str(Path(cfg.output_dir) / "teacher_cache")
    return build_teacher_cache(teacher, sentences, cache_dir, batch_size=cfg.teacher_batch_size, device=device,
                               progress=cfg.progress, pca_dim=cfg.pca_dim)


def distill_dataset(sentences: list, vectors: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"sentence": sentences, "label": np.asarray(vectors, dtype=np.float32)})


def finetune_dataset(cfg: TrainConfig):
    """(anchor, positive[, negative]) columns of the stage 2 file."""
    from datasets import Dataset

    if not cfg.train_file:
        raise ConfigError("stage finetune needs --train_file (STS-B .csv or .jsonl of anchor/positive[/negative])")
    data = read_labeled(cfg.resolve_path(cfg.train_file, "train_file"), min_score=cfg.min_score)
    log.info("train file: %s%s", data.stats, "" if data.hard_negatives is not None else " (no hard negatives)")
    if len(data) < cfg.per_device_train_batch_size:
        raise DataError(f"the training set has {len(data)} pairs, fewer than one batch of "
                        f"{cfg.per_device_train_batch_size}")
    columns = {"anchor": data.anchors, "positive": data.positives}
    if data.hard_negatives is not None:
        columns["negative"] = data.hard_negatives
    return Dataset.from_dict(columns)
