"""A run folder on disk: what train.py writes and evaluate.py reads back, both ways in this file.

    runs/<name>/
        metrics.jsonl            one line per epoch
        results.json             the final record: hyperparameters, test metrics, timing
        model.safetensors        the trained weights (LoRA runs: adapters and head only)
        model.json               what is needed to rebuild the model: config, labels, head, LoRA
        tokenizer.json           the tokenizer the run used
        projection.safetensors   contrastive runs: the stage-1 projection head
        checkpoint.safetensors   training state after the last completed epoch, for --resume

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file where a good one was. Nothing is pickled. And no command destroys what it did
not make: each writes only where nothing is, into an empty folder, or into one that proves to be
its own (check_out).
"""

import csv
import errno
import json
import os
import platform
import re
import reprlib
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .classifier import ScenarioClassifier
from .data import describe, json_object, load_data, load_massive, same_source
from .device import device_name, native_bf16, peak_memory
from .experiments import CHOICES, FIELDS, as_recorded
from .lora import apply_lora
from .model import BertConfig, BertModel, count_parameters
from .tokenizer import Tokenizer
from .weights import load_pretrained

FORMAT = "minibert-run/1"


class RunComplete(Exception):
    """Asked to resume a run that has finished: there is nothing to do, and that is no error."""


class WriteError(ValueError):
    """A file that could not be written: a full disk, a folder without write permission. Its
    previous version, if it had one, is left as it was."""

    def __init__(self, path, reason, full):
        self.path, self.reason = Path(path), reason
        self.kept = f"the previous {self.path.name} is kept" if self.path.exists() else "nothing was written"
        self.fix = "free space and" if full else "once it can be written,"
        super().__init__(self.line("run the command again"))

    def line(self, then):
        """The one line to show, ending with what to do once the file can be written: `then`."""
        return f"cannot write {self.path} ({self.reason}); {self.kept}: {self.fix} {then}"


def write_error(path, error):
    """The WriteError of a failed write, in the operating system's words. Python raises them as
    an OSError; safetensors wraps them in its own error, e.g. "Error while serializing: I/O error:
    No space left on device (os error 28)"."""
    if isinstance(error, OSError):
        reason, code = error.strerror or str(error), error.errno
    else:
        found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(error))
        reason, code = (found[1], int(found[2])) if found else (str(error), None)
    return WriteError(path, reason, full=code in (errno.ENOSPC, errno.EDQUOT))


def replace_atomically(path, write):
    """Write through `write(tmp)`, then rename into place. The bytes reach the disk before the
    rename, and the rename before returning, so even a power cut leaves the old file or the new
    one, never an empty one. A write that fails (a full disk) leaves the old file and no
    temporary one, and raises a WriteError that names the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)  # only there if something failed before the rename
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path, obj):
    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)

    replace_atomically(path, write)


def write_jsonl(path, rows):
    replace_atomically(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def save_tokenizer(path, tokenizer):
    """tokenizer.json, written atomically. The tokenizers library reports a failed write as a bare
    Exception ("No space left on device (os error 28)"): it is raised as the OSError it is."""
    def write(tmp):
        try:
            tokenizer.backend.save(str(tmp))
        except Exception as e:  # noqa: BLE001 (the library raises nothing narrower)
            found = re.search(r"(.*) \(os error (\d+)\)", str(e))
            if found is None:
                raise
            raise OSError(int(found[2]), found[1]) from None

    replace_atomically(path, write)


def save_tensors(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path):
    """→ (tensors, metadata), with errors that name the file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot read ({e}); the file is damaged: train the run again") from None


