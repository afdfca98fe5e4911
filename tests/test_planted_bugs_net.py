"""Bugs the rest of the suite let through, and the checks that now catch them.

Each bug named below was planted alone in the library code, one at a time, and the suite as it
stood let it through (the one exception is said where it stands). Every test here was then seen
to fail with its bug planted (the code edited, the test run, the edit reverted), and to pass
without it; its docstring says which bug that was and what the check proves.

The checks go through what a user or another module calls: train.main on the tiny reference
BERT, with its records (metrics.jsonl, results.json, the saved weights), and the minibert modules'
functions. What a run does inside is watched from outside the loop, at the classifier's forward
and at AdamW's step, never through train.py's own helpers, which may move. Every run whose
numbers are compared trains in fp32, named on the command line: the default precision is bf16
on a CPU that runs it natively, and bf16 rounding would swamp the tolerances.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from minibert import Tokenizer, evaluation
from minibert.classifier import ContrastiveModel, ScenarioClassifier
from minibert.data import Encoded, batch_order, load_massive
from minibert.lora import apply_lora, lora_modules
from minibert.losses import supcon_loss
from minibert.runs import load_model, read_json
from minibert.schedule import warmup_steps
from minibert.weights import load_pretrained
from tests import cases

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


def tiny_args(model, data, out, *extra):
    """A run of `model` (the tiny reference BERT) on `data`, in fp32, quiet."""
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--max-len", "16", "--log-every", "1000",
            "--precision", "fp32", *extra]


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def numbered_massive(small_massive, tmp_path_factory):
    """small_massive (96 train, 48 dev, 48 test lines) with each utterance replaced by words of the
    tiny reference vocabulary (w0 ... w93) that number its line, then as many more as the original
    had words: lengths vary as MASSIVE's do, but every sentence tokenizes to ids of its own (the
    tiny vocabulary reads MASSIVE's words as [UNK]), so a batch seen inside the model says which
    sentences it holds. Scenarios and intents are MASSIVE's."""
    records = [json.loads(line) for line in small_massive.read_text().splitlines()]
    for n, record in enumerate(records):
        words = len(record["utt"].split())
        record["utt"] = " ".join([f"w{n % 94}", f"w{n // 94}"] + ["w93"] * max(0, words - 2))
    path = tmp_path_factory.mktemp("numbered") / "numbered.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sentences(input_ids, attention_mask):
    """A batch's rows as the sentences they hold: each row's ids up to its own length."""
    if attention_mask is None:
        return [tuple(row) for row in input_ids.tolist()]
    return [tuple(row[:n]) for row, n in zip(input_ids.tolist(), attention_mask.sum(1).tolist())]


class Classifier:
    """The classifier's forward, watched from the class (however the loop reaches it, DDP included):
    `trained` gets every batch it trains on, as its sentences, in order; `evaluated` its trainable
    weights each time it is first evaluated after training, i.e. at the end of each epoch."""

    def __init__(self, patch):
        self.trained, self.evaluated = [], []
        forward, fresh = ScenarioClassifier.forward, [False]

        def watched(model, input_ids, attention_mask=None, grouped=True):
            if model.training:
                self.trained.append(sentences(input_ids, attention_mask))
                fresh[0] = True
            elif fresh[0]:
                self.evaluated.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
                fresh[0] = False
            return forward(model, input_ids, attention_mask, grouped)

        patch(ScenarioClassifier, "forward", watched)


