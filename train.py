"""Fine-tune BERT for MASSIVE scenario classification: every experiment of the paper, one script.

    python train.py --experiment baseline                  # the paper's experiment 2
    python train.py --experiment baseline --epochs 1 --model all-MiniLM-L6-v2
    python train.py --experiment baseline --resume         # continue an interrupted run

A preset (minibert/experiments.py) fixes the paper's hyperparameters; every flag overrides it.
Records go to runs/<experiment>-<model>-s<seed>/ (minibert/runs.py). Top to bottom: setup()
builds the run, or restores it from its checkpoint; train_epoch() sets each step's rate and takes
the step (minibert/training.py: forward, loss, backward, clip, AdamW); end_of_epoch() evaluates on
dev and writes the checkpoint; finish() evaluates on test and writes the records.
"""

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minibert.classifier import ContrastiveModel, ScenarioClassifier
from minibert.cli import Parser
from minibert.data import Source, add_data_flags, batch_order, describe, encode, load_data, source_from, to_device
from minibert.device import (add_device_flags, autocast_and_scaler, pick_compile, pick_device, pick_fast, pick_precision,
                             setup_distributed, world_size)
from minibert.evaluation import contrastive_record, evaluate
from minibert.experiments import MAX_STEPS, TrainConfig, add_config_flags, config_from
from minibert.fast import EpochBatches, Replay, for_the_graph
from minibert.fetch import DownloadError
from minibert.runs import (RunComplete, WriteError, check_resumable, check_run_dir, checkpoint_state, code_version,
                           default_run_dir, load_checkpoint, load_into, load_tensors, save_checkpoint, save_model,
                           save_tensors, trainable_state, write_jsonl, write_training_results)
from minibert.schedule import averages_after, learning_rate
from minibert.swa import WeightAverage
from minibert.tokenizer import Tokenizer
from minibert.training import (Batch, build_models, dropout_seed, fp16_step, learner_for, loss_for, optimizer_for,
                               set_learning_rate, train_step)
from minibert.word_gradient import keep_word_gradient


def parse_args(argv=None):
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0])
    add_config_flags(p)  # --experiment, and a flag for each TrainConfig field
    add_device_flags(p)  # --device, --fast, --compile
    add_data_flags(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<experiment>-<model>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines (default: 100)")
    p.add_argument("--no-test", action="store_true",
                   help="never evaluate on the test split (for choosing hyperparameters on dev)")
    args = p.parse_args(argv)
    if not 1 <= args.log_every <= MAX_STEPS:
        p.error(f"--log-every {args.log_every}: must be at least 1 and at most {MAX_STEPS}")
    return args


@dataclass
class Run:
    """Everything a training run holds from one epoch to the next."""
    config: TrainConfig
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int  # processes (torchrun); each trains on every world-th sentence of a batch
    precision: str  # fp32, bf16 or fp16: config.precision, with auto decided
    fast: bool  # the fast path: static shapes, no host sync, a CUDA graph on a GPU
    compiled: bool  # the fast path's encoder layers compiled (a GPU's only)
    autocast: Callable  # () → a context: autocast, or nothing in fp32
    scaler: torch.amp.GradScaler | None  # fp16 only
    labels: tuple
    source: Source  # where the sentences came from: MASSIVE, or a file of your own
    data: dict  # what results.json and the checkpoint keep of them: file, split, sizes, digest
    code: dict  # the git commit of the code this process loaded, read when it started
    intents: dict  # split → (N,) intent ids, for --supervise and --contrastive-labels
    tokenizer: Tokenizer
    model: ScenarioClassifier
    contrastive: ContrastiveModel | None  # contrastive runs only
    trained: nn.ModuleDict  # every module that trains, under one name space for checkpoints
    learner: Callable  # what the classifier's loss calls: the model, its DDP replica, or a Probe
    splits: dict  # train / dev / test, encoded
    run_dir: Path
    average: WeightAverage | None  # SWA only
    optimizer: torch.optim.Optimizer | None = None
    start_epoch: int = 0
    steps_taken: int = 0  # optimizer steps, both stages
    history: list = field(default_factory=list)
    replay: Replay | None = None  # the fast path's recorded step, for the current optimizer
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
    except RunComplete as done:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one process says so
            print(done)
        sys.exit(0)
    except WriteError as e:  # a full disk, say: the last completed epoch's checkpoint is intact
        sys.exit(f"train.py: {e.line('run the same command with --resume')}")
    except (ValueError, DownloadError, OSError) as e:
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted; the run's folder keeps its last completed epoch: continue it with "
                 "the same command and --resume")


