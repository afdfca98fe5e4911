"""The fast path (minibert/fast.py): the same training as the eager loop, step for step.

On the CPU the fast path's static step runs eagerly: batches padded to --max-len, the learning
rate a tensor, loss and accuracy summed on the device. With dropout off (the tiny model has none,
--drop-rate 0 the head's) both loops compute the same function of the same batches; they differ
only in padding, which the mask hides, so every figure agrees to float rounding. On a GPU the
last test checks the CUDA graph's replays against the same step run eagerly.
"""

import json

import pytest
import torch

import train
from minibert.data import batch_order, encode, load_massive
from minibert.fast import EpochBatches, Replay
from minibert.runs import read_json
from minibert.tokenizer import Tokenizer

CONFIGS = {
    # linear warmup and decay, SWA averaging the last three epochs, a short last batch (96 = 4 x 20 + 16)
    "schedule, swa": ["--experiment", "both", "--epochs", "4", "--swa-start", "0.25", "--batch-size", "20"],
    # per-layer rates, the intents' loss added, R-Drop's two passes in one forward
    "layer decay, intents, rdrop": ["--layer-decay", "0.8", "--supervise", "both", "--rdrop", "1", "--epochs", "2"],
    "lora": ["--experiment", "lora20", "--epochs", "2", "--lr", "1e-3"],
    # a contrastive stage with its own optimizer, then the classifier on the frozen encoder
    "supcon, probe": ["--experiment", "supcon", "--contrastive-epochs", "1", "--epochs", "2", "--stage2", "probe"],
}


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


FAST_PATHS = {  # device, the fast run's flags, what its results.json says of it
    "cpu": ("cpu", [], "eager"),
    "cuda": ("cuda", [], "cuda graph, compiled"),
    "cuda-no-compile": ("cuda", ["--no-compile"], "cuda graph"),
}


@pytest.mark.parametrize("path", [pytest.param(p, marks=GPU if p.startswith("cuda") else ()) for p in FAST_PATHS])
@pytest.mark.parametrize("flags", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_fast_path_trains_as_the_eager_loop(flags, path, tiny_model, small_massive, tmp_path):
    """On the CPU the fast path's step runs eagerly; on a GPU it is replayed from a CUDA graph,
    with query, key and value as one product, and by default each encoder layer compiled."""
    device, fast_flags, recorded = FAST_PATHS[path]
    if device == "cuda":
        torch._dynamo.reset()  # each case compiles its own shapes, within torch.compile's recompile limit
    common = ["--model", str(tiny_model), "--data", str(small_massive), "--max-len", "16", "--drop-rate", "0",
              "--lr", "5e-4", "--device", device, "--precision", "fp32", *flags]
    eager, fast = (train.main([*common, "--out", str(tmp_path / name), *extra])
                   for name, extra in (("eager", ["--no-fast"]), ("fast", ["--fast", *fast_flags])))
    assert read_json(eager / "results.json")["fast"] is None
    assert read_json(fast / "results.json")["fast"] == recorded
    for a, b in zip(history(eager), history(fast), strict=True):
        figures = [k for k in a if "second" not in k]  # every figure but the clock's
        assert [k for k in b if "second" not in k] == figures
        for key in figures:  # losses to rounding, accuracies and counts exactly
            assert b[key] == (pytest.approx(a[key], rel=1e-5) if "loss" in key else a[key]), key
    assert read_json(fast / "results.json")["test"]["loss"] == pytest.approx(
        read_json(eager / "results.json")["test"]["loss"], rel=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_fused_qkv_is_the_same_function(lora):
    """Query, key and value as one product over the stacked weights (the GPU's fast path): the
    same outputs and the same gradients as three products, LoRA-adapted projections included."""
    from minibert.lora import apply_lora
    from minibert.model import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    models = [BertModel(config, with_pooler=False), BertModel(config, with_pooler=False)]
    for model in models:
        for name, p in model.named_parameters():  # BERT's zero biases would hide a bias stacked out of order
            if name.endswith("bias"):
                torch.nn.init.normal_(p.data)
        if lora:
            apply_lora(model, 4, 8.0)
            for module in model.modules():  # B starts at zero: make the update count
                if hasattr(module, "lora_B"):
                    torch.nn.init.normal_(module.lora_B)
    models[1].load_state_dict(models[0].state_dict())
    for layer in models[1].layers:
        layer.fused_qkv = True
    ids = torch.randint(1, 50, (3, 7))
    mask = (torch.arange(7) < torch.tensor([[7], [4], [2]])).long()
    outputs = [model(ids, mask) for model in models]
    assert torch.allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for output in outputs:
        output.square().sum().backward()
    grads = [{n: p.grad for n, p in model.named_parameters() if p.requires_grad} for model in models]
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0]) == lora
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-4, atol=1e-6), name
    if lora:  # merged into W for inference, the update is not added a second time
        for model in models:
            for module in model.modules():
                if hasattr(module, "merge"):
                    module.merge()
        with torch.no_grad():
            assert torch.allclose(models[1](ids, mask), outputs[0], rtol=1e-5, atol=1e-5)


