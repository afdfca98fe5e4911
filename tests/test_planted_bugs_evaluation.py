"""Every check of the evaluation extras fails for a real bug.

The same proof as test_planted_bugs.py, for what is measured around a model rather than inside
it: the per-label figures and the mistakes most made, the CSV records of a split, the
representation measures, the JSON of `report --by`, and the order of the labels. Each mistake is
planted for the length of one test (with monkeypatch: the library code is untouched) and the
check's own comparison, with its own tolerance, must report a failure.
"""

import statistics

import pytest
import torch
import torch.nn.functional as F

import evaluate
from lab import report
from minibert import data, evaluation, representations
from tests.test_data import check_label_order
from tests.test_representations import MEASURE_TOL, PCA_TOL, alignment_error, pca_error, uniformity_error
from tests.test_evaluate import (PER_LABEL_TOL, PROBABILITY_TOL, REPORT_TOL, bucketing_json_error,
                                 bucketing_std_error, check_confused_pairs, check_confusion_csv,
                                 per_label_accuracy_error, probability_error)


def gold_and_predicted_swapped(monkeypatch, module):
    """`module`'s confusion matrix built as confusion_matrix(labels, predicted): rows predicted,
    columns gold, so that every mistake is named backwards."""
    confusion_matrix = evaluation.confusion_matrix
    monkeypatch.setattr(module, "confusion_matrix",
                        lambda predicted, labels, n_labels: confusion_matrix(labels, predicted, n_labels))


def test_most_confused_check_catches_gold_and_predicted_swapped(monkeypatch):
    gold_and_predicted_swapped(monkeypatch, evaluation)
    with pytest.raises(AssertionError):
        check_confused_pairs()


def per_label_precision(logits, labels, names):
    """Each label's precision (right among the sentences predicted as it) instead of its accuracy
    (right among its gold sentences)."""
    predicted = logits.argmax(1)
    return {name: (labels[predicted == i] == i).float().mean().item()
            for i, name in enumerate(names) if (labels == i).any()}


def test_per_label_accuracy_check_catches_precision(monkeypatch):
    monkeypatch.setattr(evaluation, "per_label_accuracy", per_label_precision)
    assert per_label_accuracy_error() > PER_LABEL_TOL


def test_probability_check_catches_a_sigmoid(tmp_path, monkeypatch):
    """The predicted label's probability as the sigmoid of its logit, not the softmax over all
    labels. The records take it from `logits.softmax(-1)`: here that is a sigmoid."""
    monkeypatch.setattr(torch.Tensor, "softmax", lambda self, dim: self.sigmoid())
    assert probability_error(tmp_path) > PROBABILITY_TOL


def test_confusion_csv_check_catches_gold_and_predicted_swapped(tmp_path, monkeypatch):
    gold_and_predicted_swapped(monkeypatch, evaluate)
    with pytest.raises(AssertionError):
        check_confusion_csv(tmp_path)


def test_alignment_check_catches_self_pairs_left_in(monkeypatch):
    """Each sentence counted as its own positive, at distance 0. alignment leaves the self-pairs
    out with ~torch.eye: an identity of zeros leaves nothing out."""
    zeros = torch.zeros
    monkeypatch.setattr(torch, "eye", lambda n, **kwargs: zeros(n, n, **kwargs))
    assert alignment_error() > MEASURE_TOL


def uniformity_log_sum(z, t=2):
    """log Σ over the pairs instead of log of their mean: off by the log of the number of pairs."""
    z = F.normalize(z, dim=-1)
    return torch.pdist(z).pow(2).mul(-t).exp().sum().log().item()


def test_uniformity_check_catches_a_sum(monkeypatch):
    monkeypatch.setattr(representations, "uniformity", uniformity_log_sum)
    assert uniformity_error() > MEASURE_TOL


def pca_uncentred(z):
    """The SVD of the points as they are: the first axis follows their mean, not their spread."""
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    return z @ v[:2].T


def test_pca_check_catches_no_centring(monkeypatch):
    monkeypatch.setattr(representations, "pca_2d", pca_uncentred)
    assert pca_error() > PCA_TOL


def arm_std_of_the_population(monkeypatch):
    """The JSON's std of an arm as statistics.pstdev (divided by n) instead of stdev (by n - 1);
    the markdown table, which the README test compares, keeps the sample std."""
    arm_summary = report.arm_summary

    def with_pstdev(results):
        summary = arm_summary(results)
        for split in ("dev", "test"):
            summary[split][1] = statistics.pstdev([r[split]["accuracy"] for r in results])
        return summary

    monkeypatch.setattr(report, "arm_summary", with_pstdev)


def test_report_json_check_catches_a_population_std(tmp_path, monkeypatch):
    arm_std_of_the_population(monkeypatch)
    assert bucketing_json_error(tmp_path / "json", monkeypatch) > REPORT_TOL


def test_report_std_by_hand_catches_a_population_std(tmp_path, monkeypatch):
    arm_std_of_the_population(monkeypatch)
    assert bucketing_std_error(tmp_path / "std", monkeypatch) > REPORT_TOL


def intents_from_a_set(monkeypatch):
    """The intents as a set makes them, in the order of the string hashes of this process."""
    monkeypatch.setattr(data.Dataset, "intents",
                        property(lambda self: tuple({e.intent for split in (self.train, self.dev, self.test)
                                                     for e in split})))


def scenarios_from_a_set(monkeypatch):
    """The scenario labels as a set of the names makes them, in the order of the string hashes."""
    monkeypatch.setattr(data, "SCENARIOS", tuple(set(data.SCENARIOS)))


@pytest.mark.parametrize("bug", [intents_from_a_set, scenarios_from_a_set], ids=lambda bug: bug.__name__)
def test_label_order_check_catches(bug, massive_path, monkeypatch):
    bug(monkeypatch)
    with pytest.raises(AssertionError):
        check_label_order(massive_path)