class Steps:
    """Every AdamW step, watched as it is taken: which optimizer, the rate of each of its groups,
    how many weights it holds, and the norm of the gradient it is about to apply."""

    def __init__(self, monkeypatch):
        self.optimizer, self.lrs, self.sizes, self.norms = [], [], [], []
        step = torch.optim.AdamW.step

        def watched(optimizer, *args, **kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grads = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
            self.optimizer.append(id(optimizer))
            self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])
            self.sizes.append(sum(p.numel() for p in params))
            self.norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())
            return step(optimizer, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", watched)

    def of_last_optimizer(self, values):
        return [v for v, o in zip(values, self.optimizer) if o == self.optimizer[-1]]


def train_sentences(model, data):
    """{sentence ids: label id} of the train split, tokenized here as a run tokenizes it."""
    massive = load_massive(data)
    ids = Tokenizer.from_folder(model).encode([e.text for e in massive.train], max_len=16)
    table = dict(zip(map(tuple, ids), massive.label_ids(massive.train)))
    assert len(table) == len(massive.train), "two train sentences tokenize alike: they cannot be told apart"
    return table


# ---- the shuffle ------------------------------------------------------------------------------

@pytest.mark.parametrize("bucket", ["--no-bucket", "--bucket"])
def test_each_epoch_draws_its_own_shuffle(bucket, tiny_model, numbered_massive, tmp_path, monkeypatch):
    """Planted: the epoch's shuffle seeded by the run's seed alone (not the epoch), so every epoch
    trains on the same batches in the same order. Each of three epochs, as the classifier saw
    them, holds every train sentence exactly once, in 96 = 4 · 20 + 16 sentences (the last batch
    short), and no two epochs share the same batches. It catches as well an epoch that leaves out
    its short last batch."""
    seen = Classifier(monkeypatch.setattr)
    train.main(tiny_args(tiny_model, numbered_massive, tmp_path / "run", "--epochs", "3", "--batch-size", "20",
                         bucket))
    everyone = sorted(train_sentences(tiny_model, numbered_massive))
    assert len(seen.trained) == 15
    epochs = [seen.trained[5 * e:5 * (e + 1)] for e in range(3)]
    for e, batches in enumerate(epochs, start=1):
        assert [len(b) for b in batches].count(16) == 1, f"epoch {e}: not four batches of 20 and one of 16"
        assert sorted(s for b in batches for s in b) == everyone, f"epoch {e}: not every sentence exactly once"
    groups = [sorted(tuple(sorted(b)) for b in batches) for batches in epochs]  # who shares a batch
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert epochs[a] != epochs[b], f"epochs {a + 1} and {b + 1} train on the same batches in the same order"
        assert groups[a] != groups[b], f"epochs {a + 1} and {b + 1} group the sentences into the same batches"


def test_bucketed_batches_are_shuffled_after_sorting():
    """Planted: --bucket's batches left in the order of their length sort (not shuffled again), so
    that each run of 50 batches goes from the shortest sentences to the longest. The batches of one
    chunk of 50 hold sentences of nearly one length each, but their order is not by length, and
    two epochs' orders differ."""
    n, batch_size = 800, 16  # one chunk of 50 batches
    lengths = torch.randint(3, 30, (n,), generator=torch.Generator().manual_seed(0))
    encoded = Encoded(torch.zeros(n, 30, dtype=torch.long), lengths, torch.zeros(n, dtype=torch.long))
    orders = [batch_order(encoded, batch_size, torch.Generator().manual_seed(epoch), bucket=True) for epoch in (0, 1)]
    for order in orders:
        shortest = [int(lengths[index].min()) for index in order]
        assert sum(int(lengths[i].max()) - s for i, s in zip(order, shortest)) / len(order) < 3  # bucketed
        assert shortest != sorted(shortest), "the bucketed batches go from short to long"
    assert [i.tolist() for i in orders[0]] != [i.tolist() for i in orders[1]]


# ---- two processes -----------------------------------------------------------------------------

DRIVER = """
import json, os, sys
sys.path.insert(0, {root!r})
import train
from tests.test_planted_bugs_net import Classifier
seen = Classifier(setattr)
train.main(sys.argv[2:])
with open(sys.argv[1] + "." + os.environ["RANK"], "w") as f:
    json.dump(seen.trained, f)
"""


def torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_processes_share_the_batches_of_one(tiny_model, numbered_massive, tmp_path, monkeypatch):
    """Planted: each process draws its own shuffle (its rank in the shuffle's seed), so that the
    two halves of a step come from two different batches. torchrun with two CPU processes, in fp32
    named on the command line (the default precision, bf16 on some CPUs, would part the two runs
    by its rounding and not by the bug): at every step of two epochs the two processes' shares
    together are the batch one process trains on, the ragged last one included, and the run ends
    where one process does. What is compared first is which sentences each step holds, which no
    precision changes."""
    common = ["--model", str(tiny_model), "--data", str(numbered_massive), "--max-len", "16", "--log-every", "1000",
              "--precision", "fp32", "--epochs", "2", "--batch-size", "20", "--drop-rate", "0", "--lr", "1e-3",
              "--no-test"]
    one = Classifier(monkeypatch.setattr)
    train.main([*common, "--out", str(tmp_path / "one")])
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    torchrun(str(driver), str(tmp_path / "shares"), *common, "--out", str(tmp_path / "two"))
    shares = [json.loads((tmp_path / f"shares.{rank}").read_text()) for rank in (0, 1)]
    assert len(one.trained) == len(shares[0]) == len(shares[1]) == 10
    for step, (whole, first, second) in enumerate(zip(one.trained, *shares), start=1):
        assert sorted(map(tuple, first + second)) == sorted(whole), f"step {step}: the processes' shares are not " \
                                                                    "one process's batch"
    a, b = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], abs=1e-5)
    assert [r["dev_accuracy"] for r in b] == [r["dev_accuracy"] for r in a]


