"""Every fault test fails for a real bug.

As in test_planted_bugs.py: each mistake is planted for the length of one test (with monkeypatch:
the library code is untouched), and the fault test's own check must report it. A check that let
one of these through would prove nothing about the code it guards.
"""

from pathlib import Path

import pytest

import evaluate
from lab import tune
from minibert import predictor, runs
from minibert.experiments import FIELDS, MAX_SEED, TrainConfig
from tests import test_bad_input, test_faults
from tests.test_bad_input import (BAD_COMBINATIONS, BAD_NUMBERS, FINISHED, nothing_loads,  # a fixture, by name
                                  one_line_exit, refused_number, resume_finished, write_run)
from tests.test_faults import FAILURES, WRITERS, disk_fills_up, full_disk_run, write_fault

# ---- a full disk --------------------------------------------------------------------------------


def written_in_place(monkeypatch):
    """Each file written straight over its previous version: no temporary file, no rename."""
    monkeypatch.setattr(runs, "replace_atomically", lambda path, write: write(path))


def temporary_file_left(monkeypatch):
    """A failed write's temporary file never removed."""
    def replace_atomically(path, write):
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        try:
            write(tmp)
            tmp.replace(path)
        except (OSError, runs.SafetensorError) as e:
            raise runs.write_error(path, e) from None

    monkeypatch.setattr(runs, "replace_atomically", replace_atomically)


def error_passed_on_as_it_came(monkeypatch):
    """The writer's own error passed on: no file named, nothing said of what to do."""
    monkeypatch.setattr(runs, "write_error", lambda path, error: error)


def serializer_error_not_caught(monkeypatch):
    """OSError caught alone, as if safetensors raised it: its SafetensorError escapes."""
    monkeypatch.setattr(runs, "SafetensorError", type("NotSafetensorError", (Exception,), {}))


@pytest.mark.parametrize("bug", [written_in_place, temporary_file_left, error_passed_on_as_it_came],
                         ids=lambda bug: bug.__name__)
@pytest.mark.parametrize("name", WRITERS)
def test_write_fault_check_catches(name, bug, tmp_path, monkeypatch):
    bug(monkeypatch)
    assert write_fault(name, True, tmp_path, lambda: disk_fills_up(monkeypatch, name)) != []


def test_write_fault_check_catches_a_serializer_error_not_caught(tmp_path, monkeypatch):
    serializer_error_not_caught(monkeypatch)
    name = "checkpoint.safetensors"
    assert write_fault(name, True, tmp_path, lambda: disk_fills_up(monkeypatch, name)) != []


def every_failure_called_a_full_disk(monkeypatch):
    """"free space" whatever the cause, and safetensors' words passed on whole."""
    monkeypatch.setattr(runs, "write_error", lambda path, error: runs.WriteError(path, str(error), full=True))


def test_other_failure_check_catches_every_failure_called_a_full_disk(tmp_path, monkeypatch):
    every_failure_called_a_full_disk(monkeypatch)
    with pytest.raises(AssertionError):
        test_faults.test_other_write_failures_say_what_the_system_said(tmp_path)


@pytest.mark.parametrize("bug", [written_in_place, error_passed_on_as_it_came, serializer_error_not_caught],
                         ids=lambda bug: bug.__name__)
def test_full_disk_run_check_catches(bug, small_massive, tmp_path, monkeypatch):
    bug(monkeypatch)
    name = "checkpoint.safetensors"
    assert full_disk_run(small_massive, tmp_path / "run", name,
                         lambda: disk_fills_up(monkeypatch, name, FAILURES[name][0])) != []


# ---- numbers out of range -----------------------------------------------------------------------

def check_skipped(monkeypatch):
    """TrainConfig.check never called: every flag goes through to the loaders."""
    monkeypatch.setattr(TrainConfig, "check", lambda self, world=1: None)


def check_raises_a_traceback(monkeypatch):
    """A bad flag found, but reported with an error that main() does not catch."""
    def check(self, world=1):
        raise TypeError(f"bad flag in {self.experiment}")

    monkeypatch.setattr(TrainConfig, "check", check)


def check_explains_in_two_lines(monkeypatch):
    """The first line says what, a second says what to do."""
    real = TrainConfig.check

    def check(self, world=1):
        try:
            real(self, world)
        except ValueError as e:
            raise ValueError(str(e).replace(": ", ":\n", 1)) from None

    monkeypatch.setattr(TrainConfig, "check", check)


