"""SWA runs as torch.optim.swa_utils' documented loop has it, epoch by epoch.

torch's recipe, written out below with its own classes: after each epoch, `if epoch > swa_start:
swa_model.update_parameters(model); swa_scheduler.step()`. Where torch's example steps its ordinary
scheduler once per epoch, this loop steps LambdaLR after every optimizer step, as the linear and
cosine schedules do. A tiny model is trained twice from the same start on the same batches: once by
that loop (AveragedModel, SWALR, LambdaLR), once by a loop written here with minibert's
`learning_rate`, `averages_after` and WeightAverage, as train.py calls them (a second test checks
the rates train.py itself records). The learning rate of every step, the weights after every epoch and the average
must agree, for the `swa` and the `both` presets and the contrastive rows' SWA-and-cosine variant.
"""

import json
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import SWALR, AveragedModel

import train
from minibert import schedule
from minibert.experiments import PRESETS
from minibert.swa import WeightAverage

STEPS_PER_EPOCH = 3


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS_PER_EPOCH)]


def torch_recipe(config):
    """torch's documented SWA loop → (lr of every step, weights after each epoch, the average)."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    total = config.epochs * STEPS_PER_EPOCH
    decay = {"linear": lambda s: max(0.0, (total - s) / total),
             "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * s / total))}.get(config.scheduler)
    scheduler = LambdaLR(optimizer, decay) if decay else None
    swa_model = AveragedModel(model)
    swa_start = int(config.swa_start * config.epochs)
    swa_scheduler = SWALR(optimizer, swa_lr=config.swa_lr, anneal_epochs=config.swa_anneal_epochs,
                          anneal_strategy=config.swa_anneal)
    lrs, weights = [], []
    for epoch in range(config.epochs):
        for x, y in batches():
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if scheduler is not None and not epoch > swa_start:
                scheduler.step()
        if epoch > swa_start:
            swa_model.update_parameters(model)
            swa_scheduler.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return lrs, weights, dict(swa_model.module.named_parameters()), int(swa_model.n_averaged)


def minibert_loop(config):
    """The same training with the learning rate and averaging that train.py applies."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    average = WeightAverage(model)
    lrs, weights, step = [], [], 0
    for epoch in range(config.epochs):
        for x, y in batches():
            lr = schedule.learning_rate(config, epoch, step, STEPS_PER_EPOCH)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
        if schedule.averages_after(config, epoch):
            average.update()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return lrs, weights, average.state(), average.n_averaged


CONFIGS = {
    # 8 epochs, SWA from int(0.5 · 8) = 4: epochs 5, 6 and 7 averaged, annealed over 2 epochs.
    "swa": PRESETS["swa"].override(epochs=8, swa_start=0.5, swa_anneal_epochs=2, lr=1e-2, swa_lr=1e-3),
    "both": PRESETS["both"].override(epochs=8, swa_start=0.5, swa_anneal_epochs=2, lr=1e-2, swa_lr=1e-3),
    "paper": PRESETS["both"].override(lr=1e-2, swa_lr=1e-3),  # 10 epochs: epochs 8 and 9 averaged
    # The classifier stage of the SWA-and-cosine variant: cosine decay until SWA takes over.
    "cosine": PRESETS["simclr-swa-cosine"].override(epochs=8, swa_start=0.5, swa_anneal_epochs=2, lr=1e-2,
                                                    swa_lr=1e-3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_swa_follows_torch_loop_epoch_by_epoch(name):
    config = CONFIGS[name]
    lrs, weights, average, n = torch_recipe(config)
    our_lrs, our_weights, our_average, our_n = minibert_loop(config)
    assert our_n == n == config.epochs - int(config.swa_start * config.epochs) - 1
    for epoch in range(config.epochs):
        steps = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        assert our_lrs[steps] == pytest.approx(lrs[steps], rel=1e-12, abs=0), f"epoch {epoch}"
        for p, value in weights[epoch].items():
            # The same operations in the same order; only the lr's float rounding can differ.
            assert torch.allclose(our_weights[epoch][p], value, rtol=0, atol=1e-6), (epoch, p)
    for p, value in average.items():
        assert torch.allclose(our_average[p], value, rtol=0, atol=1e-6), p


def test_swa_loop_fails_when_averaging_one_epoch_early(monkeypatch):
    """The comparison above catches the off-by-one it was written for (`>=` for `>`)."""
    config = CONFIGS["swa"]
    lrs, _, average, n = torch_recipe(config)
    monkeypatch.setattr(schedule, "averages_after",
                        lambda c, epoch: c.swa and epoch >= schedule.last_epoch_before_swa(c))
    _, _, our_average, our_n = minibert_loop(config)
    assert our_n == n + 1
    assert not all(torch.allclose(our_average[p], v, atol=1e-6) for p, v in average.items())


@pytest.mark.parametrize("experiment, flags", [
    ("both", ["--epochs", "4", "--swa-start", "0.25", "--swa-anneal-epochs", "1"]),
    # after a contrastive stage the schedule counts the classifier's own steps from 0
    ("supcon", ["--epochs", "2", "--contrastive-epochs", "1", "--scheduler", "linear", "--warmup-steps", "2"]),
])
def test_learning_rate_in_metrics_is_what_the_loop_applied(experiment, flags, small_massive, tmp_path):
    """train.py's own loop on a tiny BERT: each classifier epoch's last learning rate, read back
    from metrics.jsonl, is the rate the schedule (checked against torch's recipe above) gives at
    that step of the classifier's training."""
    from tests.test_train import ROOT

    run = train.main(["--model", str(ROOT / "tests/reference/tiny_odd"), "--data", str(small_massive),
                      "--experiment", experiment, *flags, "--out", str(tmp_path / "run"), "--no-test",
                      "--max-len", "16"])
    config = train.config_from(train.parse_args(["--experiment", experiment, *flags]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = rows[0]["step"]
    classifier = [r for r in rows if r["stage"] == "classifier"]
    expected = [schedule.learning_rate(config, e, (e + 1) * steps_per_epoch - 1, steps_per_epoch)
                for e in range(config.epochs)]
    assert [r["lr"] for r in classifier] == pytest.approx(expected, rel=1e-12)
    if experiment == "both":  # SWALR over one epoch: the second averaged epoch runs at swa_lr
        assert classifier[-1]["lr"] == pytest.approx(config.swa_lr, rel=1e-12)
        assert json.loads((run / "results.json").read_text())["swa"]["n_averaged"] == 2
    else:  # the contrastive stage ran at the peak rate
        assert [r["lr"] for r in rows if r["stage"] == "contrastive"] == [config.lr]
