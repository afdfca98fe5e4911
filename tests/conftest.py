"""Shared fixtures. Weights, data or reference libraries that are missing skip the tests that
need them, unless MINIBERT_REQUIRE_ASSETS=1 (as in CI), where a missing asset is a failure."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from minibert.data import data_path
from minibert.weights import is_complete, load_pretrained
from tests import cpu
from tests.cases import REFERENCE, minilm_folder, require_assets


def pytest_addoption(parser):
    parser.addoption("--cpu", default="this", choices=["this", "other", *cpu.KINDS],
                     help="run as this machine's CPU (the default), or as another kind: native-bf16, fp32-only, "
                          "or the other of the two. The precision query answers as that CPU in this process and "
                          "in every process a test starts (tests/cpu/sitecustomize.py)")


def pytest_configure(config):
    kind = config.getoption("--cpu")
    if kind == "this":
        return
    if kind == "other":
        kind = "fp32-only" if cpu.this_machine() == "native-bf16" else "native-bf16"
    cpu.answer_as(kind)
    os.environ["MINIBERT_TESTS_CPU"] = kind
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(cpu.__file__).parent),
                                                *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_collection_modifyitems(config, items):
    """As another kind of CPU, the tests that train the embedded model are left out: they ran as
    this machine in the first pass, and as a native-bf16 CPU on a machine without bf16 in hardware
    their emulated bf16 takes minutes a test. The tiny models' runs cover every precision path."""
    if config.getoption("--cpu") == "this":
        return
    kept = [item for item in items if not {"minilm_dir", "minilm"} & set(getattr(item, "fixturenames", ()))]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_report_header(config):
    return f"cpu: {os.environ.get('MINIBERT_TESTS_CPU') or cpu.this_machine() + ' (this machine)'}"


def need(condition, what):
    if condition:
        return
    if require_assets():
        pytest.fail(f"{what} is missing and MINIBERT_REQUIRE_ASSETS=1")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def minilm_dir():
    need(is_complete("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2 (make weights MODEL=all-MiniLM-L6-v2)")
    return minilm_folder()


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """(model, tokenizer, config) of the embedded all-MiniLM-L6-v2, in eval mode."""
    model, tokenizer, config = load_pretrained(str(minilm_dir))
    return model.eval(), tokenizer, config


@pytest.fixture(scope="session")
def massive_path():
    path = data_path()
    need(path.exists(), f"MASSIVE en-US ({path}; make data or MASSIVE_JSONL=...)")
    return path


@pytest.fixture(scope="session")
def transformers():
    need(importlib.util.find_spec("transformers") is not None, "transformers (the test extra)")
    import transformers

    return transformers


@pytest.fixture(scope="session")
def peft():
    need(importlib.util.find_spec("peft") is not None, "peft (the test extra)")
    import peft

    return peft


@pytest.fixture(scope="session")
def small_massive(massive_path, tmp_path_factory):
    """The first 96 train, 48 dev and 48 test lines of MASSIVE: a file that trains in seconds."""
    keep = {"train": 96, "dev": 48, "test": 48}
    lines = []
    for line in massive_path.read_text().splitlines():
        partition = line.split('"partition": "', 1)[1].split('"', 1)[0]
        if keep.get(partition, 0) > 0:
            keep[partition] -= 1
            lines.append(line)
    path = tmp_path_factory.mktemp("massive") / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_model(tmp_path):
    """The tiny reference BERT with dropout off: a run that is deterministic, whatever the seed
    of its dropout, so that one process and two, or one pass and two, see the same."""
    model = tmp_path / "tiny"
    model.mkdir()
    for name in ("model.safetensors", "vocab.txt"):
        (model / name).write_bytes((REFERENCE / "tiny_odd" / name).read_bytes())
    config = json.loads((REFERENCE / "tiny_odd/config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model