NEW_CHECKS = [["--seed=-1"], [f"--seed={MAX_SEED + 1}"], *(argv for argv, _ in BAD_COMBINATIONS)]


@pytest.mark.parametrize("bug", [check_skipped, check_raises_a_traceback, check_explains_in_two_lines],
                         ids=lambda bug: bug.__name__)
@pytest.mark.parametrize("argv", NEW_CHECKS, ids=" ".join)
def test_refused_number_check_catches(argv, bug, nothing_loads, tmp_path, capsys, monkeypatch):
    bug(monkeypatch)
    with pytest.raises(AssertionError):
        refused_number(argv, tmp_path, capsys)


def test_lab_seed_check_catches_no_upper_bound(nothing_loads, tmp_path, capsys, monkeypatch):
    for module, argv in [(evaluate, ["--zero-shot"]), (tune, [str(tmp_path)])]:
        monkeypatch.setattr(module, "MAX_SEED", 2**64)
        with pytest.raises(AssertionError):
            one_line_exit(module.main, [*argv, "--seed", str(MAX_SEED + 1)], capsys)


def test_flag_coverage_check_catches_a_flag_without_bad_values(monkeypatch):
    monkeypatch.delitem(BAD_NUMBERS, "--seed")
    with pytest.raises(AssertionError):
        test_bad_input.test_every_numeric_flag_has_bad_values()


# ---- a finished run resumed ---------------------------------------------------------------------

def finished_settings_ignored(monkeypatch):
    """A finished run is "already complete" whatever the flags (train.py before this check)."""
    monkeypatch.setattr(runs, "check_same_config", lambda saved, current, run_dir: None)


def record_compared_raw(monkeypatch):
    """The record compared as written: settings newer than the run count as changed."""
    monkeypatch.setattr(runs, "as_recorded", lambda hyperparameters: {k: hyperparameters.get(k) for k in FIELDS})


def test_resume_finished_check_catches_settings_ignored(nothing_loads, tmp_path, capsys, monkeypatch):
    finished_settings_ignored(monkeypatch)
    assert resume_finished(FINISHED, ["--lr", "1e-3"], tmp_path / "run", capsys)[0] == 0  # the check wants 1


def test_resume_finished_check_catches_a_record_compared_raw(nothing_loads, tmp_path, capsys, monkeypatch):
    record_compared_raw(monkeypatch)
    older = {k: v for k, v in FINISHED.items() if k not in ("pooling", "rdrop")}
    assert resume_finished(older, [], tmp_path / "run", capsys)[0] != 0  # the check wants 0


# ---- an empty sentence --------------------------------------------------------------------------

def empty_sentence_taken_for_none(monkeypatch):
    """`if args.predict:` as before: an empty --predict is no sentence, and the test split is evaluated."""
    real = evaluate.parse_args

    def parse_args(argv):
        argv = list(argv)
        if "--predict" in argv and not argv[argv.index("--predict") + 1].strip():
            del argv[argv.index("--predict"):argv.index("--predict") + 2]
        return real(argv)

    monkeypatch.setattr(evaluate, "parse_args", parse_args)


@pytest.mark.parametrize("sentence", ["", "  \t "], ids=["empty", "blank"])
def test_empty_sentence_check_catches(sentence, nothing_loads, tmp_path, capsys, monkeypatch):
    empty_sentence_taken_for_none(monkeypatch)
    with pytest.raises(AssertionError):
        one_line_exit(evaluate.main, [str(tmp_path), "--predict", sentence], capsys)


def test_blank_file_check_catches_blank_lines_kept(tmp_path, capsys, monkeypatch):
    """Every line kept, blank ones too, and the predictor's own refusal of blank sentences gone: a
    blank file is classified, line by line, as nothing."""
    run = write_run(tmp_path / "run", ("alarm", "audio"), "scenario")
    monkeypatch.setattr(evaluate, "read_sentences", lambda path: Path(path).read_text().splitlines())
    monkeypatch.setattr(predictor, "checked_sentences", list)
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(AssertionError):
        one_line_exit(evaluate.main, [str(run), "--predict-file", str(tmp_path / "blank.txt")], capsys)
