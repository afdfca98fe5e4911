"""Fine-tune BERT for MASSIVE scenario classification: every experiment of the paper, one script.

    python train.py --experiment baseline                  # the paper's experiment 2
    python train.py --experiment baseline --epochs 1 --model all-MiniLM-L6-v2
    python train.py --experiment baseline --resume         # continue an interrupted run

A preset (minibert/experiments.py) fixes the paper's hyperparameters; every flag overrides it.
Records go to runs/<experiment>-<model>-s<seed>/ (see minibert/runs.py).

The script reads in three parts: setup() builds the run (or restores it from its checkpoint),
train_epoch() is the loop, finish() evaluates and writes the records.
"""

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minibert.classifier import ContrastiveModel, ScenarioClassifier
from minibert.cli import Parser
from minibert.data import batch_order, encode, load_massive, to_device
from minibert.evaluation import contrastive_metrics, evaluate
from minibert.experiments import CHOICES, FIELDS, PRESETS, TrainConfig, as_recorded
from minibert.fast import EpochBatches, Replay
from minibert.fetch import DownloadError
from minibert.lora import apply_lora
from minibert.losses import supcon_loss, symmetric_kl
from minibert.model import count_parameters
from minibert.runs import (FORMAT, WriteError, checkpoint_state, device_name, load_checkpoint, load_into,
                           load_tensors, peak_memory, pick_device, read_json, save_checkpoint, save_tensors,
                           save_tokenizer, trainable_state, write_json, write_jsonl)
from minibert.schedule import cosine_warmup, layer_scales, linear_warmup, warmup_steps
from minibert.swa import WeightAverage, swa_lr
from minibert.tokenizer import Tokenizer
from minibert.weights import load_pretrained, read_config

FLAG_HELP = {
    "model": "auto (bert-base-uncased, else the embedded all-MiniLM-L6-v2), a model name, or a folder",
    "labels": "scenario (18 classes, the paper) or intent (60)",
    "epochs": "training epochs",
    "lr": "peak learning rate of AdamW",
    "batch_size": "sentences per optimizer step",
    "drop_rate": "dropout on the sentence vector ([CLS], see --pooling) before the head",
    "hidden_dim": "width of the head's hidden layer",
    "max_len": "word-pieces per sentence, [CLS] and [SEP] included",
    "adam_eps": "AdamW epsilon",
    "weight_decay": "AdamW weight decay",
    "seed": "seed for the head, the shuffle and dropout",
    "bucket": "batch sentences of similar length together (less padding)",
    "max_grad_norm": "clip the gradient norm to this; 0 turns clipping off",
    "scheduler": "learning-rate schedule: constant, or linear warmup then linear or cosine decay to zero",
    "warmup_steps": "linear and cosine schedules: warmup steps",
    "warmup_ratio": "linear and cosine schedules: warmup as a fraction of all steps (instead of --warmup-steps)",
    "swa": "stochastic weight averaging over the last epochs",
    "swa_start": "SWA averages after every epoch past int(swa_start x epochs) (0-based), as torch's loop",
    "swa_lr": "SWA: the rate annealed to",
    "swa_anneal_epochs": "SWA: epochs to anneal over",
    "swa_anneal": "SWA: annealing curve, cos or linear",
    "lora_r": "LoRA rank; 0 fine-tunes every weight",
    "lora_alpha": "LoRA: the update is scaled by alpha / r",
    "lora_dropout": "LoRA: dropout on the adapter input",
    "lora_targets": "LoRA: comma-separated names of the Linear modules to adapt",
    "loss": "ce; or supcon / simclr for a contrastive stage 1 before the classifier",
    "temperature": "contrastive: softmax temperature",
    "contrastive_epochs": "contrastive: stage-1 epochs (-1: as many as --epochs)",
    "stage2": "after the contrastive stage: finetune everything, or probe (frozen encoder)",
    "select": "weights kept: the last epoch's (the paper), or dev-best: the epoch with the best dev accuracy",
    "supervise": "train on the labels, on MASSIVE's 60 intents (a scenario's probability is the sum of its "
                 "intents'), or on both losses added",
    "contrastive_labels": "supcon: positives share a label, or share an intent",
    "layer_decay": "layer-wise lr decay of the classifier stage: the head at lr, the top layer at lr x decay, "
                   "each lower layer x decay again; 1 turns it off",
    "rdrop": "R-Drop: weight of the symmetric KL between two dropout passes, per sentence (the R-Drop code's "
             "alpha, which weighs the batch's sum, times the batch size); 0 turns it off",
    "pooling": "what the head reads: the [CLS] vector (the paper), or mean: the mean of the sentence's word-pieces",
}