# ---- the optimizer's step: clipping, the probe, the gradient --------------------------------------

@pytest.mark.parametrize("flags", [[], ["--supervise", "both"]], ids=["labels", "supervise-both"])
def test_clipping_bounds_every_r_drop_step(flags, tiny_model, small_massive, tmp_path, monkeypatch):
    """Planted: the clip turned off when R-Drop is on (the step handed a bound of 0 with --rdrop).
    With --rdrop and --max-grad-norm 1e-3, far below the gradient's own norm (3 to 4 here), the
    gradient every AdamW step applies has norm 1e-3 (torch scales by max_norm / (norm + 1e-6):
    within 1e-6 relative); unclipped, it would be the raw norm."""
    steps = Steps(monkeypatch)
    train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--epochs", "1", "--lr", "1e-3", "--rdrop", "1",
                         "--drop-rate", "0.5", "--max-grad-norm", "1e-3", *flags))
    assert len(steps.norms) == 6
    for norm in steps.norms:
        assert norm == pytest.approx(1e-3, rel=1e-3), f"a step applied a gradient of norm {norm:.3g}"


@pytest.mark.parametrize("stage1", [[], ["--loss", "simclr", "--contrastive-epochs", "1"]],
                         ids=["pretrained", "after-simclr"])
def test_a_probe_trains_its_head_alone(stage1, tiny_model, small_massive, tmp_path, monkeypatch):
    """Planted: the probe's optimizer built over the whole classifier (`module = run.model`), not
    its head. The encoder gets no gradient either way, so its weights alone would not show it: the
    optimizer of every probe step holds exactly the head's weights (as many as model.safetensors
    has under head.), and the encoder ends bit for bit where the probe found it: the pretrained
    weights, or the encoder stage 1 left (as the stage-1 record evaluates it)."""
    steps = Steps(monkeypatch)
    found = {}
    if stage1:
        metrics = evaluation.contrastive_metrics

        def remember_the_encoder(contrastive, *args, **kwargs):
            found.update({k: v.clone() for k, v in contrastive.encoder.state_dict().items()})
            return metrics(contrastive, *args, **kwargs)

        monkeypatch.setattr(evaluation, "contrastive_metrics", remember_the_encoder)
    else:
        found.update(load_pretrained(str(tiny_model))[0].state_dict())
    run = train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", *stage1, "--epochs", "2",
                               "--stage2", "probe", "--lr", "1e-2"))
    saved = load_file(run / "model.safetensors")
    head = sum(v.numel() for k, v in saved.items() if k.startswith("head."))
    probe = steps.of_last_optimizer(steps.sizes)
    assert len(probe) == 12 and set(probe) == {head}, f"the probe's optimizer holds {set(probe)} weights, " \
                                                     f"its head {head}"
    assert found and all(torch.equal(saved[f"encoder.{k}"], v) for k, v in found.items()), "the probe moved the encoder"


