"""The words and tables that explain EvalGuard's numbers: the one-sentence reading, and the end-of-fit summary."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_only

from lightning_evalguard.metrics import MetricInfo

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "EFFECT_LABELS",
    "METRIC_INFO_TAG",
    "format_value",
    "print_summary",
    "read_metric_info",
    "reading",
    "render_summary",
    "summary_rows",
    "summary_text",
    "tensorboard_layout",
    "write_metric_info",
    "write_tensorboard_layout",
]

#: Effect kinds (the ``<prefix>/effect/<kind>/<name>`` keys) and how the reading names them.
EFFECT_LABELS: dict[str, str] = {
    "train_mode": "train mode (Dropout, BatchNorm batch statistics)",
    "augmentation": "augmentation",
    "weight_drift": "weights moving during the epoch",
}


def _is_fraction(*values: float | None) -> bool:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return bool(present) and all(0.0 <= value <= 1.0 for value in present)


def format_value(value: float | None) -> str:
    """Format a metric value for a table: four decimals, or ``-`` when absent.

    Args:
        value: The value, or None.

    Returns:
        The text.
    """
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}"


def reading(
    name: str,
    running: float | None,
    clean: float,
    effects: Mapping[str, float] | None = None,
    validation: float | None = None,
    stderr: float | None = None,
    info: MetricInfo | None = None,
) -> str:
    """One sentence that says what the numbers mean.

    Differences are in points (x 100) for metrics bounded in [0, 1], e.g. "running acc understates clean acc by 4.1
    points; 3.2 of them come from augmentation", otherwise in the metric's own units. "understates"/"overstates"
    follow the metric's ``higher_is_better``: a running MSE above the clean one "overstates the error". With a
    standard error of the clean value (a random subset), the gap is called real when it exceeds two of them.

    Args:
        name: The metric name.
        running: The running train value, or None when it was not found.
        clean: The clean value.
        effects: ``{"train_mode" | "augmentation" | "weight_drift": value}`` when the gap was decomposed.
        validation: The validation value, when known.
        stderr: The clean value's standard error, when measured on a random subset.
        info: What torchmetrics says of the metric (bounds, ``higher_is_better``); without it, values in [0, 1]
            are read as fractions and higher as better.

    Returns:
        The sentence, ending with a full stop.
    """
    points = info.bounded if info is not None else _is_fraction(running, clean, validation)
    higher_is_better = info.higher_is_better if info is not None else True
    scale, unit = (100.0, " points") if points else (1.0, "")

    def amount(value: float, with_unit: bool = True) -> str:
        if not points:
            return f"{abs(value):.4g}"
        return f"{abs(value) * scale:.1f}" + (unit if with_unit else "")

    if running is None:
        sentence = f"clean {name} is {format_value(clean)}; no running {name} was found to compare with"
    elif math.isnan(clean) or math.isnan(running):
        sentence = f"running {name} is {format_value(running)} and clean {name} {format_value(clean)}: no gap to read"
    else:
        gap = clean - running
        if _negligible(gap, clean, running, points):
            sentence = f"running {name} matches clean {name} (gap {amount(gap)})"
        else:
            if higher_is_better is None:
                sentence = f"running {name} is {amount(gap)} {'below' if gap > 0 else 'above'} clean {name}"
            elif higher_is_better:
                sentence = f"running {name} {'understates' if gap > 0 else 'overstates'} clean {name} by {amount(gap)}"
            else:
                verb = "overstates" if gap < 0 else "understates"
                side = "below" if gap < 0 else "above"
                sentence = f"running {name} {verb} the error by {amount(gap)} (clean {name} is {side} it)"
            if effects:
                same_sign = {kind: value for kind, value in effects.items() if value * gap > 0}
                if same_sign:
                    kind = max(same_sign, key=lambda k: abs(same_sign[k]))
                    label = EFFECT_LABELS.get(kind, kind)
                    sentence += f"; {amount(same_sign[kind], with_unit=False)} of them come from {label}"
            if stderr is not None and stderr > 0 and not math.isnan(stderr):
                errors = abs(gap) / stderr
                if errors > 2:
                    sentence += f"; the gap of {amount(gap)} is {errors:.1f} standard errors: real"
                else:
                    sentence += (
                        f"; the gap of {amount(gap)} is within the subset's noise ({errors:.1f} standard errors)"
                    )
    if validation is not None:
        generalization = clean - validation
        direction = "below" if generalization >= 0 else "above"
        sentence += f"; validation {name} is {amount(generalization)} {direction} clean (generalization gap)"
    return sentence + "."


def _negligible(gap: float, clean: float, running: float, points: bool) -> bool:
    # Whether the gap rounds to nothing at the precision the sentence prints.
    if points:
        return abs(gap * 100.0) < 0.05
    return abs(gap) <= 5e-5 * max(abs(clean), abs(running)) or gap == 0


def summary_rows(
    names: Sequence[str],
    last: Mapping[str, Mapping[str, float]],
    infos: Mapping[str, MetricInfo] | None = None,
) -> list[dict[str, str]]:
    """Rows of the summary table, one per metric, from the last evaluated epoch.

    Args:
        names: The metric names, in order.
        last: ``{"clean": {...}, "running": {...}, "gap": {...}, "validation": {...}, "generalization": {...},
            "effect/<kind>": {...}, "stderr": {...}}``; missing groups are allowed.
        infos: What torchmetrics says of each metric, by name (see :func:`reading`).

    Returns:
        One dict per metric with the formatted columns and the reading.
    """
    rows = []
    for name in names:

        def get(group: str, metric: str = name) -> float | None:
            return last.get(group, {}).get(metric)

        clean = get("clean")
        if clean is None:
            continue
        effects = {kind: value for kind in EFFECT_LABELS if (value := get(f"effect/{kind}")) is not None}
        row = {
            "metric": name,
            "running": format_value(get("running")),
            "clean": format_value(clean),
            "gap": format_value(get("gap")),
            "validation": format_value(get("validation")),
            "generalization": format_value(get("generalization")),
            **{f"effect/{kind}": format_value(value) for kind, value in effects.items()},
        }
        if get("stderr") is not None:
            row["stderr"] = format_value(get("stderr"))
        row["reading"] = reading(
            name,
            get("running"),
            clean,
            effects or None,
            get("validation"),
            get("stderr"),
            (infos or {}).get(name),
        )
        rows.append(row)
    return rows


def summary_text(rows: Sequence[Mapping[str, str]], title: str = "EvalGuard summary") -> str:
    """Render summary rows as a plain-text table followed by the readings.

    Args:
        rows: From ``summary_rows``.
        title: The first line.

    Returns:
        The text, without a trailing newline.
    """
    if not rows:
        return f"{title}: no clean pass has run."
    columns = [column for column in rows[0] if column != "reading"]
    for row in rows[1:]:
        columns += [column for column in row if column != "reading" and column not in columns]
    widths = {column: max(len(column), *(len(row.get(column, "-")) for row in rows)) for column in columns}
    lines = [title, "  ".join(column.ljust(widths[column]) for column in columns)]
    lines += ["  ".join(row.get(column, "-").ljust(widths[column]) for column in columns) for row in rows]
    lines += [f"{row['metric']}: {row['reading']}" for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def render_summary(rows: Sequence[Mapping[str, str]], title: str = "EvalGuard summary") -> Any:
    """The summary for printing: a ``rich`` table (with the readings as a caption) when rich is installed.

    Args:
        rows: From ``summary_rows``.
        title: The table's title.

    Returns:
        A ``rich.table.Table``, or the plain text of ``summary_text`` without rich.
    """
    try:
        from rich.table import Table
    except ImportError:
        return summary_text(rows, title)
    if not rows:
        return summary_text(rows, title)
    columns = [column for column in rows[0] if column != "reading"]
    for row in rows[1:]:
        columns += [column for column in row if column != "reading" and column not in columns]
    readings = "\n".join(f"{row['metric']}: {row['reading']}" for row in rows)
    table = Table(title=title, caption=readings, caption_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in rows:
        table.add_row(*(row.get(column, "-") for column in columns))
    return table


def tensorboard_layout(
    prefix: str,
    names: Sequence[str],
    validation_keys: Mapping[str, Sequence[str]],
    decompose: bool,
    bands: Sequence[str] = (),
) -> dict[str, dict[str, list[Any]]]:
    """A TensorBoard custom-scalars layout: per metric, running, clean and validation overlaid; gaps; effects.

    Charts select tags by regular expression, so the validation key may be any of its candidates.

    Args:
        prefix: EvalGuard's key prefix; it names the category.
        names: The metric names.
        validation_keys: Per metric, the keys its validation value may be logged under.
        decompose: Whether effects are logged (adds a chart per metric).
        bands: The metrics whose clean value gets a standard error (a random subset): a margin chart each, the clean
            value between ``clean_low`` and ``clean_high`` (clean -/+ 2 standard errors).

    Returns:
        ``{category: {chart title: ["Multiline", [tag regexes]] or ["Margin", [value, lower, upper tags]]}}`` for
        ``SummaryWriter.add_custom_scalars``.
    """

    def key(*parts: str) -> str:
        return "/".join(part for part in (prefix, *parts) if part)

    charts: dict[str, list[Any]] = {}
    for name in names:
        tags = [f"^{re.escape(key('running', name))}$", f"^{re.escape(key('clean', name))}$"]
        tags += [f"^{re.escape(candidate)}$" for candidate in validation_keys.get(name, [])]
        charts[f"{name}: running, clean, validation"] = ["Multiline", tags]
    gaps = [f"^{re.escape(key(group, name))}$" for name in names for group in ("gap", "generalization")]
    charts["gaps: clean - running, clean - validation"] = ["Multiline", gaps]
    if decompose:
        for name in names:
            effects = [f"^{re.escape(key('effect', kind, name))}$" for kind in EFFECT_LABELS]
            charts[f"{name}: the gap's causes"] = ["Multiline", [f"^{re.escape(key('gap', name))}$", *effects]]
    for name in bands:
        charts[f"{name}: clean, 2 standard errors either side"] = [
            "Margin",
            [key("clean", name), key("clean_low", name), key("clean_high", name)],
        ]
    return {prefix or "evalguard": charts}


def write_tensorboard_layout(trainer: pl.Trainer, layout: Any) -> None:
    """Give every attached TensorBoardLogger the custom-scalars dashboard ``layout`` (rank zero only).

    Other loggers are left untouched.

    Args:
        trainer: The Trainer.
        layout: What :func:`tensorboard_layout` returned.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if not _is_tensorboard_logger(logger):
            continue
        writer: Any = getattr(logger, "experiment", None)
        if hasattr(writer, "add_custom_scalars"):
            writer.add_custom_scalars(layout)