def parse_args(argv=None):
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", choices=sorted(PRESETS), default="baseline",
                   help="preset of the paper's hyperparameters; flags below override it")
    for name, help in FLAG_HELP.items():
        default = FIELDS[name].default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif name in CHOICES:
            p.add_argument(flag, choices=CHOICES[name], default=None, help=f"{help} (preset: {default})")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"{help} (preset: {default})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="auto: bf16 autocast where the device runs bf16 matmuls natively (a GPU that supports "
                        "it; a CPU with AVX512-BF16 or AMX), else fp32. Default: bf16 on such a GPU, else fp32")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast path: batches padded to --max-len, nothing that waits for the device, and on a GPU "
                        "the whole step replayed from one CUDA graph (on the CPU the same step runs eagerly). "
                        "Default: on for one GPU process in bf16 or fp32, off elsewhere")
    p.add_argument("--data", default=None, help="MASSIVE en-US.jsonl (default: $MASSIVE_JSONL or data/massive/)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<experiment>-<model>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--no-test", action="store_true",
                   help="never evaluate on the test split (for choosing hyperparameters on dev)")
    args = p.parse_args(argv)
    if args.log_every < 1:
        p.error(f"argument --log-every: must be at least 1, not {args.log_every}")
    return args


def world_size():
    """How many processes train: torchrun's WORLD_SIZE, 1 without it."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE={value!r}: not a number of processes; start several with "
                         "torchrun --nproc_per_node N train.py ..., or unset WORLD_SIZE")
    return int(value)


def setup_distributed(device):
    """→ (rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL
    between GPUs, gloo between CPU processes."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={world} but no RANK, LOCAL_RANK, MASTER_ADDR or MASTER_PORT: start several "
                         "processes with torchrun --nproc_per_node N train.py ..., or unset WORLD_SIZE")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def native_bf16(device):
    """Whether `device` runs bf16 matmuls in hardware, as torch reports it. Elsewhere bf16 is
    emulated, and on a CPU that is an order of magnitude slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def pick_precision(device, name):
    """→ the precision's name: fp32, bf16 or fp16. Decided once; model code never asks."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name is None:
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    return name


def pick_fast(device, requested, precision, world):
    """--fast: None (the default) turns it on where it pays and works, one GPU process in bf16 or
    fp32; asked for where it cannot work, it is refused with the reason."""
    blockers = [why for why, applies in (
        ("--precision fp16 (its loss scaler reads the gradients' finiteness on the host every step)",
         precision == "fp16"),
        (f"{world} processes (the fast path runs in one)", world > 1)) if applies]
    if requested is None:
        return device.type == "cuda" and not blockers
    if requested and blockers:
        raise ValueError(f"--fast cannot run with {blockers[0]}; drop --fast or that setting")
    return requested


def autocast_and_scaler(device, precision, fast):
    """→ (autocast factory, gradient scaler or None). fp16 has too little range for BERT's
    gradients without loss scaling; bf16 needs none. A CUDA graph replays the weights' bf16
    copies from the addresses it recorded, so the fast path keeps autocast's cache of them off."""
    if precision == "fp32":
        return nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=not fast), scaler


@dataclass
class Run:
    """Everything a training run holds from one epoch to the next."""
    config: TrainConfig
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    precision: str
    fast: bool  # the fast path: static shapes, no host sync, a CUDA graph on a GPU
    autocast: Callable  # () → a context: autocast, or nothing in fp32
    scaler: torch.amp.GradScaler | None  # fp16 only
    labels: tuple
    intents: dict  # split → (N,) intent ids, for --supervise and --contrastive-labels
    tokenizer: Tokenizer
    model: ScenarioClassifier
    contrastive: ContrastiveModel | None  # contrastive runs only
    trained: nn.ModuleDict  # every module that trains, under one name space for checkpoints
    forward: nn.Module  # what the classifier's gradients flow through (model or head; DDP-wrapped)
    splits: dict  # train / dev / test, encoded
    run_dir: Path
    average: WeightAverage | None  # SWA only
    optimizer: torch.optim.Optimizer | None = None  # made once the run is built
    start_epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    replay: Replay | None = None  # the fast path's step for the current optimizer
    totals: tuple = ()  # (loss sum, correct count) of the epoch so far, on the device

    @property
    def main_process(self):
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.main_process:
            print(*args, **kwargs)

    @property
    def steps_per_epoch(self):
        return math.ceil(len(self.splits["train"]) / self.config.batch_size)

    @property
    def checkpoint(self):
        return self.run_dir / "checkpoint.safetensors"

    @property
    def best_weights(self):
        """With --select dev-best: the best dev epoch's weights so far, until the run finishes."""
        return self.run_dir / "dev-best.safetensors"


