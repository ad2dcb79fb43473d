"""Three training steps of one integration, run under ``torchrun`` (or in a single process), dumping this
rank's student and loss state. Used by tests/test_torchrun.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/_torchrun_worker.py MODE MODEL_DIR OUT_DIR BATCH

MODE: ``st`` (SentenceTransformerTrainer + IBKDDistillationLoss), ``st-cached`` (the GradCache variant),
``hf`` (IBKDTrainer), ``cli`` (the ``ibkd distill`` application, rank 0's export). BATCH is the per-process batch size. The data
set is exactly one global batch, so every step sees the same set of rows whatever the sampler's order,
and a single process with the whole batch must end with the same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

SENTENCES = ["a man plays guitar", "a woman eats an apple", "the child runs", "a dog runs in the park",
             "a cat eats bread", "the horse plays", "a red car", "a blue tree"]
TEACHER_DIM = 12
STEPS = 3


def teacher_vectors(n: int) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, TEACHER_DIM)).astype(np.float32)


def clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def ddp_args() -> dict:
    """gloo under torchrun; nothing in a single process (a backend there makes accelerate expect a group)."""
    return {"ddp_backend": "gloo"} if rank_world()[1] > 1 else {}


def run_st(model_dir: str, out: Path, batch: int, cached: bool):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from ibkd.integrations.sentence_transformers import CachedIBKDDistillationLoss, IBKDDistillationLoss

    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    dataset = Dataset.from_dict({"sentence": SENTENCES, "label": teacher_vectors(len(SENTENCES)).tolist()})
    extra = {"mini_batch_size": 3} if cached else {}
    cls = CachedIBKDDistillationLoss if cached else IBKDDistillationLoss
    loss = cls(model, TEACHER_DIM, beta_calibration_steps=2, projection_init="random", **extra)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=batch, max_steps=STEPS, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **ddp_args())
    initial = clone(loss.ibkd.state_dict())
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    return model[0].auto_model.state_dict(), loss.ibkd.state_dict(), initial


def run_hf(model_dir: str, out: Path, batch: int):
    from datasets import Dataset
    from transformers import AutoModel, AutoTokenizer, TrainingArguments

    from ibkd import IBKDLoss
    from ibkd.integrations.hf_trainer import IBKDTrainer, TeacherEmbeddingCollator

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    dataset = Dataset.from_dict({"text": SENTENCES, "teacher_embedding": teacher_vectors(len(SENTENCES)).tolist()})
    loss = IBKDLoss(model.config.hidden_size, TEACHER_DIM, beta_calibration_steps=2, projection_init="random")
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=batch, max_steps=STEPS,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             remove_unused_columns=False, **ddp_args())
    initial = clone(loss.state_dict())
    IBKDTrainer(model=model, args=args, train_dataset=dataset, data_collator=TeacherEmbeddingCollator(tokenizer),
                ibkd_loss=loss).train()
    return model.state_dict(), loss.state_dict(), initial


def run_cli(model_dir: str, out: Path, batch: int):
    """The ``ibkd distill`` application end to end (its own trainer set-up, export and lock); returns what it
    exported (rank 0; other ranks None): DDP keeps the ranks' students equal, the st/hf modes check P's."""
    from safetensors.torch import load_file

    from ibkd.distill.config import TrainConfig
    from ibkd.distill.trainer import run

    rank, world = rank_world()
    inputs = out / f"cli-inputs-rank{rank}-world{world}"  # per process: no two writers of one file
    inputs.mkdir(exist_ok=True)
    (inputs / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    np.save(inputs / "teacher.npy", teacher_vectors(len(SENTENCES)))
    cfg = TrainConfig.from_dict(dict(
        teacher=model_dir, student_layers="0,2", corpus=str(inputs / "corpus.txt"),
        teacher_embeddings=str(inputs / "teacher.npy"), output_dir=str(out / f"cli-world{world}"),
        per_device_train_batch_size=batch, max_steps=STEPS, learning_rate=1e-2, warmup_ratio=0.0, progress=False,
        plot=False, dev=None, test=None, beta_calibration_steps=2, projection_init="random", device="cpu",
        save_steps=1000, seed=0, max_length=16))
    run(cfg)
    if rank:
        return None
    final = Path(cfg.output_dir) / "final"
    initial = {"projection.weight": torch.full((1,), float("nan"))}  # P's start is not exported
    return load_file(str(final / "model.safetensors")), load_file(str(final / "ibkd_projection.safetensors")), initial


def main(argv=None) -> None:
    mode, model_dir, out, batch = (argv or sys.argv[1:])[:4]
    out, batch = Path(out), int(batch)
    torch.set_num_threads(1)
    if mode in ("st", "st-cached"):
        student, loss, initial = run_st(model_dir, out, batch, cached=mode == "st-cached")
    elif mode == "hf":
        student, loss, initial = run_hf(model_dir, out, batch)
    elif mode == "cli":
        exported = run_cli(model_dir, out, batch)
        if exported is None:
            return _finish()
        student, loss, initial = exported
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    rank, world = rank_world()
    torch.save({"student": clone(student), "loss": clone(loss), "initial_loss": initial},
               out / f"{mode}-world{world}-rank{rank}.pt")
    _finish()


def _finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # both ranks leave their collectives before either tears gloo down
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
