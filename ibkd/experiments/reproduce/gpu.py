"""The GPU hook: seconds per distillation step with the fused vs the reference losses (bf16 autocast by
default). A step is timed directly on its parts, the layer-subset student (:mod:`ibkd.distill.models`)
and the library objective (:class:`ibkd.losses.IBKDLoss`): tokenize, forward under autocast, InfoNCE +
β·HSIC, backward, AdamW. That is all a stage-1 training step is; the trainer around it adds logging and
checkpoints, which are not what the backends change."""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from ...backend.base import resolve_backend
from ...distill.config import TrainConfig
from ...distill.data import read_sentences
from ...distill.models import Encoder, autocast_context, build_student
from ...losses import IBKDLoss
from .rows import Context
from .run import teacher_spec


def _timed_steps(student: Encoder, loss_fn: IBKDLoss, texts: list, teacher_vectors: torch.Tensor, dev: torch.device,
                 amp: str, warmup: int, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(list(student.parameters()) + list(loss_fn.parameters()), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")  # fp16 needs loss scaling, bf16 does not
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    student.train()
    loss_fn.train()

    def step() -> None:
        batch = student.tokenize(texts, device=dev)
        with autocast_context(dev, amp):
            out = student(batch, hidden_layers=[0])  # x: the pooled embedding-layer output (stage 1)
        loss = loss_fn(out["embedding"].float(), teacher_vectors, out["layers"][0].float())["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return times


def time_distill_steps(teacher: str, layers, batches, *, backends=("reference", "auto"), device="cuda",
                       amp="bf16", max_length: int = 64, sentences=None, warmup: int = 2, steps: int = 5,
                       setting: Optional[dict] = None) -> list[dict]:
    """Seconds per stage-1 optimizer step of a layer-subset student of ``teacher`` per loss backend and
    batch size. Teacher vectors are random (the loss cost does not depend on their values). Out-of-memory
    is recorded, not raised."""
    teacher_encoder = Encoder.load(teacher, max_length=max_length)
    if not sentences:
        sentences = ["a sentence of about sixty-four tokens, repeated to fill the batch " * 6]
    setting = {"temperature": 1.0, "beta": "auto", "gamma": 1.0, "normalize_hsic_inputs": True, **(setting or {})}
    dev = torch.device(device)
    results = []
    for backend in backends:
        for batch in batches:
            rec = {"backend": backend, "batch_size": batch, "amp": amp, "device": str(dev)}
            try:
                rec["resolved_backend"] = resolve_backend(backend, dev, torch.float32, "infonce",
                                                          (batch, batch, teacher_encoder.dim)).name
            except Exception as exc:  # noqa: BLE001 - a record, not a failure
                rec["resolved_backend"] = f"? ({exc.__class__.__name__})"
            texts = [sentences[i % len(sentences)] for i in range(batch)]
            generator = torch.Generator().manual_seed(0)
            vectors = torch.randn(batch, teacher_encoder.dim, generator=generator).to(dev)
            try:
                student = build_student(teacher_encoder, layers=layers).to(dev)
                loss_fn = IBKDLoss(student.dim, teacher_encoder.dim, backend=backend, **setting).to(dev)
                times = _timed_steps(student, loss_fn, texts, vectors, dev, amp, warmup, steps)
                rec.update(status="ok", median_s=statistics.median(times), times_s=times)
                if dev.type == "cuda":
                    rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
            except torch.cuda.OutOfMemoryError:
                rec["status"] = "out of memory"
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(rec)
    return results


def run_gpu_timing(ctx: Context) -> dict:
    """The GPU hook: skipped (and said so) without CUDA; never cached (a GPU rerun measures)."""
    gpu = ctx.spec.get("gpu_timing") or {}
    if not gpu.get("enabled", True):
        return {"status": "skipped", "reason": "disabled in the config"}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device on this machine (the hook runs where one is)"}
    common = ctx.spec["common"]
    cfg = TrainConfig.from_dict({**common, "data_dir": ctx.data_dir, "output_dir": "unused"})
    sentences, _ = read_sentences(cfg.resolve_path(cfg.corpus, "common.corpus"), limit=4096)
    ctx.log("gpu: timing distillation steps (fused vs reference losses)")
    rows = time_distill_steps(teacher_spec(ctx), common["student_layers"], gpu.get("batches", [256, 512, 1024, 2048, 4096]),
                              backends=tuple(gpu.get("backends", ["reference", "auto"])), device="cuda",
                              amp=gpu.get("amp", "bf16"), max_length=common.get("max_length", TrainConfig.max_length),
                              sentences=sentences, warmup=gpu.get("warmup", 2), steps=gpu.get("steps", 5))
    return {"status": "done", "device": torch.cuda.get_device_name(0), "rows": rows}