def read_record_text(path):
    """A run folder's text file, with errors that name it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; is {Path(path).parent} a run folder written by train.py?") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start + 1}); the file is damaged") from None


def read_json(path):
    text = read_record_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from None


# ---- the records read back, checked field by field ---------------------------------------------
# Each table gives the type of every field its readers use; a key is a dotted path, "*" standing
# for each item of a list. A damaged or hand-edited record is refused by the field that is wrong,
# before a reader trips on it.

NUMBER = int | float
TYPE_WORDS = {str: "a string", int: "a whole number", NUMBER: "a number", bool: "true or false", dict: "an object",
              list: "a list"}
METRICS = {"accuracy": NUMBER, "loss": NUMBER, "loss_paper_sum": NUMBER, "n": int}  # evaluation.metrics
HYPERPARAMETERS = {name: NUMBER if type(f.default) is float else type(f.default) for name, f in FIELDS.items()}
RESULTS_FIELDS = {
    "experiment": str, "model": str, "model_requested": str, "seed": int, "device": str, "precision": str,
    "fast": str, "command": str, "wall_seconds": NUMBER, "samples_per_second": NUMBER, "trainable_params": int,
    "all_params": int, "trainable_pct": NUMBER, "dev_accuracy_per_epoch": list, "dev_accuracy_per_epoch.*": NUMBER,
    "hyperparameters": dict, **{f"hyperparameters.{name}": kind for name, kind in HYPERPARAMETERS.items()},
    "data": dict, "data.format": str, "data.file": str, "data.split": dict, "data.sizes": dict, "data.sha256": str,
    "test": dict, "dev": dict, "dev_best": dict, "dev_best.epoch": int, "dev_best.dev": dict, "dev_best.test": dict,
    **{f"{split}.{name}": kind for split in ("test", "dev", "dev_best.dev", "dev_best.test")
       for name, kind in METRICS.items()},
    "contrastive": dict, "contrastive.test_contrastive_loss_paper_sum": NUMBER,
}
MODEL_FIELDS = {
    "model": str, "encoder": dict, "labels": list, "labels.*": str, "label_kind": str, "groups": list,
    "groups.*": int, "hidden_dim": int, "drop_rate": NUMBER, "pooling": str, "max_len": int, "lora": dict,
    "lora.r": int, "lora.alpha": NUMBER, "lora.dropout": NUMBER, "lora.targets": list, "lora.targets.*": str,
}
EPOCH_FIELDS = {"epoch": int, "stage": str, "step": int, "train_loss": NUMBER, "train_accuracy": NUMBER,
                "dev_loss": NUMBER, "dev_accuracy": NUMBER, "train_seconds": NUMBER, "wall_seconds": NUMBER}
CHECKPOINT_FIELDS = {
    "epoch": int, "step": int, "history": list, "history.*": dict,
    **{f"history.*.{name}": kind for name, kind in EPOCH_FIELDS.items()},
    "config": dict, **{f"config.{name}": kind for name, kind in HYPERPARAMETERS.items()},
    "data": dict, "data.sha256": str, "precision": str, "processes": int, "n_averaged": int, "scaler": dict,
}


def fields_at(record, path, name=""):
    """(name, value) of each field of `record` at `path`, a list of keys ("*": each item of a list)."""
    if not path:
        yield name, record
        return
    key, *rest = path
    if key == "*" and isinstance(record, list):
        for i, item in enumerate(record):
            yield from fields_at(item, rest, f"{name}[{i}]")
    elif isinstance(record, dict) and key in record:
        yield from fields_at(record[key], rest, f"{name}.{key}" if name else key)


def check_fields(record, types, where, fix):
    """Refuse `record` at its first field whose type is not the one `types` gives it. A field left
    out, or null, is not checked: older records lack newer fields. A bool is no number."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: holds {reprlib.repr(record)}, not a JSON object; {fix}")
    for key, kind in types.items():
        for name, value in fields_at(record, key.split(".")):
            kinds = getattr(kind, "__args__", (kind,))
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{where}: {name} is {reprlib.repr(value)}, not {TYPE_WORDS[kind]}; {fix}")


def require(record, keys, where):
    """Refuse a results.json `record` that lacks a field of `keys` (dotted paths), or holds it null."""
    missing = [key for key in keys if all(value is None for _, value in fields_at(record, key.split(".")))]
    if missing and "test" in record and record["test"] is None and all(k.startswith("test.") for k in missing):
        raise ValueError(f"{where}: no test figures (the run was trained with --no-test), and this command reads "
                         f"{', '.join(missing)}; leave the run out")
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}; not a finished run's record")