def test_each_step_applies_its_own_batch_gradient(tiny_model, small_massive, tmp_path, monkeypatch):
    """Planted: the gradient never zeroed between steps (zero_grad dropped), so each step applies
    the sum of every gradient so far. One batch of all 96 sentences per epoch and a rate of 1e-12
    (the weights move by ~1e-12): the two epochs' steps see the same loss on the same weights,
    and apply gradients of the same norm, to float rounding (measured: 1e-7 relative); summed,
    the second would be twice the first. (Before this check only the fp16-against-fp32 comparison
    saw the bug, and only because fp16 zeroes the gradient in a step of its own.)"""
    steps = Steps(monkeypatch)
    train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--epochs", "2", "--batch-size", "96",
                         "--lr", "1e-12", "--drop-rate", "0"))
    first, second = steps.norms
    assert first > 1e-3 and second == pytest.approx(first, rel=1e-4)


def test_the_epoch_figures_count_the_short_last_batch_as_its_own_mean(tiny_model, numbered_massive, tmp_path,
                                                                      monkeypatch):
    """Planted: the epoch's train loss taken as if every batch were full (the sum of the batch means
    times --batch-size, over the sentences), which weighs the short last batch, 16 sentences of a
    --batch-size of 20, as 20. At a rate of 1e-12 the weights stay where they started, so the
    epoch's train loss is the mean over its batches of each batch's mean cross-entropy, and its
    train accuracy the share of the 96 sentences the model gets right: both recomputed here, from
    the batches the classifier saw and the weights the run saved (fp32: agreement to 1e-5
    relative; the planted bug moves the loss by 4 %)."""
    seen = Classifier(monkeypatch.setattr)
    run = train.main(tiny_args(tiny_model, numbered_massive, tmp_path / "run", "--epochs", "1", "--batch-size", "20",
                               "--lr", "1e-12", "--drop-rate", "0", "--no-test"))
    labels = train_sentences(tiny_model, numbered_massive)
    model, tokenizer, _ = load_model(run)
    losses, right = [], 0
    with torch.no_grad():
        for batch in seen.trained:
            input_ids, attention_mask = tokenizer.pad([list(s) for s in batch])
            logits = model(input_ids, attention_mask)
            gold = torch.tensor([labels[s] for s in batch])
            losses.append(F.cross_entropy(logits, gold).item())
            right += int((logits.argmax(1) == gold).sum())
    assert sorted(map(len, seen.trained)) == [16, 20, 20, 20, 20]
    (row,) = history(run)
    assert row["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert row["train_accuracy"] == pytest.approx(right / 96, abs=1e-9)


# ---- the learning rate -------------------------------------------------------------------------

def linear(s, warmup, total):
    return s / warmup if s < warmup else (total - s) / (total - warmup)


def cosine(s, warmup, total):
    return s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))


@pytest.mark.parametrize("scheduler, stage1", [
    ("linear", []), ("cosine", []), ("linear", ["--loss", "supcon", "--contrastive-epochs", "1"]),
], ids=["linear", "cosine", "linear-after-supcon"])
def test_warmup_ratio_is_a_share_of_the_whole_run(scheduler, stage1, tiny_model, small_massive, tmp_path,
                                                  monkeypatch):
    """Planted: --warmup-ratio taken of one epoch's steps instead of the whole run's. Two epochs of
    96 / 12 = 8 steps with --warmup-ratio 0.25: the rate of each of the 16 classifier steps, read at
    AdamW's step, warms up over 4 steps (not 2) and then decays to 0 at step 16, linearly or along
    half a cosine (the formulas written out here; transformers' schedules). A contrastive stage
    runs at the peak rate, and the classifier's warmup counts its own steps only. A schedule that
    reaches 0 a step after the run's last step fails it too."""
    steps = Steps(monkeypatch)
    train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--epochs", "2", "--batch-size", "12",
                         "--lr", str(LR), "--scheduler", scheduler, "--warmup-ratio", "0.25", "--no-test", *stage1))
    rates = [group[0] for group in steps.lrs]
    stage1_rates, classifier = rates[:len(rates) - 16], rates[len(rates) - 16:]
    assert stage1_rates == ([LR] * 8 if stage1 else [])
    decay = {"linear": linear, "cosine": cosine}[scheduler]
    assert classifier == pytest.approx([LR * decay(s, 4, 16) for s in range(16)], rel=1e-12, abs=1e-18)