# ---- setup: device, precision, processes, data, model, optimizer --------------------------------

def setup(args):
    config = config_from(args)
    config.check(world_size())  # every flag, before anything heavy loads: a bad one costs a second
    source = source_from(args)
    if args.out:
        check_run_dir(Path(args.out), args.resume, config, source)
    device = pick_device(args.device)
    rank, world, device = setup_distributed(device)  # under torchrun: one process per GPU or CPU share
    precision = pick_precision(device, config.precision, world)
    fast = pick_fast(device, args.fast, precision, world)
    compiled = pick_compile(device, args.compile, fast)
    autocast, scaler = autocast_and_scaler(device, precision, fast)

    data = load_data(source, labels=config.labels)
    config.check_data(data.has_intents)  # MASSIVE's intents, for the levers that use them
    model, contrastive, tokenizer = build_models(config, data, rank, world)
    trained = nn.ModuleDict({"classifier": model, **({"contrastive": contrastive} if contrastive else {})}).to(device)
    if fast and device.type == "cuda":
        for_the_graph(model.encoder, compile=compiled)  # fewer, larger kernels for the recorded step
    if device.type == "cpu" and world == 1:
        keep_word_gradient(model.encoder)  # the same gradient, not a fresh vocabulary-sized tensor a step
    learner = learner_for(model, config.stage2, world)
    splits = {name: encode(tokenizer, data.split(name), data.label_ids(data.split(name)),
                           config.max_len) for name in ("train", "dev", "test")}
    short = len(splits["train"]) % config.batch_size
    if 0 < short < world:
        raise ValueError(f"the last batch holds {short} sentences, fewer than the {world} processes: pick a "
                         f"--batch-size that leaves none or at least {world} over from {len(splits['train'])}")
    config.check_steps(math.ceil(len(splits["train"]) / config.batch_size))
    run_dir = Path(args.out or default_run_dir(config.experiment, model.encoder.name, source, config.seed))
    if not args.out:  # --out was checked before anything loaded
        check_run_dir(run_dir, args.resume, config, source)
    run_dir.mkdir(parents=True, exist_ok=True)

    run = Run(config=config, args=args, device=device, rank=rank, world=world, precision=precision, fast=fast,
              compiled=compiled, autocast=autocast, scaler=scaler, labels=data.labels, data=describe(source, data),
              intents={name: torch.tensor(data.intent_ids(data.split(name))) for name in splits},
              tokenizer=tokenizer, model=model, contrastive=contrastive, trained=trained, learner=learner,
              splits=splits, run_dir=run_dir, average=WeightAverage(model) if config.swa else None, source=source,
              code=code_version())
    run.optimizer = make_optimizer(run, contrastive_stage=config.stage1_epochs > 0)
    if args.resume and run.checkpoint.exists():
        restore(run)
    run.log(f"{config.experiment}: {model.encoder.name}, {len(data.labels)} labels, {len(splits['train'])} train "
            f"sentences, {run.steps_per_epoch} steps/epoch, {config.stage1_epochs} contrastive + {config.epochs} "
            f"classifier epochs, {device.type} {precision}" + (f", {world} processes" if world > 1 else "")
            + (", fast path" + (" (CUDA graph)" if device.type == "cuda" else " (eager)") if fast else "")
            + (", layers compiled" if compiled else ""))
    return run


def restore(run):
    """Continue from the checkpoint of the last completed epoch, or refuse if it was another run."""
    saved = checkpoint_state(run.checkpoint)
    check_resumable(saved, run.config, run.precision, run.world, run.source, run.data, run.run_dir)
    stage1 = run.config.stage1_epochs
    run.start_epoch = saved["epoch"]
    # AdamW's moments carry over only within a stage: stage 2 starts with a fresh optimizer.
    run.optimizer = make_optimizer(run, contrastive_stage=run.start_epoch < stage1)
    same_stage = (run.start_epoch < stage1) == (run.start_epoch - 1 < stage1)
    state = load_checkpoint(run.checkpoint, run.trained, run.optimizer if same_stage else None, run.average)
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.steps_taken, run.history = state["step"], state["history"]
    run.log(f"resuming {run.run_dir} after epoch {run.start_epoch}")