def read_results(path, need=(), fix="the file is damaged: restore it, or train the run again"):
    """A results.json → its record: an object whose fields have the types of RESULTS_FIELDS, with
    every field of `need`; else a ValueError that names the file and the field (and ends with `fix`
    where a field has the wrong type)."""
    record = read_json(path)
    check_fields(record, RESULTS_FIELDS, path, fix)
    require(record, need, path)
    return record


def read_metrics(path):
    """A run's metrics.jsonl → its rows, one per epoch, each checked as results.json is."""
    rows = []
    for n, line in enumerate(read_record_text(path).split("\n"), start=1):
        if line.strip():
            rows.append(json_object(line, f"{path}:{n}", "a JSON object, one epoch's row"))
            check_fields(rows[-1], EPOCH_FIELDS, f"{path}:{n}", "the file is damaged")
    return rows


def trainable_state(model):
    """What a run must store: the parameters that train, by name (frozen weights come from the
    pretrained checkpoint and are not copied into every run)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_into(model, tensors, path, prefix=""):
    """Copy `tensors` (names under `prefix`) into model parameters; every name must exist and fit."""
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in params:
            raise ValueError(f"{path}: unexpected key {key!r}: this model has no parameter {name!r}")
        if params[name].shape != value.shape:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(value.shape)}, "
                             f"the model needs {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value)


def save_checkpoint(path, model, optimizer, state, averaged=None):
    """Everything needed to continue training exactly: trainable weights, AdamW moments, the
    weight average, and `state` (epoch, step, history) as metadata. (Random streams are reseeded
    at every epoch from the seed, so they need no saving.)"""
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    names = {p: name for name, p in model.named_parameters()}
    for p, moments in optimizer.state.items():
        for key, value in moments.items():
            tensors[f"optim.{names[p]}.{key}"] = torch.as_tensor(value)
    if averaged is not None:
        tensors.update({f"average.{k}": v for k, v in averaged.state().items()})
        state = {**state, "n_averaged": averaged.n_averaged}
    save_tensors(path, tensors, metadata={"state": json.dumps(state)})


def checkpoint_state(path):
    """The `state` of a checkpoint alone, without loading its tensors."""
    try:
        with safe_open(path, framework="pt") as f:
            state = json.loads((f.metadata() or {})["state"])
        missing = [k for k in ("epoch", "step", "history", "config") if k not in state]
        if missing:
            raise KeyError(missing[0])
        check_fields(state, CHECKPOINT_FIELDS, path, "the checkpoint is damaged: delete it to train again")
        return state
    except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a training checkpoint ({e!r}); delete it to train again") from None


def load_checkpoint(path, model, optimizer, averaged=None):
    """Restore what save_checkpoint wrote (the optimizer's moments only if `optimizer` is
    given); returns its `state`."""
    tensors, _ = load_tensors(path)
    state = checkpoint_state(path)
    missing = sorted(f"model.{name}" for name in trainable_state(model) if f"model.{name}" not in tensors)
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}; delete the checkpoint to train again")
    load_into(model, tensors, path, prefix="model.")
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    on_device = optimizer is not None and (optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    for key, value in tensors.items():
        if key.startswith("optim.") and optimizer is not None:
            name, moment = key[len("optim."):].rsplit(".", 1)
            if name not in params:
                raise ValueError(f"{path}: unexpected key {key!r}: this model has no parameter {name!r}")
            # AdamW keeps its step count on the CPU unless it runs fused or captured.
            keep_on_cpu = moment == "step" and not on_device
            optimizer.state[params[name]][moment] = value if keep_on_cpu else value.to(device)
    if averaged is not None and "n_averaged" in state:
        averaged.load({k[len("average."):]: v for k, v in tensors.items() if k.startswith("average.")},
                      state["n_averaged"])
    return state


def load_model(run_dir):
    """Rebuild a trained classifier from its run folder → (model, tokenizer, meta)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "no such folder"
        raise ValueError(f"{run_dir}: {what}; pass a run folder written by train.py (runs/<name>)")
    if not (run_dir / "model.json").exists() and (run_dir / "checkpoint.safetensors").exists():
        raise ValueError(f"{run_dir}: the run has not finished (a checkpoint, no model yet); finish it with "
                         f"train.py --resume --out {run_dir} and the flags it started with")
    meta = read_json(run_dir / "model.json")
    where = run_dir / "model.json"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{where}: format {found!r}, expected {FORMAT!r}; not a model record of train.py")
    missing = [k for k in ("model", "encoder", "labels", "label_kind", "hidden_dim", "drop_rate", "max_len", "lora")
               if k not in meta]
    if missing:
        raise ValueError(f"{where}: no {missing[0]!r} field; the file is damaged")
    check_fields(meta, MODEL_FIELDS, where, "the file is damaged")
    if meta.get("pooling", "cls") not in CHOICES["pooling"]:
        raise ValueError(f"{where}: pooling {meta['pooling']!r}, expected {' or '.join(CHOICES['pooling'])}; "
                         "the file is damaged")
    try:
        encoder_config = BertConfig(**meta["encoder"])  # which checks its sizes
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: encoder: {e}; the file is damaged") from None
    try:
        if meta["lora"]:
            # Adapters and head only: the frozen weights are the pretrained model's.
            encoder, _, _ = load_pretrained(meta["model"])
            if encoder.config.to_dict() != meta["encoder"]:
                raise ValueError(f"{run_dir}: the pretrained {meta['model']} found now is not the one trained")
            lora = meta["lora"]
            apply_lora(encoder, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])
        else:
            encoder = BertModel(encoder_config)
            encoder.name = meta["model"]
        # Older runs have no groups (one output per label) and read [CLS].
        model = ScenarioClassifier(encoder, len(meta["labels"]), meta["hidden_dim"], meta["drop_rate"],
                                   meta.get("groups"), meta.get("pooling", "cls"))
    except (KeyError, TypeError, RuntimeError) as e:  # RuntimeError: torch's, of a size below 0
        raise ValueError(f"{where}: incomplete or wrong field ({e}); the file is damaged") from None
    tensors, _ = load_tensors(run_dir / "model.safetensors")
    expected = trainable_state(model) if meta["lora"] else model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{run_dir / 'model.safetensors'}: missing key {missing[0]!r}")
    load_into(model, tensors, run_dir / "model.safetensors")
    if not (run_dir / "tokenizer.json").exists():
        raise ValueError(f"{run_dir}: no tokenizer.json")
    return model.eval(), Tokenizer.from_folder(run_dir), meta


