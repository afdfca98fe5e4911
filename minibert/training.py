"""One training step: the paper's, plain, then each option beyond it in a place of its own.

    the paper's step    train_step: forward, loss (paper_loss), backward, clip, AdamW
    the rate            set_learning_rate, before each step, from schedule.learning_rate
    the optimizer       optimizer_for: AdamW (adamw) over what trains, in layer groups with --layer-decay

Each option changes one thing, and is picked once, when the run is set up (loss_for and learner_for here, fp16_step by train.py):

    --supervise         the head predicts intents: supervised_loss replaces the loss
    --rdrop             the batch twice, and the KL between the passes added: rdrop_loss wraps the loss
    --stage2 probe      the encoder frozen: Probe replaces the model the loss calls
    contrastive rows    stage 1 trains the encoder on SupCon or SimCLR: contrastive_loss
    torchrun            each process weighs its share of the batch: shard_weighted wraps the loss
    --precision fp16    the loss scaled before backward, the gradients unscaled before clipping: fp16_step
    a GPU's fast path   the step recorded once and replayed from a CUDA graph: minibert/fast.py
"""

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .classifier import ContrastiveModel, ScenarioClassifier, layer_groups
from .lora import apply_lora
from .losses import simclr_loss, supcon_loss, symmetric_kl
from .weights import load_pretrained, read_config


@dataclass(frozen=True)
class Batch:
    """A batch on the device: the sentences' word-piece ids and their labels."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), None when no row is padded
    labels: torch.Tensor  # (B,)
    intents: torch.Tensor  # (B,) MASSIVE's intent ids, for --supervise and --contrastive-labels
    share: float = 1.0  # under torchrun: processes × this process's sentences / the batch's (shard_weighted)

    def __len__(self):
        return len(self.labels)

    def twice(self):
        """The batch and a copy of it, one after the other: R-Drop's two passes in one forward."""
        mask = None if self.attention_mask is None else self.attention_mask.repeat(2, 1)
        return Batch(self.input_ids.repeat(2, 1), mask, self.labels.repeat(2), self.intents.repeat(2), self.share)


# ---- the paper's step ----------------------------------------------------------------------------

def paper_loss(model, batch):
    """The paper's loss: the cross-entropy of the head's logits, the batch's mean → (loss, logits)."""
    logits = model(batch.input_ids, batch.attention_mask).float()  # (B, labels), fp32 under autocast too
    return F.cross_entropy(logits, batch.labels), logits


def train_step(model, optimizer, batch, loss=paper_loss, max_grad_norm=0.0, autocast=nullcontext):
    """One optimizer step on `batch` → (the loss, the head's outputs): forward and loss, backward,
    clip (the paper never does: max_grad_norm 0), AdamW. `model` is what the loss calls: the
    classifier (minibert/classifier.py), and `autocast` the precision's context (device.py).

    Nothing here reads a value back from the device, so a CUDA graph can record it (fast.py)."""
    with autocast():
        value, outputs = loss(model, batch)                  # forward and loss
    optimizer.zero_grad(set_to_none=True)
    value.backward()                                         # backward
    clip_gradients(optimizer, max_grad_norm)                 # clip
    optimizer.step()                                         # AdamW
    return value.detach(), outputs


def clip_gradients(optimizer, max_grad_norm):
    """Scale every gradient the optimizer applies down to a total norm of max_grad_norm (0: off)."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)


def set_learning_rate(optimizer, lr):
    """Every group at `lr` times its layer-decay scale (1 without --layer-decay). On the fast path
    the rate is a device tensor that a recorded step reads (adamw): it is written in place."""
    for group in optimizer.param_groups:
        rate = lr * group.get("lr_scale", 1.0)
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def optimizer_for(model, contrastive, config, contrastive_stage, device, fast=False):
    """AdamW over what trains in this stage: the encoder and projection head (`contrastive`), or the
    classifier `model` (a probe trains its head alone), in groups by layer with --layer-decay."""
    if contrastive_stage:
        module = contrastive
    elif config.stage2 == "probe":
        module = model.head
    else:
        module = model
    params = [p for p in module.parameters() if p.requires_grad]  # not a frozen pooler or LoRA base
    if config.layer_decay < 1 and not contrastive_stage:
        params = layer_groups(module, model.encoder.config.num_hidden_layers, config.layer_decay)
    return adamw(params, config, device, fast)


def dropout_seed(seed, epoch, rank=0):
    """The seed of an epoch's dropout stream, fixed by (seed, epoch, process), so that a resumed
    run, which restarts at an epoch boundary, draws exactly what the uninterrupted run drew."""
    return seed * 1000 + epoch + 1_000_003 * rank


def adamw(params, config, device, fast=False):
    """AdamW over `params` (tensors, or layer_groups' groups) with the run's settings.

    The fused kernel updates each tensor in one pass over memory: on the CPU it is ~4x faster
    than the default, and the optimizer step is a third of a step's time on a small BERT. On a
    GPU's fast path the step count and the rate live on the device (capturable), so that a
    CUDA graph can hold the update."""
    capturable = fast and device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay,
                                  fused=device.type in ("cpu", "cuda"), capturable=capturable)
    if fast:
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    return optimizer


# ---- the options ---------------------------------------------------------------------------------

def supervised_loss(model, batch, supervise, coarse):
    """--supervise intents or both (beyond the paper): the head has one output per intent, a
    scenario's logit is the logsumexp of its intents' (ScenarioClassifier.coarse), and the loss is
    the cross-entropy on the intents, or that plus the scenarios' → (loss, the head's outputs).
    `coarse`: the classifier's sum of intents into scenarios (model may be DDP's replica of it)."""
    outputs = model(batch.input_ids, batch.attention_mask, grouped=False).float()  # (B, intents)
    intents = F.cross_entropy(outputs, batch.intents)
    if supervise == "intents":
        return intents, outputs
    return F.cross_entropy(coarse(outputs), batch.labels) + intents, outputs


def rdrop_loss(model, batch, loss, weight):
    """R-Drop (Liang et al. 2021, beyond the paper): the batch twice in one forward, so that the
    two passes drop different units; the loss of both, plus `weight` times the symmetric KL
    between the passes' outputs, summed over the batch and divided by its size → (loss, the first
    pass's outputs)."""
    value, outputs = loss(model, batch.twice())
    first, second = outputs.chunk(2)  # (B, outputs) each
    return value + weight * symmetric_kl(first, second) / len(batch), first


