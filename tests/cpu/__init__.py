"""Making minibert.device's hardware query answer as another kind of CPU (see sitecustomize.py)."""

import torch

import minibert.device

KINDS = ("native-bf16", "fp32-only")


def answer_as(kind, monkeypatch=None):
    """From now on the CPU is `kind`: the instruction query torch makes, and minibert.device's
    timing of bf16 against fp32, answer as they do on such a CPU. With pytest's `monkeypatch`,
    until the test ends; without it, for the rest of this process."""
    if kind not in KINDS:
        raise ValueError(f"MINIBERT_TESTS_CPU={kind!r}: one of {', '.join(KINDS)}")
    native = kind == "native-bf16"
    patch = monkeypatch.setattr if monkeypatch else setattr
    patch(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    patch(torch.cpu, "_is_amx_tile_supported", lambda: native)
    # On a native-bf16 CPU the timing finds bf16 faster (the records of such CPUs say so);
    # elsewhere it is never asked.
    patch(minibert.device, "bf16_pays_off", lambda device: native)


def this_machine():
    """The kind of CPU this process runs on (as the query answers now)."""
    return "native-bf16" if minibert.device.native_bf16(torch.device("cpu")) else "fp32-only"
