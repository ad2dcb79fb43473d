"""The compact student: the teacher's layer subset with factorized word embeddings.

The ``V x hidden`` word-embedding matrix is most of a small BERT's parameters (all-MiniLM-L6-v2: 11.7M of
22.7M). The compact student replaces it by a small ``V x d_small`` table (from embedding distillation by
encoding, :mod:`ibkd.distill.embedding_table`) followed by ``Linear(d_small -> hidden)``
(:class:`ibkd.distill.compact_modeling.CompactBertModel`); position/token-type embeddings, the embedding LayerNorm
and the chosen transformer layers are copied from the teacher. The up-projection starts at the least-squares
fit ``[T 1] [W^T; b] ~ E`` of the teacher's word-embedding matrix E, so the student starts close to the plain
layer-subset student, and IBKD stage 1 then trains it (``compact_embeddings`` in :class:`ibkd.distill.config.TrainConfig`).

* :func:`build_compact_student` / :func:`factorize_student` — build it (from the teacher, or from an already
  built layer-subset student).
* :func:`lstsq_up_projection` — the least-squares initialisation.
* :func:`pca_table` — a baseline table: the teacher's word embeddings projected on their top principal
  directions (not embedding distillation; with it the lstsq start is the best rank-d fit of E).
* :func:`load_compact_table` — read and check a table folder against a tokenizer.
* :func:`bert_parameter_count` (closed form), :func:`parameter_table` (counts of built models:
  :func:`ibkd.distill.evaluation.count_parameters`).

Size: with all-MiniLM-L6-v2 (V 30522, hidden 384) and layers {0, 5}, the compact student has
``30906 d + 3,747,456`` parameters: d = 96 → 6.71M (29.6% of the teacher's 22.71M), d = 128 → 7.70M; the
"<= 7.5M" target needs d <= 121.

Loading an exported compact student (``Encoder.save``/``ibkd distill`` output: ``config.json`` with
``model_type: ibkd_compact_bert`` and ``auto_map``, ``compact_modeling.py``, ``model.safetensors``, tokenizer,
sentence-transformers files): in a process without ibkd, ``transformers.AutoModel.from_pretrained(folder,
trust_remote_code=True)`` or ``sentence_transformers.SentenceTransformer(folder, trust_remote_code=True)``
(the copied ``compact_modeling.py`` needs only torch and transformers); with ibkd, ``Encoder.load(folder)``, or
those two without ``trust_remote_code`` once ``ibkd.distill.compact_modeling`` has been imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .compact_modeling import CompactBertConfig, CompactBertModel, register_auto_classes
from .embedding_table import TABLE_FILE, load_small_table
from .evaluation import count_parameters
from .models import Encoder, subset_layers

UP_INITS = ("lstsq", "random")
FACTORIZED_KEYS = ("embeddings.word_embeddings.table.weight", "embeddings.word_embeddings.up.weight",
                   "embeddings.word_embeddings.up.bias")

register_auto_classes()


# -- the small table --------------------------------------------------------------------------------

def load_compact_table(folder: Union[str, Path], tokenizer=None, *, vocab_size: Optional[int] = None
                       ) -> tuple[torch.Tensor, dict]:
    """The ``V x d_small`` table of a folder written by ``ibkd.distill.embedding_table.save_small_table`` and its meta.

    With ``tokenizer`` (the teacher's), checks that the table has one row per token id of the model
    (``vocab_size``, the rows of its word-embedding matrix; default ``len(tokenizer)``) and, when the folder
    carries tokenizer files, that they define the same vocabulary as ``tokenizer`` (a table indexed by
    another tokenizer would be silently wrong). Raises FileNotFoundError / ValueError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"compact_embeddings folder {folder} does not exist")
    if not (folder / TABLE_FILE).is_file():
        raise FileNotFoundError(f"compact_embeddings folder {folder} has no {TABLE_FILE} "
                                "(write it with ibkd.distill.embedding_table.save_small_table)")
    table, meta = load_small_table(folder)  # DataError (a ValueError) on an inconsistent folder
    if table.dim() != 2 or not table.is_floating_point():
        raise ValueError(f"the table in {folder} must be a 2-D float tensor, got {tuple(table.shape)} {table.dtype}")
    if tokenizer is not None:
        expected = len(tokenizer) if vocab_size is None else int(vocab_size)
        if table.shape[0] != expected or len(tokenizer) > table.shape[0]:
            raise ValueError(f"the table in {folder} has {table.shape[0]} rows but the teacher has {expected} "
                             f"token ids ({len(tokenizer)} in its tokenizer): it was built for another vocabulary")
        if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            if AutoTokenizer.from_pretrained(str(folder)).get_vocab() != tokenizer.get_vocab():
                raise ValueError(f"the tokenizer saved in {folder} differs from the teacher's tokenizer: the "
                                 "table rows would index other tokens")
    return table, meta