def make_optimizer(run, contrastive_stage):
    """A new AdamW over what trains in this stage (training.optimizer_for)."""
    run.replay = None  # a recorded step belongs to the optimizer it was recorded with
    return optimizer_for(run.model, run.contrastive, run.config, contrastive_stage, run.device, run.fast)


# ---- one epoch: the rate, the step, the log ------------------------------------------------------

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
    torch.manual_seed(dropout_seed(config.seed, epoch, run.rank))
    started = time.perf_counter()
    if not run.totals:  # made once: a recorded step adds into these very tensors
        run.totals = (torch.zeros((), device=run.device), torch.zeros((), device=run.device, dtype=torch.long))
    for total in run.totals:
        total.zero_()
    step = stepper(run, contrastive_stage, order)
    window = (0, time.perf_counter())  # sentences and clock since the last progress line
    for i, index in enumerate(order, start=1):
        # The contrastive stage runs at the peak rate; the schedule counts the classifier's own steps.
        lr = config.lr if contrastive_stage else learning_rate(
            config, epoch - stage1, run.steps_taken - stage1 * run.steps_per_epoch, run.steps_per_epoch)
        set_learning_rate(run.optimizer, lr)
        step(i - 1, index)                       # forward, loss, backward, clip, AdamW: training.train_step
        run.steps_taken += 1
        window = (window[0] + len(index), window[1])
        if i % run.args.log_every == 0 or i == len(order):   # log: the step's one sync
            window = log_progress(run, epoch, i, order, lr, window)
    end_of_epoch(run, epoch, order, *run.totals, lr, time.perf_counter() - started)


def stage_loss(run, contrastive_stage):
    """→ (what the loss calls, the loss): the stage's model, and the loss the recipe trains with
    (training.loss_for). Under torchrun the model is DDP's replica; a probe calls its head alone."""
    model = run.contrastive if contrastive_stage else run.learner
    return model, loss_for(run.config, contrastive_stage, run.world, run.model.coarse)


def stepper(run, contrastive_stage, order):
    """→ step(i, index): one optimizer step on batch i of the epoch, whose sentences are `index`,
    its loss and correct count added to run.totals. Eagerly, each batch is this process's shard,
    copied to the device when its turn comes. The fast path copies the epoch once, every row
    padded to max_len, and replays one recorded step (minibert/fast.py)."""
    model, loss = stage_loss(run, contrastive_stage)
    update = partial(fp16_step, scaler=run.scaler) if run.scaler else train_step
    loss_sum, correct = run.totals  # added to in place: a recorded step writes into these tensors

    def step(batch):
        value, outputs = update(model, run.optimizer, batch, loss, run.config.max_grad_norm, run.autocast)
        loss_sum.add_(value)
        if outputs is not None:
            correct.add_((run.model.coarse(outputs).argmax(1) == batch.labels).sum())

    if not run.fast:
        return lambda i, index: step(shard_on_device(run, index))
    if run.replay is None:
        run.replay = Replay(lambda *tensors: step(Batch(*tensors)), run.device)
    batches = EpochBatches.build(run.splits["train"], order, run.intents["train"], run.device)
    full = run.config.batch_size  # a full batch replays; the short last one runs eagerly, on its own shape
    return lambda i, index: run.replay(*batches[i]) if len(index) == full else step(Batch(*batches[i]))


def shard_on_device(run, index):
    """This process's share of a batch, every world-th sentence, on the device → a Batch."""
    shard = index[run.rank::run.world]
    tensors = to_device((*run.splits["train"].batch(shard), run.intents["train"][shard]), run.device)
    return Batch(*tensors, share=run.world * len(shard) / len(index))


def log_progress(run, epoch, i, order, lr, window):
    """A progress line after step i; → the next window (no sentences yet, the clock now)."""
    config, stage1 = run.config, run.config.stage1_epochs
    mean_loss = run.totals[0].item() / i
    if not math.isfinite(mean_loss):
        kept = f"the checkpoint of epoch {epoch} is kept in {run.run_dir}" if epoch else "no epoch had completed"
        raise ValueError(f"the loss became {mean_loss} at epoch {epoch + 1} step {i}; stopping. {kept}. Try a "
                         "lower --lr, or --precision fp32/bf16 instead of fp16.")
    rate = window[0] / (time.perf_counter() - window[1])
    eta = (len(order) - i) * config.batch_size / rate
    run.log(f"epoch {epoch + 1}/{stage1 + config.epochs} step {i}/{len(order)} loss {mean_loss:.4f} "
            f"lr {lr:.2e} {rate:.1f} samples/s epoch ETA {eta:.0f}s", flush=True)
    return 0, time.perf_counter()


