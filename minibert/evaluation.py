"""Loss, accuracy and the per-label figures of a classifier on an encoded split."""

import math
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

from .data import to_device
from .fast import Replay
from .lora import LoRALinear
from .losses import supcon_loss

PAPER_BATCH = 16  # the paper's "loss" is a sum over test batches of 16 of each batch's mean


@torch.no_grad()
def predict(model, encoded, device, autocast=nullcontext, batch_size=256, fast=False):
    """→ logits (N, n_labels) in fp32, in the split's order. Rows are processed sorted by length
    so that each batch pads little; the order is restored at the end.

    With `fast`, every batch is (batch_size, max_len), the last one filled up with empty rows,
    and on a GPU the forward is replayed from a CUDA graph (minibert/fast.py); the logits are
    those of the eager forward, to float rounding."""
    was_training = model.training
    model.eval()

    def forward(input_ids, attention_mask):
        with autocast():
            return model(input_ids, attention_mask)

    replay = Replay(forward, device) if fast else None
    order = torch.argsort(encoded.lengths)
    logits = torch.empty(len(encoded), 0)
    for index in order.split(batch_size):
        if fast:
            full = torch.cat([index, index.new_zeros(batch_size - len(index))])  # filled up with row 0 ...
            input_ids, attention_mask, _ = encoded.batch(full, pad_to=encoded.input_ids.shape[1])
            attention_mask[len(index):] = 0  # ... made empty: it attends to nothing real, its output is dropped
            out = replay(*to_device((input_ids, attention_mask), device))[: len(index)]
        else:
            out = forward(*to_device(encoded.batch(index)[:2], device))
        if logits.shape[1] == 0:
            logits = torch.empty(len(encoded), out.shape[1])
        logits[index] = out.float().cpu()
    model.train(was_training)
    return logits


def metrics(logits, labels):
    """The per-example mean loss, the paper's summed form, and accuracy."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    paper_sum = sum(chunk.mean().item() for chunk in losses.split(PAPER_BATCH))
    return {
        "loss": losses.mean().item(),
        "loss_paper_sum": paper_sum,
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        "n": len(labels),
        "n_batches": math.ceil(len(labels) / PAPER_BATCH),
    }


def evaluate(model, encoded, device, autocast=nullcontext, fast=False):
    return metrics(predict(model, encoded, device, autocast, fast=fast), encoded.labels)


def per_label_accuracy(logits, labels, names):
    predicted = logits.argmax(1)
    return {name: (predicted[labels == i] == i).float().mean().item()
            for i, name in enumerate(names) if (labels == i).any()}


def confusion_matrix(predicted, labels, n_labels):
    """(n_labels, n_labels) counts: row i, column j = how many sentences of gold label i were
    predicted as j. The diagonal holds the correct ones."""
    counts = torch.zeros(n_labels, n_labels, dtype=torch.long)
    counts.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    return counts


def confused_pairs(logits, labels, names, top=5):
    """The most frequent (true → predicted) mistakes."""
    counts = confusion_matrix(logits.argmax(1), labels, len(names))
    counts.fill_diagonal_(0)
    values, flat = counts.flatten().topk(min(top, counts.numel()))
    return [{"true": names[i // len(names)], "predicted": names[i % len(names)], "count": int(v)}
            for v, i in zip(values.tolist(), flat.tolist()) if v > 0]


def precision_recall_f1(confusion):
    """Per label, from a confusion matrix (rows gold, columns predicted) → three (n_labels,) tensors.

    precision = TP / predicted, recall = TP / gold, F1 = their harmonic mean = 2 TP / (predicted + gold).
    A label never predicted has no precision (0/0); by convention it is 0, and so is every other
    0/0 here. TP is 0 whenever a denominator is, so dividing by max(denominator, 1) gives exactly that."""
    true_positives = confusion.diagonal().double()
    predicted, gold = confusion.sum(0).double(), confusion.sum(1).double()
    precision = true_positives / predicted.clamp(min=1)
    recall = true_positives / gold.clamp(min=1)
    f1 = 2 * true_positives / (predicted + gold).clamp(min=1)
    return precision, recall, f1


def accuracy_interval(accuracy, n):
    """→ (standard error, 95% interval) of an accuracy measured on n independent sentences: each is
    right with probability p, so the count right is binomial and SE = sqrt(p(1-p)/n); the interval
    is the normal approximation p ± 1.96·SE."""
    se = math.sqrt(accuracy * (1 - accuracy) / n)
    return se, [accuracy - 1.96 * se, accuracy + 1.96 * se]


def label_metrics(confusion, names):
    """Macro-F1 and each label's precision, recall, F1 and support (its gold count). Labels absent
    from both the gold labels and the predictions have no figures and are left out of the mean."""
    precision, recall, f1 = precision_recall_f1(confusion)
    gold = confusion.sum(1)
    seen = (gold + confusion.sum(0)) > 0
    per_label = {names[i]: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                            "support": int(gold[i])}
                 for i in seen.nonzero().flatten().tolist()}
    return {"macro_f1": f1[seen].mean().item(), "per_label": per_label}


def plot_confusion(confusion, names, path, title):
    """Save the confusion matrix as a picture: each cell holds its count, shaded by its share of
    the row (the gold label's sentences), so that labels of different sizes compare. Returns
    False (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(names)
    share = confusion / confusion.sum(1, keepdim=True).clamp(min=1)  # (n, n), rows sum to 1
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * n), max(5, 0.4 * n)))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i, j in confusion.nonzero().tolist():
        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the gold label's sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@torch.no_grad()
