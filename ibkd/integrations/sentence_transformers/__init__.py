"""IBKD losses for sentence-transformers.

They follow that library's loss convention — the model first in the constructor,
``forward(sentence_features, labels)``, and a dict of named components returned, which
``SentenceTransformerTrainer`` sums into the training loss and logs one by one — so they drop into
``SentenceTransformerTrainer(model=..., loss=...)`` like any built-in loss. The trainer optimises
every parameter of the loss module, the learned projection P included.

* :class:`IBKDDistillationLoss` — stage 1: unlabeled sentences with pre-computed teacher vectors in
  the ``label`` column; :class:`CachedIBKDDistillationLoss`, the same with GradCache for batches larger
  than memory.
* :class:`IBKDSupervisedLoss` — stage 2: (anchor, positive[, hard negative ...]) columns;
  :class:`CachedIBKDSupervisedLoss`, the same with GradCache.

The objective itself is :class:`ibkd.losses.IBKDLoss` / :class:`ibkd.losses.SupervisedIBKDLoss` with
its own defaults (``beta="auto"``, identity start of P, L2-normalised HSIC inputs): these classes only
embed the sentences and hand the vectors over. Under ``torchrun`` the objective gathers every rank's
rows (the other ranks' teacher vectors become negatives) and keeps P identical on every rank.

The HSIC input x is a mean-pooled hidden layer of the student's transformer (the embedding-layer
output by default in stage 1, the penultimate layer in stage 2), read from the first module of the
SentenceTransformer (its Hugging Face model) with hidden states switched on for that forward pass.

Reference: Zhang et al., "Text Representation Distillation via Information Bottleneck Principle",
EMNLP 2023, https://arxiv.org/abs/2311.05472.
"""


from .cached import CachedIBKDDistillationLoss, CachedIBKDSupervisedLoss
from .losses import IBKD_CITATION, IBKDDistillationLoss, IBKDSupervisedLoss, embed_with_hidden_layer

__all__ = ["CachedIBKDDistillationLoss", "CachedIBKDSupervisedLoss", "IBKDDistillationLoss", "IBKDSupervisedLoss", "IBKD_CITATION",
           "embed_with_hidden_layer"]