def test_warmup_ratio_rounds_to_the_nearest_step():
    """Planted: the ratio's warmup rounded up (transformers' Trainer's ceil). The committed records
    were made with the nearest step: 0.06 of 1,440 steps is 86 (86.4), not 87; 0.25 of 6 is 2."""
    assert warmup_steps(1440, ratio=0.06) == 86
    assert warmup_steps(6, ratio=0.25) == 2
    assert warmup_steps(10, ratio=0.26) == 3


def test_layer_decay_leaves_the_contrastive_stage_at_one_rate(tiny_model, small_massive, tmp_path, monkeypatch):
    """Planted: --layer-decay's groups applied in the contrastive stage too (its help says: the
    classifier stage). Stage 1 trains every weight at --lr; the classifier's groups run at lr times
    decay^k, from the head (k = 0) down to the embeddings (k = layers + 1), as every AdamW step
    applies them (a group's scale left out of its rate fails it too)."""
    steps = Steps(monkeypatch)
    train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--loss", "supcon", "--contrastive-epochs", "1",
                         "--epochs", "1", "--layer-decay", "0.5", "--lr", str(LR), "--no-test"))
    layers = read_json(tiny_model / "config.json")["num_hidden_layers"]
    assert len(steps.lrs) == 12
    for rates in steps.lrs[:6]:
        assert rates == [LR] * len(rates), f"stage 1 trains at {sorted(set(rates))}"
    for rates in steps.lrs[6:]:
        assert rates == pytest.approx([LR * 0.5 ** k for k in range(layers + 2)], rel=1e-12)


# ---- what a run keeps: SWA, dev-best ------------------------------------------------------------

def test_the_swa_model_is_the_mean_of_the_averaged_epochs(tiny_model, small_massive, tmp_path, monkeypatch):
    """Planted: the average never copied into the model at the end, so the last epoch's weights are
    evaluated and saved as the SWA model. --swa-start 0 over 3 epochs averages after epochs 2 and 3
    (torch's loop: epoch > int(0 · 3), 0-based): the saved weights are the mean of the weights the
    classifier had at those epochs' ends (float32 running mean: within 1e-6), and not the last.
    Averaging one epoch early fails it too."""
    seen = Classifier(monkeypatch.setattr)
    run = train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--experiment", "swa", "--swa-start", "0",
                               "--epochs", "3", "--lr", "1e-2", "--drop-rate", "0.1", "--no-test"))
    assert read_json(run / "results.json")["swa"]["n_averaged"] == 2
    assert len(seen.evaluated) == 3
    saved = load_file(run / "model.safetensors")
    mean = {k: (seen.evaluated[1][k] + seen.evaluated[2][k]) / 2 for k in seen.evaluated[2]}
    assert max((saved[k] - v).abs().max().item() for k, v in mean.items()) < 1e-6
    assert max((saved[k] - v).abs().max().item() for k, v in seen.evaluated[2].items()) > 1e-4


def test_dev_best_keeps_the_first_of_tied_epochs(tiny_model, small_massive, tmp_path):
    """Planted: `>=` in the dev-best comparison, so a tie replaces the kept epoch with the later
    one. At a rate of 1e-12 no prediction moves: three epochs of one dev accuracy, and the first
    is the one kept, and the only one marked selected."""
    run = train.main(tiny_args(tiny_model, small_massive, tmp_path / "run", "--epochs", "3", "--lr", "1e-12",
                               "--select", "dev-best", "--no-test"))
    results = read_json(run / "results.json")
    assert len(set(results["dev_accuracy_per_epoch"])) == 1, "the epochs must tie for the check to mean anything"
    assert results["dev_best"]["epoch"] == 1
    assert [row.get("selected", False) for row in history(run)] == [True, False, False]