def main(argv=None):
    args = parse_args(argv)
    try:
        run = setup(args)
        for epoch in range(run.start_epoch, run.config.stage1_epochs + run.config.epochs):
            train_epoch(run, epoch)
        return finish(run, argv)
    except WriteError as e:  # a full disk, say: the last completed epoch's checkpoint is intact
        sys.exit(f"train.py: {e.line('run the same command with --resume')}")
    except (ValueError, DownloadError, OSError) as e:
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted; the run's folder keeps its last completed epoch: continue it with "
                 "the same command and --resume")


# ---- setup --------------------------------------------------------------------------------------

def setup(args):
    config = PRESETS[args.experiment].override(**{k: getattr(args, k) for k in FLAG_HELP})
    config.check(world_size())  # every flag, before anything heavy loads: a bad one costs a second
    if args.out:
        check_run_dir(Path(args.out), args.resume, config)
    device = pick_device(args.device)
    rank, world = setup_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    precision = pick_precision(device, args.precision)
    fast = pick_fast(device, args.fast, precision, world)
    autocast, scaler = autocast_and_scaler(device, precision, fast)

    data = load_massive(args.data, labels=config.labels)
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
    contrastive = ContrastiveModel(encoder, config.drop_rate, config.pooling) if config.stage1_epochs else None
    trained = nn.ModuleDict({"classifier": model, **({"contrastive": contrastive} if contrastive else {})})
    trained.to(device)
    # What the classifier's gradients flow through: the whole model, or the head alone for a
    # probe. Under torchrun every process holds a replica and DDP averages the gradients.
    forward = model.head if config.stage2 == "probe" else model
    if world > 1:
        forward = DistributedDataParallel(forward)
    splits = {name: encode(tokenizer, data.split(name), data.label_ids(data.split(name), config.labels),
                           config.max_len) for name in ("train", "dev", "test")}
    short = len(splits["train"]) % config.batch_size
    if 0 < short < world:
        raise ValueError(f"the last batch holds {short} sentences, fewer than the {world} processes: pick a "
                         f"--batch-size that leaves none or at least {world} over from {len(splits['train'])}")
    config.check_steps(math.ceil(len(splits["train"]) / config.batch_size))
    run_dir = Path(args.out or f"runs/{config.experiment}-{Path(encoder.name).name}-s{config.seed}")
    if not args.out:  # --out was checked before anything loaded
        check_run_dir(run_dir, args.resume, config)
    run_dir.mkdir(parents=True, exist_ok=True)

    run = Run(config=config, args=args, device=device, rank=rank, world=world, precision=precision, fast=fast,
              autocast=autocast, scaler=scaler, labels=data.labels,
              intents={name: torch.tensor(data.intent_ids(data.split(name))) for name in splits},
              tokenizer=tokenizer, model=model,
              contrastive=contrastive, trained=trained, forward=forward, splits=splits, run_dir=run_dir,
              average=WeightAverage(model) if config.swa else None)
    run.optimizer = make_optimizer(run, contrastive_stage=config.stage1_epochs > 0)
    if args.resume and run.checkpoint.exists():
        restore(run)
    run.log(f"{config.experiment}: {encoder.name}, {len(data.labels)} labels, {len(splits['train'])} train "
            f"sentences, {run.steps_per_epoch} steps/epoch, {config.stage1_epochs} contrastive + {config.epochs} "
            f"classifier epochs, {device.type} {precision}" + (f", {world} processes" if world > 1 else "")
            + (", fast path" + (" (CUDA graph)" if device.type == "cuda" else " (eager)") if fast else ""))
    return run


