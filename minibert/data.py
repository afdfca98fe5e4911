"""Amazon MASSIVE 1.1, en-US (FitzGerald et al. 2022, CC BY 4.0): utterances and their scenarios.

One JSON object per line; the split is its `partition` field (train 11,514 / dev 2,033 /
test 2,974), the label its `scenario` (18 of them), or its `intent` (60) with `--labels intent`.

    python -m minibert.data     # puts en-US.jsonl in data/massive/ (MASSIVE_JSONL=... to copy one)
"""

import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
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
    label: str  # what the run classifies: MASSIVE's scenario (or its intent, with --labels intent)
    intent: str = ""  # MASSIVE's intent; "" in data of your own
    id: str = ""  # where the example came from (MASSIVE's `id`, a file's line), to trace a prediction back


@dataclass(frozen=True)
class Dataset:
    train: list
    dev: list
    test: list
    labels: tuple  # label names; an example's label is its index here

    def split(self, name):
        return getattr(self, name)

    def label_ids(self, examples):
        index = {name: i for i, name in enumerate(self.labels)}
        return [index[e.label] for e in examples]

    @property
    def has_intents(self):
        """Whether every example names an intent of its label (MASSIVE), for the levers that use them."""
        return all(e.intent for split in (self.train, self.dev, self.test) for e in split)

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
        scenario = {e.intent: e.label for split in (self.train, self.dev, self.test) for e in split}
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
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may begin it
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
            fix = "run `make data` again, or pass another --data file" if path == DEFAULT_PATH else \
                "pass --data MASSIVE's en-US.jsonl, or a CSV, TSV or JSONL of labelled sentences of your own"
            raise ValueError(f"{path}: no {name} examples (is the file empty or truncated?); {fix}")
    data = Dataset(**splits, labels=SCENARIOS)
    if labels == "scenario":
        return data
    as_intents = {name: [replace(e, label=e.intent) for e in examples] for name, examples in splits.items()}
    return Dataset(**as_intents, labels=data.intents)


def parse_line(line, where):
    """One line of the file → (Example, partition), or a ValueError that names `where`."""
    record = json_object(line, where, "a JSON object")
    for key in FIELDS:
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: missing or non-string field {key!r}")
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


# ---- labelled sentences of your own: CSV, TSV or JSONL ------------------------------------------

def option(default, help):
    """A Source field and its flag: --name-with-dashes, with this help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Source:
    """Where a run's sentences come from: MASSIVE (the default), or a file of your own with a text
    and a label column, split by a column, by separate dev and test files, or at random."""

    path: str | None = None  # --data; None: $MASSIVE_JSONL or data/massive/en-US.jsonl
    text_column: str = option("text", "the sentences' column")
    label_column: str = option("label", "the labels' column")
    split_column: str | None = option(None, "a column of train, dev or test for each row")
    dev_data: str | None = option(None, "the dev sentences, in a file of the same columns")
    test_data: str | None = option(None, "the test sentences, in a file of the same columns")
    # With no split column or files: a stratified split, the same whatever the run's seed.
    split_seed: int = option(0, "with no split column or files: the seed of the stratified split")
    dev_fraction: float = option(0.1, "with no split column or files: of each label, for dev")
    test_fraction: float = option(0.1, "with no split column or files: of each label, for test")

    @cached_property
    def own(self):
        """Data of your own: a CSV or TSV, or a file given with any option of data of your own, or
        a JSONL whose first record lacks MASSIVE's fields."""
        if self.path is None:
            return False
        if Path(self.path).suffix.lower() in (".csv", ".tsv") or changed(self, OWN_FORMAT):
            return True
        return Path(self.path).is_file() and not _looks_like_massive(Path(self.path))

    @property
    def record(self):
        """What a run records of where its data came from (file names, not paths), read before any
        of it loads: a run folder is resumed only on the data it started with."""
        if not self.own:
            return {"format": "massive"}
        if self.split_column:
            split = {"column": self.split_column}
        elif self.dev_data:
            split = {"dev_data": Path(self.dev_data).name, "test_data": Path(self.test_data).name}
        else:
            split = {"seed": self.split_seed, "dev_fraction": self.dev_fraction, "test_fraction": self.test_fraction}
        return {"format": Path(self.path).suffix.lower().lstrip("."), "file": Path(self.path).name,
                "text_column": self.text_column, "label_column": self.label_column, "split": split}


OWN_FORMAT = ("text_column", "label_column", "split_column", "dev_data", "test_data")
RANDOM_SPLIT = ("split_seed", "dev_fraction", "test_fraction")
SUFFIXES = (".csv", ".tsv", ".jsonl")


def changed(source, names):
    """The options among `names` set to other than their defaults."""
    return [name for name in names if getattr(source, name) != Source.__dataclass_fields__[name].default]