# ---- the end of an epoch: SWA, dev, checkpoint ---------------------------------------------------

def end_of_epoch(run, epoch, order, loss_sum, correct, lr, train_seconds):
    """Average SWA, evaluate on dev, append the epoch's row, write the checkpoint."""
    config, stage1 = run.config, run.config.stage1_epochs
    contrastive_stage = epoch < stage1
    if run.world > 1:  # every process saw its shard: the epoch's figures are their sum
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
        loss_sum /= run.world
    started = time.perf_counter()
    row = {"epoch": epoch + 1, "stage": "contrastive" if contrastive_stage else "classifier", "step": run.steps_taken,
           "lr": lr, "train_loss": loss_sum.item() / len(order)}
    if contrastive_stage and epoch == stage1 - 1:
        row.update(stage1_record(run))
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
    figures = [k for k in row if k.startswith(("train_loss", "train_accuracy", "dev_", "test_"))]  # not the clock
    run.log(f"epoch {epoch + 1} ({row['stage']}): " + " ".join(f"{k} {row[k]:.4f}" for k in figures), flush=True)
    if run.main_process:  # replicas are identical: one process writes
        write_jsonl(run.run_dir / "metrics.jsonl", run.history)
        state = {"epoch": epoch + 1, "step": run.steps_taken, "history": run.history, "config": config.to_dict(),
                 "data": run.data, "precision": run.precision, "processes": run.world}
        if run.scaler is not None:
            state["scaler"] = run.scaler.state_dict()
        save_checkpoint(run.checkpoint, run.trained, run.optimizer, averaged=run.average, state=state)


def stage1_record(run):
    """At the end of stage 1, what the paper reports as a contrastive row's "loss" (dev, test). The
    projection head, which stage 2 no longer uses, is kept in the run folder."""
    if run.main_process:
        save_tensors(run.run_dir / "projection.safetensors", run.contrastive.projection.state_dict())
    splits = {split: run.splits[split] for split in ("dev",) + (() if run.args.no_test else ("test",))}
    return contrastive_record(run.contrastive, splits, run.device, run.config, run.intents)


# ---- finish: test, and the records --------------------------------------------------------------

def finish(run, argv):
    config, model, device, average = run.config, run.model, run.device, run.average
    swa = average is not None and average.n_averaged > 0
    if swa:
        average.copy_to_model()  # the averaged weights are the ones evaluated and saved
    # The figures compared with the paper are computed in fp32, whatever the training precision.
    dev = evaluate(model, run.splits["dev"], device, fast=run.fast)
    if swa:
        run.log(f"SWA average of {average.n_averaged} epochs: dev accuracy {dev['accuracy']:.4f}")
    test = None if run.args.no_test else evaluate(model, run.splits["test"], device, fast=run.fast)
    if test:
        run.log(f"test: loss {test['loss']:.4f} (paper's sum over {test['n_batches']} batches: "
                f"{test['loss_paper_sum']:.4f}) accuracy {test['accuracy']:.4f}")
    dev_best = select_dev_best(run) if config.select == "dev-best" else None
    if run.world > 1:  # leave together: a process whose peer has gone can abort on its way out
        dist.barrier()
        dist.destroy_process_group()
    if not run.main_process:
        return run.run_dir
    save_model(run.run_dir, model, run.tokenizer, run.labels, config, run.data.get("label_column", config.labels))
    command = "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    fast = ("cuda graph" if run.replay is not None and run.replay.captured else "eager") if run.fast else None
    fast = f"{fast}, compiled" if fast and run.compiled else fast
    write_training_results(run.run_dir, command, config=config, model=model, device=device, world=run.world,
                           precision=run.precision, fast=fast, data=run.data, dev=dev, test=test, history=run.history,
                           n_train=len(run.splits["train"]), steps_per_epoch=run.steps_per_epoch, average=average,
                           dev_best=dev_best, code=run.code)
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


if __name__ == "__main__":
    main()
