"""Beyond the paper: intent supervision, layer-wise learning-rate decay, R-Drop and SupCon on
intents, each checked against its definition, in the model and inside train.py's loss."""

import json

import pytest
import torch
import torch.nn.functional as F

import evaluate
import train
from minibert import BertConfig, BertModel, evaluation, training
from minibert.classifier import ContrastiveModel, ScenarioClassifier, layer_groups
from minibert.data import load_massive
from minibert.losses import symmetric_kl
from minibert.runs import read_json
from tests import cases

TINY = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16,
                  max_position_embeddings=16)


def test_a_label_probability_is_the_sum_of_its_intents():
    torch.manual_seed(0)
    groups = [0, 0, 1, 2, 2, 2]  # label 3 has no intent
    model = ScenarioClassifier(BertModel(TINY), 4, groups=groups).double()
    fine = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    summed = torch.zeros(5, 4, dtype=torch.float64).index_add(1, torch.tensor(groups), fine.softmax(-1))
    assert torch.allclose(model.coarse(fine).softmax(-1), summed, rtol=0, atol=1e-12)
    F.cross_entropy(model.coarse(fine), torch.tensor([0, 1, 2, 2, 0])).backward()
    assert torch.isfinite(fine.grad).all()  # the empty label's -inf-like logit leaks no NaN
    ids = torch.randint(1, 50, (5, 7))
    assert model(ids, grouped=False).shape == (5, 6) and model(ids).shape == (5, 4)
    assert ScenarioClassifier(BertModel(TINY), 4).coarse(fine) is fine  # without groups: the head's outputs


def test_intent_groups_follow_the_data(massive_path):
    data = load_massive(massive_path)
    groups = data.intent_groups()
    assert len(data.intents) == 60 and sorted(set(groups)) == list(range(18))
    assert all(intent.startswith(data.labels[g] + "_") for intent, g in zip(data.intents, groups))


def test_layer_groups_decay_from_the_top():
    model = ScenarioClassifier(BertModel(TINY), 4)
    groups = layer_groups(model, TINY.num_hidden_layers, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(scale) == sum(len(g["params"]) for g in groups) == len(trainable)  # each weight once
    expected = {"head.": 1, "encoder.layers.2.": 0.5, "encoder.layers.1.": 0.25, "encoder.layers.0.": 0.125,
                "encoder.embeddings.": 0.0625}
    for name, p in trainable:
        assert scale[id(p)] == next(v for prefix, v in expected.items() if name.startswith(prefix)), name


def test_training_sets_each_layer_its_rate(tiny_model, small_massive, tmp_path, monkeypatch):
    seen = []
    real = train.end_of_epoch
    monkeypatch.setattr(train, "end_of_epoch", lambda run, *a: (seen.append(
        [(g["lr"], g["lr_scale"]) for g in run.optimizer.param_groups]), real(run, *a)))
    run = train.main(["--model", str(tiny_model), "--data", str(small_massive), "--out", str(tmp_path / "run"),
                      "--max-len", "16", "--epochs", "2", "--scheduler", "linear", "--layer-decay", "0.5"])
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    layers = read_json(tiny_model / "config.json")["num_hidden_layers"]
    for groups, rate in zip(seen, rates):
        assert [scale for _, scale in groups] == [0.5 ** k for k in range(layers + 2)]
        assert [lr for lr, _ in groups] == [rate * scale for _, scale in groups]


def test_symmetric_kl_is_r_drop_term():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    p, q = a.log_softmax(-1), b.log_softmax(-1)
    # F.kl_div(input, target) is KL(target ‖ input), both given as log-probabilities.
    reference = 0.5 * (F.kl_div(q, p, log_target=True, reduction="sum") + F.kl_div(p, q, log_target=True,
                                                                                   reduction="sum"))
    assert symmetric_kl(a, b).item() == pytest.approx(reference.item(), abs=1e-12)
    assert symmetric_kl(a, b).item() == pytest.approx(symmetric_kl(b, a).item(), abs=1e-12)
    assert symmetric_kl(a, a).item() == 0


def built(model, data, out, *flags):
    """train.py's run, set up and in training mode, as train_epoch() holds it: in fp32, which the
    tests' recomputations use too."""
    run = train.setup(train.parse_args(["--model", str(model), "--data", str(data), "--out", str(out),
                                        "--max-len", "16", "--precision", "fp32", *flags]))
    run.trained.train()
    return run


def one_loss(run, seed=7):
    torch.manual_seed(seed)  # the same dropout masks for every run asked
    return cases.batch_loss(run, torch.arange(16), contrastive_stage=False)[0]


def test_r_drop_adds_the_weighted_kl_of_two_passes(tiny_model, small_massive, tmp_path):
    """With dropout on, the loss is the mean cross-entropy of both passes plus rdrop times their
    symmetric KL, recomputed here from the model's own two passes."""
    flags = ["--drop-rate", "0.5"]
    one, two = (built(tiny_model, small_massive, tmp_path / f"r{w}", *flags, "--rdrop", str(w)) for w in (1, 2))
    kl = (one_loss(two) - one_loss(one)).item()
    ids, mask, labels = one.splits["train"].batch(torch.arange(16))
    torch.manual_seed(7)
    first, second = one.model(ids.repeat(2, 1), mask.repeat(2, 1)).chunk(2)
    ce = (F.cross_entropy(first, labels) + F.cross_entropy(second, labels)) / 2
    assert kl > 1e-4 and kl == pytest.approx(symmetric_kl(first, second).item() / 16, rel=1e-4)
    assert one_loss(one).item() == pytest.approx((ce + symmetric_kl(first, second) / 16).item(), rel=1e-5)


def test_r_drop_without_dropout_changes_nothing(tiny_model, small_massive, tmp_path):
    common = ["--model", str(tiny_model), "--data", str(small_massive), "--max-len", "16", "--epochs", "2",
              "--drop-rate", "0",
              "--lr", "1e-3"]
    runs = [train.main([*common, "--out", str(tmp_path / name), *extra]) for name, extra in
            (("plain", []), ("rdrop", ["--rdrop", "1"]))]
    plain, rdrop = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs)
    for a, b in zip(plain, rdrop):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["dev_accuracy"] == a["dev_accuracy"]


