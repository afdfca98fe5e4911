"""Linear warmup, then decay to zero: linearly (the schedule of BERT's fine-tuning recipe) or
along half a cosine (SGDR, Loshchilov & Hutter 2017, without restarts).

Pure functions of the step. The training loop sets lr = peak · multiplier(step) once before
the first optimizer step and again after every step, as transformers'
`get_linear_schedule_with_warmup` does through LambdaLR.
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
    """Warmup length: `steps`, or a fraction `ratio` of all `total` steps; never both."""
    if steps and ratio:
        raise ValueError(f"--warmup-steps {steps} and --warmup-ratio {ratio} both given; "
                         "set one of them to 0")
    return round(ratio * total) if ratio else steps


def layer_scales(module, n_layers, decay):
    """Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT's numbering): optimizer
    groups [{"params", "lr_scale"}] in which everything outside the encoder (the head) trains at
    the full rate, the encoder's top layer at decay, each layer below at one more factor of
    decay, and the embeddings at decay^(n_layers + 1). The loop sets lr = rate · lr_scale."""
    depth = {}  # lr_scale exponent → parameters
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if "embeddings" in parts:
            k = n_layers + 1
        elif "layers" in parts:
            k = n_layers - int(parts[parts.index("layers") + 1])
        else:
            k = 0
        depth.setdefault(k, []).append(p)
    return [{"params": params, "lr_scale": decay ** k} for k, params in sorted(depth.items())]
