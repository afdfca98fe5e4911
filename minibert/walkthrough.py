"""One sentence through one training step of the paper's baseline, printed file by file as it meets them.

    python -m minibert walkthrough "wake me up at seven" [--label alarm] [--model all-MiniLM-L6-v2] [--seed 0]

Every number comes from the functions train.py calls (build_models, optimizer_for, learning_rate,
set_learning_rate, train_step, paper_loss), in train.py's order, so the loss and logits printed
are those of train.py's first step on a data set whose first batch is this one sentence. The
forward pass of sections 2 and 3 runs with dropout off, so that it can be checked by hand; the
step of sections 4 and 5 runs with dropout on, drawn as train.py draws it.
"""

import math

import torch
import torch.nn.functional as F

from .data import SCENARIOS, Dataset, Example, encode
from .experiments import PRESETS
from .schedule import learning_rate
from .training import Batch, build_models, dropout_seed, optimizer_for, paper_loss, set_learning_rate, train_step

HEAD = 0  # the attention head whose [CLS] row section 3 shows


def walkthrough(sentence, label="alarm", model="all-MiniLM-L6-v2", seed=0):
    """Print the walk, fp32 on the CPU → (loss, logits (1, 18)) of the step."""
    config = PRESETS["baseline"].override(model=model, seed=seed)
    config.check()
    data = Dataset(train=[Example(sentence, label)], dev=[], test=[], labels=SCENARIOS)
    classifier, _, tokenizer = build_models(config, data, rank=0, world=1)  # torch.manual_seed(seed) inside
    optimizer = optimizer_for(classifier, None, config, contrastive_stage=False, device=torch.device("cpu"))
    encoded = encode(tokenizer, data.train, data.label_ids(data.train), config.max_len)
    input_ids, attention_mask, labels = encoded.batch(torch.tensor([0]))  # one sentence: no padding, no mask
    batch = Batch(input_ids, attention_mask, labels, intents=torch.zeros_like(labels))
    print(f"minibert/training.py · build_models: {classifier.encoder.name} under the paper's head, seed {seed}; "
          f"label {label!r}, id {int(labels)} of {len(SCENARIOS)}")
    print(f"the {config.experiment} recipe: lr {config.lr:g} {config.scheduler}, AdamW, drop_rate {config.drop_rate}, "
          f"hidden_dim {config.hidden_dim}, max_len {config.max_len}; fp32 on the CPU\n")
    words = [tokenizer.backend.id_to_token(i) for i in input_ids[0].tolist()]
    show_tokens(sentence, words, input_ids, config.max_len)
    classifier.eval()  # sections 2 and 3: dropout off
    with torch.no_grad():
        x = show_embeddings(classifier.encoder, input_ids)
        show_layers(classifier.encoder, x, words)
    classifier.train()
    torch.manual_seed(dropout_seed(config.seed, epoch=0))  # as train.py's train_epoch, before the first step
    lr = learning_rate(config, epoch=0, step=0, steps_per_epoch=1)
    set_learning_rate(optimizer, lr)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters() if p.requires_grad}
    seen = {}  # hooks watch the step's own forward, changing nothing: the [CLS] vector, and the head inside
    hooks = [classifier.dropout.register_forward_hook(lambda m, inputs, out: seen.update(cls=inputs[0], kept=out)),
             classifier.head[1].register_forward_hook(lambda m, inputs, out: seen.update(hidden=out))]
    loss, logits = train_step(classifier, optimizer, batch, paper_loss, config.max_grad_norm)
    for hook in hooks:
        hook.remove()
    show_head(classifier, seen, logits, int(labels), config.drop_rate)
    show_step(classifier, before, loss, lr, config, int(labels))
    return loss, logits.detach()


def show_tokens(sentence, words, input_ids, max_len):
    print("1. minibert/tokenizer.py · Tokenizer.encode, then minibert/data.py · encode and Encoded.batch")
    print(f"   {sentence!r} → {len(words)} word-pieces, [CLS] first and [SEP] last (cut to max_len {max_len})")
    widths = [max(len(w), len(str(i))) for w, i in zip(words, input_ids[0].tolist())]
    print("   " + "  ".join(w.rjust(n) for w, n in zip(words, widths)))
    print("   " + "  ".join(str(i).rjust(n) for i, n in zip(input_ids[0].tolist(), widths)) + "\n")


def show_embeddings(encoder, input_ids):
    """→ the embeddings' output, (1, T, H)."""
    e = encoder.embeddings
    T = input_ids.shape[1]
    parts = {"word": e.word(input_ids), "position": e.position(torch.arange(T)),
             "token type": e.token_type(torch.zeros_like(input_ids))}
    x = e(input_ids, torch.zeros_like(input_ids))  # (1, T, H)
    by_hand = e.norm(sum(parts.values()))
    print("2. minibert/model.py · Embeddings.forward: word + position + token type, then LayerNorm")
    print("   " + " + ".join(f"{name} {tuple(p.shape)} norm {p.norm():.4f}" for name, p in parts.items()))
    print(f"   LayerNorm(sum) → {tuple(x.shape)}, norm {x.norm():.4f} (each row: mean 0, variance 1, "
          f"then scaled); by hand: max |diff| {(by_hand - x).abs().max():.1e}\n")
    return x