def test_supervising_both_adds_label_and_intent_losses(tiny_model, small_massive, tmp_path):
    flags = ["--drop-rate", "0"]  # and the tiny model has no dropout: every pass is the same
    intents, both = (built(tiny_model, small_massive, tmp_path / s, *flags, "--supervise", s) for s in ("intents",
                                                                                                      "both"))
    ids, mask, labels = both.splits["train"].batch(torch.arange(16))
    data = load_massive(small_massive)
    intent_ids = torch.tensor(data.intent_ids(data.train))[:16]
    assert one_loss(intents).item() == pytest.approx(
        F.cross_entropy(intents.model(ids, mask, grouped=False), intent_ids).item(), rel=1e-6)
    assert (one_loss(both) - one_loss(intents)).item() == pytest.approx(
        F.cross_entropy(both.model(ids, mask), labels).item(), rel=1e-5)


def test_an_intent_supervised_run_reloads_and_predicts_labels(tiny_model, small_massive, tmp_path):
    run = train.main(["--model", str(tiny_model), "--data", str(small_massive), "--out", str(tmp_path / "run"),
                      "--max-len", "16", "--epochs", "1", "--supervise", "intents"])
    meta = read_json(run / "model.json")
    assert len(meta["groups"]) == len(load_massive(small_massive).intents) and len(meta["labels"]) == 18
    evaluate.main([str(run), "--data", str(small_massive)])
    assert read_json(run / "eval-test.json")["accuracy"] == read_json(run / "results.json")["test"]["accuracy"]
    assert read_json(run / "eval-test.json")["loss"] == pytest.approx(read_json(run / "results.json")["test"]["loss"])


def test_supcon_on_intents_pairs_sentences_of_one_intent(tiny_model, small_massive, tmp_path, monkeypatch):
    positives = []
    monkeypatch.setattr(training, "supcon_loss", lambda views, labels, *a: positives.append(labels) or views.sum())
    data = load_massive(small_massive)
    for which in ("labels", "intents"):
        run = built(tiny_model, small_massive, tmp_path / which, "--experiment", "supcon", "--contrastive-labels",
                    which)
        cases.batch_loss(run, torch.arange(16), contrastive_stage=True)
    assert positives[0].tolist() == data.label_ids(data.train)[:16]
    assert positives[1].tolist() == data.intent_ids(data.train)[:16]
    # The loss recorded at the end of stage 1 counts the positives stage 1 trained with.
    recorded = []
    monkeypatch.setattr(evaluation, "contrastive_metrics", lambda contrastive, encoded, *a: recorded.append(
        encoded.labels) or {"loss": 0.0, "loss_paper_sum": 0.0})
    train.stage1_record(run)
    assert [labels.tolist() for labels in recorded] == [data.intent_ids(data.dev), data.intent_ids(data.test)]