#: The text tag, under the prefix, that holds what EvalGuard knows of each metric (read back by ``evalguard report``).
METRIC_INFO_TAG = "metric_info"


def write_metric_info(trainer: pl.Trainer, prefix: str, infos: Mapping[str, MetricInfo]) -> None:
    """Write each metric's bounds and ``higher_is_better`` as a text summary to every TensorBoardLogger (rank zero).

    ``evalguard report`` reads it back to word the gaps as the end-of-fit summary does. The text tag is
    ``<prefix>/metric_info``, a JSON object ``{name: {"bounded": bool, "higher_is_better": bool | null}}``.

    Args:
        trainer: The Trainer.
        prefix: EvalGuard's key prefix.
        infos: What torchmetrics says of each metric, by logged name.
    """
    if not trainer.is_global_zero or not infos:
        return
    text = json.dumps(
        {name: {"bounded": info.bounded, "higher_is_better": info.higher_is_better} for name, info in infos.items()}
    )
    tag = "/".join(part for part in (prefix, METRIC_INFO_TAG) if part)
    for logger in trainer.loggers:
        writer: Any = getattr(logger, "experiment", None) if _is_tensorboard_logger(logger) else None
        if hasattr(writer, "add_text"):
            writer.add_text(tag, text, 0)


def read_metric_info(text: str) -> dict[str, MetricInfo]:
    """Parse what :func:`write_metric_info` wrote.

    Args:
        text: The JSON text.

    Returns:
        ``{name: MetricInfo}`` (without standard-error kinds); empty when the text is not such an object.
    """
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    infos: dict[str, MetricInfo] = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            higher = value.get("higher_is_better")
            infos[str(name)] = MetricInfo(bool(value.get("bounded")), None if higher is None else bool(higher), None)
    return infos


