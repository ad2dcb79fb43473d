"""The compact student: the teacher's layer subset with factorized word embeddings.

The ``V x hidden`` word-embedding matrix is most of a small BERT's parameters (all-MiniLM-L6-v2: 11.7M of
22.7M). The compact student replaces it by a small ``V x d_small`` table followed by
``Linear(d_small -> hidden)`` (:class:`ibkd.distill.compact_modeling.CompactBertModel`); position/token-type
embeddings, the embedding LayerNorm and the chosen transformer layers are copied from the teacher. The
up-projection starts at the least-squares fit ``[T 1] [W^T; b] ~ E`` of the teacher's word-embedding matrix E,
so the student starts close to the plain layer-subset student, and IBKD stage 1 then trains it.

Two starts of the table (:class:`ibkd.distill.config.TrainConfig`: ``compact_embeddings``, ``compact_init``,
``compact_dim``, ``compact_max_positions``; :func:`compact_student_from_config`):

* ``table``: a table folder, e.g. distilled by encoding (:mod:`ibkd.distill.embedding_table`,
  ``ibkd compress-embeddings``);
* ``pca``: :func:`pca_table`, the centred E on its top ``d`` principal directions. The least-squares
  up-projection of that table is exactly those directions and the bias the mean of E, so the student starts
  from the best rank-d approximation of E (Eckart-Young; :func:`pca_compact_student`). On STS-B dev, before
  any training: 75.3 for the d = 96 PCA table vs 66.9 for the distilled one.

The position embeddings can be trimmed to the first ``max_positions`` rows (``compact_max_positions``, at least
``max_length``): the student never sees a later position, and 512 x 384 = 197k parameters shrink to
64 x 384 = 25k at max_length 64. Outputs for inputs within ``max_positions`` tokens are unchanged.

* :func:`build_compact_student` / :func:`factorize_student` / :func:`pca_compact_student` — build it (from the
  teacher, or from an already built layer-subset student).
* :func:`lstsq_up_projection` — the least-squares initialisation.
* :func:`pca_table` — the PCA table.
* :func:`load_compact_table` — read and check a table folder against a tokenizer.
* :func:`bert_parameter_count` (closed form), :func:`parameter_table` (counts of built models:
  :func:`ibkd.distill.evaluation.count_parameters`).

Size: a BERT with V word ids, hidden H, FFN width I, L layers, P positions, T token types and a d-wide
table has ``V d + d H + H`` (words) ``+ (P + T + 2) H`` (positions, token types, LayerNorm)
``+ L (4 H^2 + 2 H I + 9 H + I)`` parameters (no pooler). With all-MiniLM-L6-v2 (V 30522, H 384, I 1536,
T 2) and layers {0, 5} that is ``30906 d + 384 P + 3,550,848``:

* P = 512 (untrimmed): ``30906 d + 3,747,456``: d = 96 → 6.71M (29.6% of the teacher's 22.71M), d = 128 → 7.70M;
* P = 64 (trimmed to max_length 64): ``30906 d + 3,575,424``: d = 96 → 6.54M, d = 120 → 7.28M,
  d = 126 → 7.47M, the widest table within 7.5M (d = 127 → 7,500,486).

Loading an exported compact student (``Encoder.save``/``ibkd distill`` output: ``config.json`` with
``model_type: ibkd_compact_bert`` and ``auto_map``, ``compact_modeling.py``, ``model.safetensors``, tokenizer,
sentence-transformers files): in a process without ibkd, ``transformers.AutoModel.from_pretrained(folder,
trust_remote_code=True)`` or ``sentence_transformers.SentenceTransformer(folder, trust_remote_code=True)``
(the copied ``compact_modeling.py`` needs only torch and transformers); with ibkd, ``Encoder.load(folder)``, or
those two without ``trust_remote_code`` once ``ibkd.distill.compact_modeling`` has been imported. A trimmed
student's ``config.json`` says ``max_position_embeddings: P`` and its tokenizer ``model_max_length: P``.
"""

from __future__ import annotations

import copy
import logging
import numbers
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .compact_modeling import CompactBertConfig, CompactBertModel, register_auto_classes
from .config import ConfigError
from .embedding_table import TABLE_FILE, load_small_table
from .evaluation import count_parameters
from .models import Encoder, subset_layers