def shard_weighted(model, batch, loss):
    """Under torchrun each process computes the loss of its share of the batch, and DDP averages
    the processes' gradients. A process's mean counts `share` = processes × its sentences / the
    batch's, so that the average is the gradient of the whole batch's mean, also when a short last
    batch splits unevenly."""
    value, outputs = loss(model, batch)
    return value * batch.share, outputs


class Probe:
    """--stage2 probe (beyond the paper): the classifier with its encoder frozen. The encoder runs
    without gradients (and in eval mode, train.py), and only the head, which may be DDP-wrapped,
    learns. Called like the classifier."""

    def __init__(self, model, head):
        self.model, self.head = model, head

    def __call__(self, input_ids, attention_mask=None, grouped=True):
        with torch.no_grad():
            vectors = self.model.embed(input_ids, attention_mask)  # (B, H)
        outputs = self.head(self.model.dropout(vectors))
        return self.model.coarse(outputs) if grouped else outputs


def contrastive_loss(model, batch, config):
    """Stage 1 of the contrastive rows (§3.2.3), on the ContrastiveModel: SupCon, whose positives
    share a label (or an intent), or SimCLR, whose only positive is the other view of the same
    sentence → (loss, None)."""
    views = model.views(batch.input_ids, batch.attention_mask)  # (B, 2, H), two dropout passes
    if config.loss == "simclr":
        negatives = batch.labels if config.simclr_negatives == "other-labels" else None
        return simclr_loss(views, config.temperature, negatives), None
    positives = batch.intents if config.contrastive_labels == "intents" else batch.labels
    return supcon_loss(views, positives, config.temperature, config.temperature), None


def loss_for(config, contrastive_stage, world, coarse):
    """The loss a stage trains with: the paper's, or the options' in its place, each named above.
    `coarse`: the classifier's ScenarioClassifier.coarse, for --supervise."""
    if contrastive_stage:
        loss = partial(contrastive_loss, config=config)
    elif config.supervise != "labels":
        loss = partial(supervised_loss, supervise=config.supervise, coarse=coarse)
    else:
        loss = paper_loss
    if config.rdrop and not contrastive_stage:
        loss = partial(rdrop_loss, loss=loss, weight=config.rdrop)
    if world > 1:
        loss = partial(shard_weighted, loss=loss)
    return loss


def fp16_step(model, optimizer, batch, loss, max_grad_norm, autocast, scaler):
    """train_step in fp16 (--precision fp16): fp16 has too little range for small gradients, so the
    loss is multiplied by the scaler's factor before backward, the gradients divided by it before
    clipping, and a step whose gradients overflowed is skipped while the factor shrinks."""
    with autocast():
        value, outputs = loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    scaler.unscale_(optimizer)
    clip_gradients(optimizer, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return value.detach(), outputs


# ---- the models ----------------------------------------------------------------------------------

def build_models(config, data, rank, world):
    """The pretrained encoder (with LoRA adapters where asked) under the paper's head, and, for a
    contrastive run, under the projection head as well → (classifier, contrastive or None, tokenizer)."""
    name = config.model
    if world > 1:  # one process decides `auto` and fetches missing weights; the others take its word
        chosen = [read_config(name)[0] if rank == 0 else None]
        dist.broadcast_object_list(chosen)
        name = chosen[0]
    name, encoder_config = read_config(name)
    config.check_model(encoder_config)  # the model's limits, before its weights load
    torch.manual_seed(config.seed)
    encoder, tokenizer, _ = load_pretrained(name)
    if config.lora_r:
        apply_lora(encoder, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_list)
    groups = data.intent_groups() if config.supervise != "labels" else None
    model = ScenarioClassifier(encoder, len(data.labels), config.hidden_dim, config.drop_rate, groups, config.pooling)
    contrastive = ContrastiveModel(encoder, config.views_drop_rate, config.pooling) if config.stage1_epochs else None
    return model, contrastive, tokenizer


def learner_for(model, stage2, world):
    """What the classifier's loss calls, and its gradients flow through: the model, or for a probe
    (training.Probe) the head alone. Under torchrun every process holds a replica of it, and DDP
    averages their gradients."""
    trains = model.head if stage2 == "probe" else model
    if world > 1:
        trains = DistributedDataParallel(trains)
    if stage2 == "probe":
        return Probe(model, trains)
    return trains
