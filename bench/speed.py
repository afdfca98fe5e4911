"""Training and evaluation speed of minibert against transformers, measured side by side.

    python bench/speed.py                      # CPU: all-MiniLM-L6-v2 on real MASSIVE batches
    python bench/speed.py --steps 40 --rounds 5

Every system trains the paper's classifier (the [CLS] vector, dropout, the 10-unit head) on the
same batches of MASSIVE train sentences, batch 16, at most 20 word-pieces, each batch padded to
its longest sentence. transformers runs as a user would run it: BertModel with its default
(SDPA) attention and torch.optim.AdamW's default implementation. Rounds alternate between the
systems so that a noisy neighbour slows all of them alike; the median round is reported.
Prints ratios only against what was measured in this same process.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minibert.classifier import ScenarioClassifier  # noqa: E402
from minibert.data import batch_order, encode, load_massive  # noqa: E402
from minibert.lora import apply_lora  # noqa: E402
from minibert.weights import load_pretrained, resolve  # noqa: E402


class TransformersClassifier(nn.Module):
    """The same classifier around transformers' BertModel."""

    def __init__(self, folder, n_labels):
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(folder)
        self.dropout = nn.Dropout(0.9)
        self.head = nn.Sequential(nn.Linear(self.encoder.config.hidden_size, 10), nn.ReLU(), nn.Linear(10, n_labels))

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return self.head(self.dropout(h))


def train_steps(model, optimizer, batches):
    model.train()
    started = time.perf_counter()
    for input_ids, attention_mask, labels in batches:
        loss = F.cross_entropy(model(input_ids, attention_mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


@torch.no_grad()
def eval_rate(model, encoded, batch_size=256, n=2048):
    model.eval()
    index = torch.arange(min(n, len(encoded)))
    started = time.perf_counter()
    for part in index.split(batch_size):
        input_ids, attention_mask, _ = encoded.batch(part)
        model(input_ids, attention_mask)
    return len(index) / (time.perf_counter() - started)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=None)
    args = p.parse_args()

    torch.manual_seed(0)
    data = load_massive(args.data)
    _, folder = resolve(args.model)
    encoder, tokenizer, _ = load_pretrained(args.model)
    train = encode(tokenizer, data.train, data.label_ids(data.train, "scenario"), 20)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.rounds + 5
    random_batches = [train.batch(i) for i in batch_order(train, 16, g)[:n]]
    bucketed_batches = [train.batch(i) for i in batch_order(train, 16, g, bucket=True)[:n]]

    systems = {
        "transformers (eager, AdamW default)": (TransformersClassifier(folder, 18), {}, random_batches),
        "minibert (fused AdamW)": (ScenarioClassifier(encoder, 18), {"fused": True}, random_batches),
    }
    systems["minibert (fused AdamW, length-bucketed)"] = (
        ScenarioClassifier(load_pretrained(args.model)[0], 18), {"fused": True}, bucketed_batches)
    lora_encoder = load_pretrained(args.model)[0]
    apply_lora(lora_encoder, r=20, alpha=8)
    systems["minibert LoRA r=20 (fused AdamW)"] = (ScenarioClassifier(lora_encoder, 18), {"fused": True}, random_batches)

    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, **kw)
                  for name, (m, kw, _) in systems.items()}
    for name, (model, _, batches) in systems.items():
        train_steps(model, optimizers[name], batches[:5])  # warm up
    times = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, (model, _, batches) in systems.items():
            chunk = batches[5 + r * args.steps: 5 + (r + 1) * args.steps]
            times[name].append(train_steps(model, optimizers[name], chunk) / len(chunk))

    device = f"cpu, {torch.get_num_threads()} threads" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"training step, {args.model}, batch 16, max length 20, {device}, torch {torch.__version__}")
    print(f"median of {args.rounds} rounds of {args.steps} steps each\n")
    reference = statistics.median(times["transformers (eager, AdamW default)"])
    full = statistics.median(times["minibert (fused AdamW)"])
    for name, per_step in times.items():
        ms = statistics.median(per_step)
        print(f"  {name:<44} {1000 * ms:7.1f} ms/step {16 / ms:7.1f} samples/s   ratio {reference / ms:.2f}x")
    lora = statistics.median(times["minibert LoRA r=20 (fused AdamW)"])
    print(f"\n  LoRA r=20 step / full fine-tuning step (minibert, same batches): {lora / full:.2f}")
    dev = encode(tokenizer, data.dev, data.label_ids(data.dev, "scenario"), 20)
    print("\nevaluation, batch 256:")
    hf_rate = eval_rate(systems["transformers (eager, AdamW default)"][0], dev)
    ours_rate = eval_rate(systems["minibert (fused AdamW)"][0], dev)
    print(f"  transformers {hf_rate:8.1f} samples/s\n  minibert     {ours_rate:8.1f} samples/s   ratio {ours_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
