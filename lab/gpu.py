"""GPU training and evaluation speed: minibert's eager and fast paths against transformers' best
mode and peft's LoRA, in one process, on one GPU.

    python -m lab.gpu                 # bert-base-uncased's shapes, random weights, batch 16, length 20
    python -m lab.gpu --steps 50 --rounds 5

Every system trains the paper's classifier (the [CLS] vector, dropout 0.9, the 10-unit head) on
the same batches: 16 sentences of random word-pieces, each 5 to 20 long, padded to 20, in bf16
autocast with fused AdamW. The encoder is bert-base-uncased's configuration with random weights
(speed does not depend on the values; nothing is downloaded). A step is forward, cross-entropy,
backward and AdamW; no clipping on either side.

- transformers, best mode: BertModel with SDPA attention, compiled with torch.compile (default
  mode). The full fine-tuning rows are compared with it.
- peft LoRA r=20 on query and value, over the same BertModel, eager, as peft's users run it. The
  LoRA rows are compared with it.
- minibert eager: the same loop as train.py --no-fast.
- minibert fast: train.py's fast path (minibert/fast.py): the whole step replayed from one CUDA
  graph, capturable fused AdamW with the learning rate on the device; as train.py runs it on a
  GPU (the last row of each group), with query, key and value as one product and each encoder
  layer compiled by torch.compile; the row between has the first change alone.

Evaluation: forward passes at batch 256, length 20, bf16, no gradients; minibert fast replays
the forward from a CUDA graph. Rounds alternate between systems; the median round is reported.
The figures are wall-clock times between device synchronisations.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from minibert.classifier import ScenarioClassifier
from minibert.fast import Replay, for_the_graph
from minibert.lora import apply_lora
from minibert.model import BertConfig, BertModel

N_LABELS = 18


class HFClassifier(nn.Module):
    """The paper's classifier around a transformers (or peft) encoder."""

    def __init__(self, encoder, hidden_size):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(0.9)
        self.head = nn.Sequential(nn.Linear(hidden_size, 10), nn.ReLU(), nn.Linear(10, N_LABELS))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(hidden[:, 0]))


def hf_encoder(config, lora_r=0):
    import transformers

    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k != "pad_token_id"},
                                        attn_implementation="sdpa")
    encoder = transformers.BertModel(hf_config, add_pooling_layer=False)
    if lora_r:
        import peft

        encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=lora_r, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=["query", "value"]))
    return encoder


def minibert(config, lora_r=0, fused_qkv=False, compiled=False):
    encoder = BertModel(config, with_pooler=False)
    if lora_r:
        apply_lora(encoder, lora_r, 8.0)
    if fused_qkv:  # as train.py's fast path on a GPU, compiled or not
        for_the_graph(encoder, compile=compiled)
    return ScenarioClassifier(encoder, N_LABELS)


def minibert_options(name):
    """A minibert row's name → minibert()'s keyword arguments."""
    return {"fused_qkv": "fused QKV" in name, "compiled": "compiled" in name}