def add_data_flags(parser):
    """--data and the options of data of your own (one flag per Source field), as train.py and
    evaluate.py take them."""
    parser.add_argument("--data", default=None,
                        help="MASSIVE en-US.jsonl (default: $MASSIVE_JSONL or data/massive/), or a CSV, TSV or "
                             "JSONL of labelled sentences of your own")
    own = parser.add_argument_group("data of your own (a CSV, TSV or JSONL given with --data)")
    for f in fields(Source):
        if "help" in f.metadata:
            own.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.default is not None else str,
                             default=None, help=f.metadata["help"] + ("" if f.default is None else
                                                                      f" (default: {f.default})"))


def source_from(args):
    """The parsed flags → a Source, or a ValueError that names the flag."""
    given = {f.name: getattr(args, f.name) for f in fields(Source) if "help" in f.metadata
             and getattr(args, f.name) is not None}
    for name, value in [("data", args.data), *given.items()]:
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: empty; name a "
                             + ("column" if name.endswith("column") else "file"))
    source = Source(args.data, **given)
    flag = "--" + (next(iter(given), "").replace("_", "-"))
    if given and args.data is None:
        raise ValueError(f"{flag}: an option of data of your own; pass the file with --data")
    if given and not source.own:
        raise ValueError(f"{flag} with --data {args.data}, a MASSIVE file: its columns and splits are fixed; "
                         "drop the option")
    roles = [f"--{name.replace('_', '-')} {getattr(source, name)}" + ("" if name in given else " (its default)")
             for name in ("text_column", "label_column", "split_column")]
    columns = [source.text_column, source.label_column, source.split_column]
    for i in range(3):
        for j in range(i):
            if columns[i] is not None and columns[i] == columns[j]:
                raise ValueError(f"{roles[j]} and {roles[i]} name the same column; give each its own column")
    if source.own and Path(source.path).suffix.lower() not in SUFFIXES:
        raise ValueError(f"--data {source.path}: name the file .csv, .tsv or .jsonl, after what it holds")
    random = changed(source, RANDOM_SPLIT)
    if random and (source.split_column or source.dev_data or source.test_data):
        raise ValueError(f"--{random[0].replace('_', '-')} applies to a random split only; the file is split by "
                         + ("--split-column" if source.split_column else "--dev-data and --test-data"))
    if source.split_column and (source.dev_data or source.test_data):
        raise ValueError(f"--dev-data and --test-data with --split-column {source.split_column}: the column splits "
                         f"{source.path} already; pass one of the two")
    if bool(source.dev_data) != bool(source.test_data):
        raise ValueError("--dev-data and --test-data go together: pass both files, or neither for a random split "
                         "of --data")
    if not (0 <= source.dev_fraction < 1 and 0 <= source.test_fraction < 1
            and source.dev_fraction + source.test_fraction < 1):
        raise ValueError(f"--dev-fraction {source.dev_fraction} and --test-fraction {source.test_fraction}: each "
                         "must be at least 0, and together below 1, to leave train sentences")
    if not 0 <= source.split_seed <= 2**32 - 1:
        raise ValueError(f"--split-seed {source.split_seed}: must be a whole number from 0 to {2**32 - 1}")
    return source


