"""Training and evaluation speed of minibert against transformers, measured side by side.

    python -m lab.speed                      # CPU: all-MiniLM-L6-v2 on real MASSIVE batches
    python -m lab.speed --steps 15 --rounds 3 --precision fp32 bf16

Every system trains the paper's classifier (the [CLS] vector, dropout, the 10-unit head) on the
same MASSIVE train batches, batch 16, at most 20 word-pieces, each batch padded to its longest
sentence. transformers runs as its users run it today: BertModel with its default (SDPA)
attention and fused AdamW, the optimizer its Trainer uses by default for torch >= 2.8; the same
optimizer on both sides, so the ratio compares the models, not an optimizer setting. Length
grouping is compared like with like: transformers on batches grouped as Trainer's
`group_by_length` groups them (megabatches of 50 batches sorted by length), minibert on its
`--bucket` batches. Each precision (fp32, bf16 autocast) is its own comparison.

Rounds alternate between the systems so that a noisy neighbour slows all of them alike; the
median round is reported. Each training row also prints the matmul work it achieved (GFLOP/s)
beside the machine's matmul peak measured here, so the distance to the limit shows.
"""

import argparse
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minibert.classifier import ScenarioClassifier
from minibert.data import batch_order, encode, load_massive
from minibert.device import cpu_model
from minibert.weights import load_pretrained, resolve


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


def grouped_by_length(encoded, batch_size, generator):
    """transformers' LengthGroupedSampler: a random permutation cut into megabatches of 50
    batches, each sorted by length, longest first, then cut into batches."""
    order = torch.randperm(len(encoded), generator=generator)
    batches = []
    for mega in order.split(50 * batch_size):
        mega = mega[torch.argsort(encoded.lengths[mega], descending=True, stable=True)]
        batches += list(mega.split(batch_size))
    return batches


def matmul_flops(config, batch):
    """Matmul FLOPs of one training step (forward and backward, 3x the forward) on a batch of
    (B, T) tokens: per layer the Q, K, V, output and two feed-forward projections, and the two
    attention products."""
    B, T = batch[0].shape
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    forward = L * (2 * B * T * (4 * H * H + 2 * H * I) + 2 * 2 * B * T * T * H)
    return 3 * forward


def matmul_peak(dtype, n=1024, repeats=20):
    """GFLOP/s of a large square matmul in `dtype`: what this CPU's cores can do at best."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e9


def train_steps(model, optimizer, batches, autocast):
    model.train()
    started = time.perf_counter()
    for input_ids, attention_mask, labels in batches:
        with autocast():
            loss = F.cross_entropy(model(input_ids, attention_mask).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


@torch.no_grad()
def eval_rate(model, encoded, autocast, batch_size=256, n=2048):
    model.eval()
    index = torch.argsort(encoded.lengths[:n])  # sorted by length, as minibert's predict() does
    started = time.perf_counter()
    for part in index.split(batch_size):
        input_ids, attention_mask, _ = encoded.batch(part)
        with autocast():
            model(input_ids, attention_mask)
    return len(index) / (time.perf_counter() - started)


def autocast_for(precision):
    return nullcontext if precision == "fp32" else lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def cpu_flags():
    """The instruction sets that decide a CPU's matmul speed, as the OS and torch report them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        flags = set()
    listed = [name for name in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if name in flags]
    return (f"flags {' '.join(listed) or 'unknown'}; torch: avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, "
            f"amx {torch.cpu._is_amx_tile_supported()}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--steps", type=int, default=15, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--data", default=None)
    args = p.parse_args()

    torch.manual_seed(0)
    data = load_massive(args.data)
    _, folder = resolve(args.model)
    encoder, tokenizer, config = load_pretrained(args.model)
    train = encode(tokenizer, data.train, data.label_ids(data.train), 20)
    n = args.steps * args.rounds + 3
    g = torch.Generator().manual_seed(0)
    batches = {"random": [train.batch(i) for i in batch_order(train, 16, g)[:n]],
               "grouped": [train.batch(i) for i in grouped_by_length(train, 16, g)[:n]],
               "bucketed": [train.batch(i) for i in batch_order(train, 16, g, bucket=True)[:n]]}

    def minibert():
        return ScenarioClassifier(load_pretrained(args.model)[0], 18)

    # name → (model factory, batches); the first of each precision is that precision's reference.
    plan = {"transformers": (lambda: TransformersClassifier(folder, 18), "random"),
            "minibert": (minibert, "random"),
            "transformers, grouped by length": (lambda: TransformersClassifier(folder, 18), "grouped"),
            "minibert, bucketed": (minibert, "bucketed")}
    systems = {}
    for precision in args.precision:
        for name, (make, kind) in plan.items():
            model = make()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            systems[f"{name}, {precision}"] = (model, optimizer, batches[kind], autocast_for(precision))
    for model, optimizer, chunk, autocast in systems.values():
        train_steps(model, optimizer, chunk[:3], autocast)  # warm up
    times = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, (model, optimizer, chunk, autocast) in systems.items():
            part = chunk[3 + r * args.steps: 3 + (r + 1) * args.steps]
            times[name].append((train_steps(model, optimizer, part, autocast), part))

    peaks = {precision: matmul_peak(torch.float32 if precision == "fp32" else torch.bfloat16)
             for precision in args.precision}
    print(f"cpu: {cpu_model()}, {platform.machine()}; {cpu_flags()}")
    print(f"training step, {args.model}, batch 16, max length 20, cpu, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, fused AdamW on both sides")
    print(f"median of {args.rounds} rounds of {args.steps} steps each; matmul peak measured here: "
          + ", ".join(f"{p} {peak:.0f} GFLOP/s" for p, peak in peaks.items()) + "\n")
    reference = None
    for name, rounds in times.items():
        seconds, part = sorted(rounds, key=lambda r: r[0] / len(r[1]))[len(rounds) // 2]
        ms = 1000 * seconds / len(part)
        rate = len(part) * 16 / seconds
        reference = rate if name == f"transformers, {args.precision[0]}" else reference
        precision = name.rsplit(", ", 1)[1]
        gflops = sum(matmul_flops(config, b) for b in part) / seconds / 1e9
        print(f"  {name:<40} {ms:7.1f} ms/step {rate:6.1f} samples/s  {rate / reference:5.2f}x   "
              f"{gflops:5.1f} GFLOP/s = {100 * gflops / peaks[precision]:3.0f} % of {precision} peak")

    dev = encode(tokenizer, data.dev, data.label_ids(data.dev), 20)
    print("\nevaluation, batch 256, sorted by length:")
    hf = TransformersClassifier(folder, 18)
    ours = minibert()
    for precision in args.precision:
        autocast = autocast_for(precision)
        hf_rate, our_rate = eval_rate(hf, dev, autocast), eval_rate(ours, dev, autocast)
        print(f"  {precision}: transformers {hf_rate:7.1f} samples/s, minibert {our_rate:7.1f} samples/s, "
              f"{our_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
