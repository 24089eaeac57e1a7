"""The R1/R2 exposure model: the pretrained embedding block and a linear head, no transformer layers.

logits = Linear(masked_mean_t(embed(input_ids)[t])). A round over SST-2 costs about one embedding lookup
per token, so the two shallow rounds stay cheap whatever the depth of the model. The authors' code averages
over all 128 padded positions; here padding is masked out, so a sample's pooled vector does not depend on
how much padding its batch happened to need.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import embedding_block, input_embeddings, submodule_name


class ShallowClassifier(nn.Module):
    def __init__(self, block: nn.Module, word_path: str, num_labels: int):
        super().__init__()
        self.block = block
        self._word_path = word_path
        with torch.no_grad():  # the block's output width (== word dim for BERT-like and decoder LMs)
            dim = self.block(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
        self.head = nn.Linear(dim, num_labels)

    @classmethod
    def from_model(cls, model, num_labels: int) -> "ShallowClassifier":
        """A fresh shallow model on a *copy* of `model`'s embedding block (the model is left untouched)."""
        block = embedding_block(model)
        path = submodule_name(block, input_embeddings(model))
        return cls(copy.deepcopy(block).float(), path, num_labels)

    @property
    def word_embeddings(self) -> nn.Module:
        return self.block.get_submodule(self._word_path) if self._word_path else self.block

    def forward(self, input_ids, attention_mask=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.block(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
