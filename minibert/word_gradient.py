"""The word embedding's gradient, kept from step to step: the same numbers without a fresh
11.7 M-value tensor every step.

A batch of 16 sentences of 20 word-pieces touches at most 320 of the vocabulary's 30,522 rows,
but the gradient of an nn.Embedding is dense (AdamW needs it so: weight decay and the moments
move every row): its backward allocates a (V, H) tensor of zeros and adds each word-piece's
gradient into its row. On a CPU that is a fill of 47 MB (bert-base: 94 MB) a step, in memory
the allocator has just returned to the system and must map again, page by page.

Here the gradient lives in one buffer for the whole run. A step's first backward zeroes the
rows the previous step wrote, and adds this step's word-pieces into their rows in the order
the dense backward adds them (position by position): AdamW, clipping and the loss see the
same tensor, bit for bit. Where something else wrote into the buffer since (clipping scales
it, an fp16 scaler unscales it, both in place), every row is zeroed, as the dense backward would.

Used by train.py for a single process on the CPU (under torchrun DDP needs the gradient to
arrive through autograd; a GPU's recorded step has no host code to run).
"""

import torch
import torch.nn.functional as F
from torch import nn


class KeptGradientEmbedding(nn.Module):
    """An nn.Embedding's lookup whose weight gradient is written into `kept` (a (V, H) buffer made
    at the first backward) instead of a new tensor. Holds the embedding's own weight, so the
    model's parameter names, its state dict and its optimizer are unchanged."""

    def __init__(self, embedding):
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.kept = None  # (V, H), the weight's .grad after each backward
        self.written = []  # id tensors whose rows the kept gradient holds since it was last zeroed
        self.version = None  # kept._version after our last write: another number means another writer
        self.trusted = True  # False once another writer has been seen since the last zeroing

    def forward(self, input_ids):
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.embedding(input_ids, self.weight, self.padding_idx)
        return _Lookup.apply(input_ids, self.weight, self)

    def add(self, input_ids, grad):
        """Backward: add grad (B, T, H), the gradient of each word-piece's vector, into its row."""
        ids = input_ids.reshape(-1)
        grad = grad.reshape(len(ids), -1)  # (B·T, H)
        if self.padding_idx is not None:  # the padding row never learns
            keep = ids != self.padding_idx
            ids, grad = ids[keep], grad[keep]
        # Each row's sum in position order, as the dense backward adds them, then that sum into the
        # row: a second lookup in the same backward (SupCon's two views) adds its rows' sums, as
        # autograd adds two dense gradients.
        rows, where = torch.unique(ids, return_inverse=True)
        sums = grad.new_zeros(len(rows), grad.shape[1]).index_add_(0, where, grad)  # (rows, H)
        if self.weight.grad is None:  # the step's first backward: the optimizer let go of the last one
            self.clear()
            self.weight.grad = self.kept
        elif self.weight.grad is not self.kept:  # a gradient from elsewhere: add to it as autograd would
            self.weight.grad.index_add_(0, rows, sums)
            return
        elif self.kept._version != self.version:  # written in place since our last write
            self.trusted, self.written = False, []
        self.kept.index_add_(0, rows, sums)
        self.written.append(rows)
        self.version = self.kept._version

    def clear(self):
        """Zero the kept gradient: the rows written since the last zeroing, or every row if
        anything else has written into it since."""
        if self.kept is None:
            self.kept = torch.zeros_like(self.weight)
        elif self.kept._version != self.version or not self.trusted:
            self.kept.zero_()
        elif self.written:
            self.kept.index_fill_(0, torch.cat(self.written), 0.0)
        self.written, self.trusted = [], True


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, owner):
        ctx.save_for_backward(input_ids)
        ctx.owner = owner
        return F.embedding(input_ids, weight, owner.padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (input_ids,) = ctx.saved_tensors
        ctx.owner.add(input_ids, grad)
        return None, None, None  # the weight's gradient is written, not returned


def keep_word_gradient(encoder):
    """Give `encoder` (model.BertModel) a kept word-embedding gradient. Its weight stays the
    same Parameter, under the same name."""
    encoder.embeddings.word = KeptGradientEmbedding(encoder.embeddings.word)
