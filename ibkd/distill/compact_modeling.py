"""A BERT encoder whose word embeddings are factorized: a small ``V x embedding_dim`` table followed by a
``Linear(embedding_dim -> hidden_size)`` up-projection (ALBERT-style factorization; the table usually comes
from embedding distillation by encoding). Everything after the word lookup (position and token-type
embeddings, embedding LayerNorm, the transformer layers) is plain BERT. There is no pooler: sentence
vectors are pooled from the token states (mean or CLS), so a pooler would be dead weight.

This file is self-contained on purpose (it imports only torch and transformers): ``save_pretrained``
copies it into the exported folder as Hugging Face custom code and writes ``auto_map`` into
``config.json``, so a process that has never heard of ``ibkd`` loads the folder with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` or
``SentenceTransformer(folder, trust_remote_code=True)``. Imported as ``ibkd.distill.compact_modeling`` it also
registers the classes with ``AutoConfig``/``AutoModel``, so inside ``ibkd`` no ``trust_remote_code`` is
needed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

MODEL_TYPE = "ibkd_compact_bert"


class CompactBertConfig(BertConfig):
    """``BertConfig`` plus ``embedding_dim``, the width of the small word-embedding table."""

    model_type = MODEL_TYPE

    def __init__(self, embedding_dim: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim


class FactorizedEmbedding(nn.Module):
    """``ids -> up(table[ids])``: a ``V x embedding_dim`` lookup, then ``Linear(embedding_dim, hidden_size)``.

    Stands in for BERT's ``V x hidden_size`` ``word_embeddings`` (same call signature, same output shape)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, hidden_size: int, padding_idx=None,
                 initializer_range: float = 0.02):
        super().__init__()
        self.table = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.up = nn.Linear(embedding_dim, hidden_size)
        # BERT's init (normal(0, initializer_range), zero bias), so a model built from a config alone is sane.
        with torch.no_grad():
            if self.table.weight.device.type != "meta":
                self.table.weight.normal_(0.0, initializer_range)
                self.up.weight.normal_(0.0, initializer_range)
                self.up.bias.zero_()
                if padding_idx is not None:
                    self.table.weight[padding_idx].zero_()

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def padding_idx(self):
        return self.table.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(input_ids))


class CompactBertModel(BertModel):
    """``BertModel`` with :class:`FactorizedEmbedding` as ``embeddings.word_embeddings`` and no pooler."""

    config_class = CompactBertConfig
    config: CompactBertConfig
    # A checkpoint of the full model may carry a pooler; it is unused here.
    _keys_to_ignore_on_load_unexpected = [r"pooler\."]

    def __init__(self, config: CompactBertConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        self.embeddings.word_embeddings = FactorizedEmbedding(
            config.vocab_size, config.embedding_dim, config.hidden_size, padding_idx=config.pad_token_id,
            initializer_range=config.initializer_range)


# save_pretrained copies this file and writes auto_map for these two classes.
CompactBertConfig.register_for_auto_class()  # AutoConfig
CompactBertModel.register_for_auto_class("AutoModel")


def register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModel`` resolve ``model_type: ibkd_compact_bert`` to these classes without
    ``trust_remote_code`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, CompactBertConfig, exist_ok=True)
    AutoModel.register(CompactBertConfig, CompactBertModel, exist_ok=True)


# Only the package's own copy registers itself; a copy loaded as remote code (module name
# transformers_modules....) leaves the auto registries alone.
if __name__ == "ibkd.distill.compact_modeling":
    register_auto_classes()
