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
    "are_probabilities",
    "classification_outputs",
    "draw_data_map",
    "is_classification",
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
    "seen",
)

ScoreFn = Callable[[Any, Any], torch.Tensor]


def classification_outputs(
    preds: torch.Tensor, target: torch.Tensor, probabilities: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Margin, probability of the given label and prediction of each sample of a classification batch.

    Preds of shape (B, C) are scores over C classes; (B,) or (B, 1) are binary, seen as two classes (logits z as
    (-z/2, z/2), probabilities p as (1 - p, p)). Probabilities are ``softmax(preds)`` unless the preds already lie in
    [0, 1] (and, for C > 1, sum to 1 per row: torchmetrics' rule). The margin is the score of the given label minus
    the largest other score (for binary logits: z when the label is 1, -z when it is 0). Nothing here syncs with the
    host.

    Args:
        preds: The batch's predictions.
        target: Its integer labels, shape (B,).
        probabilities: Whether the preds are probabilities (a boolean 0-dim tensor from :func:`are_probabilities`),
            when already decided on a pass's first batch; None decides it from this batch. No host sync either way.

    Returns:
        ``(margin, probability, prediction)``, each of shape (B,), in the preds' precision (at least float32).

    Raises:
        ValueError: If the shapes are not those of a classification batch.
    """
    if not is_classification(preds, target):
        shape = tuple(preds.shape) if isinstance(preds, torch.Tensor) else type(preds).__name__
        target_shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        dtype = f" and dtype {target.dtype}" if isinstance(target, torch.Tensor) else ""
        raise ValueError(
            "EvalGuard(track_samples=True) computes margins from classification outputs: preds of shape (B, C), (B,)"
            f" or (B, 1) and integer targets of shape (B,); got preds of shape {shape} and target of shape"
            f" {target_shape}{dtype}. Pass `sample_score=` (preds, target) -> a score per sample (higher = fits"
            " better) for other tasks."
        )
    scores = preds[:, 0] if preds.ndim == 2 and preds.shape[1] == 1 else preds
    scores = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    flag = are_probabilities(scores) if probabilities is None else probabilities
    if scores.ndim == 1:  # binary: two classes
        scores = torch.where(flag, torch.stack([1 - scores, scores], 1), torch.stack([-scores, scores], 1) / 2)
    labels = target.long().unsqueeze(1)
    given = scores.gather(1, labels).squeeze(1)
    probability = torch.where(flag, given, (given - scores.logsumexp(1)).exp())
    others = scores.scatter(1, labels, float("-inf")).amax(1)
    return given - others, probability, scores.argmax(1)


def is_classification(preds: Any, target: Any) -> bool:
    """Whether ``(preds, target)`` are classification outputs: preds (B, C), (B,) or (B, 1), integer labels (B,).

    Args:
        preds: The predictions.
        target: The targets.

    Returns:
        Whether :func:`classification_outputs` reads them (shapes and dtypes only: no host sync).
    """
    return (
        isinstance(preds, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and preds.ndim in (1, 2)
        and (preds.ndim == 1 or preds.shape[1] > 0)
        and target.ndim == 1
        and target.shape[0] == preds.shape[0]
        and not target.is_floating_point()
        and not target.is_complex()
    )


def are_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Whether scores are probabilities: in [0, 1], and for (B, C) scores summing to 1 per row (torchmetrics' rule).

    Args:
        scores: The predictions, (B,) binary or (B, C).

    Returns:
        A boolean 0-dim tensor (no host sync).
    """
    scores = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    if not scores.numel():  # an empty batch decides nothing
        return torch.zeros((), dtype=torch.bool, device=scores.device)
    low, high = scores.aminmax()
    inside = (low >= 0) & (high <= 1)
    if scores.ndim == 1 or scores.shape[1] == 1:
        return inside
    return inside & ((scores.sum(1) - 1).abs().amax() <= 1e-6)


#: Classification outputs are copied into chunks of at most this many bytes (or one batch) on the model's device;
#: a chunk's margins, probabilities and predictions are computed at once when it is full or the pass ends.
CHUNK_BYTES = 8 * 2**20


class PassOutputs:
    """The per-sample values of one clean pass, gathered batch by batch on the model's device.

    Per batch, classification outputs cost one copy into a chunk (a dozen small tensor operations per batch would
    cost more than the copy on a cheap model); ``sample_score`` is called per batch. Nothing syncs with the host
    before :meth:`to_host`.
    """

    def __init__(
        self, tracker: SampleTracker, order: Sequence[int] | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        """Start a pass.

        Args:
            tracker: How to score and identify the samples.
            order: The dataset indices the rebuilt loader reads, in order (ids when there is no ``sample_ids``).
            chunk_bytes: The most bytes of classification outputs kept before their values are computed (at least
                one batch).
        """
        self._tracker = tracker
        self._chunk_bytes = chunk_bytes
        self._order = order
        self._read = 0
        self._ids: list[torch.Tensor] = []
        # Per part: labels (or None), scores, probabilities (or None), predictions (or None), count.
        self._parts: list[tuple[Any, ...]] = []
        self._chunk: torch.Tensor | None = None
        self._chunk_targets: torch.Tensor | None = None
        self._filled = 0
        self._probabilities: torch.Tensor | None = None  # decided on the pass's first batch

    def observe(self, batch: Any, preds: Any, target: Any) -> None:
        """Keep one batch's values (no host sync).

        Args:
            batch: The batch as it reached the model (for ``sample_ids``).
            preds: Its predictions.
            target: Its targets.

        Raises:
            ValueError: If the outputs are not classification outputs and no ``sample_score`` was given, the score
                is not one value per sample, or ``sample_ids`` does not give one id per sample.
        """
        if self._tracker.sample_score is not None:
            scores = self._tracker.score(preds, target)
            count = int(scores.shape[0])
            self._parts.append((_labels(target), scores.detach(), None, None, count))
        else:
            count = self._copy(preds, target)
        if self._tracker.sample_ids is not None:
            self._ids.append(self._tracker.batch_ids(batch, count))
        self._read += count

    def _copy(self, preds: Any, target: Any) -> int:
        if not is_classification(preds, target):
            classification_outputs(preds, target)  # raises, naming the shapes
        scores = preds[:, 0] if preds.ndim == 2 and preds.shape[1] == 1 else preds
        count = int(scores.shape[0])
        if not count:
            return 0
        if self._probabilities is None:
            self._probabilities = are_probabilities(scores)
        chunk, targets = self._chunk, self._chunk_targets
        if (
            chunk is None
            or targets is None
            or chunk.shape[1:] != scores.shape[1:]
            or chunk.dtype != scores.dtype
            or chunk.device != scores.device
            or targets.dtype != target.dtype
            or targets.device != target.device
            or self._filled + count > chunk.shape[0]
        ):
            self._flush()
            row_bytes = max(scores[:1].numel() * scores.element_size(), 1)
            rows = max(count, self._chunk_bytes // row_bytes)
            if self._order is not None:  # no more rows than the pass has left to read
                rows = max(count, min(rows, len(self._order) - self._read))
            chunk = self._chunk = scores.new_empty((rows, *scores.shape[1:]))
            targets = self._chunk_targets = target.new_empty(rows)
        # A copy, not a reference: a forward may reuse its output buffer for the next batch (CUDA graphs).
        chunk[self._filled : self._filled + count].copy_(scores.detach())
        targets[self._filled : self._filled + count].copy_(target)
        self._filled += count
        return count

    def _flush(self) -> None:
        if self._filled and self._chunk is not None and self._chunk_targets is not None:
            scores, targets = self._chunk[: self._filled], self._chunk_targets[: self._filled]
            margin, probability, prediction = classification_outputs(scores, targets, self._probabilities)
            self._parts.append((targets, margin, probability, prediction, self._filled))
        self._chunk, self._chunk_targets, self._filled = None, None, 0

    def to_host(self) -> tuple[torch.Tensor, ...]:
        """All batches' values, concatenated, converted and moved to the host once.

        Returns:
            ``(ids, targets, scores, probabilities, predictions)`` on the CPU: int64, int64, float64, float64, int64
            (-1 or NaN where a batch had no such value; empty when the pass had no batch).
        """
        self._flush()
        if not self._parts:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64), empty

        def column(position: int, dtype: torch.dtype, fill: float) -> torch.Tensor:
            device = self._parts[0][1].device
            on_device = torch.float32 if device.type == "mps" and dtype == torch.float64 else dtype  # no MPS float64
            values = [
                part[position].reshape(-1).to(on_device)
                if part[position] is not None
                else torch.full((part[4],), fill, dtype=on_device, device=part[1].device)
                for part in self._parts
            ]
            return (values[0] if len(values) == 1 else torch.cat(values)).cpu().to(dtype)

        if self._tracker.sample_ids is not None:
            ids = (self._ids[0] if len(self._ids) == 1 else torch.cat([part.reshape(-1) for part in self._ids])).cpu()
        else:
            assert self._order is not None
            ids = torch.as_tensor(self._order[: self._read], dtype=torch.long)
        return (
            ids.reshape(-1).to(torch.long),
            column(0, torch.long, -1),
            column(1, torch.float64, math.nan),
            column(2, torch.float64, math.nan),
            column(3, torch.long, -1),
        )


def _labels(target: Any) -> torch.Tensor | None:
    # The given labels when the targets are integer labels, one per sample; else None (-1 in the statistics).
    if isinstance(target, torch.Tensor) and target.ndim == 1 and not target.is_floating_point():
        return target
    return None


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
        seen: The number of passes that evaluated the sample: ``passes`` unless the subset changes between passes
            (``limit_batches="auto"``); the means and ``correct`` are over these passes.
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
    def seen(self) -> torch.Tensor:
        """The number of passes that evaluated each sample."""
        return self._seen

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

    def start_pass(self, order: Sequence[int] | None) -> PassOutputs:
        """Start collecting one clean pass's values.

        Args:
            order: The dataset indices the rebuilt loader reads, in order, or None (then ``sample_ids`` gives them).

        Returns:
            The pass's collector: call its ``observe`` per batch and its ``to_host`` at the end.
        """
        return PassOutputs(self, order)

    def check(self, preds: Any, target: Any) -> None:
        """Fail now for outputs the tracker cannot score (at fit start, on the first clean batch).

        Args:
            preds: The batch's predictions.
            target: Its targets.

        Raises:
            ValueError: If the outputs are not classification outputs and no ``sample_score`` was given, or the
                score is not one value per sample.
        """
        if self.sample_score is None:
            classification_outputs(preds, target)
        else:
            self.score(preds, target)

    def score(self, preds: Any, target: Any) -> torch.Tensor:
        """The ``sample_score`` of one batch, checked.

        Args:
            preds: The batch's predictions.
            target: Its targets.

        Returns:
            One score per sample, shape (B,).

        Raises:
            ValueError: If the score is not a 1-D tensor.
        """
        assert self.sample_score is not None
        scores = self.sample_score(preds, target)
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
            raise ValueError(
                "EvalGuard's `sample_score` must return one score per sample, a 1-D tensor of shape (B,); got "
                + (f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__)
                + "."
            )
        return scores

    def batch_ids(self, batch: Any, count: int) -> torch.Tensor:
        """The dataset indices of a batch from ``sample_ids``, checked.

        Args:
            batch: The batch as it reaches the model.
            count: The batch's number of samples.

        Returns:
            A LongTensor of shape (count,), where ``sample_ids`` left it.

        Raises:
            ValueError: If ``sample_ids`` returned something else.
        """
        assert self.sample_ids is not None
        ids = self.sample_ids(batch)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.shape[0] != count:
            raise ValueError(
                f"EvalGuard's `sample_ids` must return a LongTensor of shape ({count},), one id per sample."
            )
        return ids

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
    integers = {"indices", "targets", "correct", "forgetting", "first_learned", "last_prediction", "seen"}
    fields: dict[str, Any] = {"passes": int(rows[0]["passes"]) if rows and "passes" in rows[0] else 0}
    for name in FIELDS:
        values = [row.get(name, fields["passes"]) for row in rows]  # a file without "seen": every pass saw them
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
    seen = fields["seen"].double() if "seen" in fields else torch.full((count,), float(passes))
    fraction = (fields["correct"].double() / seen.clamp(min=1)).numpy()
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