def add_image(trainer: pl.Trainer, tag: str, image: Any, step: int) -> None:
    """Send an ``(H, W, 3)`` image to every attached TensorBoardLogger (rank zero only).

    Args:
        trainer: The Trainer.
        tag: The image's tag.
        image: The pixels.
        step: The global step.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        writer: Any = getattr(logger, "experiment", None) if _is_tensorboard_logger(logger) else None
        if hasattr(writer, "add_image"):
            writer.add_image(tag, image, step, dataformats="HWC")


@rank_zero_only
def print_summary(rows: list[dict[str, str]], extra: str | None = None) -> None:
    """Print the end-of-fit summary on rank zero: a rich table in a terminal, plain text elsewhere.

    The summary is the one thing EvalGuard prints (``print_summary=False`` turns it off). In log files and pipes rich
    would cut the table at 80 columns, so they get :func:`summary_text`.

    Args:
        rows: What :func:`summary_rows` returned.
        extra: A line printed after it (the per-sample statistics'), or None.
    """
    rendered = render_summary(rows) if sys.stdout.isatty() else summary_text(rows)
    if isinstance(rendered, str):
        print(rendered)
    else:
        from rich.console import Console

        Console().print(rendered)
    if extra:
        print(extra)


def _is_tensorboard_logger(logger: Any) -> bool:
    """Whether ``logger`` is a ``TensorBoardLogger`` (or a subclass) of either Lightning namespace.

    The standalone ``pytorch_lightning`` package is checked only when the user has imported it: importing it here
    would re-route Lightning's log messages.

    Args:
        logger: One of ``trainer.loggers``.

    Returns:
        True for a ``TensorBoardLogger`` or a subclass of one.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    classes: list[type] = [TensorBoardLogger]
    standalone = sys.modules.get("pytorch_lightning.loggers")
    if standalone is not None and isinstance(getattr(standalone, "TensorBoardLogger", None), type):
        classes.append(standalone.TensorBoardLogger)
    return isinstance(logger, tuple(classes))
