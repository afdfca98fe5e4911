"""The training loop's levers checked where their bugs show: the bucketed epoch, gradient clipping
under fp16 and in the contrastive stage, the probe's frozen encoder, dev-best under bf16, and the
CUDA graph's replay (simulated on the CPU). Each check is a function that raises AssertionError;
tests/test_planted_bugs_training.py plants a bug under each and asserts that it does."""

import contextlib
import math

import pytest
import torch

import train
from minibert.data import Encoded, batch_order, encode, load_massive
from minibert.evaluation import evaluate
from minibert.fast import Replay
from minibert.runs import load_model, read_json
from tests import cases


def tiny_args(model, data, out, *extra):
    """A run of the tiny reference BERT (no dropout inside) on the small MASSIVE slice."""
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--max-len", "16", "--log-every", "3",
            *extra]


# ---- bucketed batches --------------------------------------------------------------------------

def check_bucketed_epoch(n=2_345, batch_size=16):
    """Every sentence once per epoch, in batches of batch_size but one short one, each batch of
    nearly one length. 2,345 sentences make three chunks of 50 batches (800 sentences each), the
    last one ragged (745), so a slip at a chunk's edge shows."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 30, (n,), generator=g)
    encoded = Encoded(torch.zeros(n, 30, dtype=torch.long), lengths, torch.zeros(n, dtype=torch.long))
    for epoch in range(3):
        order = batch_order(encoded, batch_size, torch.Generator().manual_seed(epoch), bucket=True)
        seen = torch.cat(order)
        assert torch.equal(seen.sort().values, torch.arange(n)), "not every sentence exactly once"
        sizes = sorted(len(index) for index in order)
        assert sizes == [n % batch_size] + [batch_size] * (len(order) - 1)
        spread = [int(lengths[index].max() - lengths[index].min()) for index in order]
        assert sum(spread) / len(spread) < 3, "batches are not grouped by length"


def test_a_bucketed_epoch_visits_every_sentence_once():
    check_bucketed_epoch()


def test_a_bucketed_run_trains_on_every_sentence(tiny_model, small_massive, tmp_path):
    """End to end: a --bucket epoch's train accuracy is a count over all 96 sentences (k / 96)."""
    run = train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--bucket", "--epochs", "1",
                               "--batch-size", "20"))
    (accuracy,) = read_json(run / "results.json")["train_accuracy_per_epoch"]
    assert math.isclose(accuracy * 96, round(accuracy * 96), abs_tol=1e-9)


# ---- gradient clipping -------------------------------------------------------------------------