def restore(run):
    """Continue from the checkpoint of the last completed epoch, or refuse if it was another run."""
    saved = checkpoint_state(run.checkpoint)
    check_same_config(saved["config"], run.config.to_dict(), run.run_dir)
    for what, now in (("precision", run.precision), ("processes", run.world)):
        then = saved.get(what, {"precision": "fp32", "processes": 1}[what])
        if then != now:
            raise ValueError(f"cannot resume {run.run_dir}: it was trained with {what} {then}, not {now}; "
                             f"resume it as it started, or train again with another --out")
    stage1 = run.config.stage1_epochs
    run.start_epoch = saved["epoch"]
    # AdamW's moments carry over only within a stage: stage 2 starts with a fresh optimizer.
    run.optimizer = make_optimizer(run, contrastive_stage=run.start_epoch < stage1)
    same_stage = (run.start_epoch < stage1) == (run.start_epoch - 1 < stage1)
    state = load_checkpoint(run.checkpoint, run.trained, run.optimizer if same_stage else None, run.average)
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.history = state["step"], state["history"]
    run.log(f"resuming {run.run_dir} after epoch {run.start_epoch}")


def make_optimizer(run, contrastive_stage):
    """AdamW over what trains in this stage: the encoder and projection head (contrastive), or
    the classifier (a probe trains its head alone), in groups by layer with --layer-decay."""
    if contrastive_stage:
        module = run.trained["contrastive"]
    elif run.config.stage2 == "probe":
        module = run.model.head
    else:
        module = run.model
    params = [p for p in module.parameters() if p.requires_grad]
    if run.config.layer_decay < 1 and not contrastive_stage:
        params = layer_scales(module, run.model.encoder.config.num_hidden_layers, run.config.layer_decay)
    # The fused kernel updates each tensor in one pass over memory: on the CPU it is ~4x faster
    # than the default, and the optimizer step is a third of a step's time on a small BERT.
    # capturable: the step count lives on the device, so a CUDA graph can hold the update.
    optimizer = torch.optim.AdamW(params, lr=run.config.lr, eps=run.config.adam_eps,
                                  weight_decay=run.config.weight_decay, fused=run.device.type in ("cpu", "cuda"),
                                  capturable=run.fast and run.device.type == "cuda")
    if run.fast:  # the rate as a device tensor, set in place before each step: a graph reads it there
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=run.device)
    run.replay = None  # a recorded step belongs to the optimizer it was recorded with
    return optimizer


# ---- one epoch: forward, loss, backward, clip, step, schedule, log -----------------------------

def train_epoch(run, epoch):
    config, stage1 = run.config, run.config.stage1_epochs
    contrastive_stage = epoch < stage1
    if epoch == stage1 and stage1:
        run.optimizer = make_optimizer(run, contrastive_stage=False)
    run.trained.train()
    if not contrastive_stage and config.stage2 == "probe":
        run.model.encoder.eval()  # a frozen encoder: no dropout either
    # The shuffle depends on (seed, epoch) alone, so a resumed run sees the same batches.
    order = batch_order(run.splits["train"], config.batch_size,
                        torch.Generator().manual_seed(config.seed * 1000 + epoch), bucket=config.bucket)
    # Dropout draws from a stream fixed by (seed, epoch, process), so a resumed run, which
    # restarts at an epoch boundary, draws exactly what the uninterrupted run drew.
    torch.manual_seed(config.seed * 1000 + epoch + 1_000_003 * run.rank)
    started = time.perf_counter()
    if not run.totals:  # made once: a recorded step adds into these very tensors
        run.totals = (torch.zeros((), device=run.device), torch.zeros((), device=run.device, dtype=torch.long))
    for total in run.totals:
        total.zero_()
    if run.fast:
        batches = EpochBatches.build(run.splits["train"], order, run.intents["train"], run.device)
        if run.replay is None:
            run.replay = Replay(partial(train_step, run, contrastive_stage, config.batch_size), run.device)
    window, window_start = 0, time.perf_counter()
    for i, index in enumerate(order, start=1):
        # The contrastive stage runs at the peak rate; the schedule counts the classifier's own steps.
        lr = config.lr if contrastive_stage else learning_rate(
            config, epoch - stage1, run.step - stage1 * run.steps_per_epoch, run.steps_per_epoch)
        for group in run.optimizer.param_groups:
            if run.fast:
                group["lr"].fill_(lr * group.get("lr_scale", 1.0))
            else:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        if not run.fast:
            train_step(run, contrastive_stage, len(index), *shard_on_device(run, index))
        elif len(index) == config.batch_size:
            run.replay(*batches[i - 1])  # a CUDA graph's replay on a GPU
        else:
            train_step(run, contrastive_stage, len(index), *batches[i - 1])  # the short batch: eagerly
        run.step += 1                                                        # schedule: the next lr above
        window += len(index)
        if i % run.args.log_every == 0 or i == len(order):                   # log: the step's one sync
            mean_loss = check_finite(run.totals[0].item() / i, epoch, i, run.run_dir)
            rate = window / (time.perf_counter() - window_start)
            eta = (len(order) - i) * config.batch_size / rate
            run.log(f"epoch {epoch + 1}/{stage1 + config.epochs} step {i}/{len(order)} loss {mean_loss:.4f} "
                    f"lr {lr:.2e} {rate:.1f} samples/s epoch ETA {eta:.0f}s", flush=True)
            window, window_start = 0, time.perf_counter()
    end_of_epoch(run, epoch, order, *run.totals, lr, time.perf_counter() - started)