def test_epoch_batches_hold_each_batch_padded_to_max_len(small_massive, minilm_dir):
    data = load_massive(small_massive)
    encoded = encode(Tokenizer.from_folder(minilm_dir), data.train, data.label_ids(data.train), 20)
    order = batch_order(encoded, 20, torch.Generator().manual_seed(0), bucket=True)
    intents = torch.tensor(data.intent_ids(data.train))
    batches = EpochBatches.build(encoded, order, intents, torch.device("cpu"))
    assert len(batches) == len(order) == 5
    for index, (ids, mask, labels, batch_intents) in zip(order, (batches[i] for i in range(len(order)))):
        assert ids.shape == mask.shape == (len(index), 20)
        assert torch.equal(ids, encoded.input_ids[index]) and torch.equal(labels, encoded.labels[index])
        assert torch.equal(mask.sum(1), encoded.lengths[index]) and torch.equal(batch_intents, intents[index])
        short_ids, short_mask, _ = encoded.batch(index)  # the eager loop's batch: cut to its longest row
        assert torch.equal(ids[:, : short_ids.shape[1]], short_ids)
        assert short_mask is None or torch.equal(mask[:, : short_mask.shape[1]], short_mask)


def test_a_batch_without_padding_has_no_mask(small_massive, minilm_dir):
    data = load_massive(small_massive)
    encoded = encode(Tokenizer.from_folder(minilm_dir), data.train, data.label_ids(data.train), 20)
    same = torch.nonzero(encoded.lengths == encoded.lengths[0]).flatten()[:2]
    assert len(same) == 2 and encoded.batch(same)[1] is None
    assert encoded.batch(same, pad_to=20)[1].sum() == 2 * encoded.lengths[0]  # a fixed shape keeps its mask


def test_fast_prediction_gives_the_eager_logits(small_massive, minilm_dir):
    """Batches of a fixed shape, the last filled up with empty rows: the same logits."""
    from minibert.classifier import ScenarioClassifier
    from minibert.evaluation import predict
    from minibert.weights import load_pretrained

    encoder, tokenizer, _ = load_pretrained(str(minilm_dir))
    data = load_massive(small_massive)
    encoded = encode(tokenizer, data.dev, data.label_ids(data.dev), 20)
    torch.manual_seed(0)
    model = ScenarioClassifier(encoder, 18)
    eager = predict(model, encoded, torch.device("cpu"), batch_size=32)
    fast = predict(model, encoded, torch.device("cpu"), batch_size=32, fast=True)  # 48 rows: 32 + 16 and 16 empty
    assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-5)


@GPU
def test_cuda_graph_replays_the_eager_steps():
    """A small BERT classifier step recorded in a CUDA graph, against the same step run eagerly from
    the same weights on the same batches: the losses and the final weights agree."""
    from minibert.classifier import ScenarioClassifier
    from minibert.model import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    first = ScenarioClassifier(BertModel(config), 5, drop_rate=0.0).cuda()
    second = ScenarioClassifier(BertModel(config), 5, drop_rate=0.0).cuda()
    second.load_state_dict(first.state_dict())
    ids = torch.randint(1, 100, (12, 8, 10), device="cuda")
    mask = (torch.arange(10, device="cuda") < torch.randint(3, 11, (12, 8, 1), device="cuda")).long()
    labels = torch.randint(0, 5, (12, 8), device="cuda")

    def stepper(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True,
                                      capturable=True)
        losses = []

        def step(i_ids, i_mask, i_labels):
            loss = torch.nn.functional.cross_entropy(model(i_ids, i_mask), i_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.detach())
        return step, losses

    eager_step, eager_losses = stepper(first)
    graph_step, graph_losses = stepper(second)
    replay = Replay(graph_step, torch.device("cuda"), warmup=3)
    for i in range(12):
        eager_step(ids[i], mask[i], labels[i])
        replay(ids[i], mask[i], labels[i])
    assert replay.captured
    # 3 warm-up steps and the recording call itself append; replays reuse the recorded loss tensor.
    recorded = graph_losses[3]
    assert torch.allclose(torch.stack(eager_losses[:3]), torch.stack(graph_losses[:3]), rtol=1e-5)
    assert torch.allclose(eager_losses[-1], recorded, rtol=1e-4, atol=1e-6)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
