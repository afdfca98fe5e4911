"""LoRA (Hu et al. 2021): freeze a pretrained weight W and learn a low-rank update B·A.

    y = W x + b + (alpha / r) · B A dropout(x)          (eq. 3 of the paper, scaled as in §4.1)

A (r × in) starts uniform like any Linear (kaiming, a=√5) and B (out × r) starts at zero, so at
step 0 the adapted model is exactly the pretrained one. Only A and B train: for bert-base with
query and value adapted that is 2 · r · 768 per module · 2 modules · 12 layers = 36,864 · r.
"""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y + self.update(x)

    def update(self, x):
        """The low-rank term (alpha / r) · B A dropout(x); none once merged into W."""
        if self.merged:
            return 0
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self):
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self):
        """Fold the update into W for inference: one matmul per call instead of three."""
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def frozen_and_update(linear):
    """→ (the Linear whose weight and bias stay as loaded, its low-rank update or None): a fused
    product (model.py's Layer.project) stacks the frozen weights and adds each update."""
    if isinstance(linear, LoRALinear):
        return linear.base, linear.update
    return linear, None


def linear_names(model):
    """The names the Linear modules of `model` go by (query, key, ... in an encoder layer)."""
    return sorted({child_name for module in model.modules() for child_name, child in module.named_children()
                   if isinstance(child, nn.Linear)})


def targets_problem(targets, linear):
    """What is wrong with LoRA `targets` among the Linear names `linear`, or None. Every target must
    name at least one Linear: a typo would otherwise adapt less than asked."""
    unknown = [t for t in targets if t not in linear]
    if unknown:
        return f"no Linear module is named {' or '.join(unknown)}"
    return None if targets else "names no module"


def apply_lora(model, r, alpha, dropout=0.0, targets=("query", "value")):
    """Freeze every parameter of `model`, then wrap each Linear whose name is in `targets`."""
    linear = linear_names(model)
    problem = targets_problem(targets, linear)
    if problem:
        raise ValueError(f"LoRA targets {','.join(targets)!r}: {problem}; choose from {','.join(linear)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]