def clipped_norms(argv, monkeypatch):
    """Train with `argv`, recording at every optimizer step the norm of the gradient AdamW is about
    to apply, over every parameter the stage trains, and checking that AdamW holds them all
    → [norm of each step whose gradient is finite] (GradScaler skips the others)."""
    norms, stages = [], []
    step = torch.optim.AdamW.step

    def spy(optimizer, *args, **kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if torch.isfinite(norm):
            norms.append(norm.item())
        stages.append(len(params))
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    real_setup = train.setup

    def setup_and_check(args):
        run = real_setup(args)
        contrastive = sum(p.requires_grad for p in run.trained["contrastive"].parameters()) if run.contrastive else 0
        classifier = sum(p.requires_grad for p in run.model.parameters())
        stages.append(("trainable", contrastive, classifier))
        return run

    monkeypatch.setattr(train, "setup", setup_and_check)
    train.main(argv)
    (_, contrastive, classifier), *sizes = stages
    assert set(sizes) <= {contrastive, classifier}, "the optimizer leaves out a trainable parameter"
    return norms


def check_clipping(argv, max_norm, monkeypatch):
    norms = clipped_norms([*argv, "--max-grad-norm", str(max_norm)], monkeypatch)
    assert len(norms) >= 4, "too few steps with a finite gradient to judge"
    # The bound is far below the gradient's own norm (~1 here), so every step is clipped to it:
    # torch scales by max_norm / (norm + 1e-6), within 1e-6 relative of max_norm.
    for norm in norms:
        assert norm == pytest.approx(max_norm, rel=1e-3), f"a step applied a gradient of norm {norm:.3g}"


CLIPPED = {
    # fp16: GradScaler's scaled gradients must be unscaled before the norm is measured.
    "fp16 classifier": ["--precision", "fp16", "--epochs", "2"],
    # stage 1 trains the encoder and the projection head; stage 2 the classifier.
    "contrastive": ["--loss", "simclr", "--contrastive-epochs", "1", "--epochs", "1"],
    "fp16 contrastive": ["--loss", "supcon", "--contrastive-epochs", "1", "--epochs", "1", "--precision", "fp16"],
}


@pytest.mark.parametrize("flags", CLIPPED.values(), ids=CLIPPED.keys())
def test_clipping_bounds_the_gradient_every_parameter_gets(flags, tiny_model, small_massive, tmp_path, monkeypatch):
    check_clipping(tiny_args(tiny_model, small_massive, tmp_path / "run", "--lr", "1e-3", *flags), 1e-3,
                   monkeypatch)


# ---- the probe's frozen encoder ----------------------------------------------------------------

def check_probe_keeps_its_encoder_frozen(argv, monkeypatch):
    """During the probe's classifier stage every module of the encoder is in eval mode (no
    dropout) whenever it runs, and its weights end where stage 1 left them."""
    modes, snapshot = [], {}
    real_epoch = train.train_epoch

    def epoch_watched(run, epoch):
        stage2 = epoch >= run.config.stage1_epochs
        if stage2 and not snapshot:
            snapshot.update({k: v.clone() for k, v in run.model.encoder.state_dict().items()})
            for module in run.model.encoder.modules():
                module.register_forward_pre_hook(lambda m, _: modes.append(m.training) if stage2 else None)
        real_epoch(run, epoch)
        if stage2:
            after = run.model.encoder.state_dict()
            assert all(torch.equal(after[k], v) for k, v in snapshot.items()), "the probe moved the encoder"

    monkeypatch.setattr(train, "train_epoch", epoch_watched)
    train.main(argv)
    assert modes and not any(modes), f"{sum(modes)} encoder module calls ran in train mode"


def test_the_probe_encoder_stays_frozen_and_in_eval_mode(small_massive, tmp_path, monkeypatch):
    """The tiny reference model as stored, with its dropout of 0.1 inside, as a real encoder has."""
    check_probe_keeps_its_encoder_frozen(
        tiny_args(cases.REFERENCE / "tiny_odd", small_massive, tmp_path / "run", "--experiment", "supcon",
                  "--contrastive-epochs", "1", "--epochs", "1", "--stage2", "probe"),
        monkeypatch)


# ---- dev-best under bf16 -----------------------------------------------------------------------

def check_dev_best_is_an_fp32_figure(run_dir, data):
    """The kept epoch's figures are an fp32 evaluation of the saved weights, as the final ones are."""
    results = read_json(run_dir / "results.json")
    model, tokenizer, meta = load_model(run_dir)
    massive = load_massive(data)
    for split in ("dev", "test"):
        examples = massive.split(split)
        encoded = encode(tokenizer, examples, massive.label_ids(examples), meta["max_len"])
        fp32 = evaluate(model, encoded, torch.device("cpu"))
        recorded = results["dev_best"][split]
        # Same weights, same fp32 kernels: equal to rounding. bf16 moves the loss by ~1e-3 here.
        assert recorded["loss"] == pytest.approx(fp32["loss"], rel=1e-6, abs=0), split
        assert recorded["accuracy"] == fp32["accuracy"], split


def test_dev_best_under_bf16_is_evaluated_like_the_final_figures(tiny_model, small_massive, tmp_path):
    run = train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--epochs", "2", "--lr", "1e-3",
                               "--precision", "bf16", "--select", "dev-best"))
    assert read_json(run / "results.json")["precision"] == "bf16"
    check_dev_best_is_an_fp32_figure(run, small_massive)


# ---- the CUDA graph's replay, simulated on the CPU ---------------------------------------------

class FakeGraph:
    """What a CUDA graph does, on the CPU: capturing runs nothing real on the GPU but records the
    step; a replay runs the recorded step again on the recorded input tensors (whatever they hold
    now) and writes into the recorded output tensors in place."""

    def __init__(self, replay):
        self.owner = replay

    def replay(self):
        fresh = self.owner.function(*self.owner.inputs)
        for recorded, value in zip(self.owner.outputs, fresh):
            recorded.copy_(value)


@pytest.fixture
def simulated_cuda(monkeypatch):
    """torch.cuda's streams and graphs replaced by CPU stand-ins; → a factory of Replays whose
    graph is a FakeGraph."""
    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())

    def make(step, warmup=2):
        replay = Replay(step, torch.device("cuda"), warmup=warmup)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: FakeGraph(replay))
        return replay

    return make


def check_replay_refreshes_every_input(make_replay):
    """Every call returns the step of that call's own inputs, through warm-up, capture and replay:
    each of the three inputs changes every call, so a stale one shows in the result."""
    def step(a, b, c):
        return (a * 100 + b * 10 + c, (a - b) * c)

    replay = make_replay(step)
    for i in range(6):
        a, b, c = (torch.full((3,), float(i + k)) * (k + 1) for k in range(3))
        out = replay(a, b, c)
        expected = step(a, b, c)
        assert all(torch.equal(o, e) for o, e in zip(out, expected)), f"call {i + 1} used a stale input"
    assert replay.captured


def test_a_replay_refreshes_every_input(simulated_cuda):
    check_replay_refreshes_every_input(simulated_cuda)
