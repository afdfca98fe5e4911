"""Training and evaluation speed of minibert against transformers, measured side by side.

    python -m lab.speed                      # CPU: all-MiniLM-L6-v2 on real MASSIVE batches
    python -m lab.speed --steps 15 --rounds 3 --precision fp32 bf16
    python -m lab.speed --profile            # where the time of minibert's own step goes

Every system trains the paper's classifier (the [CLS] vector, dropout, the 10-unit head) on the
same MASSIVE train batches, batch 16, at most 20 word-pieces, each batch padded to its longest
sentence. transformers runs as its users run it today: BertModel with its default (SDPA)
attention and fused AdamW, the optimizer its Trainer uses by default for torch >= 2.8; the same
optimizer on both sides, so the ratio compares the models, not an optimizer setting. Length
grouping is compared like with like: transformers on batches grouped as Trainer's
`group_by_length` groups them (megabatches of 50 batches sorted by length), minibert on its
`--bucket` batches. Each precision (fp32, bf16 autocast) is its own comparison.

minibert runs as train.py runs it on the CPU, its word embedding's gradient kept from step to step
(minibert/word_gradient.py); the row "minibert, dense word gradient" runs it without, so the cut
is measured on its own, in the same run.

Rounds alternate between the systems so that a noisy neighbour slows all of them alike. A row
prints its median round's time, and its ratio to transformers round by round: the median and the
spread over the rounds (on a shared machine a few rounds do not pin a ratio). Each training row
also prints the matmul work it achieved (GFLOP/s) beside the machine's matmul peak measured here
(Peaks), so the distance to the limit shows.

--profile takes minibert's own step as train.py takes it (the baseline preset: training.train_step
with paper_loss, fused AdamW, the kept word gradient) under torch.profiler, and prints per
precision where its operators' self CPU time goes, in groups (GROUPS), each beside the floor this
machine's peaks set for it.
"""

import argparse
import platform
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from minibert.classifier import ScenarioClassifier
from minibert.data import batch_order, encode, load_massive
from minibert.device import cpu_model
from minibert.experiments import PRESETS
from minibert.training import Batch, build_models, optimizer_for, paper_loss, train_step
from minibert.weights import load_pretrained, resolve
from minibert.word_gradient import keep_word_gradient


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