def contrastive_metrics(contrastive, encoded, device, labelled, temperature):
    """A contrastive stage's loss on a split, as the paper reports it for its SupCon and SimCLR
    rows: batches of 16 in the split's order, two dropout views of each sentence (dropout on, as
    in training), SupCon with the labels or SimCLR without; fp32. Seed the global generator
    first for a repeatable figure."""
    was_training = contrastive.training
    contrastive.train()
    losses = []
    for index in torch.arange(len(encoded)).split(PAPER_BATCH):
        input_ids, attention_mask, labels = to_device(encoded.batch(index), device)
        views = contrastive.views(input_ids, attention_mask)  # (B, 2, H)
        losses.append(supcon_loss(views, labels if labelled else None, temperature, temperature).item())
    contrastive.train(was_training)
    return {"loss": sum(losses) / len(losses), "loss_paper_sum": sum(losses), "n_batches": len(losses)}


def contrastive_record(contrastive, splits, device, config, intents=None):
    """The contrastive_metrics of each split as a run records them at the end of stage 1:
    {split}_contrastive_loss and {split}_contrastive_loss_paper_sum. Each split's two views come
    from their own fixed dropout stream, so a re-run draws the same views. The positives are those
    stage 1 trained with: the labels, or with --contrastive-labels intents, `intents` (split → ids)."""
    record = {}
    for split, encoded in splits.items():
        if config.contrastive_labels == "intents":
            encoded = replace(encoded, labels=intents[split])
        torch.manual_seed(config.seed * 1000 + 999_999)
        metrics = contrastive_metrics(contrastive, encoded, device, config.loss == "supcon", config.temperature)
        record.update({f"{split}_contrastive_loss": metrics["loss"],
                       f"{split}_contrastive_loss_paper_sum": metrics["loss_paper_sum"]})
    return record


@torch.no_grad()
def weight_changes(encoder, pretrained):
    """How far training moved each Linear weight of the encoder's layers → {name: ‖W − W₀‖_F / ‖W₀‖_F},
    W being the weight the layer computes with: for a LoRA layer, W₀ + (alpha / r) · B·A."""
    changes = {}
    for name, before in pretrained.named_modules():
        if isinstance(before, torch.nn.Linear) and name.startswith("layers."):
            after = encoder.get_submodule(name)
            if isinstance(after, LoRALinear):
                weight = after.base.weight if after.merged else after.base.weight + after.delta()
            else:
                weight = after.weight
            changes[name] = ((weight - before.weight).norm() / before.weight.norm()).item()
    return changes
