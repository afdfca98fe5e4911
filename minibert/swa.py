"""Stochastic Weight Averaging (Izmailov et al. 2018): average the weights visited late in
training (its annealed learning rate is schedule.py's, with the rest of the schedule).

Semantics follow torch.optim.swa_utils: AveragedModel's equal-weight running mean and SWALR's
annealing. One thing SWA usually needs, re-estimating BatchNorm statistics for the averaged
weights (`update_bn`), does not apply: BERT normalises with LayerNorm, which computes its
statistics from each input and keeps no running averages, so the averaged model is ready as is.

The timeline of the paper's SWA rows (10 epochs, swa_start 0.75; the rates from schedule.py):

    epochs 1-8   the ordinary schedule: `swa` at a constant 1e-4, `both` decaying linearly to 2e-5
    epoch 9      at the rate the schedule reached (1e-4; both: 2e-5); then the first average
    epoch 10     SWALR's first annealing step: 1e-4 → 9.14e-5 (both: 2e-5 → 1.9e-5); the second average
    the end      the mean of epochs 9 and 10 is evaluated on dev and test, and saved

SWALR's five annealing epochs never finish, so its target, swa_lr = 1e-5, is never reached. The
dev figures recorded after epochs 9 and 10 are the raw weights'; only the final figures are the
average's.
"""

import torch


class WeightAverage:
    """The running mean of a model's trainable parameters over the updates so far.

    The first update copies the weights; the n+1-th moves the mean a 1/(n+1) step towards them:
    avg ← avg + (w - avg) / (n + 1). Frozen parameters equal their own mean and are left alone;
    BERT keeps no buffers to copy. Under LoRA the factors are averaged each, as AveragedModel
    averages peft's: the averaged update is mean(B)·mean(A), not the mean of the updates B·A."""

    def __init__(self, model):
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}
        self.n_averaged = 0

    @torch.no_grad()
    def update(self):
        for name, p in self.params.items():
            if self.n_averaged == 0:
                self.average[name].copy_(p)
            else:
                self.average[name].add_((p.float() - self.average[name]) / (self.n_averaged + 1))
        self.n_averaged += 1

    @torch.no_grad()
    def copy_to_model(self):
        """Overwrite the model's weights with the average (done once, at the end of training)."""
        for name, p in self.params.items():
            p.copy_(self.average[name])

    def state(self):
        return self.average

    def load(self, tensors, n_averaged):
        for name, value in tensors.items():
            self.average[name].copy_(value)
        self.n_averaged = n_averaged
