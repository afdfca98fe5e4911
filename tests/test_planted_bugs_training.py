"""Every check of tests/test_training_loop.py, and the fp16 and dev-best checks of test_train.py,
fails for the bug it is there to catch.

As in test_planted_bugs.py, each bug is planted for the length of one test with monkeypatch (the
library code is untouched) and the check, with its own tolerance, must raise AssertionError.
"""

import os
from contextlib import nullcontext

import pytest
import torch

import train
from minibert import classifier, evaluation, model, training
from minibert.fast import Replay
from tests import test_train
from tests import test_training_loop as loop
from tests.test_train import fp32_reference  # noqa: F401 (a fixture)
from tests.test_training_loop import simulated_cuda  # noqa: F401 (a fixture)


def batch_order_dropping_one_per_chunk(encoded, batch_size, generator, bucket=False):
    """data.batch_order with each 50-batch chunk cut one sentence short when bucketing."""
    order = torch.randperm(len(encoded), generator=generator)
    chunk = 50 * batch_size
    pieces = [order[start:start + chunk - 1] for start in range(0, len(order), chunk)]
    pieces = [part[torch.argsort(encoded.lengths[part], stable=True)] for part in pieces]
    batches = list(torch.cat(pieces).split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def test_bucketing_check_catches_a_dropped_sentence(monkeypatch):
    monkeypatch.setattr(loop, "batch_order", batch_order_dropping_one_per_chunk)
    with pytest.raises(AssertionError, match="exactly once"):
        loop.check_bucketed_epoch()


def clip_before_unscaling(monkeypatch):
    """The gradient clipped while GradScaler's scale is still in it: clip(s·g), then ÷ s."""
    scale = {}
    unscale, clip = torch.amp.GradScaler.unscale_, torch.nn.utils.clip_grad_norm_

    def remember_the_scale(self, optimizer):
        scale["s"] = self.get_scale()
        return unscale(self, optimizer)

    def clip_scaled(params, max_norm, *args, **kwargs):
        params, s = list(params), scale.get("s", 1.0)
        for p in params:
            p.grad.mul_(s)
        total = clip(params, max_norm, *args, **kwargs)
        for p in params:
            p.grad.div_(s)
        return total

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", remember_the_scale)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_scaled)


def clip_without_the_projection_head(monkeypatch):
    """Stage 1's clipping measured over the encoder only, the projection head left out."""
    head, clip = set(), torch.nn.utils.clip_grad_norm_
    init = classifier.ContrastiveModel.__init__

    def remember_the_head(self, *args, **kwargs):
        init(self, *args, **kwargs)
        head.update(id(p) for p in self.projection.parameters())

    monkeypatch.setattr(classifier.ContrastiveModel, "__init__", remember_the_head)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, *a, **k: clip([p for p in params if id(p) not in head], *a, **k))


@pytest.mark.parametrize("bug, flags", [(clip_before_unscaling, "fp16 classifier"),
                                        (clip_without_the_projection_head, "contrastive")],
                         ids=["clip_before_unscaling", "clip_without_the_projection_head"])
def test_clipping_check_catches(bug, flags, tiny_model, small_massive, tmp_path, monkeypatch):
    bug(monkeypatch)
    with pytest.raises(AssertionError, match="applied a gradient of norm"):
        loop.check_clipping(loop.tiny_args(tiny_model, small_massive, tmp_path / "run", "--lr", "1e-3",
                                           *loop.CLIPPED[flags]), 1e-3, monkeypatch)


def test_probe_check_catches_the_encoder_left_in_train_mode(small_massive, tmp_path, monkeypatch):
    """The probe's `encoder.eval()` has no effect."""
    monkeypatch.setattr(model.BertModel, "eval", lambda self: self)
    with pytest.raises(AssertionError, match="in train mode"):
        loop.test_the_probe_encoder_stays_frozen_and_in_eval_mode(small_massive, tmp_path, monkeypatch)


