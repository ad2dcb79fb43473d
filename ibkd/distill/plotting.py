"""The one plotting helper of the application and the experiments: a training log read into columns, a
figure that is always written the same way (off-screen backend, tight layout, PNG, closed), and the
standard plot of one run's log.

``ibkd distill|finetune`` plots its ``train_log.jsonl`` with :func:`plot_training_log`; ``ibkd reproduce``
reads every row's log with :func:`read_training_log` and draws its panels inside :func:`figure`.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

# Figure without pyplot: no GUI backend is needed (CI, SSH, torchrun workers), the caller's pyplot
# state and backend (a notebook's, say) are left alone, and a figure is freed with its last reference
from matplotlib.figure import Figure

PathLike = Union[str, Path]

#: the loss terms of a training log, in the order they are drawn
LOSS_TERMS = ("loss", "infonce", "hsic", "mse")


def read_training_log(path: PathLike) -> list[dict]:
    """The records of a ``train_log.jsonl`` (one JSON object per line; blank lines skipped). A missing
    file is no records; a line that is not JSON is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
    return records


def log_columns(records: list[dict], *, skip: tuple = ()) -> dict[str, list]:
    """Records as columns: every key that occurs (first-seen order, ``skip`` left out), None where a
    record lacks it."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys and k not in skip]
    return {k: [record.get(k) for record in records] for k in keys}


@contextmanager
def figure(png_path: PathLike, nrows: int = 1, ncols: int = 1, *, figsize: Optional[tuple] = None,
           title: Optional[str] = None, dpi: int = 80) -> Iterator:
    """``with figure(png, 2, 3) as axes:`` draw on ``axes`` (as ``plt.subplots`` returns them); on leaving,
    the figure is laid out and written to ``png_path`` (its folder created)."""
    fig = Figure(figsize=figsize or (4.7 * ncols, 4 * nrows))
    axes = fig.subplots(nrows, ncols)
    yield axes
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)


def _finite(values: list) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def plot_training_log(log_jsonl: PathLike, png: PathLike) -> Optional[Path]:
    """Plot one run's ``train_log.jsonl``: the loss terms, their gradient norms at the student output,
    and the learning rate (with dev Spearman where the log has it) against the step. Returns the PNG's
    path, or None when the log has no step records (nothing is written)."""
    records = [r for r in read_training_log(log_jsonl) if "step" in r and "loss" in r]
    if not records:
        return None
    columns = log_columns(records)
    steps = columns["step"]
    with figure(png, 1, 3, figsize=(14, 4)) as axes:
        for key in LOSS_TERMS:
            if key in columns and _finite(columns[key]):
                axes[0].plot(steps, columns[key], label=key)
        if _finite(columns["loss"]) and all(v > 0 for v in columns["loss"]):
            axes[0].set_yscale("log")
        axes[0].set_title("loss terms")
        for key in [k for k in columns if k.startswith("grad_norm_")]:
            axes[1].plot(steps, columns[key], label=key[len("grad_norm_"):])
        axes[1].set_title("gradient norm at the student output")
        if "lr" in columns:
            axes[2].plot(steps, columns["lr"])
        axes[2].set_title("learning rate")
        dev = [(r["step"], r["dev_spearman"]) for r in records if r.get("dev_spearman") is not None]
        if dev:
            twin = axes[2].twinx()
            twin.plot(*zip(*dev), "o-", color="tab:red", label="dev Spearman")
            twin.legend(loc="lower right")
        for ax in axes:
            ax.set_xlabel("step")
        for ax in axes[:2]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    return Path(png)