# ---- what train.py and evaluate.py write -------------------------------------------------------

def default_run_dir(experiment, model, source, seed, variant=""):
    """runs/<experiment>-<model>[-<file>][<variant>]-s<seed>: <file> names data of your own."""
    own = f"-{Path(source.path).stem}" if source.own else ""
    return Path(f"runs/{experiment}-{Path(model).name}{own}{variant}-s{seed}")


def run_data(run_dir, meta, source):
    """The data a trained run is evaluated on, checked to be what it trained on: MASSIVE under the
    run's labels (scenario or intent), or its file of your own, split as it was (results.json
    records which sentence went where: another file or split seed would mix training sentences
    into test)."""
    if meta["label_kind"] not in ("scenario", "intent") and not source.own:
        raise ValueError(f"{run_dir} was trained on data of your own (labels from its column {meta['label_kind']!r}), "
                         "not on MASSIVE: pass that --data, with the column and split flags it was trained with")
    data = load_data(source) if source.own else load_massive(source.path, labels=meta["label_kind"])
    check_run_data(run_dir, meta, source, data)
    return data


def check_run_data(run_dir, meta, source, data):
    """Refuse `data` unless it has the run's labels and, where results.json recorded it, its split."""
    results = Path(run_dir) / "results.json"
    recorded = read_results(results).get("data") if results.exists() else None
    own = meta["label_kind"] not in ("scenario", "intent")  # a label column's name: data of your own
    trained_on = f"it was trained on {recorded['file']}" if recorded and "file" in recorded else \
        f"it was trained on {'data of your own' if own else 'MASSIVE'}"
    if list(data.labels) != meta["labels"]:
        raise ValueError(f"the run's {len(meta['labels'])} labels do not match the data's {len(data.labels)} "
                         f"{meta['label_kind']} labels; {trained_on}: pass that --data, with the column and split "
                         "flags it was trained with")
    if recorded and "sha256" in recorded and recorded["sha256"] != describe(source, data)["sha256"]:
        raise ValueError(f"{run_dir}: the data splits other sentences into train, dev and test than the run's "
                         f"({recorded.get('split', 'MASSIVE')}); {trained_on}: pass that --data, with the column "
                         "and split flags it was trained with")


