"""Per-sample training dynamics from the clean passes: which samples the model gets wrong, forgets, or finds hardest.

Each clean pass gives, for every tracked sample, the eval-mode output on the un-augmented input. Kept across passes as
running sums (nothing is stored per epoch), they give the statistics of Dataset Cartography (confidence and
variability of the probability of the given label; Swayamdipta et al., 2020), of the Area Under the Margin (the mean
margin of the given label over the largest other; Pleiss et al., 2020) and forgetting events (Toneva et al., 2019),
here from clean outputs keyed by dataset index.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PassOutputs",
    "SampleStats",
    "SampleTracker",
    "classification_outputs",
    "draw_data_map",
    "read_csv",
    "suspects_of",
    "summary_line",
]

#: The per-sample fields, in the order of ``to_csv`` and ``to_dict``.
FIELDS = (
    "indices",
    "targets",
    "mean_margin",
    "last_margin",
    "confidence",
    "variability",
    "correct",
    "forgetting",
    "first_learned",
    "last_prediction",
)

ScoreFn = Callable[[Any, Any], torch.Tensor]


def classification_outputs(
    preds: torch.Tensor, target: torch.Tensor, probabilities: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Margin, probability of the given label and prediction of each sample of a classification batch.

    Preds of shape (B, C) are scores over C classes; (B,) or (B, 1) are binary, seen as two classes (logits z as
    (-z/2, z/2), probabilities p as (1 - p, p)). Probabilities are ``softmax(preds)`` unless the preds already lie in
    [0, 1] and sum to 1 per row (torchmetrics' rule). The margin is the score of the given label minus the largest
    other score (for binary logits: z when the label is 1, -z when it is 0). Nothing here syncs with the host.

    Args:
        preds: The batch's predictions.
        target: Its integer labels, shape (B,).
        probabilities: Whether the (B, C) preds are probabilities (a boolean 0-dim tensor from
            :func:`are_probabilities`), when already decided on a pass's first batch; None decides it from this batch.
            No host sync either way.

    Returns:
        ``(margin, probability, prediction)``, each of shape (B,), in the preds' precision (at least float32).

    Raises:
        ValueError: If the shapes are not those of a classification batch.
    """
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim == 1:
        scores = preds.double()
        probability_like = ((scores >= 0) & (scores <= 1)).all()
        preds = torch.where(
            probability_like, torch.stack([1 - scores, scores], 1), torch.stack([-scores, scores], 1) / 2
        )
    if preds.ndim != 2 or target.ndim != 1 or preds.shape[0] != target.shape[0] or target.is_floating_point():
        raise ValueError(
            "EvalGuard(track_samples=True) computes margins from classification outputs: preds of shape (B, C), (B,)"
            f" or (B, 1) and integer targets of shape (B,); got preds of shape {tuple(preds.shape)} and target of"
            f" shape {tuple(target.shape)} and dtype {target.dtype}. Pass `sample_score=` (preds, target) -> a score"
            " per sample (higher = fits better) for other tasks."
        )
    scores = preds if preds.dtype in (torch.float32, torch.float64) else preds.float()
    labels = target.long().unsqueeze(1)
    given = scores.gather(1, labels).squeeze(1)
    flag = are_probabilities(scores) if probabilities is None else probabilities
    probability = torch.where(flag, given, (given - scores.logsumexp(1)).exp())
    others = scores.scatter(1, labels, float("-inf")).amax(1)
    return given - others, probability, scores.argmax(1)


