"""Fine-tune BERT for MASSIVE scenario classification: every experiment of the paper, one script.

    python train.py --experiment baseline                  # the paper's experiment 2
    python train.py --experiment baseline --epochs 1 --model all-MiniLM-L6-v2
    python train.py --experiment baseline --resume         # continue an interrupted run

A preset (minibert/experiments.py) fixes the paper's hyperparameters; every flag overrides it.
Records go to runs/<experiment>-<model>-s<seed>/ (see minibert/runs.py).
"""

import argparse
import math
import os
import platform
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minibert.classifier import ContrastiveModel, ScenarioClassifier
from minibert.data import batch_order, encode, load_massive
from minibert.evaluation import evaluate
from minibert.experiments import CHOICES, FIELDS, PRESETS
from minibert.lora import apply_lora
from minibert.losses import supcon_loss
from minibert.model import count_parameters
from minibert.runs import (FORMAT, checkpoint_state, device_name, load_checkpoint, peak_memory, save_checkpoint,
                           save_tensors, trainable_state, write_json, write_jsonl)
from minibert.schedule import linear_warmup
from minibert.swa import WeightAverage, swa_lr
from minibert.weights import load_pretrained

FLAG_HELP = {
    "model": "auto (bert-base-uncased, else the embedded all-MiniLM-L6-v2), a model name, or a folder",
    "labels": "scenario (18 classes, the paper) or intent (60)",
    "epochs": "training epochs",
    "lr": "peak learning rate of AdamW",
    "batch_size": "sentences per optimizer step",
    "drop_rate": "dropout on the [CLS] vector before the head",
    "hidden_dim": "width of the head's hidden layer",
    "max_len": "word-pieces per sentence, [CLS] and [SEP] included",
    "adam_eps": "AdamW epsilon",
    "weight_decay": "AdamW weight decay",
    "seed": "seed for the head, the shuffle and dropout",
    "bucket": "batch sentences of similar length together (less padding)",
    "max_grad_norm": "clip the gradient norm to this; 0 turns clipping off",
    "scheduler": "learning-rate schedule: constant, or linear warmup then decay to zero",
    "warmup_steps": "linear schedule: warmup steps",
    "warmup_ratio": "linear schedule: warmup as a fraction of all steps (overrides --warmup-steps)",
    "swa": "stochastic weight averaging over the last epochs",
    "swa_start": "SWA starts at epoch int(swa_start x epochs)",
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
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--data", default=None, help="MASSIVE en-US.jsonl (default: $MASSIVE_JSONL or data/massive/)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<experiment>-<model>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--no-test", action="store_true",
                   help="never evaluate on the test split (for choosing hyperparameters on dev)")
    return p.parse_args(argv)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("train.py: --device cuda, but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        sys.exit("train.py: --device mps, but torch sees no Apple GPU")
    return torch.device(name)


def setup_distributed(device):
    """→ (rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL
    between GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def pick_precision(device, name):
    """→ (name, autocast factory, gradient scaler or None). Decided once; model code never asks."""
    if name is None:
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp32":
        return name, nullcontext, None
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    # fp16 has too little range for BERT's gradients without loss scaling; bf16 needs none.
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return name, lambda: torch.autocast(device.type, dtype=dtype), scaler


def main(argv=None):
    args = parse_args(argv)
    try:
        config = PRESETS[args.experiment].override(**{k: getattr(args, k) for k in FLAG_HELP})
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    device = pick_device(args.device)
    rank, world = setup_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)
    if world > 1 and config.stage1_epochs:
        sys.exit("train.py: the contrastive stage runs in one process only (its negatives would be "
                 "split across processes)")
    precision, autocast, scaler = pick_precision(device, args.precision)

    # ---- data, model, run folder -------------------------------------------------------------
    data = load_massive(args.data, labels=config.labels)
    torch.manual_seed(config.seed)
    encoder, tokenizer, _ = load_pretrained(config.model)
    if config.lora_r:
        apply_lora(encoder, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets.split(","))
    model = ScenarioClassifier(encoder, len(data.labels), config.hidden_dim, config.drop_rate)
    contrastive = ContrastiveModel(encoder, config.drop_rate) if config.stage1_epochs else None
    # Everything that trains, under one name space for checkpoints (the encoder is shared).
    trained = nn.ModuleDict({"classifier": model, **({"contrastive": contrastive} if contrastive else {})})
    trained.to(device)
    # Under torchrun every process holds a replica; DDP averages the gradients in backward.
    forward = DistributedDataParallel(model) if world > 1 else model
    train, dev, test = (encode(tokenizer, split, data.label_ids(split, config.labels), config.max_len)
                        for split in (data.train, data.dev, data.test))
    run_dir = Path(args.out or f"runs/{config.experiment}-{Path(encoder.name).name}-s{config.seed}")
    check_run_dir(run_dir, args.resume)
    run_dir.mkdir(parents=True, exist_ok=True)

    stage1 = config.stage1_epochs
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    average = WeightAverage(model) if config.swa else None
    start_epoch, step, history = 0, 0, []
    optimizer = make_optimizer(config, trained, device, contrastive_stage=stage1 > 0)
    checkpoint = run_dir / "checkpoint.safetensors"
    if args.resume and checkpoint.exists():
        try:
            saved = checkpoint_state(checkpoint)
            check_same_config(saved["config"], config.to_dict(), run_dir)
            start_epoch = saved["epoch"]
            # AdamW's moments carry over only within a stage: stage 2 starts with a fresh optimizer.
            optimizer = make_optimizer(config, trained, device, contrastive_stage=start_epoch < stage1)
            same_stage = (start_epoch < stage1) == (start_epoch - 1 < stage1)
            state = load_checkpoint(checkpoint, trained, optimizer if same_stage else None, average)
        except ValueError as e:
            sys.exit(f"train.py: cannot resume: {e}")
        step, history = state["step"], state["history"]
        log(f"resuming {run_dir} after epoch {start_epoch}")
    log(f"{config.experiment}: {encoder.name}, {len(data.labels)} labels, {len(train)} train sentences, "
          f"{steps_per_epoch} steps/epoch, {stage1} contrastive + {config.epochs} classifier epochs, "
          f"{device.type} {precision}" + (f", {world} processes" if world > 1 else ""))

    # ---- the loop: forward, loss, backward, clip, step, schedule, log ------------------------
    for epoch in range(start_epoch, stage1 + config.epochs):
        contrastive_stage = epoch < stage1
        if epoch == stage1 and stage1:
            optimizer = make_optimizer(config, trained, device, contrastive_stage=False)
        trained.train()
        probe = not contrastive_stage and config.stage2 == "probe"
        if probe:
            encoder.eval()  # a frozen encoder: no dropout either
        # The shuffle depends on (seed, epoch) alone, so a resumed run sees the same batches.
        order = batch_order(train, config.batch_size, torch.Generator().manual_seed(config.seed * 1000 + epoch),
                            bucket=config.bucket)
        # Dropout draws from a stream fixed by (seed, epoch, process), so a resumed run, which
        # restarts at an epoch boundary, draws exactly what the uninterrupted run drew.
        torch.manual_seed(config.seed * 1000 + epoch + 1_000_003 * rank)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        window, window_start = 0, time.perf_counter()
        for i, index in enumerate(order, start=1):
            if contrastive_stage:
                lr = config.lr
            else:  # the schedule counts the classifier's own epochs and steps
                e = epoch - stage1
                lr = learning_rate(config, e, e * steps_per_epoch + i - 1, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Each process takes every world-th sentence of the batch: its shard of the epoch.
            input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                                 for t in train.batch(index[rank::world]))
            with autocast():
                if contrastive_stage:
                    views = contrastive.views(input_ids, attention_mask)  # (B, 2, H), two dropout passes
                    loss = supcon_loss(views, labels if config.loss == "supcon" else None,
                                       config.temperature, config.temperature)
                else:
                    if probe:
                        with torch.no_grad():
                            cls = model.embed(input_ids, attention_mask)
                        logits = model.head(model.dropout(cls))
                    else:
                        logits = forward(input_ids, attention_mask)
                    # The mean over the whole batch; DDP divides the summed gradients by world.
                    loss = F.cross_entropy(logits.float(), labels, reduction="sum") * world / len(index)
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            loss_sum += loss.detach()
            if not contrastive_stage:
                correct += (logits.argmax(1) == labels).sum()
            window += len(index)
            if i % args.log_every == 0 or i == len(order):
                mean_loss = check_finite(loss_sum.item() / i, epoch, i, run_dir)
                rate = window / (time.perf_counter() - window_start)
                eta = (len(order) - i) * config.batch_size / rate
                log(f"epoch {epoch + 1}/{stage1 + config.epochs} step {i}/{len(order)} loss {mean_loss:.4f} "
                      f"lr {lr:.2e} {rate:.1f} samples/s epoch ETA {eta:.0f}s", flush=True)
                window, window_start = 0, time.perf_counter()
        train_seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "stage": "contrastive" if contrastive_stage else "classifier", "step": step,
               "lr": lr, "train_loss": loss_sum.item() / len(order)}
        if not contrastive_stage:
            if average is not None and epoch - stage1 >= swa_start_epoch(config):
                average.update()
            dev_metrics = evaluate(model, dev, device, autocast)
            if world > 1:
                dist.all_reduce(correct)
            row.update(train_accuracy=correct.item() / len(train), dev_loss=dev_metrics["loss"],
                       dev_accuracy=dev_metrics["accuracy"])
        row.update(train_seconds=train_seconds, samples_per_second=len(train) / train_seconds,
                   wall_seconds=time.perf_counter() - started)
        history.append(row)
        log(f"epoch {epoch + 1} ({row['stage']}): " + " ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_l", "train_a", "dev_"))), flush=True)
        if main_process:  # replicas are identical: one process writes
            write_jsonl(run_dir / "metrics.jsonl", history)
            save_checkpoint(checkpoint, trained, optimizer, averaged=average,
                            state={"epoch": epoch + 1, "step": step, "history": history, "config": config.to_dict()})

    # ---- test, and the records ---------------------------------------------------------------
    swa_dev = None
    if average is not None and average.n_averaged:
        average.copy_to_model()  # the averaged weights are the ones evaluated and saved
        swa_dev = evaluate(model, dev, device, autocast)
        log(f"SWA average of {average.n_averaged} epochs: dev accuracy {swa_dev['accuracy']:.4f}")
    final_dev = swa_dev or evaluate(model, dev, device, autocast)
    test_metrics = None if args.no_test else evaluate(model, test, device, autocast)
    if test_metrics:
        log(f"test: loss {test_metrics['loss']:.4f} (paper's sum over {test_metrics['n_batches']} batches: "
            f"{test_metrics['loss_paper_sum']:.4f}) accuracy {test_metrics['accuracy']:.4f}")
    if world > 1:
        dist.destroy_process_group()
    if not main_process:
        return run_dir
    save_model(run_dir, model, tokenizer, data.labels, config)
    classifier_rows = [h for h in history if h["stage"] == "classifier"]
    write_json(run_dir / "results.json", {
        "format": FORMAT,
        "experiment": config.experiment,
        "model": encoder.name,
        "model_requested": config.model,
        "hyperparameters": config.to_dict(),
        "seed": config.seed,
        "device": device_name(device) + (f" × {world} processes" if world > 1 else ""),
        "precision": precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "test": test_metrics,
        "dev": final_dev,
        "dev_accuracy_per_epoch": [h["dev_accuracy"] for h in classifier_rows],
        "train_accuracy_per_epoch": [h["train_accuracy"] for h in classifier_rows],
        "contrastive_loss_per_epoch": [h["train_loss"] for h in history if h["stage"] == "contrastive"],
        "swa": {"n_averaged": average.n_averaged, "dev": swa_dev} if average is not None else None,
        **parameter_counts(model),
        "wall_seconds": sum(h["wall_seconds"] for h in history),
        "samples_per_second": len(train) * len(history) / sum(h["train_seconds"] for h in history),
        "ms_per_step": 1000 * sum(h["train_seconds"] for h in history) / (len(history) * steps_per_epoch),
        **peak_memory(device),
        "command": "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    })
    # The run is complete: its record and weights are written, so the training state can go.
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {run_dir}/results.json")
    return run_dir


def make_optimizer(config, trained, device, contrastive_stage):
    """AdamW over what trains in this stage: the encoder and projection head (contrastive), or
    the classifier (a probe trains its head alone)."""
    if contrastive_stage:
        module = trained["contrastive"]
    elif config.stage2 == "probe":
        module = trained["classifier"].head
    else:
        module = trained["classifier"]
    params = [p for p in module.parameters() if p.requires_grad]
    # The fused kernel updates each tensor in one pass over memory: on the CPU it is ~4x faster
    # than the default, and the optimizer step is a third of a step's time on a small BERT.
    return torch.optim.AdamW(params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def swa_start_epoch(config):
    return int(config.swa_start * config.epochs)


def learning_rate(config, epoch, step, steps_per_epoch):
    """The rate for the classifier's next optimizer step, `step` steps into its `epoch`-th epoch.

    Constant, or linear warmup and decay (§3.2.1). With SWA, from its first epoch on the rate is
    SWALR's, once per epoch, annealing from whatever the schedule had reached at that point."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_ratio * total) if config.warmup_ratio else config.warmup_steps

    def scheduled(s):
        return config.lr * (linear_warmup(s, warmup, total) if config.scheduler == "linear" else 1.0)

    start = swa_start_epoch(config)
    if config.swa and epoch >= start:
        return swa_lr(epoch - start, scheduled(start * steps_per_epoch), config.swa_lr,
                      config.swa_anneal_epochs, config.swa_anneal)
    return scheduled(step)


def check_run_dir(run_dir, resume):
    """Never overwrite a run silently: its checkpoint could be hours of work."""
    existing = [f for f in ("checkpoint.safetensors", "results.json") if (run_dir / f).exists()]
    if existing and not resume:
        sys.exit(f"train.py: {run_dir} already holds a run ({', '.join(existing)}); "
                 "pass --resume to continue it, or --out to write elsewhere")
    if resume and (run_dir / "results.json").exists():
        print(f"{run_dir} is already complete: see its results.json (delete the folder to train again)")
        sys.exit(0)


def check_same_config(saved, current, run_dir):
    # A field newer than the checkpoint had its default's behaviour then.
    saved = {k: saved.get(k, FIELDS[k].default) for k in current}
    differ = [k for k in current if saved[k] != current[k]]
    if differ:
        details = ", ".join(f"{k}: {saved[k]!r} → {current[k]!r}" for k in differ)
        sys.exit(f"train.py: cannot resume {run_dir} with other hyperparameters ({details})")


def check_finite(loss, epoch, step, run_dir):
    if not math.isfinite(loss):
        kept = f"the checkpoint of epoch {epoch} is kept in {run_dir}" if epoch else "no epoch had completed"
        sys.exit(f"train.py: the loss became {loss} at epoch {epoch + 1} step {step}; stopping. "
                 f"{kept}. Try a lower --lr, or --precision fp32/bf16 instead of fp16.")
    return loss


def parameter_counts(model):
    """Counted as peft counts them: the encoder (pooler included) with any adapters; the head
    is reported on its own."""
    encoder_all = count_parameters(model.encoder)
    encoder_trainable = count_parameters(model.encoder, trainable_only=True)
    return {"trainable_params": encoder_trainable, "all_params": encoder_all,
            "trainable_pct": 100 * encoder_trainable / encoder_all,
            "head_params": count_parameters(model) - encoder_all}


def save_model(run_dir, model, tokenizer, labels, config):
    # A LoRA run stores its adapters and the head together (the pretrained weights are
    # reloaded by name); without the head a reloaded adapter would predict at random.
    save_tensors(run_dir / "model.safetensors", trainable_state(model) if config.lora_r else model.state_dict())
    lora = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": config.lora_targets.split(",")} if config.lora_r else None
    tokenizer.backend.save(str(run_dir / "tokenizer.json"))
    write_json(run_dir / "model.json", {
        "format": FORMAT,
        "model": model.encoder.name,
        "encoder": model.encoder.config.to_dict(),
        "labels": list(labels),
        "label_kind": config.labels,
        "hidden_dim": config.hidden_dim,
        "drop_rate": config.drop_rate,
        "max_len": config.max_len,
        "lora": lora,
    })


if __name__ == "__main__":
    main()