# ---- no command destroys what it did not make --------------------------------------------------

def check_out(path, fix, own=lambda entry: False, folder=True):
    """Where a command may write: `path`, a folder (a file where `folder` is False), only where
    nothing is yet, where an empty folder is, or where everything there proves to be the
    command's own: `own(entry)` of each file and folder it holds (of the file itself). Anything
    else is refused before the first write, in one line that names it and ends with `fix`."""
    path = Path(path)
    under = next((parent for parent in path.parents if parent.exists()), None)
    if under is not None and not under.is_dir():
        raise ValueError(f"{path}: {under} is a file, not a folder; {fix}")
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{path}: a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}; {fix}")
    held = sorted(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
    foreign = [entry.name for entry in held if not own(entry)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        what = f"holds {foreign[0]}{more}" if folder else "is a file"
        raise ValueError(f"{path} {what} that this command did not write, and it never overwrites what it did "
                         f"not make; {fix}")


def begins_with(path, text):
    """Whether the text file at `path` begins with `text`: how a command knows a page it wrote by its title."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(len(text)) == text
    except (OSError, UnicodeDecodeError):
        return False


def record_with(path, keys):
    """Whether the file at `path` is a JSON object with every one of `keys`: how a command knows a
    record it wrote."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and set(keys) <= record.keys()


# What a run leaves in its folder before its first checkpoint, and train.log, its output where
# lab.paper (or the shell) sends it: a run stopped that early may start again in the folder.
STARTED = ("metrics.jsonl", "dev-best.safetensors", "projection.safetensors", "train.log")


def run_records(run_dir, fix):
    """The records of a run that `run_dir` holds (checkpoint.safetensors, results.json): whether the
    run asked for may continue there is that run's to decide. A folder without them is written
    only if it is new, empty, or holds no more than a run leaves before its first checkpoint
    (STARTED): never a model's folder, an export, or anything else no run wrote."""
    records = [f for f in ("checkpoint.safetensors", "results.json") if (Path(run_dir) / f).exists()]
    if not records:
        check_out(run_dir, fix, own=lambda entry: entry.name in STARTED)
    return records


def check_run_dir(run_dir, resume, config, source):
    """Never overwrite a run silently: its checkpoint could be hours of work. A finished run asked
    to resume is done (RunComplete) if it trained with `config` on `source`, and refused if not;
    a folder that holds no run is written only if no more than a run's beginning is there."""
    existing = run_records(run_dir, "pass another --out: a new or empty folder, or the run's own to resume it")
    if existing and not resume:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(existing)}); "
                         "pass --resume to continue it, or --out to write elsewhere")
    if resume and (run_dir / "results.json").exists():
        record = read_results(run_dir / "results.json")
        if not isinstance(record.get("hyperparameters"), dict):
            raise ValueError(f"{run_dir / 'results.json'}: no hyperparameters, not a record of train.py; "
                             "delete the folder to train again, or pass another --out")
        check_same_config(record["hyperparameters"], config.to_dict(), run_dir)
        if config.precision != "auto" and record.get("precision", config.precision) != config.precision:
            raise ValueError(f"cannot resume {run_dir}: it was trained with precision {record['precision']}, not "
                             f"{config.precision}; pass another --out to train again")
        check_finished_data(record.get("data"), source, config.labels, run_dir)
        raise RunComplete(f"{run_dir} is already complete: see its results.json (delete the folder to train again)")


