"""The word-embedding experiment (Mou et al., "Distilling Word Embeddings: An Encoding Approach", CIKM
2016, arXiv 1506.04488): small tables distilled by encoding the teacher's table vs trained directly, on
STS-B, and the ``ibkd compress-embeddings`` command.

The distiller itself and the exported table folder are part of the application
(:mod:`ibkd.distill.embedding_table`: the compact student is built on them); this package holds what
trains and compares tables:

* :mod:`.model` — :class:`DirectEmbedding` (the paper's baseline), :class:`TaskHead`, tokenized STS pairs,
  mean pooling over word ids, the arms of a run, :func:`evaluate_small_table`;
* :mod:`.train` — :class:`EmbeddingTaskConfig`, :func:`train_sts_embedding`, :func:`select_learning_rate`;
* :mod:`.compare` — :func:`compare_embeddings` and :func:`render_markdown`;
* :mod:`.cli` — :func:`add_arguments` / :func:`run_cli` / :func:`main` (``ibkd compress-embeddings``).
"""

from ...distill.embedding_table import (EmbeddingConfigError, EncodingDistiller, load_small_table,
                                        save_small_table)
from .cli import add_arguments, main, run_cli
from .compare import DEFAULT_SEEDS, DEFAULT_SIZES, compare_embeddings, load_teacher_table, render_markdown, stsb_paths
from .model import DirectEmbedding, TaskHead, TokenizedPairs, evaluate_small_table, mean_pool_ids, tokenize_pairs
from .train import DEFAULT_LR_GRID, METHODS, EmbeddingTaskConfig, select_learning_rate, train_sts_embedding

__all__ = [
    "DEFAULT_LR_GRID", "DEFAULT_SEEDS", "DEFAULT_SIZES", "METHODS", "DirectEmbedding", "EmbeddingConfigError",
    "EmbeddingTaskConfig", "EncodingDistiller", "TaskHead", "TokenizedPairs", "add_arguments", "compare_embeddings",
    "evaluate_small_table", "load_small_table", "load_teacher_table", "main", "mean_pool_ids", "render_markdown",
    "run_cli", "save_small_table", "select_learning_rate", "stsb_paths", "tokenize_pairs", "train_sts_embedding",
]
