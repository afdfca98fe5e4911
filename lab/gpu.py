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
  graph, capturable fused AdamW with the learning rate on the device.

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
from minibert.fast import Replay
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


def minibert(config, lora_r=0):
    encoder = BertModel(config, with_pooler=False)
    if lora_r:
        apply_lora(encoder, lora_r, 8.0)
    return ScenarioClassifier(encoder, N_LABELS)


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


def profile(step, data, device, top=12):
    """Where one step's time goes: the kernels (GPU) or operators (CPU) of a few steps, by total
    time, and how many ran per step. A graph's replay runs every recorded kernel, so on a GPU
    this is the list to shorten."""
    from torch.profiler import ProfilerActivity, profile as profiler

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profiler(activities=[activity]) as prof:
        timed(step, data, device)
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == (device.type == "cuda")]
    time_of = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    calls = sum(e.count for e in events) / len(data)
    total = sum(time_of(e) for e in events) / len(data)
    print(f"\nprofile of {len(data)} steps: {calls:.0f} kernels or operators per step, {total / 1000:.2f} ms of "
          f"their time per step; the {top} largest:")
    for e in sorted(events, key=time_of, reverse=True)[:top]:
        print(f"  {time_of(e) / len(data) / 1000:7.3f} ms/step {e.count / len(data):5.0f} calls/step  {e.key[:90]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, graph recording)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide encoder: checks the script on any device")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--profile", action="store_true", help="also profile minibert's fast step: its kernels by time")
    p.add_argument("--compile-fast", action="store_true",
                   help="also time minibert's fast path with the model compiled inside the graph (experimental)")
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

    def make_train(name):
        lora = 20 if "LoRA" in name else 0
        if name.startswith("transformers") or name.startswith("peft"):
            model = HFClassifier(hf_encoder(config, lora), H).to(device)
            return trainer(model, device, fast=False, compile_model="compile" in name)
        model = minibert(config, lora).to(device)
        return trainer(model, device, fast="fast" in name, compile_model="compile" in name)

    full = ["transformers, SDPA, torch.compile" if compile_ok else "transformers, SDPA", "minibert eager",
            "minibert fast (CUDA graph)", *(["minibert fast, torch.compile (CUDA graph)"] if args.compile_fast else [])]
    lora = ["peft LoRA r=20", "minibert LoRA r=20 eager", "minibert LoRA r=20 fast (CUDA graph)"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {'tiny' if args.tiny else 'bert-base-uncased'} config, random "
          f"weights, batch 16, length 20, bf16 autocast, fused AdamW; median of {args.rounds} rounds of "
          f"{args.steps} steps\n")
    results = {}
    for group in (full, lora):
        systems = build(group, make_train)
        results.update(measure(systems, train_data, args.warmup, args.steps, args.rounds, device))
        del systems
    print("\ntraining step:")
    for group in (full, lora):
        reference = results.get(group[0])
        for name in group:
            if name in results:
                ratio = f"{reference / results[name]:6.2f}x" if reference else "   -"
                print(f"  {name:<40} {1000 * results[name]:7.2f} ms/step {16 / results[name]:9.0f} samples/s {ratio}")

    eval_data = batches(config, 5 + 2 * args.rounds, 256, 20, device, seed=1)

    def make_eval(name):
        if name.startswith("transformers"):
            return evaluator(HFClassifier(hf_encoder(config), H).to(device), device, False, "compile" in name)
        return evaluator(minibert(config).to(device), device, fast="fast" in name)

    names = ["transformers, SDPA", *(["transformers, SDPA, torch.compile"] if compile_ok else []),
             "minibert eager", "minibert fast (CUDA graph)"]
    evals = measure(build(names, make_eval), eval_data, 5, 2, args.rounds, device)
    reference = min((v for k, v in evals.items() if k.startswith("transformers")), default=None)
    print("\nevaluation, batch 256, length 20 (ratio against transformers' faster row):")
    for name, seconds in evals.items():
        ratio = f"{reference / seconds:6.2f}x" if reference else "   -"
        print(f"  {name:<40} {1000 * seconds:7.2f} ms/batch {256 / seconds:9.0f} samples/s {ratio}")
    if args.profile:
        step = make_train("minibert fast (CUDA graph)")
        timed(step, train_data[:args.warmup], device)
        profile(step, train_data[args.warmup:args.warmup + 5], device)
    if device.type == "cuda":
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