def check_same_config(saved, current, run_dir):
    """The hyperparameters a run was trained with against those asked for now. The precision is
    compared as it was decided (check_resumable), not as it was asked for: auto, and bf16 by name,
    can be the same run."""
    saved = as_recorded(saved)
    differ = [k for k in current if k != "precision" and saved[k] != current[k]]
    if differ:
        details = ", ".join(f"{k}: {saved[k]!r} → {current[k]!r}" for k in differ)
        raise ValueError(f"cannot resume {run_dir} with other hyperparameters ({details}); resume it with the "
                         "settings it was trained with, or pass another --out")


def check_same_source(recorded, source, run_dir):
    if not same_source(recorded, source):
        raise ValueError(f"cannot resume {run_dir} on other data ({source.record}); it was trained on "
                         f"{recorded or {'format': 'massive'}}: pass the --data and flags it was trained with, or "
                         "another --out")


def check_finished_data(recorded, source, labels, run_dir):
    """A finished run's recorded data against `source`: the same file and flags and, where the record
    has their digest, the same sentences in the same splits, read now (a finished run keeps no
    checkpoint that would check them when it resumes)."""
    check_same_source(recorded, source, run_dir)
    if (recorded or {}).get("sha256"):
        check_same_sentences(recorded, source, describe(source, load_data(source, labels))["sha256"], run_dir)


def check_same_sentences(recorded, source, digest, run_dir):
    """The digest of the sentences a run started on, in their splits, against `digest`, that of the
    data read now (a record without one predates it)."""
    then = (recorded or {}).get("sha256")
    if then is not None and then != digest:
        raise ValueError(f"cannot resume {run_dir}: {source.path or 'the MASSIVE file'} no longer holds the sentences "
                         "it started on, or splits them otherwise (their digest differs); restore the file, or train "
                         "again with another --out")


def check_resumable(saved, config, precision, world, source, data, run_dir):
    """A checkpoint continues only the run that wrote it: the same hyperparameters, data (the same
    file and flags, and by `data`'s digest the same sentences in the same splits), precision and
    number of processes (a checkpoint without them predates them: MASSIVE, fp32, one process)."""
    check_same_config(saved["config"], config.to_dict(), run_dir)
    check_same_source(saved.get("data"), source, run_dir)
    check_same_sentences(saved.get("data"), source, data["sha256"], run_dir)
    for what, now in (("precision", precision), ("processes", world)):
        then = saved.get(what, {"precision": "fp32", "processes": 1}[what])
        if then != now:
            how = f"pass --precision {then}" if what == "precision" else f"start {then} processes"
            raise ValueError(f"cannot resume {run_dir}: it was trained with {what} {then}, not {now}; "
                             f"{how} to resume it as it started, or train again with another --out")


def parameter_counts(model, probe=False):
    """Counted as peft counts them: the encoder (pooler included) with any adapters; the head
    is reported on its own. A probe's encoder trains no weight (its optimizer holds the head)."""
    encoder_all = count_parameters(model.encoder)
    encoder_trainable = 0 if probe else count_parameters(model.encoder, trainable_only=True)
    return {"trainable_params": encoder_trainable, "all_params": encoder_all,
            "trainable_pct": 100 * encoder_trainable / encoder_all,
            "head_params": count_parameters(model) - encoder_all}