# -- building the compact student -------------------------------------------------------------------

def lstsq_up_projection(small_table: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` minimising ``||small_table @ W.T + b - target||_F`` (float64 solve; minimum-norm
    solution when the system is under-determined or rank-deficient). Returns float32 ``W`` (H x d), ``b`` (H)."""
    if small_table.dim() != 2 or target.dim() != 2 or small_table.shape[0] != target.shape[0]:
        raise ValueError(f"small_table (V x d) and target (V x H) must have the same rows, got "
                         f"{tuple(small_table.shape)} and {tuple(target.shape)}")
    a = torch.cat([small_table.detach().double().cpu(), torch.ones(small_table.shape[0], 1, dtype=torch.float64)], 1)
    # gelsd (SVD) copes with rank deficiency and with more unknowns than rows.
    solution = torch.linalg.lstsq(a, target.detach().double().cpu(), driver="gelsd").solution  # (d+1, H)
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def pca_table(embedding_matrix: torch.Tensor, d_small: int) -> torch.Tensor:
    """``(E - mean) @ V_d``: the centred rows of ``embedding_matrix`` on its top ``d_small`` principal
    directions (float64 SVD; float32 result). A baseline table, not a distilled one."""
    if embedding_matrix.dim() != 2 or not 1 <= d_small <= min(embedding_matrix.shape):
        raise ValueError(f"d_small must be in 1..{min(embedding_matrix.shape)} for a matrix of shape "
                         f"{tuple(embedding_matrix.shape)}, got {d_small}")
    centred = embedding_matrix.detach().double().cpu()
    centred = centred - centred.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:d_small].T).float()


def _check_table(small_table, vocab_size: int) -> None:
    if not isinstance(small_table, torch.Tensor):
        raise TypeError(f"small_table must be a torch.Tensor (V x d_small), got {type(small_table).__name__}")
    if small_table.dim() != 2 or not small_table.is_floating_point():
        raise ValueError(f"small_table must be a 2-D float tensor (V x d_small), got shape "
                         f"{tuple(small_table.shape)} dtype {small_table.dtype}")
    if small_table.shape[0] != vocab_size:
        raise ValueError(f"small_table has {small_table.shape[0]} rows but the teacher's vocabulary has {vocab_size}")
    if small_table.shape[1] < 1:
        raise ValueError("small_table must have at least one column")
    if not torch.isfinite(small_table).all():
        raise ValueError("small_table has non-finite values")


def factorize_student(student: Encoder, small_table: torch.Tensor, *, up_init: str = "lstsq",
                      seed: int = 0) -> Encoder:
    """Replace the word embeddings of a BERT ``student`` (e.g. a layer subset of the teacher) by
    ``small_table`` + ``Linear(d_small -> hidden)``; everything else is copied. ``up_init="lstsq"`` fits the
    projection to the student's word-embedding matrix; ``"random"`` draws it like BERT (normal(0, 0.02), zero bias)."""
    from transformers import BertModel

    if up_init not in UP_INITS:
        raise ValueError(f"up_init must be one of {UP_INITS}, got {up_init!r}")
    model = student.model
    if isinstance(model, CompactBertModel):
        raise ValueError("the student already has factorized embeddings")
    if not isinstance(model, BertModel):
        raise ValueError(f"the compact student is built from a BERT model, got {type(model).__name__}")
    word = model.embeddings.word_embeddings.weight
    _check_table(small_table, word.shape[0])
    values = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    config = CompactBertConfig(embedding_dim=int(small_table.shape[1]), **values)
    if getattr(model.config, "_attn_implementation", None):  # keep the teacher's attention kernel (eager/sdpa)
        config._attn_implementation = model.config._attn_implementation
    compact = CompactBertModel(config)
    state = {k: v for k, v in model.state_dict().items()
             if k != "embeddings.word_embeddings.weight" and not k.startswith("pooler.")}
    missing, unexpected = compact.load_state_dict(state, strict=False)
    if sorted(missing) != sorted(FACTORIZED_KEYS) or unexpected:
        raise RuntimeError(f"copying the student into the compact model: missing {missing}, unexpected {unexpected}")
    factorized = compact.embeddings.word_embeddings
    with torch.no_grad():
        factorized.table.weight.copy_(small_table)
        if up_init == "lstsq":
            weight, bias = lstsq_up_projection(small_table, word)
            factorized.up.weight.copy_(weight)
            factorized.up.bias.copy_(bias)
        else:
            gen = torch.Generator().manual_seed(seed)
            factorized.up.weight.copy_(torch.randn(factorized.up.weight.shape, generator=gen) * config.initializer_range)
            factorized.up.bias.zero_()
    compact.to(device=word.device, dtype=word.dtype)
    compact.train(model.training)
    return Encoder(compact, student.tokenizer, pooling=student.pooling, normalize=student.normalize,
                   max_length=student.max_length, name=f"{student.name}[compact d={small_table.shape[1]}]")


def build_compact_student(teacher: Encoder, layers: Sequence[int], small_table: torch.Tensor,
                          up_init: str = "lstsq", *, seed: int = 0) -> Encoder:
    """The teacher's layers ``layers`` (its position/token-type embeddings and embedding LayerNorm too) on
    top of factorized word embeddings ``small_table @ W.T + b`` (see :func:`factorize_student`)."""
    _check_table(small_table, int(teacher.config.vocab_size))
    if up_init not in UP_INITS:
        raise ValueError(f"up_init must be one of {UP_INITS}, got {up_init!r}")
    return factorize_student(subset_layers(teacher, layers), small_table, up_init=up_init, seed=seed)


# -- parameter counts -----------------------------------------------------------------------------

def bert_parameter_count(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                         max_position_embeddings: int, type_vocab_size: int = 2, embedding_dim: Optional[int] = None,
                         pooler: bool = False) -> int:
    """Closed form: parameters of a BERT encoder (``embedding_dim`` = factorized word embeddings of that width)."""
    h, i = hidden_size, intermediate_size
    words = vocab_size * h if embedding_dim is None else vocab_size * embedding_dim + embedding_dim * h + h
    embeddings = words + (max_position_embeddings + type_vocab_size) * h + 2 * h  # + LayerNorm
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # q,k,v,o; LN; FFN in/out; LN
    return embeddings + num_layers * layer + (h * h + h if pooler else 0)


def parameter_table(teacher: Encoder, layers: Sequence[int] = (0, 5),
                    sizes: Sequence[int] = (32, 64, 96, 128)) -> list[dict]:
    """Rows {model, embedding_dim, layers, parameters, fraction_of_teacher} for the teacher, its plain
    layer-subset student and the compact student for each table width (closed form; checked against a
    built model in the tests)."""
    cfg = teacher.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size)
    total = count_parameters(teacher)
    rows = [dict(model="teacher", embedding_dim=cfg.hidden_size, layers=teacher.num_layers, parameters=total)]
    pooler = getattr(teacher.model, "pooler", None) is not None
    rows.append(dict(model=f"layer subset {list(layers)}", embedding_dim=cfg.hidden_size, layers=len(layers),
                     parameters=bert_parameter_count(num_layers=len(layers), pooler=pooler, **common)))
    for d in sizes:
        rows.append(dict(model=f"compact d={d} {list(layers)}", embedding_dim=d, layers=len(layers),
                         parameters=bert_parameter_count(num_layers=len(layers), embedding_dim=d, **common)))
    for row in rows:
        row["fraction_of_teacher"] = row["parameters"] / total
    return rows