def train_step(run, contrastive_stage, n, input_ids, attention_mask, labels, intents):
    """Forward, loss, backward, clip, AdamW; the loss and the correct count are added to
    run.totals. Nothing here reads a value back from the device, so on the fast path a CUDA
    graph can record the whole of it. `n`: sentences in the whole batch, over every process."""
    config = run.config
    loss, logits = batch_loss_on(run, contrastive_stage, n, input_ids, attention_mask, labels, intents)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler:                                                           # backward
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if config.max_grad_norm:                                                 # clip
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                       config.max_grad_norm)
    if run.scaler:                                                           # step
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    loss_sum, correct = run.totals
    loss_sum += loss.detach()
    if logits is not None:
        correct += (logits.argmax(1) == labels).sum()


def shard_on_device(run, index):
    """This process's share of a batch, every world-th sentence, on the device →
    (input_ids, attention_mask or None, labels, intents)."""
    shard = index[run.rank::run.world]
    return to_device((*run.splits["train"].batch(shard), run.intents["train"][shard]), run.device)


def batch_loss(run, index, contrastive_stage):
    """Forward and loss of the batch `index` (this process's shard of it) → (loss, logits or None, labels)."""
    input_ids, attention_mask, labels, intents = shard_on_device(run, index)
    loss, logits = batch_loss_on(run, contrastive_stage, len(index), input_ids, attention_mask, labels, intents)
    return loss, logits, labels


def batch_loss_on(run, contrastive_stage, n, input_ids, attention_mask, labels, intents):
    """Forward and loss of a batch on the device → (loss, logits or None). The loss is the mean
    over all `n` sentences of the batch, whatever this process's share of it."""
    config = run.config
    with run.autocast():
        if contrastive_stage:
            views = run.contrastive.views(input_ids, attention_mask)  # (B, 2, H), two dropout passes
            positives = {"supcon": intents if config.contrastive_labels == "intents" else labels}
            loss = supcon_loss(views, positives.get(config.loss), config.temperature, config.temperature)
            return loss, None
        passes = 2 if config.rdrop else 1  # R-Drop: the batch twice in one forward, two dropout masks
        if config.stage2 == "probe":
            with torch.no_grad():
                cls = run.model.embed(input_ids, attention_mask).repeat(passes, 1)  # a frozen encoder: once
            fine = run.forward(run.model.dropout(cls))
        else:
            mask = None if attention_mask is None else attention_mask.repeat(passes, 1)
            fine = run.forward(input_ids.repeat(passes, 1), mask, fine=True)
        fine = fine.float()  # the head's outputs: intents with --supervise intents/both, else labels
        logits = run.model.coarse(fine)

        def mean_ce(outputs, targets):
            # The mean over the whole batch, whatever this process's share of it: DDP divides the
            # summed gradients by world, so each process scales its sum by world / batch.
            return F.cross_entropy(outputs, targets.repeat(passes), reduction="sum") * run.world / n / passes

        if config.supervise == "labels":
            loss = mean_ce(logits, labels)
        elif config.supervise == "intents":
            loss = mean_ce(fine, intents)
        else:
            loss = mean_ce(logits, labels) + mean_ce(fine, intents)
        if passes == 2:
            first, second = fine.chunk(2)
            loss = loss + config.rdrop * symmetric_kl(first, second) * run.world / n
            logits = logits[: len(input_ids)]
    return loss, logits


