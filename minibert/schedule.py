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


def warmup_steps(total, steps=0, ratio=0.0):
    """Warmup length: `steps`, or a fraction `ratio` of all `total` steps; never both."""
    if steps and ratio:
        raise ValueError(f"--warmup-steps {steps} and --warmup-ratio {ratio} both given; "
                         "set one of them to 0")
    return round(ratio * total) if ratio else steps