def trainer(model, device, fast, compile_model=False):
    """→ step(input_ids, attention_mask, labels): one training step, as train.py takes it."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = torch.tensor(1e-4, device=device) if fast else 1e-4
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True, capturable=fast)
    forward = torch.compile(model) if compile_model else model
    total = torch.zeros((), device=device)

    def step(input_ids, attention_mask, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not fast):
            loss = F.cross_entropy(forward(input_ids, attention_mask).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach())  # summed on the device, as train.py does; read once at the end

    model.train()
    return Replay(step, device) if fast else step


def evaluator(model, device, fast, compile_model=False):
    forward = torch.compile(model) if compile_model else model

    @torch.no_grad()
    def predict(input_ids, attention_mask, labels=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not fast):
            return forward(input_ids, attention_mask)

    model.eval()
    return Replay(predict, device) if fast else predict


def batches(config, n, batch_size, length, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, config.vocab_size, (n, batch_size, length), generator=g)
    lengths = torch.randint(5, length + 1, (n, batch_size, 1), generator=g)
    attention_mask = (torch.arange(length) < lengths).long()
    labels = torch.randint(0, N_LABELS, (n, batch_size), generator=g)
    return [tuple(t[i].to(device) for t in (input_ids * attention_mask, attention_mask, labels)) for i in range(n)]


def timed(run, data, device):
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    started = time.perf_counter()
    for batch in data:
        run(*batch)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return time.perf_counter() - started


def measure(systems, data, warmup, steps, rounds, device):
    """systems: name → callable. → name → median seconds per call."""
    for name, run in list(systems.items()):
        started = time.perf_counter()
        try:
            timed(run, data[:warmup], device)  # compiles, records graphs, warms caches
        except Exception as e:  # e.g. a compiler that cannot handle this version: reported, left out
            print(f"  {name}: failed in its first steps ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            del systems[name]
            continue
        print(f"  warmed up {name} ({time.perf_counter() - started:.1f} s)", flush=True)
    times = {name: [] for name in systems}
    for r in range(rounds):
        part = data[warmup + r * steps: warmup + (r + 1) * steps]
        for name, run in systems.items():
            times[name].append(timed(run, part, device) / len(part))
    return {name: statistics.median(t) for name, t in times.items()}


def build(names, make):
    """Each system that builds; one that fails is reported and left out, not fatal."""
    built = {}
    for name in names:
        try:
            built[name] = make(name)
        except Exception as e:  # a reference library's version or the device may lack a feature
            print(f"  {name}: cannot build ({type(e).__name__}: {e})")
    return built


# Kernel kinds by name, first match first: cuBLAS's and CUTLASS's matrix products, the fused
# attention kernels, the fused AdamW, Triton's generated kernels (torch.compile's fusions), then
# PyTorch's own kernels by what they do.
KINDS = (
    ("attention", ("fmha", "flash", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "splitk", "sm90_", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled (Triton, fused)", ("triton",)),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("dropout", ("dropout", "bernoulli", "philox")),
    ("copies and fills", ("copy", "memcpy", "memset", "fill", "cat", "index", "gather", "scatter", "embedding")),
    ("reductions", ("reduce",)),
    ("pointwise", ("elementwise", "vectorized", "unrolled")),
)


def kind_of(kernel):
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "other")


def kernel_profile(run, data, device):
    """→ [(kernel name, calls, µs)] of `run` over `data`: the profiler's CUDA kernels on a GPU (their
    device time), its operators elsewhere (their own CPU time; a check of the script only)."""
    from torch.profiler import ProfilerActivity, profile as profiler

    cuda = device.type == "cuda"
    with profiler(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        timed(run, data, device)
    return [(e.key, e.count, e.device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()
            if (e.device_type.name == "CUDA") == cuda and e.count]


def profile(name, replay, data, device, top=10):
    """Where one fast step's time goes. The recorded step is run eagerly (the kernels the graph
    holds, one launch each) and replayed; both are profiled. Kernels by kind: count and device
    time per step; then the largest kernels; then the replay's wall time against the sum of its
    kernels' times (the difference: the gaps between kernels inside the graph)."""
    n = len(data)
    eager = kernel_profile(replay.function, data, device)
    graph = kernel_profile(replay, data, device)
    wall = timed(replay, data, device) / n
    print(f"\nprofile of {name}, {n} steps, per step:")
    for label, kernels in (("run eagerly", eager), ("replayed", graph)):
        print(f"  {label}: {sum(c for _, c, _ in kernels) / n:.0f} kernels, "
              f"{sum(t for _, _, t in kernels) / n / 1000:.3f} ms of kernel time")
    # The profiler sees a replay's kernels one by one with a recent CUPTI; where it does not (a
    # handful of graph launches), the eager run's kernels, the same ones, stand in.
    kernels = graph if sum(c for _, c, _ in graph) >= sum(c for _, c, _ in eager) / 2 else eager
    by_kind = {}
    for key, count, time_us in kernels:
        calls, total = by_kind.get(kind_of(key), (0, 0.0))
        by_kind[kind_of(key)] = (calls + count, total + time_us)
    print(f"  by kind ({'replayed' if kernels is graph else 'run eagerly'}):")
    for kind, (calls, total) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"    {kind:<26} {calls / n:6.0f} kernels {total / n / 1000:7.3f} ms")
    print(f"  the {top} largest kernels:")
    for key, count, time_us in sorted(kernels, key=lambda k: -k[2])[:top]:
        print(f"    {time_us / n / 1000:7.3f} ms {count / n:5.0f} calls  {key[:100]}")
    busy = sum(t for _, _, t in kernels) / n / 1e6
    print(f"  replay wall time {1000 * wall:.3f} ms; kernels busy {1000 * busy:.3f} ms; between kernels "
          f"{1000 * (wall - busy):.3f} ms over {sum(c for _, c, _ in kernels) / n:.0f} kernels")