def end_of_epoch(run, epoch, order, loss_sum, correct, lr, train_seconds):
    """Average SWA, evaluate on dev, append the epoch's row, write the checkpoint."""
    config, stage1 = run.config, run.config.stage1_epochs
    contrastive_stage = epoch < stage1
    if run.world > 1:  # every process saw its shard: the epoch's figures are their sum
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
        loss_sum /= run.world
    started = time.perf_counter()
    row = {"epoch": epoch + 1, "stage": "contrastive" if contrastive_stage else "classifier", "step": run.step,
           "lr": lr, "train_loss": loss_sum.item() / len(order)}
    if contrastive_stage and epoch == stage1 - 1:
        row.update(contrastive_record(run))
    if not contrastive_stage:
        if averages_after(config, epoch - stage1):
            run.average.update()
        dev = evaluate(run.model, run.splits["dev"], run.device, run.autocast, fast=run.fast)
        row.update(train_accuracy=correct.item() / len(run.splits["train"]), dev_loss=dev["loss"],
                   dev_accuracy=dev["accuracy"])
        if config.select == "dev-best" and dev["accuracy"] > max(
                [h["dev_accuracy"] for h in run.history if "dev_accuracy" in h], default=-1.0):
            row["selected"] = True  # the best dev accuracy so far; ties keep the earlier epoch
            if run.main_process:
                save_tensors(run.best_weights, trainable_state(run.model), {"epoch": str(epoch + 1 - stage1)})
    row.update(train_seconds=train_seconds, samples_per_second=len(run.splits["train"]) / train_seconds,
               wall_seconds=train_seconds + time.perf_counter() - started)
    run.history.append(row)
    run.log(f"epoch {epoch + 1} ({row['stage']}): " + " ".join(
        f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_l", "train_a", "dev_", "test_"))), flush=True)
    if run.main_process:  # replicas are identical: one process writes
        write_jsonl(run.run_dir / "metrics.jsonl", run.history)
        state = {"epoch": epoch + 1, "step": run.step, "history": run.history, "config": config.to_dict(),
                 "precision": run.precision, "processes": run.world}
        if run.scaler is not None:
            state["scaler"] = run.scaler.state_dict()
        save_checkpoint(run.checkpoint, run.trained, run.optimizer, averaged=run.average, state=state)


def contrastive_record(run):
    """At the end of stage 1, what the paper reports as a contrastive row's "loss": the stage-1
    loss of the encoder with its projection head, on dev and test, in fp32. The projection head,
    which stage 2 no longer uses, is kept in the run folder."""
    if run.main_process:
        save_tensors(run.run_dir / "projection.safetensors", run.contrastive.projection.state_dict())
    labelled = run.config.loss == "supcon"
    record = {}
    for split in ("dev",) + (() if run.args.no_test else ("test",)):
        encoded = run.splits[split]
        if run.config.contrastive_labels == "intents":  # the positives stage 1 trained with
            encoded = replace(encoded, labels=run.intents[split])
        # Its own fixed dropout stream: the two views of every sentence are the same on a re-run.
        torch.manual_seed(run.config.seed * 1000 + 999_999)
        metrics = contrastive_metrics(run.contrastive, encoded, run.device, labelled, run.config.temperature)
        record.update({f"{split}_contrastive_loss": metrics["loss"],
                       f"{split}_contrastive_loss_paper_sum": metrics["loss_paper_sum"]})
    return record


# ---- the learning rate and SWA, as torch's documented SWA loop has them -------------------------

def swa_start_epoch(config):
    return int(config.swa_start * config.epochs)


def averages_after(config, epoch):
    """torch.optim.swa_utils' loop: `if epoch > swa_start: swa_model.update_parameters(model);
    swa_scheduler.step()` after each (0-based) classifier epoch. 10 epochs: epochs 8 and 9."""
    return config.swa and epoch > swa_start_epoch(config)


def learning_rate(config, epoch, step, steps_per_epoch):
    """The rate for the classifier's next optimizer step, `step` steps into its training, in its
    `epoch`-th epoch (both 0-based).

    Constant, or warmup and linear (§3.2.1) or cosine decay, which step after every optimizer step. With
    SWA, torch's loop hands over after epoch swa_start: the ordinary schedule has run through it,
    and SWALR, stepped once after each averaged epoch, anneals from the rate it left."""
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps(total, config.warmup_steps, config.warmup_ratio)

    decay = {"linear": linear_warmup, "cosine": cosine_warmup}.get(config.scheduler)

    def scheduled(s):
        return config.lr * (decay(s, warmup, total) if decay else 1.0)

    start = swa_start_epoch(config)
    if config.swa and epoch > start:
        handover = scheduled((start + 1) * steps_per_epoch)
        return swa_lr(epoch - start - 1, handover, config.swa_lr, config.swa_anneal_epochs, config.swa_anneal)
    return scheduled(step)


# ---- finish: test, and the records --------------------------------------------------------------

def finish(run, argv):
    config, model, device = run.config, run.model, run.device
    average = run.average
    swa_dev = None
    if average is not None and average.n_averaged:
        average.copy_to_model()  # the averaged weights are the ones evaluated and saved
    # The figures compared with the paper are computed in fp32, whatever the training precision.
    final_dev = evaluate(model, run.splits["dev"], device, fast=run.fast)
    if average is not None and average.n_averaged:
        swa_dev = final_dev
        run.log(f"SWA average of {average.n_averaged} epochs: dev accuracy {swa_dev['accuracy']:.4f}")
    test_metrics = None if run.args.no_test else evaluate(model, run.splits["test"], device, fast=run.fast)
    if test_metrics:
        run.log(f"test: loss {test_metrics['loss']:.4f} (paper's sum over {test_metrics['n_batches']} batches: "
                f"{test_metrics['loss_paper_sum']:.4f}) accuracy {test_metrics['accuracy']:.4f}")
    dev_best = select_dev_best(run) if config.select == "dev-best" else None
    if run.world > 1:  # leave together: a process whose peer has gone can abort on its way out
        dist.barrier()
        dist.destroy_process_group()
    if not run.main_process:
        return run.run_dir
    save_model(run.run_dir, model, run.tokenizer, run.labels, config)
    history = run.history
    classifier_rows = [h for h in history if h["stage"] == "classifier"]
    contrastive_rows = [h for h in history if h["stage"] == "contrastive"]
    stage1_end = contrastive_rows[-1] if contrastive_rows else {}
    write_json(run.run_dir / "results.json", {
        "format": FORMAT,
        "experiment": config.experiment,
        "model": model.encoder.name,
        "model_requested": config.model,
        "hyperparameters": config.to_dict(),
        "seed": config.seed,
        "device": device_name(device) + (f" × {run.world} processes" if run.world > 1 else ""),
        "precision": run.precision,
        "eval_precision": "fp32",  # dev and test below; per-epoch dev figures use `precision`
        # the fast path's steps: replayed from a CUDA graph, or the same static step run eagerly
        "fast": ("cuda graph" if run.replay is not None and run.replay.captured else "eager") if run.fast else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "test": test_metrics,
        "dev": final_dev,
        "contrastive": {k: v for k, v in stage1_end.items() if "_contrastive_" in k} or None,
        "dev_accuracy_per_epoch": [h["dev_accuracy"] for h in classifier_rows],
        "train_accuracy_per_epoch": [h["train_accuracy"] for h in classifier_rows],
        "contrastive_loss_per_epoch": [h["train_loss"] for h in contrastive_rows],
        "swa": {"n_averaged": average.n_averaged, "dev": swa_dev} if average is not None else None,
        "dev_best": dev_best,  # --select dev-best: the kept epoch's figures; `test` above is the last epoch's
        **parameter_counts(model, probe=config.stage2 == "probe"),
        "wall_seconds": sum(h["wall_seconds"] for h in history),
        "samples_per_second": len(run.splits["train"]) * len(history) / sum(h["train_seconds"] for h in history),
        "ms_per_step": 1000 * sum(h["train_seconds"] for h in history) / (len(history) * run.steps_per_epoch),
        **peak_memory(device),
        "command": "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    })
    # The run is complete: its record and weights are written, so the training state can go.
    run.checkpoint.unlink(missing_ok=True)
    run.best_weights.unlink(missing_ok=True)
    print(f"wrote {run.run_dir}/results.json")
    return run.run_dir


def select_dev_best(run):
    """Put the best dev epoch's weights back into the model (they are the ones saved) and
    evaluate them, in fp32 like the last epoch's figures → the record of that epoch."""
    tensors, metadata = load_tensors(run.best_weights)
    load_into(run.model, tensors, run.best_weights)
    dev = evaluate(run.model, run.splits["dev"], run.device, fast=run.fast)
    test = None if run.args.no_test else evaluate(run.model, run.splits["test"], run.device, fast=run.fast)
    record = {"epoch": int(metadata["epoch"]), "dev": dev, "test": test}
    run.log(f"kept epoch {record['epoch']} (best dev accuracy {record['dev']['accuracy']:.4f})"
            + (f": test accuracy {record['test']['accuracy']:.4f}" if record["test"] else ""))
    return record


def check_run_dir(run_dir, resume, config):
    """Never overwrite a run silently: its checkpoint could be hours of work. A finished run asked
    to resume is done if it trained with `config`, and refused if it trained with other settings."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir}: is a file, not a folder; give a folder for the run")
    existing = [f for f in ("checkpoint.safetensors", "results.json") if (run_dir / f).exists()]
    if existing and not resume:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(existing)}); "
                         "pass --resume to continue it, or --out to write elsewhere")
    if resume and (run_dir / "results.json").exists():
        record = read_json(run_dir / "results.json")
        if not isinstance(record, dict) or not isinstance(record.get("hyperparameters"), dict):
            raise ValueError(f"{run_dir / 'results.json'}: no hyperparameters, not a record of train.py; "
                             "delete the folder to train again, or pass another --out")
        check_same_config(record["hyperparameters"], config.to_dict(), run_dir)
        print(f"{run_dir} is already complete: see its results.json (delete the folder to train again)")
        sys.exit(0)


def check_same_config(saved, current, run_dir):
    saved = as_recorded(saved)
    differ = [k for k in current if saved[k] != current[k]]
    if differ:
        details = ", ".join(f"{k}: {saved[k]!r} → {current[k]!r}" for k in differ)
        raise ValueError(f"cannot resume {run_dir} with other hyperparameters ({details}); resume it with the "
                         "settings it was trained with, or pass another --out")


def check_finite(loss, epoch, step, run_dir):
    if not math.isfinite(loss):
        kept = f"the checkpoint of epoch {epoch} is kept in {run_dir}" if epoch else "no epoch had completed"
        raise ValueError(f"the loss became {loss} at epoch {epoch + 1} step {step}; stopping. "
                         f"{kept}. Try a lower --lr, or --precision fp32/bf16 instead of fp16.")
    return loss


def parameter_counts(model, probe=False):
    """Counted as peft counts them: the encoder (pooler included) with any adapters; the head
    is reported on its own. A probe's encoder trains no weight (its optimizer holds the head)."""
    encoder_all = count_parameters(model.encoder)
    encoder_trainable = 0 if probe else count_parameters(model.encoder, trainable_only=True)
    return {"trainable_params": encoder_trainable, "all_params": encoder_all,
            "trainable_pct": 100 * encoder_trainable / encoder_all,
            "head_params": count_parameters(model) - encoder_all}


def save_model(run_dir, model, tokenizer, labels, config):
    # A LoRA run stores its adapters and the head together (the pretrained weights are
    # reloaded by name); without the head a reloaded adapter would predict at random.
    save_tensors(run_dir / "model.safetensors", trainable_state(model) if config.lora_r else model.state_dict())
    lora = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": config.lora_target_list} if config.lora_r else None
    save_tokenizer(run_dir / "tokenizer.json", tokenizer)
    write_json(run_dir / "model.json", {
        "format": FORMAT,
        "model": model.encoder.name,
        "encoder": model.encoder.config.to_dict(),
        "labels": list(labels),
        "label_kind": config.labels,
        "groups": model.groups,  # with --supervise intents/both: each intent output's label
        "hidden_dim": config.hidden_dim,
        "drop_rate": config.drop_rate,
        "pooling": config.pooling,
        "max_len": config.max_len,
        "lora": lora,
    })


if __name__ == "__main__":
    main()
