"""Checks a run is refused for before any model is loaded (the device, the reporting integration, every input
file) and the ones that need the loaded teacher (its layers, its position embeddings). Each failure is one
:class:`~ibkd.distill.config.ConfigError` naming the flag."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .config import DATA_DIR_ENV, DEVICE_PATTERN, ConfigError, TrainConfig

log = logging.getLogger("ibkd.distill")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX), as oneDNN reports it."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_amp(amp: str, device: str) -> None:
    """bf16 autocast on a CPU without native bf16 is emulated and runs slower than fp32: said, not refused
    (the result is the same, only the speed differs); ``auto`` says what it chose."""
    if amp == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        log.warning("--amp bf16 on a CPU without native bf16 (AVX512-BF16/AMX): expect it to be slower than "
                    "--amp off here (--amp auto picks bf16 only where it is native)")
    elif amp == "auto":
        log.info("--amp auto: %s on %s", resolve_amp(amp, device), device)


def resolve_amp(amp: str, device: str) -> str:
    """``auto`` -> ``bf16`` where bf16 is native (a CUDA device that supports it, a CPU with AVX512-BF16/AMX),
    else ``off``; other values as given. Why: on a CPU without native bf16, autocast runs the bf16 matmuls
    through oneDNN's emulation (measured 2026-12-04 on an AVX2 AMD EPYC: a 2-layer student's step at batch
    256 took 88 s under bf16 autocast against 3.5 s in fp32), so a config written on a bf16 machine would
    train far slower on such a host."""
    if amp != "auto":
        return amp
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "off"
    return "bf16" if cpu_has_native_bf16() else "off"


def check_device(device: str, flag: str = "--device") -> None:
    """``device`` is usable here: a bad string or CUDA on a machine without it is one ConfigError."""
    if not (isinstance(device, str) and DEVICE_PATTERN.fullmatch(device)):
        raise ConfigError(f"{flag} must be cpu, cuda, cuda:N or auto, got {device!r}")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
        raise ConfigError(f"{flag} {device}: CUDA is not available here ({why}); use {flag} cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")



def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other values as given (after :func:`check_device`)."""
    check_device(device)
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

def _is_dataset_spec(value: str) -> bool:
    """A corpus that :func:`ibkd.distill.data.read_sentences` reads through ``datasets``, not a file."""
    return value.startswith("hf:") or (Path(value).is_dir() and (Path(value) / "dataset_info.json").is_file())


def input_fields(cfg: TrainConfig) -> list:
    """The path fields a run of ``cfg`` reads, in the order they are checked."""
    names = []
    if cfg.method != "none":
        names += ["corpus", "extra_stsb_sentences", "teacher_embeddings"] if cfg.stage == "distill" else ["train_file"]
    names.append("compact_embeddings")
    if not cfg.no_eval:
        names += ["dev", "test"]
    return names


def check_report_to(value: str) -> None:
    """``--report_to``: none, or a Hugging Face reporting integration whose package is installed (the trainer
    would otherwise fail after the model and data are loaded)."""
    if value in (None, "none"):
        return
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    if value not in INTEGRATION_TO_CALLBACK:
        raise ConfigError(f"report_to must be none or one of {', '.join(sorted(INTEGRATION_TO_CALLBACK))}, got {value!r}")
    if value not in get_available_reporting_integrations():
        raise ConfigError(f"report_to {value} needs its package installed (e.g. pip install {value})")


def preflight(cfg: TrainConfig, fields: Optional[list] = None) -> dict:
    """Everything a run can be refused for before a model is loaded: the device, and every input file of
    ``fields`` (default :func:`input_fields`). Returns ``{field: resolved path}`` of the inputs given. Each
    failure is one ConfigError naming the file and the flag (dev/test: and ``--no_eval``)."""
    check_device(cfg.device)
    check_report_to(cfg.report_to)
    check_amp(cfg.amp, resolve_device(cfg.device))
    found = {}
    for name in (input_fields(cfg) if fields is None else fields):
        value = getattr(cfg, name)
        if value in (None, ""):
            if name == "train_file":
                raise ConfigError("stage finetune needs --train_file (STS-B .csv, sent0,sent1[,hard_neg] .csv "
                                  "or .jsonl of {anchor, positive[, negative]})")
            continue
        path = cfg.resolve_path(value, what=f"--{name}")
        found[name] = path
        if name == "corpus" and _is_dataset_spec(str(value)):
            continue
        ok = Path(path).is_dir() if name == "compact_embeddings" else Path(path).is_file()
        if ok:
            continue
        where = ""
        if "{data_dir}" in str(value):
            if not Path(cfg.data_dir).expanduser().is_dir():
                raise ConfigError(f"data folder not found: {cfg.data_dir} (--data_dir or ${DATA_DIR_ENV}; needed "
                                  f"by --{name} {value})")
            where = f", under --data_dir / ${DATA_DIR_ENV} {cfg.data_dir}"
        what = "folder" if name == "compact_embeddings" else "file"
        hint = "; pass --no_eval to train without evaluation" if name in ("dev", "test") else ""
        raise ConfigError(f"{name} {what} not found: {path} (--{name}{where}{hint})")
    return found


def check_against_model(cfg: TrainConfig, num_layers: int, max_positions: Optional[int],
                        student_num_layers: Optional[int] = None) -> None:
    """What needs the loaded teacher: ``student_layers`` within its ``num_layers``, ``max_length`` within
    ``max_positions`` (the longest input its position embeddings take, None = no limit), and an integer
    ``hsic_layer`` within the student's ``student_num_layers`` (0 = embedding output; negative from the top)."""
    layers = cfg.student_layer_list()
    if layers:
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise ConfigError(f"student_layers {cfg.student_layers}: layer(s) {', '.join(map(str, bad))} out of range, "
                              f"the teacher has {num_layers} layers (0-{num_layers - 1})")
    if max_positions is not None and cfg.max_length > max_positions:
        raise ConfigError(f"max_length {cfg.max_length} is beyond the model's {max_positions} position embeddings "
                          f"(--max_length at most {max_positions})")
    if student_num_layers is not None and isinstance(cfg.hsic_layer, int) and not isinstance(cfg.hsic_layer, bool):
        if not -student_num_layers <= cfg.hsic_layer <= student_num_layers:
            raise ConfigError(f"hsic_layer {cfg.hsic_layer} out of range for a {student_num_layers}-layer student "
                              f"(0 = embedding output .. {student_num_layers}, or negative from the top)")
