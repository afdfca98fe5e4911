"""Amazon MASSIVE 1.1, en-US (FitzGerald et al. 2022, CC BY 4.0): utterances and their scenarios.

One JSON object per line; the split is its `partition` field (train 11,514 / dev 2,033 /
test 2,974), the label its `scenario` (18 of them), or its `intent` (60) with `--labels intent`.

    python -m minibert.data     # puts en-US.jsonl in data/massive/ (MASSIVE_JSONL=... to copy one)
"""

import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .fetch import DownloadError, check_sha256, download

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = ROOT / "data" / "massive" / "en-US.jsonl"
JSONL_SHA256 = "c70f75c6a543a26e249ec383df67733ad9b1066f6c0406c2e04a3f03356e407e"
TARBALL_URL = "https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz"
TARBALL_SHA256 = "4cba5faa11c71437928e17cb1b9b3d8b8e727e7ea363a3a9a8045e19c0491577"
TARBALL_MEMBER = "1.1/data/en-US.jsonl"

SCENARIOS = (
    "alarm", "audio", "calendar", "cooking", "datetime", "email", "general", "iot", "lists",
    "music", "news", "play", "qa", "recommendation", "social", "takeaway", "transport", "weather",
)
SPLITS = ("train", "dev", "test")
FIELDS = ("partition", "scenario", "intent", "utt")


@dataclass(frozen=True)
class Example:
    text: str
    scenario: str
    intent: str
    id: str = ""  # the record's `id`, so that a prediction can be traced back to its line


@dataclass(frozen=True)
class Massive:
    train: list
    dev: list
    test: list
    labels: tuple  # label names; an example's label is its index here

    def split(self, name):
        return getattr(self, name)

    def label_ids(self, examples, kind):
        index = {name: i for i, name in enumerate(self.labels)}
        return [index[getattr(e, kind)] for e in examples]

    @property
    def intents(self):
        """Every intent any split names, sorted: so that a small file whose dev or test holds an
        intent its train split lacks still maps every example."""
        return tuple(sorted({e.intent for split in (self.train, self.dev, self.test) for e in split}))

    def intent_ids(self, examples):
        index = {name: i for i, name in enumerate(self.intents)}
        return [index[e.intent] for e in examples]

    def intent_groups(self):
        """For each intent, the index of its scenario among the labels (scenario labels only)."""
        scenario = {e.intent: e.scenario for split in (self.train, self.dev, self.test) for e in split}
        return [self.labels.index(scenario[intent]) for intent in self.intents]


@dataclass(frozen=True)
class Encoded:
    """A split, tokenized once: ids padded to max_len, so a batch is a slice of rows, cut to the
    longest row it holds (the [CLS] output does not depend on padding beyond that)."""

    input_ids: torch.Tensor  # (N, max_len)
    lengths: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)

    def __len__(self):
        return len(self.labels)

    def batch(self, index, pad_to=None):
        """→ input_ids (B, T), attention_mask (B, T) or None, labels (B,). T is the longest row's
        length, or `pad_to` for a fixed shape. The mask is None when no row is padded: decided
        here, on the host, so that the model never asks the device (see attention_keys)."""
        lengths = self.lengths[index]
        T = pad_to or int(lengths.max())
        input_ids = self.input_ids[index, :T]
        attention_mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T)
        if pad_to is None and bool((lengths == T).all()):
            attention_mask = None
        return input_ids, attention_mask, self.labels[index]


