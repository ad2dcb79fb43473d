"""Integrations of IBKD into other training stacks.

* :mod:`ibkd.integrations.sentence_transformers` — loss classes for ``SentenceTransformerTrainer``:
  :class:`~ibkd.integrations.sentence_transformers.IBKDDistillationLoss` (stage 1, teacher vectors in
  the label column) and :class:`~ibkd.integrations.sentence_transformers.IBKDSupervisedLoss`
  (stage 2, (anchor, positive[, negative]) columns).
* :mod:`ibkd.integrations.hf_trainer` — :class:`~ibkd.integrations.hf_trainer.IBKDTrainer`, a
  Hugging Face ``Trainer`` that trains an ``AutoModel`` student from (input_ids, attention_mask,
  teacher_embedding) batches.

The submodules import their third-party library lazily: importing this package needs neither.
"""

__all__ = ["hf_trainer", "sentence_transformers"]