def by_hand(layer, x):
    """The layer recomputed from its own weights on its input x (1, T, H), dropout off, with the
    attention written out: → (probabilities (1, nh, T, T), the layer's output (1, T, H))."""
    B, T, H = x.shape
    nh, hs = layer.n_head, H // layer.n_head
    q, k, v = (linear(x).view(B, T, nh, hs).transpose(1, 2) for linear in (layer.query, layer.key, layer.value))
    probabilities = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1)  # (B, nh, T, T), Vaswani eq. 1
    a = (probabilities @ v).transpose(1, 2).reshape(B, T, H)  # (B, T, H), the heads side by side
    x = layer.attention_norm(x + layer.attention_output(a))
    return probabilities, layer.output_norm(x + layer.output(F.gelu(layer.intermediate(x))))


def show_layers(encoder, x, words):
    layers = encoder.layers
    print(f"3. minibert/model.py · Layer.forward, {len(layers)} layers: x = LayerNorm(x + attention(x)), "
            "then x = LayerNorm(x + feed-forward(x))")
    print(f"   each layer's output, and the [CLS] row's attention over the word-pieces in head {HEAD} of "
          f"{layers[0].n_head},")
    print("   softmax(q kᵀ / √hs) from the layer's own query and key; with it, the value projection and the rest,")
    print("   the whole layer recomputed by hand (by_hand) and held to Layer.forward's output: max |diff|")
    widths = [max(len(w), 5) for w in words]
    print(f"   layer  {'output':<11} {'norm':>6}  " + " ".join(w.rjust(n) for w, n in zip(words, widths))
          + "  max |diff|")
    for i, layer in enumerate(layers):
        out = layer(x, None)  # (1, T, H): the model's own module
        probabilities, recomputed = by_hand(layer, x)
        diff = (recomputed - out).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"layer {i}: the recomputed output differs from Layer.forward's by {diff}")
        cls_row = probabilities[0, HEAD, 0]  # (T,): what [CLS] reads from each word-piece
        print(f"   {i:<5}  {str(tuple(out.shape)):<11} {out.norm():6.2f}  "
              + " ".join(f"{p:.3f}".rjust(n) for p, n in zip(cls_row.tolist(), widths)) + f"  {diff:.1e}")
        x = out
    print(f"   the [CLS] vector, dropout off: {tuple(x[:, 0].shape)}, norm {x[:, 0].norm():.4f}\n")


def show_head(classifier, seen, logits, label, drop_rate):
    print("4. minibert/classifier.py · ScenarioClassifier.forward, as the step runs it: dropout on")
    cls, kept, hidden = seen["cls"], seen["kept"], seen["hidden"]
    print(f"   [CLS] vector {tuple(cls.shape)}, norm {cls.norm():.4f} (the encoder's dropout 0.1 on)")
    print(f"   Dropout({drop_rate}) keeps {int((kept != 0).sum())} of {cls.shape[1]} units, each × "
          f"{1 / (1 - drop_rate):.0f}: norm {kept.norm():.4f}")
    print(f"   head: Linear({cls.shape[1]}, {hidden.shape[1]}) → ReLU: " + " ".join(f"{h:.3f}" for h in hidden[0])
          + f" ({int((hidden > 0).sum())} above 0) → Linear({hidden.shape[1]}, {logits.shape[1]}):")
    probabilities = logits.softmax(-1)[0]
    print(f"   {'label':<14} {'logit':>7}  probability")
    for i, name in enumerate(SCENARIOS):
        mark = "  ← the label" if i == label else ""
        print(f"   {name:<14} {logits[0, i]:+.4f}  {probabilities[i]:.4f}{mark}")
    print()


def show_step(classifier, before, loss, lr, config, label):
    print("5. minibert/training.py · train_step: paper_loss, backward, clip (off: max_grad_norm 0), AdamW (adamw)")
    print(f"   loss = cross-entropy = -log p({SCENARIOS[label]}) = {loss.item():.6f}")
    print(f"   minibert/schedule.py · learning_rate: lr {lr:.2e} ({config.scheduler}), set by set_learning_rate")
    print("   AdamW's first step moves each entry with a gradient by lr · g / (|g| + eps) ≈ ±lr, whatever g's "
          "size:")
    print(f"   |Δw| ≈ lr · √(entries with a gradient); weight decay moves every entry by lr · "
          f"{config.weight_decay} · w besides")
    last = len(classifier.encoder.layers) - 1
    named = ["encoder.embeddings.word.weight", "encoder.layers.0.query.weight",
             f"encoder.layers.{last}.output.weight", "head.0.weight", "head.2.weight"]
    params = dict(classifier.named_parameters())

    def row(title, shape, names):
        grads = [params[k].grad for k in names if params[k].grad is not None]
        n = sum(int((g != 0).sum()) for g in grads)
        grad = math.sqrt(sum(g.norm().item() ** 2 for g in grads))
        change = math.sqrt(sum((params[k].detach() - before[k]).norm().item() ** 2 for k in names))
        print(f"   {title:<34} {shape:<12} {grad:9.3e} {n:9d} {change:9.3e} {lr * math.sqrt(n):9.3e}")

    print(f"   {'weight':<34} {'shape':<12} {'|grad|':>9} {'with grad':>9} {'|Δw|':>9} {'lr·√n':>9}")
    for name in named:
        row(name, str(tuple(params[name].shape)), [name])
    row(f"all {len(before)} trained tensors", "", list(before))
