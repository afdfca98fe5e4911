"""The learning rate of every step: warmup, then decay to zero, linearly (the schedule of BERT's
fine-tuning recipe, the paper's §3.2.1) or along half a cosine (SGDR, Loshchilov & Hutter 2017,
without restarts); with SWA, its annealing takes over for the last epochs (Izmailov et al. 2018).

Pure functions of step and epoch numbers. The training loop sets the rate from
`learning_rate` before every optimizer step, as transformers' `get_linear_schedule_with_warmup`
does through LambdaLR and torch's SWALR does once per epoch.
"""

import math


def linear_warmup(step, warmup, total):
    """Multiplier of the peak learning rate after `step` optimizer steps."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine_warmup(step, warmup, total):
    """Multiplier after `step` steps: the same warmup, then 0.5 · (1 + cos(π · progress)) with
    progress = (step - warmup) / (total - warmup), from 1 down to 0 at step `total`, where
    training ends: transformers' `get_cosine_schedule_with_warmup` with its default half cycle."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(total, steps=0, ratio=0.0):
    """Warmup length: `steps`, or a fraction `ratio` of all `total` steps, to the nearest step; never
    both. (transformers' Trainer rounds the fraction up: 0.06 of 1,440 steps is 86 here, 87 there;
    the committed `best` records were made with this rounding.)"""
    if steps and ratio:
        raise ValueError(f"--warmup-steps {steps} and --warmup-ratio {ratio} both given; "
                         "set one of them to 0")
    return round(ratio * total) if ratio else steps


def swa_anneal(k, start_lr, target, anneal_epochs, strategy="cos"):
    """The rate after k annealing steps (one per epoch once SWA has started), going from
    `start_lr`, the rate when SWA began, to `target` (--swa-lr) over `anneal_epochs` steps:
    torch's SWALR."""
    if anneal_epochs < 1:
        raise ValueError("anneal_epochs must be at least 1")
    t = min(1.0, k / anneal_epochs)
    alpha = (1 - math.cos(math.pi * t)) / 2 if strategy == "cos" else t
    return target * alpha + start_lr * (1 - alpha)


def last_epoch_before_swa(config):
    """The last (0-based) epoch before SWA averages: int(swa_start · epochs), as torch's loop has it."""
    return int(config.swa_start * config.epochs)


def averages_after(config, epoch):
    """torch.optim.swa_utils' loop: `if epoch > swa_start: swa_model.update_parameters(model);
    swa_scheduler.step()` after each (0-based) classifier epoch. 10 epochs: epochs 8 and 9."""
    return config.swa and epoch > last_epoch_before_swa(config)


DECAY = {"constant": None, "linear": linear_warmup, "cosine": cosine_warmup}


def learning_rate(config, epoch, step, steps_per_epoch):
    """The rate of the classifier's next optimizer step, `step` steps into its training, in its
    `epoch`-th epoch (both 0-based).

    Constant, or warmup and linear or cosine decay, which step after every optimizer step. With
    SWA, torch's loop hands over after epoch swa_start: the ordinary schedule has run through it,
    and SWALR, stepped once after each averaged epoch, anneals from the rate it left."""
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps(total, config.warmup_steps, config.warmup_ratio)
    decay = DECAY[config.scheduler]

    def scheduled(s):
        return config.lr * (decay(s, warmup, total) if decay else 1.0)

    start = last_epoch_before_swa(config)
    if config.swa and epoch > start:
        handover = scheduled((start + 1) * steps_per_epoch)
        return swa_anneal(epoch - start - 1, handover, config.swa_lr, config.swa_anneal_epochs, config.swa_anneal)
    return scheduled(step)