# ---- the contrastive stage ---------------------------------------------------------------------

def contrastive_of(run):
    """The contrastive model as stage 1 left it, rebuilt from a probe's run folder: the probe kept
    stage 1's encoder frozen (model.safetensors), and projection.safetensors holds its head. Its
    views' dropout is 0, as the runs here ask: both views of a sentence are the same vector; its
    pooling is the run's."""
    classifier, tokenizer, _ = load_model(run)
    contrastive = ContrastiveModel(classifier.encoder, drop_rate=0.0, pooling=classifier.pooling)
    contrastive.projection.load_state_dict(load_file(run / "projection.safetensors"))
    return contrastive.eval(), tokenizer


@torch.no_grad()
def contrastive_loss(contrastive, tokenizer, examples, label_ids, loss, temperature, batch_size):
    """The mean over batches (in the split's order) of SupCon with the labels, or SimCLR without,
    at `temperature` → (mean, sum over batches)."""
    losses = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        input_ids, attention_mask = tokenizer([e.text for e in chunk], max_len=16)
        z = contrastive(input_ids, attention_mask)  # (B, H)
        labels = torch.tensor(label_ids[start:start + batch_size]) if loss == "supcon" else None
        losses.append(supcon_loss(torch.stack([z, z], dim=1), labels, temperature, temperature).item())
    return sum(losses) / len(losses), sum(losses)


# Mean pooling: the tiny encoder's [CLS] vectors are nearly one vector (cosine 0.9999 apart), on
# which every temperature gives one loss; their means are up to 0.6 apart.
CONTRASTIVE = ["--contrastive-drop-rate", "0", "--stage2", "probe", "--temperature", "0.2", "--pooling", "mean"]


@pytest.mark.parametrize("loss", ["supcon", "simclr"])
def test_the_stage1_record_is_each_splits_own_loss(loss, tiny_model, numbered_massive, tmp_path):
    """Planted: the stage-1 record's test loss read from another split (dev's). Two contrastive
    epochs, then a probe (which keeps stage 1's encoder as it was): the recorded dev and test
    contrastive losses are those of each split, recomputed here from the saved encoder and
    projection head, in the paper's batches of 16, with the labels for SupCon and without for
    SimCLR, at --temperature 0.2. In fp32 they agree to 1e-5 relative, and dev's and test's differ
    by far more. It catches as well a record taken from the first contrastive epoch instead of the
    last, and SupCon's record computed without its labels (or SimCLR's with them)."""
    run = train.main(tiny_args(tiny_model, numbered_massive, tmp_path / "run", "--loss", loss, "--contrastive-epochs",
                               "2", "--epochs", "1", "--lr", "1e-3", *CONTRASTIVE))
    contrastive, tokenizer = contrastive_of(run)
    record = read_json(run / "results.json")["contrastive"]
    massive = load_massive(numbered_massive)
    expected = {}
    for split in ("dev", "test"):
        examples = massive.split(split)
        expected[split] = contrastive_loss(contrastive, tokenizer, examples, massive.label_ids(examples), loss, 0.2, 16)
        assert record[f"{split}_contrastive_loss"] == pytest.approx(expected[split][0], rel=1e-5), split
        assert record[f"{split}_contrastive_loss_paper_sum"] == pytest.approx(expected[split][1], rel=1e-5), split
    assert abs(expected["dev"][0] - expected["test"][0]) > 1e-3 * expected["dev"][0]


