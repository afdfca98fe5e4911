"""Linear warmup, then linear decay to zero: the schedule of BERT's fine-tuning recipe.

A pure function of the step. The training loop sets lr = peak · multiplier(step) once before
the first optimizer step and again after every step, as transformers'
`get_linear_schedule_with_warmup` does through LambdaLR.
"""


def linear_warmup(step, warmup, total):
    """Multiplier of the peak learning rate after `step` optimizer steps."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_steps(total, steps=None, ratio=None):
    """Warmup length from an explicit step count or a fraction of all steps (default none)."""
    if steps is not None and ratio is not None:
        raise ValueError("give --warmup-steps or --warmup-ratio, not both")
    if ratio is not None:
        return round(ratio * total)
    return steps or 0
