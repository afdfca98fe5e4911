"""The fast path: every training step the same shape, nothing in it that waits for the device,
and on a GPU the whole step replayed from one CUDA graph.

A BERT step at the paper's shapes (batch 16, 20 word-pieces) holds well under a millisecond of
matrix work on a current GPU, yet eager PyTorch takes tens of milliseconds over it: it launches
about a thousand small kernels one by one from Python. A CUDA graph records those launches once
and replays them with one call. Recording asks three things of the step:

- fixed shapes and addresses: batches padded to max_len and copied into the same input tensors;
- no host synchronisation: loss and accuracy add up in device tensors, read at log time; the
  learning rate is a device tensor that AdamW reads; "is anything padded?" is answered on the
  host (Encoded.batch); the step never calls .item();
- an optimizer whose whole update runs on the device: AdamW with capturable=True.

A replay still runs every kernel the step launched, and at these shapes most of them are small
pointwise ones, each costing a few microseconds whatever its size. `for_the_graph` cuts their
number: query, key and value in one matrix product, and each encoder layer compiled by
torch.compile, which fuses bias, GELU, dropout, residual and LayerNorm into a few generated
kernels, forward and backward. The compiled kernels are recorded into the graph like any other.

On the CPU the same step function runs eagerly, so the path can be checked where no GPU is.
"""

from dataclasses import dataclass

import torch


def for_the_graph(encoder, compile=True):
    """Set up `encoder` (a BertModel) for a GPU's recorded step: each layer's query, key and value
    as one matrix product (Layer.fused_qkv), and with `compile`, each layer and the embeddings
    compiled for fixed shapes. Every layer shares one compiled graph (torch 2.5 and later); a new
    shape (an epoch's short last batch, evaluation's batch) or mode (train, eval) compiles once
    more, up to torch.compile's recompile limit, past which a shape runs eagerly. Weights and
    their names stay as they are."""
    for layer in encoder.layers:
        layer.fused_qkv = True
        if compile:
            layer.compile(dynamic=False)
    if compile:
        encoder.embeddings.compile(dynamic=False)


@dataclass(frozen=True)
class EpochBatches:
    """One epoch's batches on the device, every row padded to max_len: one copy per epoch, not
    one per step (a copy from pageable host memory waits for the device). Batch i is a slice."""

    input_ids: torch.Tensor  # (N, max_len), rows in the epoch's order
    attention_mask: torch.Tensor  # (N, max_len)
    labels: torch.Tensor  # (N,)
    intents: torch.Tensor  # (N,)
    starts: list  # batch i is rows starts[i]:starts[i + 1]

    @classmethod
    def build(cls, encoded, order, intents, device):
        rows = torch.cat(order)
        input_ids, attention_mask, labels = encoded.batch(rows, pad_to=encoded.input_ids.shape[1])
        starts = [0]
        for index in order:
            starts.append(starts[-1] + len(index))
        return cls(input_ids.to(device), attention_mask.to(device), labels.to(device), intents[rows].to(device),
                   starts)

    def __len__(self):
        return len(self.starts) - 1

    def __getitem__(self, i):
        """→ (input_ids, attention_mask, labels, intents) of batch i: views, no copy."""
        rows = slice(self.starts[i], self.starts[i + 1])
        return self.input_ids[rows], self.attention_mask[rows], self.labels[rows], self.intents[rows]


class Replay:
    """Calls `function(*inputs)` (a training step) and returns what it returns. On a GPU, the first
    `warmup` calls run eagerly on a side stream (the optimizer creates its state, cuBLAS its
    workspaces), the next one records the function into a CUDA graph, and from then on a call copies its inputs into the
    recorded ones and replays the graph; what it returns are then the recorded outputs, which the
    next replay overwrites. Every call must pass inputs of the recorded shapes; a batch of another
    shape (an epoch's last, short one) goes to `function` directly. Elsewhere every call runs eagerly."""

    def __init__(self, function, device, warmup=3):
        self.function, self.device, self.warmup = function, device, warmup
        self.calls = 0
        self.graph = None
        self.inputs = self.outputs = None

    def __call__(self, *inputs):
        self.calls += 1
        if self.device.type != "cuda":
            return self.function(*inputs)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.function(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing
                self.outputs = self.function(*self.inputs)
        self.refresh(inputs)
        self.graph.replay()
        return self.outputs

    def refresh(self, inputs):
        """Copy a call's inputs into the tensors the graph was recorded reading: all of them, or
        the replay computes with the last call's."""
        for recorded, x in zip(self.inputs, inputs, strict=True):
            recorded.copy_(x)

    @property
    def captured(self):
        return self.graph is not None