def _looks_like_massive(path):
    """Whether the first record of the file has MASSIVE's fields, read from its first line alone:
    what follows may be anything."""
    try:
        with open(path, "rb") as f:
            first = next((line for line in f if line.strip()), b"")
        record = json.loads(first.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return False  # not MASSIVE's text: read_rows names the line and the byte
    except (OSError, json.JSONDecodeError):
        return True  # load_massive says what is wrong, line by line
    return not isinstance(record, dict) or all(key in record for key in ("partition", "utt"))


def load_data(source, labels="scenario"):
    """The Dataset a run trains on: MASSIVE, or the labelled sentences of `source` (see Source)."""
    if not source.own:
        return load_massive(source.path, labels)
    if labels != "scenario":
        raise ValueError(f"--labels {labels}: MASSIVE's intents; data of your own has its label column "
                         f"({source.label_column!r}) alone: drop --labels")
    rows = read_rows(source.path, source)
    if source.split_column:
        splits = {name: [e for e, split in rows if split == name] for name in SPLITS}
    elif source.dev_data:
        splits = {"train": [e for e, _ in rows], "dev": [e for e, _ in read_rows(source.dev_data, source)],
                  "test": [e for e, _ in read_rows(source.test_data, source)]}
    else:
        splits = stratified_split([e for e, _ in rows], source)
    labels = tuple(sorted({e.label for e in splits["train"]}))
    for name in SPLITS:
        if not splits[name]:
            raise ValueError(f"{source.path}: no {name} sentences; give each split some (see --split-column, "
                             "--dev-data and --test-data, or --dev-fraction and --test-fraction)")
        unseen = sorted({e.label for e in splits[name]} - set(labels))
        if unseen:
            raise ValueError(f"{source.path}: the {name} split has label {unseen[0]!r}, which no train sentence "
                             "has; a classifier cannot learn it: add train sentences of it, or drop them")
    if len(labels) < 2:
        raise ValueError(f"{source.path}: one label ({labels[0]!r}) in the train split; a classifier needs two "
                         f"or more: check --label-column ({source.label_column!r})")
    return Dataset(**splits, labels=labels)


def describe(source, data):
    """source.record, with the split's sizes and a digest of which sentence went where: evaluate.py
    checks with it that it reads the split the run trained on."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for e in data.split(name):
            digest.update(f"{name}\t{e.label}\t{e.text}\n".encode())
    return {**source.record, "sizes": {name: len(data.split(name)) for name in SPLITS}, "sha256": digest.hexdigest()}


def same_source(recorded, source):
    """Whether a run's recorded data (results.json or a checkpoint's; none in older ones: MASSIVE)
    came from `source`, by its record."""
    recorded = recorded or {"format": "massive"}
    return {k: v for k, v in recorded.items() if k not in ("sizes", "sha256")} == source.record


def read_rows(path, source):
    """A CSV, TSV or JSONL file → [(Example, split or None)]; every problem named with its file,
    line and column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; pass a CSV, TSV or JSONL "
                         "file of labelled sentences")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {column} of the line); save the file as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    header, records = (None, _jsonl_records(path, text)) if path.suffix.lower() == ".jsonl" else \
        _table_records(path, text)
    columns = {source.text_column: "--text-column", source.label_column: "--label-column"}
    if source.split_column:
        columns[source.split_column] = "--split-column"
    for column, flag in columns.items():
        if header is not None and column not in header:
            raise ValueError(f"{path}: no column {column!r} (its columns: {', '.join(header)}); pass {flag} "
                             "with one of them")
    rows = []
    for where, record in records:
        values = []
        for column, flag in columns.items():
            value = record.get(column)
            if isinstance(value, int) and not isinstance(value, bool) and column != source.text_column:
                value = str(value)  # labels such as 0 and 1
            if not isinstance(value, str) or not value.strip():
                found = "missing" if value is None else f"{value!r}, not a non-empty string"
                raise ValueError(f"{where}: column {column!r} ({flag}) is {found}; every row needs its text and "
                                 "label" + (" and split" if source.split_column else ""))
            values.append(value.strip())
        split = values[2] if source.split_column else None
        if split is not None and split not in SPLITS:
            raise ValueError(f"{where}: column {source.split_column!r} is {split!r}; expected one of "
                             f"{', '.join(SPLITS)}")
        rows.append((Example(values[0], values[1], id=where.rsplit(":", 1)[1]), split))
    if not rows:
        raise ValueError(f"{path}: no rows; give one labelled sentence per row")
    return rows


def _table_records(path, text):
    """CSV (or TSV, by its suffix) with a header row → (header, [(where, {column: value})]); `where`
    names the line a record starts on (a quoted field may hold line breaks)."""
    # strict: a field that opens with a quote must close it before the delimiter; the lenient
    # default would read '"Play" it loud' as 'Play it loud' without a word
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a sentence as long as JSONL takes
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                        strict=True)
    records, header, start = [], None, 1
    try:
        for line in reader:
            if not line:
                start = reader.line_num + 1
                continue
            if header is None:
                header = line
                twice = sorted({name for name in header if header.count(name) > 1})
                if twice:
                    raise ValueError(f"{path}:{start}: the header names column {twice[0]!r} twice; name each "
                                     "column once")
            elif len(line) != len(header):
                raise ValueError(f"{path}:{start}: {len(line)} fields, the header has {len(header)} "
                                 f"({', '.join(header)}); quote a field that holds the delimiter")
            else:
                records.append((f"{path}:{start}", dict(zip(header, line))))
            start = reader.line_num + 1
    except csv.Error as e:
        if "expected after" in str(e):  # text after a closing quote
            raise ValueError(f"{path}:{start}: a field starts with a quote that closes before its end; quote the "
                             'whole field and double the quotes inside it ("""Play"" it loud")') from None
        raise ValueError(f"{path}:{start}: {e}; a quote left open?") from None
    if header is None:
        raise ValueError(f"{path}: empty; the first row names the columns")
    return header, records


def _jsonl_records(path, text):
    records = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            records.append((f"{path}:{n}", json_object(line, f"{path}:{n}", "a JSON object of the text and label")))
    return records


def stratified_split(examples, source):
    """Each label's sentences shuffled with `split_seed` and cut into test, dev and train by the
    fractions (rounded; at least one train sentence a label), so each split keeps the labels'
    proportions and every run seed sees the same split."""
    by_label = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    generator = torch.Generator().manual_seed(source.split_seed)
    chosen = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        group = [by_label[label][i] for i in torch.randperm(len(by_label[label]), generator=generator)]
        n_test = min(round(len(group) * source.test_fraction), len(group) - 1)
        n_dev = max(0, min(round(len(group) * source.dev_fraction), len(group) - n_test - 1))
        chosen["test"] += group[:n_test]
        chosen["dev"] += group[n_test:n_test + n_dev]
        chosen["train"] += group[n_test + n_dev:]
    return {name: [examples[i] for i in sorted(index)] for name, index in chosen.items()}  # in the file's order


def json_object(line, where, expected):
    """One line of a JSONL file → its object, or a ValueError that names `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}; column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected {expected}")
    return record


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


