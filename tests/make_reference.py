"""Write the reference outputs in tests/reference/ with the reference libraries.

    make reference        (or: python tests/make_reference.py)

Needs the `reference` extra (transformers, peft, pytorch-metric-learning) and the
all-MiniLM-L6-v2 weights (`make weights MODEL=all-MiniLM-L6-v2`). The parity tests read these
files, so they pass without transformers; with it installed they also recompute the same cases live.

Outputs are computed in float64, so that what is stored does not depend on the CPU that wrote it
(kernels differ in rounding, ~1e-6 in float32 but ~1e-14 in float64). The checkpoints and other
inputs stay float32; converting them to float64 is exact. The random weights themselves may come
out different in the last bit on another CPU (torch's vectorised random number kernels), so every
file is rewritten together, in the order below: the LoRA reference loads the tiny_odd checkpoint
written first.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import cases  # noqa: E402

OUT = Path(__file__).resolve().parent / "reference"


def save_tiny_checkpoint(case):
    """A random transformers BertModel of odd sizes, saved as a model folder, with its outputs."""
    folder = OUT / case.name
    folder.mkdir(parents=True, exist_ok=True)
    hf = cases.tiny_hf_model(case)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if case.bert_layout:
        state = cases.to_bert_base_layout(state, hf.config)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict(), indent=1))
    (folder / "vocab.txt").write_text("\n".join(cases.tiny_vocab(case.vocab_size)) + "\n")
    inputs = cases.tiny_inputs(case)
    save_file({**inputs, **cases.hf_outputs(hf.double(), inputs)}, folder / "io.safetensors")


def save_minilm(folder):
    """The real model on real sentences. Its outputs are computed in float64 and stored rounded
    to float32 (a change of at most 3e-7, far inside the float32 test's tolerance), which keeps
    the file half the size."""
    from transformers import BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(folder)
    batch = tokenizer(cases.SENTENCES, truncation=True, max_length=cases.MAX_LEN, padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "token_type_ids": batch["token_type_ids"]}
    hf = BertModel.from_pretrained(folder).eval().double()
    outputs = {name: value.float() for name, value in cases.hf_outputs(hf, inputs).items()}
    save_file({**inputs, **outputs}, OUT / "minilm.safetensors")


def main():
    OUT.mkdir(exist_ok=True)
    for case in cases.TINY:
        save_tiny_checkpoint(case)
    save_minilm(cases.minilm_folder())
    for name, make in cases.EXTRA_REFERENCES.items():
        save_file(make(), OUT / f"{name}.safetensors")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
