"""One batch's gradients as train.py computes them, saved by the first process.

    python tests/one_step.py OUT.safetensors [train.py flags]
    torchrun --nproc_per_node 2 tests/one_step.py OUT.safetensors [train.py flags]

The batch is the last 5 training sentences: a ragged last batch, which two processes share
unevenly (3 and 2 sentences), so a per-process mean in place of the batch's mean shows.

The head's dropout draws each sentence's mask from its own index in the data and the pass it
belongs to (R-Drop runs the batch twice), not from the process's random stream: one process and
two then drop the same units of every sentence, and with --drop-rate above 0 the gradients still
agree, R-Drop's consistency term included.
"""

import gc
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from tests import cases  # noqa: E402


class KeyedDropout(nn.Module):
    """Dropout whose mask for row j is drawn from a generator seeded by (sentence, pass): the rows
    are this process's sentences `ids`, once per pass, one pass after the other."""

    def __init__(self, p, ids):
        super().__init__()
        self.p, self.ids = p, ids.tolist()

    def forward(self, x):  # (passes · len(ids), H)
        if self.p == 0:
            return x
        masks = []
        for j in range(len(x)):
            sentence, which = self.ids[j % len(self.ids)], j // len(self.ids)
            g = torch.Generator().manual_seed(2 * sentence + which)
            masks.append((torch.rand(x.shape[1], generator=g) >= self.p).to(x.dtype))
        return x * torch.stack(masks).to(x.device) / (1 - self.p)


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("MINIBERT_PLANT"):  # a bug planted in this process too (tests/test_planted_bugs_training.py)
        getattr(importlib.import_module("tests.test_planted_bugs_training"), os.environ["MINIBERT_PLANT"])()
    run = train.setup(train.parse_args(argv))
    n = len(run.splits["train"])
    batch = torch.arange(n - 5, n)
    run.model.dropout = KeyedDropout(run.config.drop_rate, batch[run.rank::run.world])
    run.trained.train()
    loss, _, _ = cases.batch_loss(run, batch, contrastive_stage=False)
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