def test_dev_best_check_catches_an_evaluation_under_autocast(tiny_model, small_massive, tmp_path, monkeypatch):
    """The kept epoch evaluated under the training precision's autocast (bf16) instead of fp32."""
    select = train.select_dev_best

    def select_under_autocast(run):
        monkeypatch.setattr(train, "evaluate", lambda model, encoded, device, autocast=None, fast=False:
                            evaluation.evaluate(model, encoded, device, run.autocast, fast=fast))
        try:
            return select(run)
        finally:
            monkeypatch.setattr(train, "evaluate", evaluation.evaluate)

    monkeypatch.setattr(train, "select_dev_best", select_under_autocast)
    with pytest.raises(AssertionError):
        loop.test_dev_best_under_bf16_is_evaluated_like_the_final_figures(tiny_model, small_massive, tmp_path)


def test_replay_check_catches_a_replay_that_refreshes_its_first_input_only(simulated_cuda, monkeypatch):
    monkeypatch.setattr(Replay, "refresh", lambda self, inputs: self.inputs[0].copy_(inputs[0]))
    with pytest.raises(AssertionError, match="stale input"):
        loop.check_replay_refreshes_every_input(simulated_cuda)



def test_fp16_check_catches_a_run_that_never_steps(fp32_reference, small_massive, tmp_path, monkeypatch):
    """GradScaler.step returns without calling the optimizer: fp16 trains nothing."""
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, optimizer, *a, **k: None)
    run = train.main(test_train.tiny(small_massive, tmp_path, *test_train.MIXED_RECIPE, "--precision", "fp16"))
    with pytest.raises(AssertionError, match="epoch 1: train loss"):
        test_train.check_trains_like_fp32(run, fp32_reference, test_train.MIXED_TOLERANCE)


def test_dev_best_check_catches_a_comparison_with_the_last_epoch(small_massive, tmp_path, monkeypatch):
    """Each epoch compared with the previous epoch's dev accuracy instead of the best so far: with
    the curve 0.3, 0.6, 0.4, 0.5 the fourth epoch (0.5 > 0.4) replaces the second."""
    monkeypatch.setattr(train, "max", lambda values, default: values[-1] if values else default, raising=False)
    run, weights = test_train.run_with_dev_curve(small_massive, tmp_path / "best", monkeypatch,
                                                 "--select", "dev-best")
    with pytest.raises(AssertionError, match="kept epoch 4"):
        test_train.check_dev_best_kept_epoch_two(run, weights, small_massive)


def r_drop_kl_unscaled_across_processes():
    """R-Drop's KL divided by the number of processes where the whole loss is weighed by the
    process's share: DDP's average then counts it too little."""
    kl = training.symmetric_kl
    training.symmetric_kl = lambda first, second: kl(first, second) / int(os.environ.get("WORLD_SIZE", "1"))


def test_two_process_check_catches_an_unscaled_r_drop(tiny_model, small_massive, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBERT_PLANT", r_drop_kl_unscaled_across_processes.__name__)
    with pytest.raises(AssertionError, match="assert False"):  # torch.allclose of a gradient, not a failed run
        test_train.check_two_processes_compute_one_process_gradient(
            "finetune", ["--supervise", "intents", "--rdrop", "4", "--drop-rate", "0.5"], tiny_model, small_massive,
            tmp_path)


def test_bf16_check_catches_gradients_cleared_before_adamw(fp32_reference, small_massive, tmp_path, monkeypatch):
    """zero_grad moved between backward and AdamW: every gradient is gone when AdamW steps, and the
    bf16 run trains nothing. The bf16 tolerance (MIXED_TOLERANCE, from bf16's 8-bit mantissa)
    still tells it from fp32's trajectory."""

    def cleared(model, optimizer, batch, loss, max_grad_norm=0.0, autocast=nullcontext):
        with autocast():
            value, outputs = loss(model, batch)
        value.backward()
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        return value.detach(), outputs

    monkeypatch.setattr(train, "train_step", cleared)
    run = train.main(test_train.tiny(small_massive, tmp_path, *test_train.MIXED_RECIPE, "--precision", "bf16"))
    with pytest.raises(AssertionError, match=r"epoch \d: train loss"):
        test_train.check_trains_like_fp32(run, fp32_reference, test_train.MIXED_TOLERANCE)