UP_INITS = ("lstsq", "random")
TABLE_INITS = ("table", "pca")  # TrainConfig.compact_init
FACTORIZED_KEYS = ("embeddings.word_embeddings.table.weight", "embeddings.word_embeddings.up.weight",
                   "embeddings.word_embeddings.up.bias")

log = logging.getLogger("ibkd.distill")

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
    directions ``V_d`` (float64 SVD; float32 result). Its least-squares up-projection
    (:func:`lstsq_up_projection`) is ``W = V_d^T``, ``b = mean``: the factorization then reproduces the best
    rank-``d_small`` approximation of E around its mean."""
    if isinstance(d_small, bool) or not isinstance(d_small, numbers.Integral):
        raise ValueError(f"d_small must be an int, got {d_small!r}")
    d_small = int(d_small)
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


def _check_max_positions(max_positions, available: int, max_length: int) -> Optional[int]:
    if max_positions is None:
        return None
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    if max_positions > available:
        raise ValueError(f"max_positions {max_positions} is beyond the model's {available} position embeddings")
    if max_positions < max_length:
        raise ValueError(f"max_positions {max_positions} is below the student's max_length {max_length}: "
                         "later tokens would have no position embedding")
    return max_positions


def factorize_student(student: Encoder, small_table: torch.Tensor, *, up_init: str = "lstsq",
                      seed: int = 0, max_positions: Optional[int] = None) -> Encoder:
    """Replace the word embeddings of a BERT ``student`` (e.g. a layer subset of the teacher) by
    ``small_table`` + ``Linear(d_small -> hidden)``; everything else is copied. ``up_init="lstsq"`` fits the
    projection to the student's word-embedding matrix; ``"random"`` draws it like BERT (normal(0, 0.02), zero bias).
    ``max_positions`` (at least the student's ``max_length``): keep only the first that many position
    embeddings (the outputs for inputs of at most that many tokens are unchanged); default: all of them."""
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
    max_positions = _check_max_positions(max_positions, int(model.config.max_position_embeddings), student.max_length)
    if max_positions is not None and getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("max_positions trims absolute position embeddings only, the model has "
                         f"{model.config.position_embedding_type!r}")
    values = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    if max_positions is not None:
        values["max_position_embeddings"] = max_positions
    config = CompactBertConfig(embedding_dim=int(small_table.shape[1]), **values)
    if getattr(model.config, "_attn_implementation", None):  # keep the teacher's attention kernel (eager/sdpa)
        config._attn_implementation = model.config._attn_implementation
    compact = CompactBertModel(config)
    state = {k: v for k, v in model.state_dict().items()
             if k != "embeddings.word_embeddings.weight" and not k.startswith("pooler.")}
    if max_positions is not None:
        state["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"][:max_positions]
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
    tokenizer = student.tokenizer
    if max_positions is not None and getattr(tokenizer, "model_max_length", 0) > max_positions:
        tokenizer = copy.deepcopy(tokenizer)  # the teacher's own tokenizer keeps its limit
        tokenizer.model_max_length = max_positions  # saved: plain truncation=True then stays within the positions
    return Encoder(compact, tokenizer, pooling=student.pooling, normalize=student.normalize,
                   max_length=student.max_length, name=f"{student.name}[compact d={small_table.shape[1]}]")


def pca_compact_student(student: Encoder, d_small: int, *, max_positions: Optional[int] = None) -> Encoder:
    """``student`` factorized through the PCA table of its own word embeddings (:func:`pca_table`, the
    least-squares up-projection then being the principal directions and the mean): its word embeddings
    start as the best rank-``d_small`` approximation of the student's."""
    word = student.model.embeddings.word_embeddings
    if not isinstance(word, torch.nn.Embedding):
        raise ValueError("the student already has factorized embeddings")
    return factorize_student(student, pca_table(word.weight, d_small), up_init="lstsq", max_positions=max_positions)


def build_compact_student(teacher: Encoder, layers: Sequence[int], small_table: torch.Tensor,
                          up_init: str = "lstsq", *, seed: int = 0, max_positions: Optional[int] = None) -> Encoder:
    """The teacher's layers ``layers`` (its position/token-type embeddings and embedding LayerNorm too) on
    top of factorized word embeddings ``small_table @ W.T + b`` (see :func:`factorize_student`)."""
    _check_table(small_table, int(teacher.config.vocab_size))
    if up_init not in UP_INITS:
        raise ValueError(f"up_init must be one of {UP_INITS}, got {up_init!r}")
    return factorize_student(subset_layers(teacher, layers), small_table, up_init=up_init, seed=seed,
                             max_positions=max_positions)


def compact_student_from_config(student: Encoder, teacher: Encoder, cfg) -> Encoder:
    """The compact student a :class:`ibkd.distill.config.TrainConfig` asks for, from the layer-subset
    ``student``: the table of the ``compact_embeddings`` folder (``compact_init`` table) or the PCA table of
    width ``compact_dim`` (default: the folder's width; ``compact_init`` pca), up-projection by least squares,
    position embeddings trimmed to ``compact_max_positions``. Every bad value is a ConfigError naming the field."""
    init = cfg.compact_init or "table"
    if init not in TABLE_INITS:
        raise ConfigError(f"compact_init must be one of {', '.join(TABLE_INITS)}, got {init!r}")
    table, folder, meta = None, None, {}
    if cfg.compact_embeddings:
        folder = cfg.resolve_path(cfg.compact_embeddings, "compact_embeddings")
        try:
            table, meta = load_compact_table(folder, teacher.tokenizer, vocab_size=teacher.config.vocab_size)
        except (FileNotFoundError, ValueError) as exc:  # DataError is a ValueError too
            raise ConfigError(f"compact_embeddings: {exc}") from None
    elif init == "table":
        raise ConfigError("compact_init table needs a compact_embeddings folder")
    if init == "pca":
        d_small = cfg.compact_dim if cfg.compact_dim is not None else int(table.shape[1])
        word = student.model.embeddings.word_embeddings.weight
        if not 1 <= d_small <= min(word.shape):
            raise ConfigError(f"compact_dim must be in 1..{min(word.shape)} (the word-embedding matrix is "
                              f"{tuple(word.shape)}), got {d_small}")
        table = pca_table(word, d_small)
    positions = int(student.config.max_position_embeddings)
    if cfg.compact_max_positions is not None and not student.max_length <= cfg.compact_max_positions <= positions:
        raise ConfigError(f"compact_max_positions must be in {student.max_length}..{positions} (max_length .. the "
                          f"teacher's position embeddings), got {cfg.compact_max_positions}")
    source = ("PCA of the teacher's word embeddings" if init == "pca"
              else f"{folder} ({meta.get('method', 'unknown method')})")
    log.info("compact student: %d x %d table from %s; %s position embeddings", table.shape[0], table.shape[1], source,
             cfg.compact_max_positions or positions)
    try:
        return factorize_student(student, table, up_init="lstsq", max_positions=cfg.compact_max_positions)
    except ValueError as exc:
        raise ConfigError(f"compact student: {exc}") from None


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
                    sizes: Sequence[int] = (32, 64, 96, 128), max_positions: Optional[int] = None) -> list[dict]:
    """Rows {model, embedding_dim, layers, parameters, fraction_of_teacher} for the teacher, its plain
    layer-subset student and the compact student for each table width, its position embeddings trimmed to
    ``max_positions`` when given (closed form; checked against a built model in the tests)."""
    cfg = teacher.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size)
    total = count_parameters(teacher)
    rows = [dict(model="teacher", embedding_dim=cfg.hidden_size, layers=teacher.num_layers, parameters=total)]
    pooler = getattr(teacher.model, "pooler", None) is not None
    rows.append(dict(model=f"layer subset {list(layers)}", embedding_dim=cfg.hidden_size, layers=len(layers),
                     parameters=bert_parameter_count(num_layers=len(layers), pooler=pooler, **common)))
    compact = {**common, **({"max_position_embeddings": max_positions} if max_positions else {})}
    trimmed = f" P={max_positions}" if max_positions else ""
    for d in sizes:
        rows.append(dict(model=f"compact d={d}{trimmed} {list(layers)}", embedding_dim=d, layers=len(layers),
                         parameters=bert_parameter_count(num_layers=len(layers), embedding_dim=d, **compact)))
    for row in rows:
        row["fraction_of_teacher"] = row["parameters"] / total
    return rows
