"""Every parity test fails for a real bug.

A parity test passes as long as the two sides agree within its tolerance, so it proves nothing
unless that tolerance is tighter than the effect of the mistakes it is there to catch. Here each
mistake is planted for the length of one test (with monkeypatch: the library code is untouched)
and the parity test's own comparison, with its own tolerance, must report a failure. Loosening a
tolerance past what a bug moves makes the matching test here fail.
"""

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from minibert import load_pretrained, schedule
from minibert.lora import lora_modules
from minibert.losses import supcon_loss
from minibert.swa import WeightAverage
from tests import cases
from tests.cases import TOL_FP32, TOL_FP64
from tests.test_losses import TOL as LOSS_TOL
from tests.test_losses import autocast_error, pml_error
from tests.test_model import minilm_error, tiny_error
from tests.test_techniques import (SCHEDULE_TOL, SWA_TOL, lora_error, schedule_error, swa_error,
                                    tiny_lora_model)

EXACT_GELU = F.gelu


def tanh_gelu(model, monkeypatch):
    """GELU's tanh approximation (GPT-2's) instead of the exact erf form BERT uses."""
    monkeypatch.setattr(F, "gelu", functools.partial(EXACT_GELU, approximate="tanh"))


def layer_norm_eps_1e_5(model, monkeypatch):
    """LayerNorm with torch's default eps 1e-5 instead of the config's 1e-12."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            monkeypatch.setattr(module, "eps", 1e-5)


def query_key_swapped(model, monkeypatch):
    """Each layer's query and key weights loaded into each other's place."""
    for layer in model.layers:
        query, key = layer.query.weight, layer.key.weight
        monkeypatch.setattr(layer.query, "weight", key)
        monkeypatch.setattr(layer.key, "weight", query)


ENCODER_BUGS = [tanh_gelu, layer_norm_eps_1e_5, query_key_swapped]


@pytest.mark.parametrize("bug", ENCODER_BUGS, ids=lambda bug: bug.__name__)
@pytest.mark.parametrize("case", cases.TINY, ids=lambda case: case.name)
def test_tiny_checkpoint_parity_catches(case, bug, monkeypatch):
    model, _, _ = load_pretrained(str(cases.REFERENCE / case.name))
    bug(model, monkeypatch)
    assert tiny_error(model, case) > TOL_FP64


@pytest.mark.parametrize("bug", ENCODER_BUGS, ids=lambda bug: bug.__name__)
def test_minilm_parity_catches(minilm, bug, monkeypatch):
    model, _, _ = minilm  # shared by the session: monkeypatch undoes every change
    bug(model, monkeypatch)
    assert minilm_error(model) > TOL_FP32


def test_lora_parity_catches_a_scale_of_r_over_alpha(monkeypatch):
    model = tiny_lora_model()
    for module in lora_modules(model):
        monkeypatch.setattr(module, "scale", cases.LORA["r"] / cases.LORA["alpha"])
    assert lora_error(model) > TOL_FP64


def average_skips_the_first_snapshot(monkeypatch):
    """The running mean starts one snapshot late."""
    update = WeightAverage.update

    def late_update(self):
        if getattr(self, "started", False):
            update(self)
        self.started = True

    monkeypatch.setattr(WeightAverage, "update", late_update)


def average_counts_one_too_many(monkeypatch):
    """The count starts at 1, not 0: each step divides by n + 2, as if a zero snapshot came first."""
    init = WeightAverage.__init__

    def init_counting_from_one(self, model):
        init(self, model)
        self.n_averaged = 1

    monkeypatch.setattr(WeightAverage, "__init__", init_counting_from_one)


@pytest.mark.parametrize("bug", [average_skips_the_first_snapshot, average_counts_one_too_many],
                         ids=lambda bug: bug.__name__)
def test_swa_parity_catches(bug, monkeypatch):
    bug(monkeypatch)
    assert swa_error() > SWA_TOL


@pytest.mark.parametrize("offset", [1, -1], ids=["one_step_ahead", "one_step_behind"])
def test_schedule_parity_catches(offset, monkeypatch):
    multiplier = schedule.linear_warmup
    monkeypatch.setattr(schedule, "linear_warmup",
                        lambda step, warmup, total: multiplier(step + offset, warmup, total))
    assert schedule_error() > SCHEDULE_TOL


def cosine_over_the_whole_run(step, warmup, total):
    """The cosine's progress counted from step 0 instead of from the end of the warmup."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def cosine_full_cycle(step, warmup, total):
    """A whole cycle (back up to the peak at the end) instead of half of one."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(2 * math.pi * (step - warmup) / max(1, total - warmup)))


@pytest.mark.parametrize("bug", [cosine_over_the_whole_run, cosine_full_cycle], ids=lambda bug: bug.__name__)
def test_cosine_schedule_parity_catches(bug, monkeypatch):
    monkeypatch.setattr(schedule, "cosine_warmup", bug)
    assert schedule_error("cosine") > SCHEDULE_TOL


@pytest.fixture
def supcon_stored():
    return load_file(cases.REFERENCE / "supcon.safetensors")


def test_supcon_parity_catches_self_pairs_left_in(supcon_stored, monkeypatch):
    """Each anchor counted as its own positive and in its own softmax. The loss builds its
    self-pair mask with torch.eye: an identity of zeros excludes nothing."""
    zeros = torch.zeros
    monkeypatch.setattr(torch, "eye", lambda n, **kwargs: zeros(n, n, **kwargs))
    assert pml_error(supcon_stored) > LOSS_TOL


def test_supcon_parity_catches_simcses_temperature(supcon_stored, monkeypatch):
    """τ = 0.05 (SimCSE's) as the default instead of 0.07 (the paper's)."""
    monkeypatch.setattr(supcon_loss, "__defaults__", (None, 0.05, 0.07, None))
    assert pml_error(supcon_stored) > LOSS_TOL


def test_autocast_check_catches_a_loss_left_to_autocast(supcon_stored, monkeypatch):
    """The loss's `autocast(enabled=False)` made a no-op: under bf16 autocast the similarities,
    the logits and the log-softmax run in bf16."""
    autocast = torch.autocast

    def autocast_that_cannot_be_disabled(*args, enabled=True, **kwargs):
        return autocast(*args, **kwargs) if enabled else contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast_that_cannot_be_disabled)
    assert autocast_error(supcon_stored["features"], supcon_stored["labels"]) > LOSS_TOL


def test_false_negative_check_catches_the_partner_view_left_out(monkeypatch):
    """The anchor's own partner, same label and all, left out of the softmax with the false negatives."""
    from tests.test_losses import false_negative_error

    loss = supcon_loss

    def partner_left_out(features, labels=None, temperature=0.07, base_temperature=0.07, left_out=None):
        if left_out is None:
            return loss(features, labels, temperature, base_temperature)
        B, V, D = features.shape
        z = F.normalize(features.double(), dim=-1).transpose(0, 1).reshape(V * B, D)
        ids, hidden = torch.arange(B).repeat(V), left_out.repeat(V)
        logits = z @ z.T / temperature
        counted = ~torch.eye(V * B, dtype=torch.bool) & (hidden[:, None] != hidden[None, :])
        positive = (ids[:, None] == ids[None, :]) & ~torch.eye(V * B, dtype=torch.bool)
        log_prob = logits[positive].reshape(V * B) - torch.logsumexp(logits.masked_fill(~counted, float("-inf")), 1)
        return -log_prob.mean().float()

    import minibert.losses
    monkeypatch.setattr(minibert.losses, "supcon_loss", partner_left_out)
    assert false_negative_error(load_file(cases.REFERENCE / "supcon.safetensors"))[0] > LOSS_TOL