@pytest.mark.parametrize("loss", ["supcon", "simclr"])
def test_stage1_trains_at_its_temperature(loss, tiny_model, numbered_massive, tmp_path):
    """Planted: the training loss called without --temperature (at the loss functions' default,
    0.07). One stage-1 step on all 96 train sentences at a rate of 1e-12: its recorded train loss
    is SupCon (or SimCLR) at --temperature 0.2 of the encoder and projection head the run kept
    (they moved by ~1e-12), recomputed here; at 0.07 it would be another number."""
    run = train.main(tiny_args(tiny_model, numbered_massive, tmp_path / "run", "--loss", loss, "--contrastive-epochs",
                               "1", "--epochs", "1", "--batch-size", "96", "--lr", "1e-12", "--no-test", *CONTRASTIVE))
    contrastive, tokenizer = contrastive_of(run)
    massive = load_massive(numbered_massive)
    expected, _ = contrastive_loss(contrastive, tokenizer, massive.train, massive.label_ids(massive.train), loss, 0.2,
                                   96)
    at_default, _ = contrastive_loss(contrastive, tokenizer, massive.train, massive.label_ids(massive.train), loss,
                                     0.07, 96)
    assert abs(expected - at_default) > 1e-2
    assert history(run)[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


# ---- evaluation --------------------------------------------------------------------------------

def test_the_paper_sum_counts_the_short_last_batch():
    """Planted: the paper's summed loss over whole batches of 16 only, the short last one left out.
    40 sentences make batches of 16, 16 and 8: the sum is of three batch means, computed here."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (40,), generator=g)
    result = evaluation.metrics(logits, labels)
    by_hand = sum(F.cross_entropy(logits[a:b], labels[a:b]).item() for a, b in ((0, 16), (16, 32), (32, 40)))
    assert result["n_batches"] == 3 and result["n"] == 40
    assert result["loss_paper_sum"] == pytest.approx(by_hand, rel=1e-12)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-12)


def test_lora_dropout_is_off_in_eval_mode():
    """Planted: LoRA's dropout applied whatever the mode (F.dropout with training=True). With
    --lora-dropout 0.5 and non-zero adapters, the model in eval mode gives the same outputs twice,
    and those of its adapters merged into the weights (W + (alpha / r) · B·A, no dropout); in
    training mode two passes differ."""
    model, _, _ = load_pretrained(str(cases.REFERENCE / "tiny_odd"))
    apply_lora(model, r=4, alpha=8, dropout=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in lora_modules(model):
            module.lora_B.normal_()
    inputs = cases.tiny_inputs(cases.TINY[0])
    model.double()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(**inputs), model(**inputs)), "the dropout must be there to be turned off"
        model.eval()
        first, second = model(**inputs), model(**inputs)
        for module in lora_modules(model):
            module.merge()
        merged = model(**inputs)
    assert torch.equal(first, second)
    assert (merged - first).abs().max().item() < 1e-10


# ---- the tokenizer -----------------------------------------------------------------------------

CAPITALS = ["ÉCOLE Über ÇA Ñandú ΑΘΗΝΑ", "ØRESUND Ångström ŁÓDŹ ÆSIR", "Wake Me Up At SEVEN, Ça Va?"]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_non_ascii_capitals_are_lower_cased(source, minilm_dir, transformers):
    """Planted: capitals lower-cased by an ASCII-only rule (MASSIVE's en-US has no other capital,
    so no utterance of it showed the bug). Uncased BERT lower-cases every capital and strips
    accents: "ÉCOLE Über ÇA Ñandú ΑΘΗΝΑ" gives the ids of "ecole uber ca nandu αθηνα", and every
    mixed-case accented sentence here the ids of transformers' BertTokenizerFast (the real
    tokenizer of all-MiniLM-L6-v2) and of its pure-Python BertTokenizer."""
    ours = Tokenizer.from_folder(minilm_dir) if source == "tokenizer.json" else \
        Tokenizer.from_vocab(minilm_dir / "vocab.txt")
    (capitals, plain) = ours.encode([CAPITALS[0], "ecole uber ca nandu αθηνα"], max_len=64)
    assert capitals == plain
    fast = transformers.BertTokenizerFast.from_pretrained(minilm_dir)(CAPITALS, truncation=True, max_length=64)
    slow = transformers.BertTokenizer(str(minilm_dir / "vocab.txt"))(CAPITALS, truncation=True, max_length=64)
    assert ours.encode(CAPITALS, max_len=64) == fast["input_ids"] == slow["input_ids"]
