"""A trained run as a Hugging Face BERT folder, for tools that load BERT the transformers way.

    python -m minibert export RUN FOLDER

FOLDER, new or empty, receives:

    config.json             the encoder's config under transformers' BertConfig names
    model.safetensors       the encoder's weights under transformers' names (NAME_TABLE read from
                            right to left); a LoRA run's updates merged in, W + (alpha / r) · B A
    vocab.txt               the run's word-pieces, line i holding id i
    tokenizer.json          the run's tokenizer, as train.py saved it
    tokenizer_config.json   what BertTokenizer needs beside vocab.txt: does it lowercase?
    head.safetensors        the classifier head's weights, under minibert's names
    head.json               its labels and settings, and how to apply it to the hidden states

`transformers.BertModel.from_pretrained(FOLDER)` then gives the run's hidden states, and the
folder is a minibert model folder too: weights.load_pretrained reads it as it reads weights/<name>/.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .lora import LoRALinear
from .runs import check_out, load_model, replace_atomically, save_tensors, save_tokenizer, write_json
from .weights import source_name

HEAD_FORMAT = "minibert-head/1"


def export_run(run_dir, folder):
    """Write the run in `run_dir` to `folder` (new, or empty) → folder. The files are written into
    a temporary folder beside it, renamed into place when all are there: a failed export leaves
    nothing behind."""
    folder = Path(folder)
    check_out(folder, "pass a new or empty folder to export to")
    inside = next((parent for parent in folder.parents if parent.is_file()), None)
    if inside:  # no folder can be made in a file
        raise ValueError(f"{folder}: {inside} is a file, not a folder; pass a new or empty folder to export to")
    model, tokenizer, meta = load_model(run_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_folder(tmp, Path(run_dir), model, tokenizer, meta)
        os.replace(tmp, folder)  # an empty folder is replaced by the full one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_folder(folder, run_dir, model, tokenizer, meta):
    encoder = model.encoder
    write_json(folder / "config.json", hf_config(encoder.config))
    # Keys bare, without `bert.`: the layout of transformers' BertModel, which BertFor* models read too.
    weights = {source_name(name): tensor for name, tensor in merged_state(encoder).items()}
    save_tensors(folder / "model.safetensors", weights, metadata={"format": "pt"})
    vocab = vocabulary(tokenizer, run_dir / "tokenizer.json")
    replace_atomically(folder / "vocab.txt", lambda tmp: Path(tmp).write_text("".join(t + "\n" for t in vocab),
                                                                             encoding="utf-8"))
    save_tokenizer(folder / "tokenizer.json", tokenizer)
    write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer, encoder.config))
    save_tensors(folder / "head.safetensors",
                 {name: t for name, t in model.state_dict().items() if not name.startswith("encoder.")})
    write_json(folder / "head.json", head_record(model, meta))


def hf_config(config):
    """minibert's BertConfig already uses transformers' field names (model.py); what transformers
    needs besides is the model type, and the fields it has that minibert keeps fixed."""
    return {"model_type": "bert", "architectures": ["BertModel"], **config.to_dict(),
            "position_embedding_type": "absolute", "initializer_range": 0.02}  # model.py's N(0, 0.02)


@torch.no_grad()
def merged_state(encoder):
    """The encoder's weights as a plain BertModel holds them: each LoRA module's update folded
    into its frozen weight, W + (alpha / r) · B A (lora.py), under the name of the Linear it wraps.
    The model is left as it was."""
    state = dict(encoder.state_dict())
    for name, module in encoder.named_modules():
        if isinstance(module, LoRALinear):
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            weight = state.pop(f"{name}.base.weight")
            state[f"{name}.weight"] = weight if module.merged else weight + module.delta().to(weight.dtype)
            state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    return state


def vocabulary(tokenizer, where):
    """The word-pieces in id order: vocab.txt gives each the id of its line, so no id may be missing."""
    by_id = sorted((i, token) for token, i in tokenizer.backend.get_vocab().items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise ValueError(f"{where}: the vocabulary's ids are not 0 to {len(by_id) - 1}, so no vocab.txt can "
                         "list them; the file is damaged: train the run again")
    return [token for _, token in by_id]


def tokenizer_config(tokenizer, config):
    """tokenizer_config.json, for BertTokenizer built from vocab.txt. Whether the tokenizer lowercases
    and strips accents is asked of its normalizer, not assumed: an uncased BERT does both."""
    normalizer = tokenizer.backend.normalizer
    normalize = normalizer.normalize_str if normalizer is not None else str
    return {"tokenizer_class": "BertTokenizer", "do_lower_case": normalize("A") == "a",
            "strip_accents": normalize("é") == "e", "model_max_length": config.max_position_embeddings}


def head_record(model, meta):
    """head.json: the head's settings and, in `apply`, each step from hidden states to label
    logits, as ScenarioClassifier computes them at inference (classifier.py)."""
    H, hidden_dim, outputs = model.head[0].in_features, model.head[0].out_features, model.head[2].out_features
    vector = {"cls": "x = last_hidden_state[:, 0], the [CLS] position",
              "mean": "x = the mean of last_hidden_state over the positions where attention_mask is 1"}
    apply = [
        "input_ids, attention_mask = the tokenizer's, truncated to max_len word-pieces with [SEP] kept last",
        f"last_hidden_state = BertModel(input_ids, attention_mask), (B, T, {H})",
        f"{vector[model.pooling]}, (B, {H})",
        "Dropout(drop_rate) in training only: nothing at inference",
        f"h = relu(x @ head.0.weight.T + head.0.bias), (B, {hidden_dim})",
        f"y = h @ head.2.weight.T + head.2.bias, (B, {outputs})",
    ]
    if model.groups is None:
        apply.append("y holds one logit per label, in the order of labels")
    else:
        apply.append("y holds one logit per finer class; groups[j] is the label of class j, and a label's logit "
                     "is the logsumexp of its classes' (its probability their sum; none: probability 0)")
    return {"format": HEAD_FORMAT, "labels": meta["labels"], "label_kind": meta["label_kind"], "groups": model.groups,
            "hidden_size": H, "hidden_dim": hidden_dim, "drop_rate": model.dropout.p, "pooling": model.pooling,
            "max_len": meta["max_len"], "apply": apply}
