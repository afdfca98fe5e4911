"""Where a run computes, and in what precision: decided once, at the start, by train.py and
evaluate.py; the model code never asks.

    device      auto → cuda, then mps, then the CPU
    processes   torchrun's WORLD_SIZE; several join one process group (NCCL or gloo)
    precision   auto → bf16 autocast where the device runs bf16 natively and it pays off, else fp32
    fast path   on for one GPU process in bf16 or fp32 (minibert/fast.py), its layers compiled
"""

import argparse
import os
import platform
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


def add_device_flags(parser):
    """train.py's flags for where and how a run computes: --device, --fast, --compile."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto (the default): cuda, then mps, then cpu")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="the fast path: batches padded to --max-len, nothing that waits for the device, and on a "
                             "GPU the whole step replayed from one CUDA graph (on the CPU the same step runs eagerly). "
                             "Default: on for one GPU process in bf16 or fp32, off elsewhere")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="on the GPU's fast path, compile each encoder layer with torch.compile (fewer, fused "
                             "kernels in the recorded step; the first steps of each shape wait for the compiler). "
                             "Default: on with the fast path on a GPU")


def pick_device(name):
    """auto, cpu, cuda or mps → a torch.device; auto takes cuda, then mps, then the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps, but torch sees no Apple GPU; use --device cpu or auto")
    return torch.device(name)


def world_size():
    """How many processes train: torchrun's WORLD_SIZE, 1 without it."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE={value!r}: not a number of processes; start several with "
                         "torchrun --nproc_per_node N train.py ..., or unset WORLD_SIZE")
    return int(value)


def setup_distributed(device):
    """→ (rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL between GPUs, each process on its own, gloo between CPU processes."""
    world = world_size()
    if world == 1:
        return 0, 1, device
    if not all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={world} but no RANK, LOCAL_RANK, MASTER_ADDR or MASTER_PORT: start several "
                         "processes with torchrun --nproc_per_node N train.py ..., or unset WORLD_SIZE")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def native_bf16(device):
    """Whether `device` runs bf16 matmuls in hardware, as torch reports it. Elsewhere bf16 is
    emulated, and on a CPU slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def bf16_pays_off(device):
    """Whether bf16 matmuls beat fp32 here, measured once (a few milliseconds). On a GPU that runs
    bf16 they do; a CPU may report the instructions and still run torch's bf16 kernels slower
    than its fp32 ones (the kernels differ between CPU generations and torch builds)."""
    if device.type != "cpu":
        return True
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)  # a BERT-base layer's matmul, 256 word-pieces

    def seconds(dtype):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # the first call pays for allocation
        started = time.perf_counter()
        for _ in range(5):
            x @ y
        return time.perf_counter() - started

    return seconds(torch.bfloat16) < seconds(torch.float32)


def pick_precision(device, name, world=1):
    """→ the precision's name: fp32, bf16 or fp16. auto: bf16 autocast where the device runs bf16
    natively and it pays off, fp32 elsewhere; under torchrun process 0 decides for all (a timing
    may come out otherwise in another process, and replicas must train alike)."""
    if name != "auto":
        return name
    chosen = ["bf16" if native_bf16(device) and bf16_pays_off(device) else "fp32"]
    if world > 1:
        dist.broadcast_object_list(chosen)  # process 0's
    return chosen[0]


def pick_fast(device, requested, precision, world):
    """--fast: None (the default) turns it on where it pays and works, one GPU process in bf16 or
    fp32; asked for where it cannot work, it is refused with the reason."""
    blockers = [why for why, applies in (
        ("--precision fp16 (its loss scaler reads the gradients' finiteness on the host every step)",
         precision == "fp16"),
        (f"{world} processes (the fast path runs in one)", world > 1)) if applies]
    if requested is None:
        return device.type == "cuda" and not blockers
    if requested and blockers:
        raise ValueError(f"--fast cannot run with {blockers[0]}; drop --fast or that setting")
    return requested


def pick_compile(device, requested, fast):
    """--compile: None (the default) compiles the encoder's layers wherever the step is recorded in
    a CUDA graph (the GPU's fast path); asked for elsewhere, it is refused."""
    if requested is None:
        return fast and device.type == "cuda"
    if requested and not (fast and device.type == "cuda"):
        raise ValueError("--compile works on a GPU's fast path only (--device cuda, --fast); drop --compile")
    return requested


def autocast_and_scaler(device, precision, fast):
    """→ (autocast factory, gradient scaler or None). fp16 has too little range for BERT's
    gradients without loss scaling; bf16 needs none. A CUDA graph replays the weights' bf16
    copies from the addresses it recorded, so the fast path keeps autocast's cache of them off."""
    if precision == "fp32":
        return nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=not fast), scaler


def device_name(device):
    """The device in words, for records: a GPU's name, or the CPU's model, kind and threads."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{device.type} ({platform.machine()})"


def cpu_model():
    """The CPU's model name as the operating system reports it (Linux's /proc/cpuinfo), so that
    records of different machines can be told apart."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory(device):
    if device.type == "cuda":
        return {"gpu_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale}