def test_mean_pooling_averages_the_sentence_and_ignores_padding():
    """A sentence's mean-pooled vector is the mean of its own positions' hidden states, the same
    alone (no mask) and in a batch padded for a longer sentence; [CLS] pooling reads position 0."""
    torch.manual_seed(0)
    model = ScenarioClassifier(BertModel(TINY), 4, pooling="mean").eval()
    short, long = torch.tensor([[1, 5, 6, 2]]), torch.tensor([[1, 7, 8, 9, 10, 11, 2]])
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0, :4], batch[1] = short[0], long[0]
    mask = (batch != 0).long()
    with torch.no_grad():
        alone = model.embed(short)
        padded = model.embed(batch, mask)
        hidden = model.encoder(short)
    assert torch.allclose(alone[0], hidden[0].mean(0), atol=1e-6)
    assert torch.allclose(padded[0], alone[0], atol=1e-5)  # the padding positions are left out
    assert not torch.allclose(padded[0], model.encoder(batch, mask)[0].mean(0), atol=1e-3)  # they would move it
    empty = model.embed(batch, torch.zeros_like(mask))  # the fast path's filler rows
    assert torch.isfinite(empty).all()
    # The contrastive stage's projection reads the same vector as the head.
    contrastive = ContrastiveModel(model.encoder, drop_rate=0.0, pooling="mean").eval()
    with torch.no_grad():
        projected = F.normalize(contrastive.projection(padded), dim=-1)
        assert torch.allclose(contrastive(batch, mask), projected, atol=1e-6)
    model.pooling = "cls"
    with torch.no_grad():
        assert torch.equal(model.embed(short), hidden[:, 0])


def test_a_mean_pooled_run_reloads_with_its_pooling(tiny_model, small_massive, tmp_path):
    run = train.main(["--model", str(tiny_model), "--data", str(small_massive), "--out", str(tmp_path / "run"),
                      "--max-len", "16", "--epochs", "1", "--pooling", "mean"])
    assert read_json(run / "model.json")["pooling"] == "mean"
    assert read_json(run / "results.json")["hyperparameters"]["pooling"] == "mean"
    evaluate.main([str(run), "--data", str(small_massive)])
    assert read_json(run / "eval-test.json")["loss"] == pytest.approx(read_json(run / "results.json")["test"]["loss"])
    # Read through [CLS] instead, the same weights give other outputs: the record decides.
    meta = read_json(run / "model.json")
    (run / "model.json").write_text(json.dumps({**meta, "pooling": "cls"}))
    evaluate.main([str(run), "--data", str(small_massive)])
    assert read_json(run / "eval-test.json")["loss"] != pytest.approx(read_json(run / "results.json")["test"]["loss"])
    (run / "model.json").write_text(json.dumps({**meta, "pooling": "max"}))
    with pytest.raises(SystemExit, match="model.json: pooling 'max', expected cls or mean"):
        evaluate.main([str(run), "--data", str(small_massive)])


def test_simclr_without_false_negatives_hides_same_label_views(tiny_model, small_massive, tmp_path, monkeypatch):
    """--simclr-negatives other-labels hands the batch's labels to SimCLR as the ids to leave out
    of each softmax; plain SimCLR hands none."""
    import minibert.losses

    seen = []
    loss = minibert.losses.supcon_loss
    monkeypatch.setattr(minibert.losses, "supcon_loss",
                        lambda *a, **k: (seen.append(k.get("left_out")), loss(*a, **k))[1])
    common = ["--model", str(tiny_model), "--data", str(small_massive), "--max-len", "16", "--experiment", "simclr",
              "--contrastive-epochs", "1", "--epochs", "1", "--no-test"]
    run = train.setup(train.parse_args([*common, "--out", str(tmp_path / "a"), "--simclr-negatives", "other-labels"]))
    cases.batch_loss(run, torch.arange(16), contrastive_stage=True)
    assert torch.equal(seen[-1], run.splits["train"].labels[:16])
    run = train.setup(train.parse_args([*common, "--out", str(tmp_path / "b")]))
    cases.batch_loss(run, torch.arange(16), contrastive_stage=True)
    assert seen[-1] is None


def test_contrastive_drop_rate_sets_the_views_dropout_alone(tiny_model, small_massive, tmp_path):
    """--contrastive-drop-rate changes the dropout between the two views of stage 1; the head's
    dropout of stage 2 stays --drop-rate. Without it, both are --drop-rate, as in the paper."""
    common = ["--model", str(tiny_model), "--data", str(small_massive), "--max-len", "16", "--experiment", "simclr",
              "--contrastive-epochs", "1", "--epochs", "1", "--no-test", "--drop-rate", "0.9"]
    run = train.setup(train.parse_args([*common, "--out", str(tmp_path / "a"), "--contrastive-drop-rate", "0.1"]))
    assert (run.contrastive.dropout.p, run.model.dropout.p) == (0.1, 0.9)
    run = train.setup(train.parse_args([*common, "--out", str(tmp_path / "b")]))
    assert (run.contrastive.dropout.p, run.model.dropout.p) == (0.9, 0.9)
