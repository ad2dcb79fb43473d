"""IBKD with the Hugging Face ``Trainer``.

:class:`IBKDTrainer` trains a student ``AutoModel`` (any model whose forward takes ``input_ids`` /
``attention_mask`` and returns ``last_hidden_state`` and ``hidden_states``) with
:class:`ibkd.losses.IBKDLoss` from batches of ``input_ids``, ``attention_mask`` and
``teacher_embedding`` (pre-computed teacher vectors). A ``compute_loss_func`` alone cannot do this:
the Trainer passes it the model outputs and labels but not the attention mask that mean pooling
needs, and it would not train the projection P. So this is a small Trainer subclass that:

* pools the student output (mean over the attention mask, or CLS) into s and a hidden layer into the
  HSIC input x (layer 0, the embedding output, by default), and returns the IBKD loss;
* trains the loss's parameters (the projection P) with the model, in their own optimizer group;
* logs ``infonce`` and ``hsic`` (unweighted, averaged since the last log) beside ``loss``;
* keeps the ``teacher_embedding`` column (the Trainer otherwise drops columns the model's forward
  does not name), and computes the same loss in evaluation;
* saves the loss's state (P, a calibrated β) beside the model (``ibkd_loss.safetensors`` in every
  checkpoint and in ``save_model``'s folder) and restores it when resuming from a checkpoint;
* under ``torchrun`` the loss gathers every rank's rows and keeps P identical on every rank
  (:mod:`ibkd.losses.distributed`).

:class:`TeacherEmbeddingCollator` pads tokenized rows and stacks their teacher vectors.

Reference: Zhang et al., "Text Representation Distillation via Information Bottleneck Principle",
EMNLP 2023, https://arxiv.org/abs/2311.05472.

Example::

    from transformers import AutoModel, AutoTokenizer, TrainingArguments
    from ibkd import IBKDLoss
    from ibkd.integrations.hf_trainer import IBKDTrainer, TeacherEmbeddingCollator

    tokenizer = AutoTokenizer.from_pretrained("nreimers/MiniLM-L6-H384-uncased")
    student = AutoModel.from_pretrained("nreimers/MiniLM-L6-H384-uncased")
    # dataset rows: {"input_ids": [...], "attention_mask": [...], "teacher_embedding": [768 floats]}
    trainer = IBKDTrainer(
        model=student,
        args=TrainingArguments("out", per_device_train_batch_size=256, learning_rate=1e-4),
        train_dataset=dataset,
        data_collator=TeacherEmbeddingCollator(tokenizer),
        ibkd_loss=IBKDLoss(384, 768),   # the defaults of `ibkd distill`: tau 1.0, beta "auto", gamma 1.0
    )
    trainer.train()
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..losses import IBKDLoss, load_loss_state, save_loss_state

__all__ = ["IBKDTrainer", "TeacherEmbeddingCollator", "LOSS_STATE_NAME", "TEACHER_COLUMN"]

TEACHER_COLUMN = "teacher_embedding"
LOSS_STATE_NAME = "ibkd_loss.safetensors"
LEGACY_LOSS_STATE_NAME = "ibkd_loss.pt"  # written by earlier releases; still restored
POOLING_MODES = ("mean", "cls")


def _pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TeacherEmbeddingCollator:
    """Pads ``input_ids``/``attention_mask`` (and ``token_type_ids`` if present) with the tokenizer and
    stacks ``teacher_embedding`` into a float32 (batch, teacher_dim) tensor. Rows may instead carry a
    ``text`` field, tokenized here (truncated to ``max_length``)."""

    def __init__(self, tokenizer, max_length: Optional[int] = 128, text_column: str = "text"):
        self.tokenizer, self.max_length, self.text_column = tokenizer, max_length, text_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        if not rows:
            raise ValueError("empty batch")
        missing = [i for i, row in enumerate(rows) if TEACHER_COLUMN not in row]
        if missing:
            raise KeyError(f"rows {missing[:5]} have no {TEACHER_COLUMN!r} field")
        teacher = torch.stack([torch.as_tensor(row[TEACHER_COLUMN], dtype=torch.float32) for row in rows])
        if "input_ids" in rows[0]:
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows[0]]
            batch = self.tokenizer.pad([{k: row[k] for k in keys} for row in rows], return_tensors="pt")
        else:
            batch = self.tokenizer([row[self.text_column] for row in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
        out = dict(batch)
        out[TEACHER_COLUMN] = teacher
        return out


class IBKDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is :class:`ibkd.losses.IBKDLoss`.

    Args (besides the Trainer's own):
        ibkd_loss: the IBKD objective; its ``student_dim`` must equal the model's hidden size.
        pooling: "mean" (over the attention mask) or "cls", for the student embedding s.
        input_layer: index into the model's ``hidden_states`` pooled into x (0 = embedding output,
            -2 = penultimate).
        normalize: L2-normalise s before the loss (the InfoNCE normalises anyway; this matters for
            HSIC and for matching a normalising inference pipeline).

    With gradient accumulation each micro-batch is its own contrastive batch (its in-batch negatives);
    the loss is averaged over the accumulation steps.
    """

    # the returned loss is a per-micro-batch mean: the Trainer must divide it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, ibkd_loss: IBKDLoss, pooling: str = "mean", input_layer: int = 0,
                 normalize: bool = False, **kwargs):
        if not isinstance(ibkd_loss, nn.Module):
            raise TypeError(f"ibkd_loss must be an ibkd.losses.IBKDLoss module, got {type(ibkd_loss).__name__}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        super().__init__(*args, **kwargs)
        # Transformers releases before `loss_is_scaled_for_ga` skip the division when the model's
        # forward takes **kwargs; ours never uses num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self.ibkd_loss = ibkd_loss.to(self.args.device)
        self.pooling, self.input_layer, self.normalize = pooling, input_layer, normalize
        self._component_sums: dict[str, Tensor] = {}
        self._component_steps = 0

    # -- data ------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and TEACHER_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TEACHER_COLUMN]

    # -- loss ------------------------------------------------------------------------------------
    def ibkd_forward(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """The IBKD loss dict (``loss``, ``infonce``, ``hsic``) of one batch."""
        inputs = dict(inputs)
        if TEACHER_COLUMN not in inputs:
            raise KeyError(f"the batch has no {TEACHER_COLUMN!r}: keys are {sorted(inputs)}")
        teacher = inputs.pop(TEACHER_COLUMN)
        inputs.pop("labels", None)
        attention_mask = inputs["attention_mask"]
        self.ibkd_loss.train(model.training)  # β calibrates in training steps only
        need_hidden = self.ibkd_loss.uses_inputs
        outputs = model(**inputs, output_hidden_states=need_hidden, return_dict=True)
        student = _pool(outputs.last_hidden_state, attention_mask, self.pooling)
        if self.normalize:
            student = nn.functional.normalize(student, dim=-1)
        x = None
        if need_hidden:
            x = _pool(outputs.hidden_states[self.input_layer], attention_mask, "mean")
        return self.ibkd_loss(student, teacher.to(student.device), x)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.ibkd_forward(model, inputs)
        if model.training:
            for name in ("infonce", "hsic", "mse", "beta"):
                if name not in out:
                    continue
                value = out[name].detach().float()
                self._component_sums[name] = self._component_sums.get(name, 0.0) + value
            self._component_steps += 1
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.ibkd_forward(model, inputs)["loss"].detach()
        return loss, None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._component_steps:
            for name, total in self._component_sums.items():
                logs[name] = round(float(total) / self._component_steps, 6)
            self._component_sums, self._component_steps = {}, 0
        super().log(logs, *args, **kwargs)

    # -- optimizer: P trains with the student -----------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        extra = [p for p in self.ibkd_loss.parameters() if p.requires_grad and id(p) not in in_optimizer]
        if extra:
            # Before the scheduler exists, so the scheduler drives this group's learning rate too.
            optimizer.add_param_group({"params": extra, "weight_decay": self.args.weight_decay})
        return optimizer

    # -- persistence of P --------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_loss_state(self.ibkd_loss, os.path.join(output_dir, LOSS_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        for name in (LOSS_STATE_NAME, LEGACY_LOSS_STATE_NAME):
            path = os.path.join(resume_from_checkpoint, name)
            if os.path.isfile(path):
                load_loss_state(self.ibkd_loss, path)
                break