def to_device(tensors, device):
    """A batch's tensors → `device`, leaving a None (an unpadded batch's mask) as it is."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in tensors)


def encode(tokenizer, examples, label_ids, max_len):
    ids = tokenizer.encode([e.text for e in examples], max_len=max_len)
    input_ids = torch.full((len(ids), max_len), tokenizer.pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
    return Encoded(input_ids, torch.tensor([len(r) for r in ids]), torch.tensor(label_ids))


def batch_order(encoded, batch_size, generator, bucket=False):
    """One epoch's batches as index tensors: a seeded shuffle, cut into batch_size pieces.

    With `bucket`, each run of 50 batches is sorted by length before it is cut, and the batches
    are shuffled again, so a batch holds sentences of similar length and pads little. The
    examples seen per epoch are the same; only who shares a batch changes."""
    order = torch.randperm(len(encoded), generator=generator)
    if bucket:
        chunk = 50 * batch_size
        pieces = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            pieces.append(part[torch.argsort(encoded.lengths[part], stable=True)])
        batches = list(torch.cat(pieces).split(batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return list(order.split(batch_size))


def data_path(path=None):
    """The jsonl to read: the argument, else $MASSIVE_JSONL, else data/massive/en-US.jsonl."""
    return Path(path or os.environ.get("MASSIVE_JSONL") or DEFAULT_PATH)


def load_massive(path=None, labels="scenario"):
    """Read and validate the file; every problem is reported with its file and line."""
    if labels not in ("scenario", "intent"):
        raise ValueError(f"labels must be 'scenario' or 'intent', not {labels!r}")
    path = data_path(path)
    if not path.exists():
        raise ValueError(f"{path}: no MASSIVE data here; run `make data`, or pass --data (or set "
                         "MASSIVE_JSONL to) the en-US.jsonl of MASSIVE 1.1")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a file; pass --data (or set MASSIVE_JSONL to) the "
                         "en-US.jsonl file of MASSIVE 1.1")
    splits = {name: [] for name in SPLITS}
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                where = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line); is this "
                                     "MASSIVE's en-US.jsonl?") from None
                if not line.strip():
                    continue
                example, partition = parse_line(line, where)
                splits[partition].append(example)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    for name, examples in splits.items():
        if not examples:
            raise ValueError(f"{path}: no {name} examples (is the file empty or truncated?); run "
                             "`make data` again, or pass another --data file")
    data = Massive(**splits, labels=SCENARIOS)
    return data if labels == "scenario" else replace(data, labels=data.intents)


def parse_line(line, where):
    """One line of the file → (Example, partition), or a ValueError that names `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}; column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for field in FIELDS:
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: missing or non-string field {field!r}")
    if record["partition"] not in SPLITS:
        raise ValueError(f"{where}: unknown partition {record['partition']!r} "
                         f"(expected one of {', '.join(SPLITS)})")
    if record["scenario"] not in SCENARIOS:
        raise ValueError(f"{where}: unknown scenario {record['scenario']!r} (MASSIVE has {', '.join(SCENARIOS)})")
    if not record["intent"].startswith(record["scenario"] + "_"):
        raise ValueError(f"{where}: intent {record['intent']!r} is not of scenario "
                         f"{record['scenario']!r}")
    example = Example(record["utt"], record["scenario"], record["intent"], str(record.get("id", "")))
    return example, record["partition"]


def fetch_massive(dest=None, source=None, url=TARBALL_URL, tarball_sha256=TARBALL_SHA256):
    """Put a verified en-US.jsonl at `dest`: copied from `source` (or $MASSIVE_JSONL), else
    extracted from the official tarball, which is verified first."""
    dest = Path(dest or DEFAULT_PATH)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = source or os.environ.get("MASSIVE_JSONL")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staged = Path(tmp) / dest.name
        if source:
            try:
                shutil.copyfile(source, staged)
            except OSError as e:
                raise ValueError(f"{source}: cannot copy it ({e.strerror}); set MASSIVE_JSONL to the "
                                 "en-US.jsonl of MASSIVE 1.1, or unset it to download the data") from None
        else:
            try:
                tarball = download(url, Path(tmp) / "massive.tar.gz", tarball_sha256, timeout=30.0)
            except DownloadError as e:
                raise DownloadError(f"{e}; check the network, or set MASSIVE_JSONL to a copy of MASSIVE 1.1's "
                                    "en-US.jsonl") from None
            with tarfile.open(tarball) as tar:
                member = tar.getmember(TARBALL_MEMBER)
                with tar.extractfile(member) as src, open(staged, "wb") as out:
                    shutil.copyfileobj(src, out)
        check_sha256(staged, JSONL_SHA256, source or f"{url}:{TARBALL_MEMBER}")
        os.replace(staged, dest)
    return dest


if __name__ == "__main__":
    try:
        print(fetch_massive())
    except (DownloadError, ValueError, OSError) as e:
        sys.exit(f"minibert.data: could not put MASSIVE in place: {e}")
