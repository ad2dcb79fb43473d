"""``ibkd reproduce``: the paper's comparison (teacher vs 2-layer students distilled with none / MSE /
contrastive-only / IBKD, stage-2 fine-tuning, a compact factorized student) on data we have, as one
resumable command whose results are a JSON file, a Markdown table, a PNG and, optionally, two README
sections.

Plan (from a YAML config, by default the shipped ``reproduce-minilm``):

1. ``teacher``: STS-B dev/test of the teacher itself;
2. ``none``: the untrained student (teacher layers copied); ``mse``, ``contrastive`` (InfoNCE only, β = 0)
   and ``auto`` (IBKD, β=auto) at every seed;
3. ``sweep``: IBKD settings (β, γ fixed or median, HSIC on unit-norm or raw vectors) at the first seed;
   the one with the best STS-B **dev** Spearman is chosen (test is reported, never used to choose);
4. ``ibkd``: the chosen setting at the other seeds (its first seed is the sweep run itself);
5. ``finetune``: stage 2 on STS-B train pairs from the chosen IBKD student (first seed);
6. ``compact``: a small word-embedding table distilled by encoding (:mod:`ibkd.distill.embedding_table`),
   then the chosen IBKD setting on a student whose embeddings are that table + an up-projection;
7. ``embedding``: :func:`ibkd.experiments.embedding.compare_embeddings` (distilled vs direct tables per size);
8. ``gpu``: distillation-step time with the fused vs reference losses under bf16 autocast (CUDA only;
   recorded as skipped elsewhere).

Every training row goes through the application's public entry point :func:`ibkd.distill.trainer.run`
in this process, in its own folder ``<output_dir>/<row>/``, with one shared teacher cache. Each finished
row writes ``result.json`` holding a hash of its settings; a rerun skips rows whose hash matches (and
resumes an interrupted row from its last checkpoint), so the command can be restarted after a crash.
The results document is assembled from the finished rows.

Modules: :mod:`.spec` (the config), :mod:`.rows` (the plan's rows), :mod:`.run` (running one row),
:mod:`.gpu` (the GPU timing hook), :mod:`.aggregate` (choice, statistics, targets), :mod:`.plan` (the
whole plan), :mod:`.render` (Markdown, figure, README sections), :mod:`.cli` (``ibkd reproduce``).
"""

from .aggregate import SCHEMA, choose, mean_std, summarize, targets
from .cli import add_arguments, main, run_cli
from .gpu import time_distill_steps
from .plan import GROUPS, run_plan
from .render import EMBEDDING_MARKERS, REPRODUCE_MARKERS, replace_between, write_outputs
from .rows import Context, Row, check_train_config, phase_one_rows, phase_two_rows
from .spec import DEFAULT_CONFIG, ReproduceError, config_path, load_spec

__all__ = [
    "DEFAULT_CONFIG", "EMBEDDING_MARKERS", "GROUPS", "REPRODUCE_MARKERS", "SCHEMA", "Context", "ReproduceError",
    "Row", "add_arguments", "check_train_config", "choose", "config_path", "load_spec", "main", "mean_std",
    "phase_one_rows", "phase_two_rows", "replace_between", "run_cli", "run_plan", "summarize", "targets",
    "time_distill_steps", "write_outputs",
]
