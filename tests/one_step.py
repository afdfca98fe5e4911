"""One batch's gradients as train.py computes them, saved by the first process.

    python tests/one_step.py OUT.safetensors [train.py flags]
    torchrun --nproc_per_node 2 tests/one_step.py OUT.safetensors [train.py flags]

The batch is the last 5 training sentences: a ragged last batch, which two processes share
unevenly (3 and 2 sentences), so a per-process mean in place of the batch's mean shows.
"""

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    run = train.setup(train.parse_args(argv))
    n = len(run.splits["train"])
    run.trained.train()
    loss, _, _ = train.batch_loss(run, torch.arange(n - 5, n), contrastive_stage=False)
    loss.backward()
    world = run.world
    if run.main_process:
        save_file({name: p.grad for name, p in run.model.named_parameters() if p.grad is not None}, out)
    if world > 1:
        # Leave together, and let go of the DDP wrapper first: gloo work still referenced while
        # the interpreter shuts down can abort the process after the work is done.
        del run, loss
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