def are_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Whether (B, C) scores lie in [0, 1] and sum to 1 per row (then they are used as probabilities), as a tensor.

    Args:
        scores: The predictions.

    Returns:
        A boolean 0-dim tensor (no host sync).
    """
    low, high = scores.aminmax()
    return (low >= 0) & (high <= 1) & ((scores.sum(1) - 1).abs().amax() <= 1e-6)


class PassOutputs:
    """The per-sample values of one clean pass, gathered batch by batch on the model's device.

    Attributes:
        ids: Dataset indices, in pass order.
        targets: The given labels (-1 when not integers).
        scores: Margins, or ``sample_score`` values.
        probabilities: Probability of the given label (NaN with ``sample_score``).
        predictions: Predicted labels (-1 with ``sample_score``).
    """

    def __init__(self) -> None:
        self._parts: list[tuple[Any, ...]] = []

    def add(self, ids: torch.Tensor, target: Any, scores: torch.Tensor, probabilities: Any, predictions: Any) -> None:
        """Keep one batch's values as they are (no copy, no host sync); :meth:`to_host` converts them once.

        Args:
            ids: The batch's dataset indices.
            target: Its labels.
            scores: One score per sample.
            probabilities: One probability per sample, or None.
            predictions: One predicted label per sample, or None.
        """
        labels = (
            target if isinstance(target, torch.Tensor) and target.ndim == 1 and not target.is_floating_point() else None
        )
        self._parts.append((ids, labels, scores.detach(), probabilities, predictions, scores.shape[0]))

    def to_host(self) -> tuple[torch.Tensor, ...]:
        """All batches' values, concatenated, converted and moved to the host once.

        Returns:
            ``(ids, targets, scores, probabilities, predictions)`` on the CPU: int64, int64, float64, float64, int64
            (-1 or NaN where a batch had no such value; empty when the pass had no batch).
        """
        if not self._parts:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64), empty

        def column(position: int, dtype: torch.dtype, fill: float) -> torch.Tensor:
            values = [
                part[position].reshape(-1).to(dtype)
                if part[position] is not None
                else torch.full((part[5],), fill, dtype=dtype, device=part[2].device)
                for part in self._parts
            ]
            return torch.cat(values).cpu()

        return (
            column(0, torch.long, -1),
            column(1, torch.long, -1),
            column(2, torch.float64, math.nan),
            column(3, torch.float64, math.nan),
            column(4, torch.long, -1),
        )


class SampleStats:
    """Per-sample statistics of the clean passes, one entry per tracked sample in ascending dataset-index order.

    Running sums only (Welford for the variance): memory does not grow with the number of epochs (60 bytes per
    sample). With ``sample_score``, ``mean_margin`` and ``last_margin`` hold the score's statistics, and
    ``confidence``/``variability`` are NaN, ``correct``/``forgetting``/``first_learned``/``last_prediction`` -1.

    Attributes:
        passes: The number of clean passes that updated the statistics.
        indices: Dataset indices (int64).
        targets: Given labels (int64; -1 when the targets are not integer labels).
        mean_margin: Mean over passes of the margin of the given label over the largest other (the AUM).
        last_margin: The last pass's margin.
        confidence: Mean over passes of the probability of the given label.
        variability: Population standard deviation of that probability over passes.
        correct: Number of passes in which the sample was predicted right.
        forgetting: Number of passes predicted wrong after a pass predicted right.
        first_learned: The epoch of the first pass that predicted it right, -1 if none.
        last_prediction: The last pass's predicted label.
    """

    def __init__(self, scored: bool = False) -> None:
        """Start with no sample.

        Args:
            scored: Whether a ``sample_score`` replaces the margin (no probabilities, no predictions).
        """
        self.scored = scored
        self.passes = 0
        self.indices = torch.empty(0, dtype=torch.long)
        self.targets = torch.empty(0, dtype=torch.long)
        self._seen = torch.empty(0, dtype=torch.int32)
        self._score_sum = torch.empty(0, dtype=torch.float64)
        self.last_margin = torch.empty(0, dtype=torch.float32)
        self._probability_mean = torch.empty(0, dtype=torch.float64)
        self._probability_m2 = torch.empty(0, dtype=torch.float64)
        self.correct = torch.empty(0, dtype=torch.int32)
        self.forgetting = torch.empty(0, dtype=torch.int32)
        self.first_learned = torch.empty(0, dtype=torch.int32)
        self.last_prediction = torch.empty(0, dtype=torch.int32)

    _STATE = (
        "indices",
        "targets",
        "_seen",
        "_score_sum",
        "last_margin",
        "_probability_mean",
        "_probability_m2",
        "correct",
        "forgetting",
        "first_learned",
        "last_prediction",
    )

    def __len__(self) -> int:
        """The number of tracked samples."""
        return int(self.indices.numel())

    @property
    def mean_margin(self) -> torch.Tensor:
        """Mean over passes of the margin (or score) of each sample."""
        return (self._score_sum / self._seen.clamp(min=1)).to(torch.float32)

    @property
    def confidence(self) -> torch.Tensor:
        """Mean over passes of the probability of the given label (NaN with ``sample_score``)."""
        return self._probability_mean.to(torch.float32)

    @property
    def variability(self) -> torch.Tensor:
        """Population standard deviation over passes of the probability of the given label."""
        return (self._probability_m2 / self._seen.clamp(min=1)).sqrt().to(torch.float32)

    def _grow(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Positions of ``ids`` in the tracked arrays, adding the ids not tracked yet (kept in ascending order).
        if torch.equal(ids, self.indices):  # the usual case: the same samples as the last pass, in order
            self.targets = targets.clone()
            return torch.arange(len(ids))
        new = torch.unique(ids[~torch.isin(ids, self.indices)])
        if new.numel():
            merged = torch.cat([self.indices, new])
            order = merged.argsort()
            count = new.numel()
            defaults = {
                "indices": new,
                "targets": torch.full((count,), -1, dtype=torch.long),
                "_seen": torch.zeros(count, dtype=torch.int32),
                "_score_sum": torch.zeros(count, dtype=torch.float64),
                "last_margin": torch.full((count,), math.nan, dtype=torch.float32),
                "_probability_mean": torch.full((count,), 0.0 if not self.scored else math.nan, dtype=torch.float64),
                "_probability_m2": torch.full((count,), 0.0 if not self.scored else math.nan, dtype=torch.float64),
                "correct": torch.full((count,), -1 if self.scored else 0, dtype=torch.int32),
                "forgetting": torch.full((count,), -1 if self.scored else 0, dtype=torch.int32),
                "first_learned": torch.full((count,), -1, dtype=torch.int32),
                "last_prediction": torch.full((count,), -1, dtype=torch.int32),
            }
            for name in self._STATE:
                setattr(self, name, torch.cat([getattr(self, name), defaults[name]])[order])
        positions = torch.searchsorted(self.indices, ids)
        self.targets[positions] = targets
        return positions

    def update(
        self,
        epoch: int,
        ids: torch.Tensor,
        targets: torch.Tensor,
        scores: torch.Tensor,
        probabilities: torch.Tensor,
        predictions: torch.Tensor,
    ) -> dict[str, float]:
        """Add one clean pass (all ranks' samples, each once).

        Args:
            epoch: The training epoch of the pass.
            ids: Dataset indices.
            targets: Given labels.
            scores: Margins (or ``sample_score`` values).
            probabilities: Probabilities of the given labels.
            predictions: Predicted labels.

        Returns:
            ``learned`` (fraction of this pass's samples predicted right), ``forgotten`` (forgetting events in this
            pass) and ``never_learned`` (fraction of tracked samples never predicted right so far); empty with
            ``sample_score``.
        """
        positions = self._grow(ids, targets)
        self.passes += 1
        seen = self._seen[positions] + 1
        self._seen[positions] = seen
        self._score_sum[positions] += scores
        self.last_margin[positions] = scores.to(torch.float32)
        if self.scored:
            return {}
        delta = probabilities - self._probability_mean[positions]
        mean = self._probability_mean[positions] + delta / seen
        self._probability_m2[positions] += delta * (probabilities - mean)
        self._probability_mean[positions] = mean
        right = predictions == targets
        was_right = (self.last_prediction[positions] == targets) & (seen > 1)
        forgotten = was_right & ~right
        self.forgetting[positions] += forgotten.to(torch.int32)
        self.correct[positions] += right.to(torch.int32)
        first = right & (self.first_learned[positions] < 0)
        self.first_learned[positions[first]] = epoch
        self.last_prediction[positions] = predictions.to(torch.int32)
        return {
            "learned": float(right.double().mean()) if right.numel() else 0.0,
            "forgotten": float(forgotten.sum()),
            "never_learned": float((self.first_learned < 0).double().mean()) if len(self) else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every per-sample field as a 1-D CPU tensor, and ``passes``.

        Returns:
            ``{"passes": int, "indices": tensor, "targets": ..., ...}`` in the order of the fields.
        """
        fields: dict[str, Any] = {"passes": self.passes}
        fields.update({name: getattr(self, name) for name in FIELDS})
        return fields

    def suspects(self, k: int = 20) -> list[dict[str, Any]]:
        """The ``k`` samples with the lowest ``mean_margin`` (ties by index): a lead list for label noise.

        Args:
            k: How many.

        Returns:
            One dict per sample with its fields as Python numbers, lowest mean margin first.
        """
        return suspects_of(self.to_dict(), k)

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per tracked sample (the fields above, then ``passes``) to ``path``.

        Args:
            path: The file to write.

        Returns:
            The path written.
        """
        path = Path(path)
        fields = self.to_dict()
        columns = [fields[name].tolist() for name in FIELDS] + [[self.passes] * len(self)]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow((*FIELDS, "passes"))
            writer.writerows(zip(*columns, strict=True))
        return path

    def state_dict(self) -> dict[str, Any]:
        """The running sums as plain tensors (``torch.load(..., weights_only=True)`` loads them).

        Returns:
            The state.
        """
        state: dict[str, Any] = {"passes": self.passes, "scored": self.scored}
        state.update({name: getattr(self, name).clone() for name in self._STATE})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SampleStats:
        """Rebuild the statistics saved by :meth:`state_dict`.

        Args:
            state: What :meth:`state_dict` returned.

        Returns:
            The statistics.
        """
        stats = cls(scored=bool(state.get("scored", False)))
        stats.passes = int(state.get("passes", 0))
        for name in cls._STATE:
            if name in state:
                setattr(stats, name, state[name].clone())
        return stats


class SampleTracker:
    """Collects per-sample values during clean passes and folds them into :class:`SampleStats`.

    Attributes:
        stats: The statistics, None before the first pass.
    """

    def __init__(self, sample_score: ScoreFn | None, sample_ids: Callable[[Any], torch.Tensor] | None) -> None:
        """Store how to score and identify samples.

        Args:
            sample_score: ``(preds, target) -> Tensor[B]`` replacing the margin, or None for classification.
            sample_ids: ``batch -> LongTensor[B]`` of dataset indices, or None when the loader's order gives them.
        """
        self.sample_score = sample_score
        self.sample_ids = sample_ids
        self.stats: SampleStats | None = None

    def outputs(
        self, preds: Any, target: Any, probabilities: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any, Any]:
        """One batch's ``(scores, probabilities or None, predictions or None)``.

        Args:
            preds: The batch's predictions.
            target: Its targets.
            probabilities: Whether classification preds are probabilities, decided once per pass (see
                :func:`classification_outputs`), or None.

        Returns:
            The values, on the model's device.

        Raises:
            ValueError: If the outputs are not classification outputs and no ``sample_score`` was given, or the
                score is not one value per sample.
        """
        if self.sample_score is None:
            margin, probability, prediction = classification_outputs(preds, target, probabilities)
            return margin, probability, prediction
        scores = self.sample_score(preds, target)
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
            raise ValueError(
                "EvalGuard's `sample_score` must return one score per sample, a 1-D tensor of shape (B,); got "
                + (f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__)
                + "."
            )
        return scores, None, None

    def ids(
        self, batch: Any, positions: Sequence[int] | None, start: int, count: int, device: torch.device
    ) -> torch.Tensor:
        """The dataset indices of a batch: from ``sample_ids``, else from the loader's order.

        Args:
            batch: The batch as it reaches the model.
            positions: The dataset indices the rebuilt loader reads, in order, or None.
            start: How many samples the pass read before this batch.
            count: The batch's number of samples.
            device: The batch's device (ids from ``sample_ids`` stay where they are; the loader's order on the host).

        Returns:
            A LongTensor of shape (count,).

        Raises:
            ValueError: If ``sample_ids`` returned something else.
        """
        if self.sample_ids is not None:
            ids = self.sample_ids(batch)
            if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.shape[0] != count:
                raise ValueError(
                    f"EvalGuard's `sample_ids` must return a LongTensor of shape ({count},), one id per sample."
                )
            return ids
        assert positions is not None
        # Kept on the host, where the loader's order is: a copy to the device per batch would wait for the device.
        return torch.as_tensor(positions[start : start + count], dtype=torch.long)

    def fold(self, epoch: int, gathered: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        """Add one pass's values, from every rank, to the statistics.

        Args:
            epoch: The training epoch.
            gathered: Each rank's ``PassOutputs.to_host()``.

        Returns:
            What :meth:`SampleStats.update` returns.
        """
        columns = [torch.cat([part[column] for part in gathered]) for column in range(5)]
        ids, targets, scores, probabilities, predictions = columns
        order = ids.argsort()
        if self.stats is None:
            self.stats = SampleStats(scored=self.sample_score is not None)
        return self.stats.update(
            epoch, ids[order], targets[order], scores[order], probabilities[order], predictions[order]
        )


def summary_line(stats: SampleStats, k: int = 5) -> str:
    """One line for the end-of-fit summary: how many samples were never learned, and the strongest suspects.

    Args:
        stats: The statistics.
        k: How many suspects to name.

    Returns:
        E.g. ``"Samples: 12 of 1437 never predicted right; strongest suspects (index, given, predicted): (803, 3, 8),
        ..."``.
    """
    if stats.scored:
        lowest = ", ".join(f"{row['indices']}" for row in stats.suspects(k))
        return f"Samples: {len(stats)} tracked; lowest mean score (index): {lowest}."
    never = int((stats.first_learned < 0).sum())
    suspects = ", ".join(f"({row['indices']}, {row['targets']}, {row['last_prediction']})" for row in stats.suspects(k))
    return (
        f"Samples: {never} of {len(stats)} never predicted right; strongest suspects (index, given, predicted):"
        f" {suspects}."
    )


def suspects_of(fields: Mapping[str, Any], k: int = 20) -> list[dict[str, Any]]:
    """The ``k`` samples with the lowest ``mean_margin``, ties by index, from per-sample columns.

    Args:
        fields: ``SampleStats.to_dict()`` or :func:`read_csv`'s columns.
        k: How many.

    Returns:
        One dict per sample with its fields as Python numbers, lowest mean margin first.
    """
    margins, indices = fields["mean_margin"].tolist(), fields["indices"].tolist()
    order = sorted(range(len(indices)), key=lambda position: (margins[position], indices[position]))
    return [{name: fields[name][position].item() for name in FIELDS} for position in order[:k]]


def read_csv(path: str | Path) -> dict[str, Any]:
    """Read a ``samples.csv`` back into per-sample columns (1-D tensors) and ``passes``.

    Args:
        path: The file ``SampleStats.to_csv`` wrote.

    Returns:
        ``{"passes": int, "indices": tensor, ...}`` as ``SampleStats.to_dict()`` gives them.
    """
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    integers = {"indices", "targets", "correct", "forgetting", "first_learned", "last_prediction"}
    fields: dict[str, Any] = {"passes": int(rows[0]["passes"]) if rows and "passes" in rows[0] else 0}
    for name in FIELDS:
        values = [row[name] for row in rows]
        if name in integers:
            fields[name] = torch.tensor([int(value) for value in values], dtype=torch.long)
        else:
            fields[name] = torch.tensor([float(value) for value in values], dtype=torch.float32)
    return fields


def draw_data_map(stats: SampleStats | Mapping[str, Any], path: str | Path, k: int = 20) -> Any:
    """Draw the data map to ``path`` (with matplotlib): variability against confidence, the suspects circled.

    x: variability, y: confidence, colour: the fraction of passes predicted right; the ``k`` suspects are circled.

    Args:
        stats: The statistics (classification: with ``sample_score`` there is no probability to map).
        path: The PNG to write.
        k: How many suspects to mark.

    Returns:
        The image as an ``(H, W, 3)`` uint8 array, or None when matplotlib is missing or there is nothing to draw.
    """
    fields = stats.to_dict() if isinstance(stats, SampleStats) else stats
    count, passes = len(fields["indices"]), int(fields["passes"])
    if not count or bool(torch.isnan(fields["confidence"]).all()):  # nothing, or sample_score: no probability
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import numpy as np

    figure = Figure(figsize=(6.4, 5.2), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    variability, confidence = fields["variability"], fields["confidence"]
    fraction = (fields["correct"].double() / max(passes, 1)).numpy()
    points = axes.scatter(variability.numpy(), confidence.numpy(), c=fraction, cmap="viridis", vmin=0, vmax=1, s=12)
    figure.colorbar(points, ax=axes, label="fraction of passes predicted right")
    suspects = suspects_of(fields, k)
    if suspects:
        positions = torch.searchsorted(fields["indices"], torch.tensor([row["indices"] for row in suspects]))
        axes.scatter(
            variability[positions].numpy(),
            confidence[positions].numpy(),
            s=80,
            facecolors="none",
            edgecolors="red",
            label=f"{len(suspects)} lowest mean margin",
        )
        axes.legend(loc="lower right")
    axes.set_xlabel("variability (std of the probability of the given label over passes)")
    axes.set_ylabel("confidence (mean probability of the given label)")
    axes.set_title(f"EvalGuard data map: {count} samples, {passes} clean passes")
    figure.tight_layout()
    canvas.draw()  # type: ignore[no-untyped-call]
    figure.savefig(path)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]