def limits(device, config):
    """The machine's measured ceilings, and what they make the floor of one step: the matrix
    work at the bf16 matmul rate, the optimizer's memory traffic at the copy bandwidth."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    matmul = timed(lambda: a @ a, [()] * 10, device) / 10
    tflops = 2 * 8192**3 / matmul / 1e12
    big = torch.empty(2**30, device=device, dtype=torch.float32)  # 4 GiB
    copy = timed(lambda: big.clone(), [()] * 5, device) / 5
    bandwidth = 2 * big.numel() * 4 / copy / 1e12  # read and write
    del a, big
    torch.cuda.reset_peak_memory_stats(device)  # the peak reported at the end is the systems', not these buffers'
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = 16 * 20
    flops = 3 * 2 * tokens * L * (4 * H * H + 2 * H * I)  # forward + backward (twice the forward)
    params = sum(p.numel() for p in BertModel(config, with_pooler=False).parameters())
    adam_bytes = params * 4 * 7  # fp32: read weight, grad, m, v; write weight, m, v
    print(f"measured: bf16 matmul {tflops:.0f} TFLOP/s (8192^3), copy {bandwidth:.2f} TB/s (4 GiB)")
    print(f"a step's floor: matrix work {flops / 1e9:.0f} GFLOP = {flops / tflops / 1e9:.3f} ms; AdamW over "
          f"{params / 1e6:.0f} M fp32 weights {adam_bytes / 1e9:.1f} GB = {adam_bytes / bandwidth / 1e9:.3f} ms\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, graph recording)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide encoder: checks the script on any device")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out, on both sides")
    p.add_argument("--profile", action="store_true", help="also profile minibert's fast steps: their kernels by kind")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("lab/gpu.py: no CUDA GPU here; --device cpu --tiny checks the script on the CPU")
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) \
        if args.tiny else BertConfig()  # BertConfig's defaults are bert-base-uncased's
    compile_ok = not args.no_compile
    torch.manual_seed(0)
    n = args.warmup + args.steps * args.rounds
    train_data = batches(config, n, 16, 20, device)
    H = config.hidden_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {'tiny' if args.tiny else 'bert-base-uncased'} config, random "
          f"weights, batch 16, length 20, bf16 autocast, fused AdamW; median of {args.rounds} rounds of "
          f"{args.steps} steps\n")
    if device.type == "cuda":
        limits(device, config)

    def make_train(name):
        lora = 20 if "LoRA" in name else 0
        if name.startswith("transformers") or name.startswith("peft"):
            model = HFClassifier(hf_encoder(config, lora), H).to(device)
            return trainer(model, device, fast=False, compile_model="compile" in name)
        model = minibert(config, lora, **minibert_options(name)).to(device)
        return trainer(model, device, fast="fast" in name)

    fast = "minibert fast (CUDA graph)"
    fastest = "minibert fast, fused QKV, compiled" if compile_ok else "minibert fast, fused QKV"
    full = ["transformers, SDPA, torch.compile" if compile_ok else "transformers, SDPA", "minibert eager", fast,
            "minibert fast, fused QKV", *([fastest] if compile_ok else [])]
    lora = ["peft LoRA r=20", "minibert LoRA r=20 eager", "minibert LoRA r=20 fast",
            *(["minibert LoRA r=20 fast, fused QKV, compiled"] if compile_ok else [])]
    results = {}
    for group in (full, lora):
        systems = build(group, make_train)
        results.update(measure(systems, train_data, args.warmup, args.steps, args.rounds, device))
        del systems
    print("\ntraining step (the fast rows replay one CUDA graph; ratio against the group's first row):")
    for group in (full, lora):
        reference = results.get(group[0])
        for name in group:
            if name in results:
                ratio = f"{reference / results[name]:6.2f}x" if reference else "   -"
                print(f"  {name:<46} {1000 * results[name]:7.2f} ms/step {16 / results[name]:9.0f} samples/s {ratio}")

    if args.profile:  # the fast step before and after the changes of minibert/fast.py
        for name in dict.fromkeys([fast, fastest]):
            step = make_train(name)
            timed(step, train_data[:args.warmup], device)
            profile(name, step, train_data[args.warmup:args.warmup + 5], device)

    eval_data = batches(config, 5 + 2 * args.rounds, 256, 20, device, seed=1)

    def make_eval(name):
        if name.startswith("transformers"):
            return evaluator(HFClassifier(hf_encoder(config), H).to(device), device, False, "compile" in name)
        return evaluator(minibert(config, **minibert_options(name)).to(device), device, fast="fast" in name)

    names = ["transformers, SDPA", *(["transformers, SDPA, torch.compile"] if compile_ok else []),
             "minibert eager", fast, "minibert fast, fused QKV", *([fastest] if compile_ok else [])]
    evals = measure(build(names, make_eval), eval_data, 5, 2, args.rounds, device)
    reference = min((v for k, v in evals.items() if k.startswith("transformers")), default=None)
    print("\nevaluation, batch 256, length 20 (ratio against transformers' faster row):")
    for name, seconds in evals.items():
        ratio = f"{reference / seconds:6.2f}x" if reference else "   -"
        print(f"  {name:<46} {1000 * seconds:7.2f} ms/batch {256 / seconds:9.0f} samples/s {ratio}")
    if device.type == "cuda":
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