def save_model(run_dir, model, tokenizer, labels, config, label_kind=None):
    """model.safetensors, model.json and tokenizer.json: what load_model rebuilds the classifier from.
    `label_kind`: what the labels are (MASSIVE's scenario or intent, or the label column of data of
    your own); config.labels where not given."""
    # A LoRA run stores its adapters and the head together (the pretrained weights are
    # reloaded by name); without the head a reloaded adapter would predict at random.
    save_tensors(run_dir / "model.safetensors", trainable_state(model) if config.lora_r else model.state_dict())
    lora = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": config.lora_target_list} if config.lora_r else None
    save_tokenizer(run_dir / "tokenizer.json", tokenizer)
    write_json(run_dir / "model.json", {
        "format": FORMAT,
        "model": model.encoder.name,
        "encoder": model.encoder.config.to_dict(),
        "labels": list(labels),
        "label_kind": label_kind or config.labels,
        "groups": model.groups,  # with --supervise intents/both: each intent output's label
        "hidden_dim": config.hidden_dim,
        "drop_rate": config.drop_rate,
        "pooling": config.pooling,
        "max_len": config.max_len,
        "lora": lora,
    })


def history_record(history, n_train, steps_per_epoch):
    """What results.json keeps of the epochs' rows: the curves, the contrastive stage's end, the clock."""
    classifier = [h for h in history if h["stage"] == "classifier"]
    contrastive = [h for h in history if h["stage"] == "contrastive"]
    stage1_end = contrastive[-1] if contrastive else {}
    train_seconds = sum(h["train_seconds"] for h in history)
    return {
        "contrastive": {k: v for k, v in stage1_end.items() if "_contrastive_" in k} or None,
        "dev_accuracy_per_epoch": [h["dev_accuracy"] for h in classifier],
        "train_accuracy_per_epoch": [h["train_accuracy"] for h in classifier],
        "contrastive_loss_per_epoch": [h["train_loss"] for h in contrastive],
        "wall_seconds": sum(h["wall_seconds"] for h in history),
        "samples_per_second": n_train * len(history) / train_seconds,
        "ms_per_step": 1000 * train_seconds / (len(history) * steps_per_epoch),
    }


def code_version():
    """The git commit of the code that made a record, and whether tracked files differed from it;
    both None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    except (OSError, subprocess.TimeoutExpired):
        commit = changes = None
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


def write_training_results(run_dir, command, *, config, model, device, world, precision, fast, data, dev, test,
                           history, n_train, steps_per_epoch, average, dev_best, code):
    """train.py's results.json: what was trained, on what, and how it did. `dev` and `test` are the
    final fp32 figures (of the SWA `average` where there is one), `dev_best` those of the kept
    epoch with --select dev-best, `history` the rows of metrics.jsonl."""
    swa = average is not None and average.n_averaged > 0
    write_results(run_dir, command, {
        "experiment": config.experiment,
        "model": model.encoder.name,
        "model_requested": config.model,
        "hyperparameters": config.to_dict(),
        "seed": config.seed,
        "data": data,  # data.describe: MASSIVE, or a file of your own, its split and sizes
        "device": device_name(device) + (f" × {world} processes" if world > 1 else ""),
        "precision": precision,
        "native_bf16": native_bf16(device),  # the default precision's deciding fact
        "eval_precision": "fp32",  # dev and test below; per-epoch dev figures use `precision`
        "fast": fast,  # the fast path's steps: "cuda graph" (", compiled"), or "eager" (the same static step); None: off
        "test": test,
        "dev": dev,
        **history_record(history, n_train, steps_per_epoch),
        "swa": {"n_averaged": average.n_averaged, "dev": dev if swa else None} if average is not None else None,
        "dev_best": dev_best,  # the kept epoch's figures; `test` above is the last epoch's
        **parameter_counts(model, probe=config.stage2 == "probe"),
        **peak_memory(device),
    }, code)


def write_results(run_dir, command, record, code=None):
    """results.json: `record` (experiment, hyperparameters, metrics, timing) with the run format,
    the command, and the versions of the code, torch and Python that made it. `code`: the
    code_version() read when the process started (a run of hours outlives commits); now if None."""
    write_json(Path(run_dir) / "results.json", {
        "format": FORMAT, **record, "torch": torch.__version__, "python": platform.python_version(),
        **(code or code_version()), "command": command})