def matmul_flops(config, input_ids):
    """Matmul FLOPs of one training step (forward and backward, 3x the forward) on a batch of
    (B, T) tokens: per layer the Q, K, V, output and two feed-forward projections, and the two
    attention products. The head's products are left out: a floor, never more than the work."""
    B, T = input_ids.shape
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    forward = L * (2 * B * T * (4 * H * H + 2 * H * I) + 2 * 2 * B * T * T * H)
    return 3 * forward


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Peaks:
    """The best this CPU has shown, on the threads the step uses (torch.get_num_threads()): matmul
    GFLOP/s per precision, and memory bandwidth (bytes read and written per second).

    One measurement can fall on a moment when a neighbour holds the cores, and then a step timed at
    a quieter moment beats the "peak" (a report showed 120 % of it). So each call of measure() is
    one more try, made between the timed rounds, and the best try is kept: a busy moment only
    lowers a try.

    A matmul try times a 1024 x 1024 square and the products of the step's two feed-forward Linears
    at 16 x 20 word-pieces as autograd runs them (forward x @ W.T, the input's gradient g @ W, the
    weight's gradient g.T @ x), each once, and keeps the fastest: a CPU that emulates bf16 runs these
    layouts at rates up to 10x apart, the square among the slowest. A memory try streams 128 MiB
    tensors, larger than any cache, two ways: a copy (one read, one written) and an in-place add
    (two read, one written in place, as AdamW writes its tensors); given `weights` (the optimizer's
    tensor sizes), also a third: fused AdamW's own pass over scratch tensors of those sizes (four
    read, three written), which streams faster than either on a CPU whose cache holds the smaller
    tensors. The fastest counts."""

    def __init__(self, config, precisions, n=1024, weights=()):
        M, H, I = 16 * 20, config.hidden_size, config.intermediate_size

        def products(dtype):
            pairs = [(torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype))]
            for fan_in, fan_out in ((H, I), (I, H)):
                x, w, g = (torch.randn(*shape).to(dtype) for shape in ((M, fan_in), (fan_out, fan_in), (M, fan_out)))
                pairs += [(x, w.t()), (g, w), (g.t(), x)]  # forward, the input's gradient, the weight's
            return pairs

        self.products = {p: products(DTYPES[p]) for p in precisions}
        self.source = torch.randn(32 * 2 ** 20)
        self.target = torch.randn(32 * 2 ** 20)
        self.adamw = [[torch.zeros(size) for size in weights] for _ in range(4)] if weights else []  # p, g, moments
        self.gflops = dict.fromkeys(precisions, 0.0)
        self.memory_gbps = 0.0
        self.tries = 0
        for pairs in self.products.values():  # the first product of a shape pays for its setup
            for a, b in pairs:
                a @ b

    def measure(self):
        for precision, pairs in self.products.items():
            for a, b in pairs:
                started = time.perf_counter()
                a @ b
                rate = 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - started) / 1e9
                self.gflops[precision] = max(self.gflops[precision], rate)
        for stream, moved in ((self.target.copy_, 2), (self.target.add_, 3)):  # tensors read + written
            started = time.perf_counter()
            stream(self.source)
            self.memory_gbps = max(self.memory_gbps, moved * self.source.nbytes / (time.perf_counter() - started) / 1e9)
        if self.adamw:
            steps = [torch.tensor(1.0) for _ in self.adamw[0]]
            started = time.perf_counter()
            torch._fused_adamw_(*self.adamw, [], steps, lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8,
                                amsgrad=False, maximize=False)
            moved = ADAMW_BYTES * sum(w.numel() for w in self.adamw[0])
            self.memory_gbps = max(self.memory_gbps, moved / (time.perf_counter() - started) / 1e9)
        self.tries += 1

    def describe(self):
        n = self.products[next(iter(self.products))][0][0].shape[0]
        return ("matmul peak " + ", ".join(f"{p} {g:.3g} GFLOP/s" for p, g in self.gflops.items())
                + f", memory {self.memory_gbps:.3g} GB/s (read + written): each the best of {self.tries} tries, one "
                f"before each round and one after the last, on {torch.get_num_threads()} threads; a matmul try: the "
                f"fastest of a {n}x{n} square and the feed-forward Linears' forward and backward products at 320 "
                f"word-pieces; a memory try: the fastest of a copy and an in-place add of "
                f"{self.source.nbytes >> 20} MiB tensors" + (", and fused AdamW over scratch tensors the size of the "
                                                             "optimizer's" if self.adamw else ""))


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


def ratio(reference, tried):
    """How many times faster than `reference` the `tried` rounds ran, round by round (each
    [(seconds, batches)], one a round, in the same order) → "median x [lowest-highest]"."""
    ratios = sorted(ref / seconds for (seconds, _), (ref, _) in zip(tried, reference))
    return f"{median(ratios):5.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]"


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


