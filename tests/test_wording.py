"""The summary's words follow the metric: points only in [0, 1], the direction from higher_is_better, the noise."""

from __future__ import annotations

import pytest
from torchmetrics import classification
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsolutePercentageError, MeanSquaredError, R2Score

from lightning_evalguard import EvalGuard
from lightning_evalguard.metrics import MetricInfo, metric_info
from lightning_evalguard.summary import reading, summary_rows

from helpers import Classifier, TensorData, loader, make_tensors, micro_accuracy, trainer

ACCURACY = MetricInfo(bounded=True, higher_is_better=True, stderr="binomial", decomposable=True)
MSE = MetricInfo(bounded=False, higher_is_better=False, stderr="samples", decomposable=True)


def test_torchmetrics_attributes_give_the_bounds_the_direction_and_the_kind_of_standard_error():
    assert metric_info(MulticlassAccuracy(num_classes=3, average="micro")) == ACCURACY
    assert metric_info(MulticlassAccuracy(num_classes=3, average="macro")) == MetricInfo(True, True, None, False)
    assert metric_info(MeanSquaredError()) == MSE
    assert metric_info(MeanSquaredError(squared=False)) == MetricInfo(False, False, None, False)  # a root of a mean
    assert metric_info(MeanAbsolutePercentageError()).decomposable is True  # a mean, without a standard error here
    assert metric_info(R2Score()).higher_is_better is True

    class ShiftedMSE(MeanSquaredError):
        def update(self, preds, target):  # type: ignore[no-untyped-def]
            super().update(preds + 1, target)

    assert metric_info(ShiftedMSE()).stderr is None  # its per-sample values are not those EvalGuard would compute
    assert metric_info(ShiftedMSE()).decomposable is None  # the user's own metric: unknown, never warned about


def test_points_only_for_metrics_bounded_in_0_1():
    assert reading("acc", 0.80, 0.83, info=ACCURACY) == "running acc understates clean acc by 3.0 points."
    # an MSE of 0.5 is not a fraction: the difference is in its own units
    sentence = reading("mse", 0.5, 0.25, info=MSE)
    assert "points" not in sentence and "by 0.25" in sentence


def test_the_direction_follows_higher_is_better():
    assert reading("mse", 0.5, 0.25, info=MSE) == ("running mse overstates the error by 0.25 (clean mse is below it).")
    assert reading("mse", 0.25, 0.5, info=MSE) == ("running mse understates the error by 0.25 (clean mse is above it).")
    assert reading("acc", 0.9, 0.8, info=ACCURACY) == "running acc overstates clean acc by 10.0 points."
    unknown = MetricInfo(bounded=False, higher_is_better=None, stderr=None)
    assert reading("m", 2.0, 3.5, info=unknown) == "running m is 1.5 below clean m."
    assert reading("m", 2.0, 2.0, info=unknown) == "running m matches clean m (gap 0)."


def test_a_gap_is_real_only_beyond_two_standard_errors():
    real = reading("acc", 0.80, 0.831, stderr=0.005, info=ACCURACY)
    assert (
        real == "running acc understates clean acc by 3.1 points; the gap of 3.1 points is 6.2 standard errors: real."
    )
    noise = reading("acc", 0.80, 0.808, stderr=0.005, info=ACCURACY)
    assert noise.endswith("the gap of 0.8 points is within the subset's noise (1.6 standard errors).")
    assert "standard errors" not in reading("acc", 0.80, 0.831, info=ACCURACY)  # a whole pass: no sampling error


def test_summary_rows_use_the_metric_info_and_show_the_standard_error():
    last = {"clean": {"mse": 0.25}, "running": {"mse": 0.5}, "gap": {"mse": -0.25}, "stderr": {"mse": 0.01}}
    (row,) = summary_rows(["mse"], last, {"mse": MSE})
    assert row["stderr"] == "0.0100"
    assert row["reading"].startswith("running mse overstates the error by 0.25")
    assert row["reading"].endswith("the gap of 0.25 is 25.0 standard errors: real.")


def test_the_end_of_fit_summary_words_a_subset_gap_against_its_standard_error(tmp_path, capsys):
    x, y = make_tensors(64)
    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches=0.5)
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    out = capsys.readouterr().out
    last = guard.history[-1]
    gap, stderr = last["gap"]["acc"], last["stderr"]["acc"]
    verdict = "real" if abs(gap) > 2 * stderr else "within the subset's noise"
    assert f"{abs(gap) / stderr:.1f} standard errors" in out and verdict in out


def test_a_nan_value_reads_as_no_gap():
    assert reading("acc", float("nan"), 0.8, info=ACCURACY) == "running acc is - and clean acc 0.8000: no gap to read."


@pytest.mark.parametrize(
    ("make", "decomposable"),
    [
        (lambda: MulticlassAccuracy(num_classes=3, average="micro"), True),
        (lambda: MulticlassAccuracy(num_classes=3, average="macro"), False),
        (lambda: classification.MulticlassF1Score(num_classes=3), False),  # macro by default
        (lambda: classification.MulticlassF1Score(num_classes=3, average="weighted"), False),
        (lambda: classification.MulticlassF1Score(num_classes=3, average="micro"), None),  # the accuracy: a mean
        (lambda: classification.MulticlassPrecision(num_classes=3, average="micro"), None),
        (lambda: classification.MulticlassJaccardIndex(num_classes=3, average="micro"), False),  # not a mean
        (lambda: classification.MulticlassMatthewsCorrCoef(num_classes=3), False),
        (lambda: classification.MulticlassCohenKappa(num_classes=3), False),
        (lambda: classification.MulticlassAUROC(num_classes=3), False),
        (lambda: classification.BinaryF1Score(), False),
        (lambda: classification.BinaryPrecision(), False),
        (lambda: classification.BinaryRecall(), False),
        (lambda: classification.BinaryAUROC(), False),
        (lambda: classification.BinaryAveragePrecision(), False),
        (lambda: classification.MultilabelF1Score(num_labels=3), False),
        (lambda: classification.BinaryAccuracy(), True),
        (lambda: classification.MultilabelAccuracy(num_labels=3, average="micro"), None),  # a mean: not judged
        (lambda: classification.MulticlassExactMatch(num_classes=3), None),
        (lambda: MeanSquaredError(), True),
        (lambda: MeanSquaredError(squared=False), False),
        (lambda: MeanAbsolutePercentageError(), True),
        (lambda: R2Score(), False),
    ],
)
def test_which_torchmetrics_metrics_are_means_over_samples(make, decomposable):
    assert metric_info(make()).decomposable is decomposable
