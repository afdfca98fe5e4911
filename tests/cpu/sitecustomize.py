"""The tests' switch for the CPU kind, in every Python process they start. With MINIBERT_TESTS_CPU
set (tests/conftest.py sets it from `pytest --cpu`, and puts this folder first on PYTHONPATH),
the hardware query of minibert.device answers as that kind of CPU would, so that `train.py` or
torchrun started by a test picks the precision such a CPU picks:

    native-bf16   AVX512-BF16 or AMX (Sapphire Rapids, Zen 4 and later): bf16 is the default
    fp32-only     AVX2 and older: fp32 is the default

On a CPU without bf16 in hardware, torch emulates it: slower, with the same rounding. The
package itself never reads MINIBERT_TESTS_CPU."""

import os

if os.environ.get("MINIBERT_TESTS_CPU"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.cpu
    from tests.cpu import answer_as

    answer_as(os.environ["MINIBERT_TESTS_CPU"])