def compare(args, data, steps, rounds):
    """minibert against transformers, training and evaluation, in each precision of args.precision."""
    _, folder = resolve(args.model)
    encoder, tokenizer, config = load_pretrained(args.model)
    train = encode(tokenizer, data.train, data.label_ids(data.train), 20)
    n = steps * rounds + 3
    g = torch.Generator().manual_seed(0)
    batches = {"random": [train.batch(i) for i in batch_order(train, 16, g)[:n]],
               "grouped": [train.batch(i) for i in grouped_by_length(train, 16, g)[:n]],
               "bucketed": [train.batch(i) for i in batch_order(train, 16, g, bucket=True)[:n]]}

    def minibert(cuts=True):
        model = ScenarioClassifier(load_pretrained(args.model)[0], 18)
        if cuts:  # as train.py runs it on the CPU
            keep_word_gradient(model.encoder)
        return model

    # name → (model factory, batches); the first of each precision is that precision's reference.
    plan = {"transformers": (lambda: TransformersClassifier(folder, 18), "random"),
            "minibert": (minibert, "random"),
            "minibert, dense word gradient": (lambda: minibert(cuts=False), "random"),
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
    times = {name: [] for name in systems}  # → [(seconds, batches)], one a round
    peaks = Peaks(config, args.precision)
    for r in range(rounds):
        peaks.measure()
        for name, (model, optimizer, chunk, autocast) in systems.items():
            part = chunk[3 + r * steps: 3 + (r + 1) * steps]
            times[name].append((train_steps(model, optimizer, part, autocast), part))
    peaks.measure()
    print(f"cpu: {cpu_model()}, {platform.machine()}; {cpu_flags()}")
    print(f"training step, {args.model}, batch 16, max length 20, cpu, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, fused AdamW on both sides")
    print(f"{rounds} rounds of {steps} steps each: ms/step of the median round; the ratio against transformers "
          f"in the same precision, round by round (the median, then the lowest and highest); {peaks.describe()}\n")
    for name, tried in times.items():
        precision = name.rsplit(", ", 1)[1]
        seconds, part = sorted(tried, key=lambda r: r[0])[len(tried) // 2]
        ms = 1000 * seconds / len(part)
        gflops = sum(matmul_flops(config, b[0]) for b in part) / seconds / 1e9
        print(f"  {name:<42} {ms:7.1f} ms/step {len(part) * 16 / seconds:6.1f} samples/s  "
              f"{ratio(times[f'transformers, {precision}'], tried)}  "
              f"{gflops:5.1f} GFLOP/s = {100 * gflops / peaks.gflops[precision]:3.0f} % of {precision} peak")
    for precision in args.precision:
        print(f"  the kept word gradient's own gain, {precision}: minibert against its dense-gradient self, round by "
              f"round, {ratio(times[f'minibert, dense word gradient, {precision}'], times[f'minibert, {precision}'])}")

    dev = encode(tokenizer, data.dev, data.label_ids(data.dev), 20)
    print("\nevaluation, batch 256, sorted by length:")
    hf = TransformersClassifier(folder, 18)
    ours = minibert()
    for precision in args.precision:
        autocast = autocast_for(precision)
        hf_rate, our_rate = eval_rate(hf, dev, autocast), eval_rate(ours, dev, autocast)
        print(f"  {precision}: transformers {hf_rate:7.1f} samples/s, minibert {our_rate:7.1f} samples/s, "
              f"{our_rate / hf_rate:.2f}x")


# ---- where one step's time goes (--profile) ------------------------------------------------------

# An operator's self time goes to the group of the first of itself and its callers that a group
# names: the pointwise work a dropout calls (its div_ and mul) counts as dropout, while autocast's
# cast of a weight, called inside the Linear, counts as a cast. Everything else: the rest.
GROUPS = {
    "matrix work": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "fills and zeroing": ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like"),
    "copies and casts": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "optimizer": ("aten::_fused_adamw_", "Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad"),
    "dropout": ("aten::dropout", "aten::native_dropout", "aten::native_dropout_backward", "aten::bernoulli_"),
}
REST = "the rest"
WARMUP = 2  # steps before the profiled ones: the first pays for allocations and kernel setup
ADAMW_BYTES = 28  # per fp32 weight, fused AdamW reads weight, gradient, exp_avg, exp_avg_sq (16) and writes three (12)


def group_of(event):
    while event is not None:
        for group, names in GROUPS.items():
            if event.name in names:
                return group
        event = event.cpu_parent
    return REST


@dataclass
class Profile:
    """One precision's profiled steps, per step: every operator's self CPU time by group, the
    profiler's own total of them, and the work that sets the floors."""

    precision: str
    steps: int = 0
    wall_ms: float = 0.0  # the profiled steps' wall time, the profiler's overhead included
    total_ms: float = 0.0  # the profiler's total self CPU time (key_averages)
    groups: dict = field(default_factory=lambda: {g: defaultdict(float) for g in (*GROUPS, REST)})  # → {operator: ms}
    flops: float = 0.0  # the encoder's matmul FLOPs (matmul_flops)
    weights: int = 0  # fp32 weights the optimizer updates

    def add(self, prof, wall_seconds, steps):
        self.steps += steps
        self.wall_ms += 1000 * wall_seconds
        self.total_ms += sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
        for event in prof.events():
            self.groups[group_of(event)][event.name] += event.self_cpu_time_total / 1000

    def rows(self, peaks):
        """→ [(group, ms/step, % of the step, floor ms/step or None, how the floor is counted,
        {operator: ms/step})], the groups in GROUPS' order, then the rest."""
        peak, memory = peaks.gflops[self.precision], peaks.memory_gbps
        floors = {"matrix work": (1000 * self.flops / self.steps / (peak * 1e9),
                                  f"{self.flops / self.steps / 1e9:.2f} GFLOP at {peak:.3g} GFLOP/s"),
                  "optimizer": (1000 * ADAMW_BYTES * self.weights / (memory * 1e9),
                                f"{ADAMW_BYTES} B x {self.weights / 1e6:.2f} M weights at {memory:.3g} GB/s")}
        rows = []
        for group in (*GROUPS, REST):
            ops = {name: ms / self.steps for name, ms in self.groups[group].items()}
            ms = sum(ops.values())
            rows.append((group, ms, 100 * ms / (self.total_ms / self.steps), *floors.get(group, (None, "")),
                         dict(sorted(ops.items(), key=lambda kv: -kv[1]))))
        return rows


def where_time_goes(model_name, data, precisions, steps, rounds, max_len=20):
    """Profile minibert's training step as train.py takes it (the baseline preset: train_step with
    paper_loss and fused AdamW, batch 16, MASSIVE train batches in train.py's order for seed 0, each
    padded to its longest sentence) → (Peaks, {precision: Profile}). Each precision has its own
    model and optimizer; rounds alternate between them, with a try at the peaks before each round
    and after the last."""
    config = PRESETS["baseline"].override(model=model_name, max_len=max_len)
    runs = {}
    for precision in precisions:
        model, _, tokenizer = build_models(config, data, rank=0, world=1)
        keep_word_gradient(model.encoder)  # as train.py does on the CPU
        runs[precision] = (model, optimizer_for(model, None, config, False, torch.device("cpu")),
                           autocast_for(precision), Profile(precision))
    encoder_config = model.encoder.config
    train = encode(tokenizer, data.train, data.label_ids(data.train), max_len)
    intents = torch.tensor(data.intent_ids(data.train))
    order = batch_order(train, config.batch_size, torch.Generator().manual_seed(config.seed * 1000))
    batches = [Batch(*train.batch(i), intents[i]) for i in order[:WARMUP + steps * rounds]]
    weights = [p.numel() for g in runs[precisions[0]][1].param_groups for p in g["params"]]
    peaks = Peaks(encoder_config, precisions, weights=weights)
    for model, optimizer, autocast, result in runs.values():
        result.weights = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        model.train()
        for batch in batches[:WARMUP]:
            train_step(model, optimizer, batch, paper_loss, config.max_grad_norm, autocast)
    for r in range(rounds):
        peaks.measure()
        part = batches[WARMUP + r * steps: WARMUP + (r + 1) * steps]
        for model, optimizer, autocast, result in runs.values():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                for batch in part:
                    train_step(model, optimizer, batch, paper_loss, config.max_grad_norm, autocast)
                seconds = time.perf_counter() - started
            result.add(prof, seconds, len(part))
            result.flops += sum(matmul_flops(encoder_config, b.input_ids) for b in part)
    peaks.measure()
    return peaks, {precision: run[3] for precision, run in runs.items()}


def print_profile(model_name, peaks, profiles, max_len=20):
    print(f"cpu: {cpu_model()}, {platform.machine()}; {cpu_flags()}")
    print(f"minibert's training step (train_step, paper_loss, fused AdamW), {model_name}, batch 16, max length "
          f"{max_len}, MASSIVE train batches in train.py's order, cpu, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(peaks.describe())
    print("self CPU time of the step's operators by group; an operator counts with the first of itself and its "
          "callers that a group names. floor: the group's work at this machine's peak")
    for result in profiles.values():
        step = result.total_ms / result.steps
        print(f"\n{result.precision}: {result.steps} steps after {WARMUP} warm-up, operators' self CPU "
              f"{step:.1f} ms/step (wall under the profiler {result.wall_ms / result.steps:.1f} ms/step)")
        print(f"  {'group':<20} {'ms/step':>8} {'share':>7} {'floor ms':>9}  floor counted as; the group's largest "
              f"operators, ms/step")
        for group, ms, share, floor, how, ops in result.rows(peaks):
            largest = ", ".join(f"{name.removeprefix('aten::')} {t:.1f}" for name, t in list(ops.items())[:4])
            floor = "-" if floor is None else f"{floor:.1f}"
            print(f"  {group:<20} {ms:8.1f} {share:6.1f} % {floor:>9}  {how + '; ' if how else ''}{largest}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 15; --profile 5)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --profile 2)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--data", default=None)
    p.add_argument("--profile", action="store_true",
                   help="profile minibert's own step instead: where its time goes, by group of operators")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = load_massive(args.data)
    if args.profile:
        peaks, profiles = where_time_goes(args.model, data, args.precision, args.steps or 5, args.rounds or 2)
        print_profile(args.model, peaks, profiles)
        return
    compare(args, data, args.steps or 15, args.rounds or 3)


if __name__ == "__main__":
    main()
