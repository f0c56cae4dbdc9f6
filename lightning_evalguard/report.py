"""The ``report`` command: EvalGuard's scalars read back from TensorBoard event files, as tables and as a figure.

``evalguard report LOGDIR [--png FILE]`` (or ``python -m lightning_evalguard report LOGDIR [--png FILE]``) finds every
directory under ``LOGDIR`` holding ``events.out.tfevents.*`` files (one run each, e.g. ``lightning_logs/version_0``),
reads the scalars of every EvalGuard instance in it (every ``<prefix>`` with ``<prefix>/clean/<name>`` tags):

- ``<prefix>/clean/<name>``, ``<prefix>/running/<name>``, ``<prefix>/gap/<name>``;
- when present, ``<prefix>/generalization/<name>`` (clean - validation, so validation = clean - generalization) and
  ``<prefix>/effect/<kind>/<name>`` for the kinds of ``lightning_evalguard.summary.EFFECT_LABELS``,

and prints, per metric, one row per evaluated epoch followed by the reading of the last one. Steps are mapped to epochs
with Lightning's ``epoch`` scalar; without it the table shows the step. ``--png FILE`` draws, per metric, the running,
clean and validation curves next to the gap and its effects (matplotlib, from ``lightning-evalguard[plot]``).

The loading, rendering and plotting functions print nothing; only ``main`` writes to stdout and stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_evalguard.metrics import MetricInfo
from lightning_evalguard.samples import draw_data_map, read_csv, suspects_of
from lightning_evalguard.summary import EFFECT_LABELS, METRIC_INFO_TAG, format_value, read_metric_info, reading

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "EpochRow",
    "MetricLog",
    "ReportError",
    "RunLog",
    "find_run_dirs",
    "load_runs",
    "main",
    "parse_scalars",
    "plot_runs",
    "read_scalars",
    "render_metric",
    "render_report",
]

#: The names TensorBoard gives its event files.
EVENT_FILE_PATTERN = "events.out.tfevents.*"
#: Value groups of the table and of ``EpochRow.values``, in column order; ``effect/<kind>`` groups follow.
VALUE_GROUPS = ("running", "clean", "gap", "stderr", "validation", "generalization")
_TAG_GROUPS = ("clean", "running", "gap", "generalization", "stderr")
_PLOT_HINT = "pip install 'lightning-evalguard[plot]'"


class ReportError(Exception):
    """What the report cannot do, said in one line: the LOGDIR is missing or holds no EvalGuard scalars, or no plot."""


@dataclass(frozen=True)
class EpochRow:
    """One metric's values at one evaluated epoch.

    Attributes:
        step: The global step they were logged at.
        epoch: The epoch, from Lightning's ``epoch`` scalar at that step; None when there is none.
        values: ``{"running" | "clean" | "gap" | "stderr" | "validation" | "generalization" | "effect/<kind>":
            value}``, without the groups that were not logged.
    """

    step: int
    epoch: int | None
    values: Mapping[str, float]


@dataclass(frozen=True)
class MetricLog:
    """The history of one metric of one EvalGuard instance.

    Attributes:
        prefix: The instance's prefix (``"evalguard"`` by default).
        name: The metric name, which may contain ``/`` (``"loaderA/acc"``, ``"acc/3"``).
        rows: One row per evaluated epoch, by step.
        info: What EvalGuard wrote of the metric (bounds, ``higher_is_better``), when the run has it.
    """

    prefix: str
    name: str
    rows: tuple[EpochRow, ...]
    info: MetricInfo | None = None

    @property
    def x_label(self) -> str:
        """``"epoch"`` when every row knows its epoch, else ``"step"``."""
        return "epoch" if all(row.epoch is not None for row in self.rows) else "step"

    def x(self, row: EpochRow) -> int:
        """The row's position on the x axis: its epoch, or its step (see ``x_label``).

        Args:
            row: One of ``rows``.

        Returns:
            The epoch or the step.
        """
        return row.epoch if row.epoch is not None and self.x_label == "epoch" else row.step

    @property
    def groups(self) -> list[str]:
        """The value groups logged in any row, in column order (``VALUE_GROUPS``, then the effects)."""
        present = {group for row in self.rows for group in row.values}
        effects = [f"effect/{kind}" for kind in EFFECT_LABELS]
        effects += sorted(group for group in present if group.startswith("effect/") and group not in effects)
        return [group for group in (*VALUE_GROUPS, *effects) if group in present]


@dataclass(frozen=True)
class RunLog:
    """The EvalGuard metrics of one run (one directory of event files).

    Attributes:
        path: The directory, relative to LOGDIR (``"."`` for LOGDIR itself), with ``/`` separators.
        metrics: Per prefix, then per metric, in the order the tags were first written.
        samples: The run's ``samples.csv`` (``track_samples=True``), if it has one.
    """

    path: str
    metrics: tuple[MetricLog, ...]
    samples: Path | None = None


def find_run_dirs(logdir: Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds TensorBoard event files.

    Args:
        logdir: The directory to search, recursively.

    Returns:
        The directories, sorted.
    """
    return sorted({path.parent for path in logdir.rglob(EVENT_FILE_PATTERN) if path.is_file()})


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the event files in one directory.

    Args:
        run_dir: A directory from ``find_run_dirs``.

    Returns:
        ``{tag: [(step, value), ...]}``, tags in the order they were first written.
    """
    return _read(run_dir)[0]


def _read(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, dict[str, MetricInfo]]]:
    # The scalars, and per prefix the metric infos EvalGuard wrote as text (``<prefix>/metric_info``).
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 1})  # the last text
    accumulator.Reload()
    scalars = {
        tag: [(int(event.step), float(event.value)) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
    suffix = f"{METRIC_INFO_TAG}/text_summary"
    infos: dict[str, dict[str, MetricInfo]] = {}
    for tag in accumulator.Tags().get("tensors", []):
        if tag == suffix or tag.endswith("/" + suffix):
            values = accumulator.Tensors(tag)[-1].tensor_proto.string_val
            if values:
                infos[tag[: -len(suffix)].rstrip("/")] = read_metric_info(values[0].decode("utf-8", "replace"))
    return scalars, infos


def _split_tag(tag: str, prefix: str) -> tuple[str, str] | None:
    """``"<prefix>/<group>/<name>"`` -> ``(group, name)``; ``<group>`` is ``effect/<kind>`` for effects."""
    if not tag.startswith(prefix + "/"):
        return None
    group, _, name = tag[len(prefix) + 1 :].partition("/")
    if group == "effect":
        kind, _, name = name.partition("/")
        group = f"effect/{kind}" if kind else ""
    if group not in _TAG_GROUPS and not group.startswith("effect/"):
        return None
    return (group, name) if name else None


def parse_scalars(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> tuple[MetricLog, ...]:
    """The EvalGuard metrics among a run's scalars.

    A prefix is whatever precedes the first ``/clean/`` of a tag. Validation is derived as clean - generalization at
    the same step. ``<prefix>/time/...``, ``<prefix>/clean_low/...`` and ``<prefix>/clean_high/...`` are not read.

    Args:
        scalars: ``{tag: [(step, value), ...]}``, as from ``read_scalars``; ``epoch`` maps steps to epochs.

    Returns:
        One entry per prefix and metric with a clean value; empty when there are no EvalGuard tags.
    """
    epochs = {step: round(value) for step, value in scalars.get("epoch", ())}
    prefixes = list(dict.fromkeys(tag[: tag.index("/clean/")] for tag in scalars if "/clean/" in tag))
    metrics = []
    for prefix in (prefix for prefix in prefixes if prefix):
        by_name: dict[str, dict[int, dict[str, float]]] = {}
        for tag, events in scalars.items():
            if (parsed := _split_tag(tag, prefix)) is None:
                continue
            group, name = parsed
            for step, value in events:
                by_name.setdefault(name, {}).setdefault(step, {})[group] = value
        for name, by_step in by_name.items():
            rows = []
            for step in sorted(by_step):
                values = by_step[step]
                if "clean" in values and "generalization" in values:
                    values["validation"] = values["clean"] - values["generalization"]
                rows.append(EpochRow(step=step, epoch=epochs.get(step), values=values))
            if any("clean" in row.values for row in rows):
                metrics.append(MetricLog(prefix=prefix, name=name, rows=tuple(rows)))
    return tuple(metrics)


def _info(infos: Mapping[str, Mapping[str, MetricInfo]], metric: MetricLog) -> MetricInfo | None:
    # The info EvalGuard wrote under the metric's prefix; TensorBoardLogger(prefix="p") logs the scalars as
    # "p-<prefix>/..." but the text as "<prefix>/metric_info". A vector element "<name>/<i>" takes its metric's.
    found = infos.get(metric.prefix)
    if found is None:
        found = next((value for key, value in infos.items() if metric.prefix.endswith(f"-{key}")), None)
    if found is None:
        return None
    return found.get(metric.name) or found.get(metric.name.rsplit("/", 1)[0])


def load_runs(logdir: str | Path) -> list[RunLog]:
    """Read every run under ``logdir`` that holds EvalGuard scalars.

    Args:
        logdir: A TensorBoard log directory, e.g. ``TensorBoardLogger``'s ``save_dir`` or one version of it.

    Returns:
        The runs with EvalGuard scalars, by path.

    Raises:
        ReportError: If ``logdir`` does not exist or is not a directory, holds no event files, or none of them holds
            EvalGuard scalars.
    """
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"LOGDIR {str(logdir)!r} does not exist")
    if not root.is_dir():
        raise ReportError(f"LOGDIR {str(logdir)!r} is not a directory")
    run_dirs = find_run_dirs(root)
    if not run_dirs:
        raise ReportError(f"no TensorBoard event files ({EVENT_FILE_PATTERN}) under {str(logdir)!r}")
    runs = []
    other_tags: dict[str, None] = {}
    for run_dir in run_dirs:
        scalars, infos = _read(run_dir)
        metrics = tuple(replace(metric, info=_info(infos, metric)) for metric in parse_scalars(scalars))
        if metrics:
            samples = run_dir / "samples.csv"
            path = run_dir.relative_to(root).as_posix()
            runs.append(RunLog(path=path, metrics=metrics, samples=samples if samples.is_file() else None))
        other_tags.update(dict.fromkeys(scalars))
    if not runs:
        shown = ", ".join(list(other_tags)[:6]) + (", ..." if len(other_tags) > 6 else "")
        raise ReportError(
            f"no EvalGuard scalars ('<prefix>/clean/<name>') in the event files under {str(logdir)!r}"
            f" (scalars found: {shown or 'none'}); was EvalGuard in the Trainer's callbacks with a TensorBoardLogger?"
        )
    return runs


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]


def render_metric(metric: MetricLog) -> str:
    """One metric's table, a row per evaluated epoch, followed by the reading of the last epoch with a clean value.

    Args:
        metric: From ``parse_scalars``.

    Returns:
        The text, without a trailing newline.
    """
    groups = metric.groups
    rows = [[str(metric.x(row)), *(format_value(row.values.get(group)) for group in groups)] for row in metric.rows]
    lines = [f"{metric.prefix}: {metric.name}", *_table([metric.x_label, *groups], rows)]
    last = [row for row in metric.rows if "clean" in row.values][-1]
    effects = {group.split("/", 1)[1]: value for group, value in last.values.items() if group.startswith("effect/")}
    sentence = reading(
        metric.name,
        last.values.get("running"),
        last.values["clean"],
        effects or None,
        last.values.get("validation"),
        last.values.get("stderr"),
        metric.info,
    )
    lines.append(f"reading at {metric.x_label} {metric.x(last)}: {sentence}")
    return "\n".join(lines)


def render_suspects(path: Path, k: int = 20) -> str:
    """The ``k`` samples of a ``samples.csv`` with the lowest mean margin: a lead list for label noise.

    Args:
        path: The run's ``samples.csv``.
        k: How many.

    Returns:
        A heading and a table of index, given and predicted label, mean margin, confidence, variability, forgetting.
    """
    fields = read_csv(path)
    header = ["index", "given", "predicted", "mean margin", "confidence", "variability", "forgetting"]
    rows = [
        [
            str(row["indices"]),
            str(row["targets"]),
            str(row["last_prediction"]),
            format_value(row["mean_margin"]),
            format_value(row["confidence"]),
            format_value(row["variability"]),
            str(row["forgetting"]),
        ]
        for row in suspects_of(fields, k)
    ]
    title = f"suspects: the {len(rows)} lowest mean margins of {len(fields['indices'])} samples ({path.name})"
    return "\n".join([title, *_table(header, rows)])


def render_report(runs: Sequence[RunLog], suspects: int = 20) -> str:
    """The report: for each run a heading with its path, a table per metric, and its suspects when it tracked samples.

    Args:
        runs: From ``load_runs``.
        suspects: How many suspects to list per run with a ``samples.csv`` (0: none).

    Returns:
        The text, without a trailing newline.
    """
    sections = []
    for run in runs:
        heading = f"run {run.path}"
        parts = [f"{heading}\n{'=' * len(heading)}", *map(render_metric, run.metrics)]
        if run.samples is not None and suspects > 0:
            parts.append(render_suspects(run.samples, suspects))
        sections.append("\n\n".join(parts))
    return "\n\n".join(sections)


def data_map_paths(runs: Sequence[RunLog], png: str | Path) -> list[tuple[RunLog, Path]]:
    """Where ``--png FILE`` draws the data maps: ``FILE``'s name with ``-data_map`` (and the run's number if several).

    Args:
        runs: From ``load_runs``.
        png: The ``--png`` argument.

    Returns:
        ``(run, path)`` for each run with a ``samples.csv``.
    """
    png = Path(png)
    tracked = [run for run in runs if run.samples is not None]
    return [
        (run, png.with_name(f"{png.stem}-data_map{'' if len(tracked) == 1 else f'-{number}'}{png.suffix}"))
        for number, run in enumerate(tracked)
    ]


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportError(f"--png needs matplotlib, which is not installed: {_PLOT_HINT}") from error
    return Figure


def plot_runs(runs: Sequence[RunLog], path: str | Path) -> None:
    """Draw every metric of every run and save the figure as an image (PNG for a ``.png`` path).

    One row per metric: on the left the running, clean and validation curves; on the right the gap (clean - running)
    with the effects it was decomposed into, when logged. The figure is built with matplotlib's object API and saved
    through the Agg canvas, without pyplot, so the caller's backend and open figures are left as they were.

    Args:
        runs: From ``load_runs``.
        path: Where to save; the format follows the suffix.

    Raises:
        ReportError: If matplotlib is not installed.
        OSError: If the file cannot be written.
    """
    figure_class = _figure_class()
    panels = [(run, metric) for run in runs for metric in run.metrics]
    figure = figure_class(figsize=(13.0, 3.6 * max(len(panels), 1)), layout="constrained")
    axes = figure.subplots(max(len(panels), 1), 2, squeeze=False)
    for (run, metric), (curves, gaps) in zip(panels, axes, strict=False):
        gaps.sharex(curves)
        title = f"{metric.prefix}: {metric.name}" + ("" if run.path == "." else f"  ({run.path})")

        def series(group: str, metric: MetricLog = metric) -> tuple[list[int], list[float]]:
            rows = [row for row in metric.rows if group in row.values]
            return [metric.x(row) for row in rows], [row.values[group] for row in rows]

        for group in ("running", "clean", "validation"):
            if group in metric.groups:
                (line,) = curves.plot(*series(group), marker="o", label=group)
                if group == "clean" and "stderr" in metric.groups:
                    band = [row for row in metric.rows if "clean" in row.values and "stderr" in row.values]
                    curves.fill_between(
                        [metric.x(row) for row in band],
                        [row.values["clean"] - 2 * row.values["stderr"] for row in band],
                        [row.values["clean"] + 2 * row.values["stderr"] for row in band],
                        color=line.get_color(),
                        alpha=0.2,
                        label="clean ± 2 standard errors",
                    )
        curves.set(title=title, xlabel=metric.x_label, ylabel=metric.name)
        curves.legend(loc="best", fontsize="small")
        curves.grid(alpha=0.3)

        gaps.axhline(0.0, color="grey", linewidth=0.8)
        if "gap" in metric.groups:
            gaps.plot(*series("gap"), marker="o", color="black", label="gap (clean - running)")
        else:
            gaps.text(0.5, 0.5, "no running metric was logged", ha="center", va="center", transform=gaps.transAxes)
            gaps.set_yticks([])
        for group in metric.groups:
            if group.startswith("effect/"):
                kind = group.split("/", 1)[1]
                gaps.plot(*series(group), marker=".", linestyle="--", label=f"effect: {kind.replace('_', ' ')}")
        gaps.set(title=f"gap, {title}", xlabel=metric.x_label, ylabel=f"clean - running {metric.name}")
        if gaps.get_legend_handles_labels()[0]:
            gaps.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        gaps.grid(alpha=0.3)
        for axis in (curves, gaps):
            axis.xaxis.get_major_locator().set_params(integer=True)
    figure.savefig(path, dpi=100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evalguard", description="Read back what EvalGuard logged to TensorBoard.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="print a per-epoch table of running, clean and gap per metric, with its reading; optionally plot it",
        description=(
            "Print, for every run under LOGDIR and every EvalGuard metric, one row per evaluated epoch of running,"
            " clean and gap (and validation and effects when logged), followed by the reading of the last epoch."
        ),
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory, searched recursively")
    report.add_argument(
        "--png",
        metavar="FILE",
        help=f"also draw the curves into FILE, and each run's data map next to it (needs {_PLOT_HINT})",
    )
    report.add_argument(
        "--suspects",
        metavar="K",
        type=int,
        default=20,
        help="how many suspects (lowest mean margin) to list for a run with samples.csv (default 20)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``evalguard`` command line: ``evalguard report LOGDIR [--png FILE]``.

    Args:
        argv: The arguments after the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0, or 2 with one line on stderr when LOGDIR is missing, holds no event files or no EvalGuard
            scalars, or ``--png`` cannot be written (matplotlib missing included).
    """
    args = _parser().parse_args(argv)
    try:
        runs = load_runs(args.logdir)
        if args.png is not None:  # fail before printing anything
            _figure_class()
            if not Path(args.png).resolve().parent.is_dir():
                raise ReportError(f"cannot write --png {args.png!r}: its directory does not exist")
    except (ReportError, OSError) as error:
        print(f"evalguard: {error}", file=sys.stderr)
        return 2
    print(render_report(runs, suspects=args.suspects))
    if args.png is not None:
        try:
            plot_runs(runs, args.png)
            maps = []
            for run, path in data_map_paths(runs, args.png):
                assert run.samples is not None
                if draw_data_map(read_csv(run.samples), path) is not None:
                    maps.append(path)
        except (ReportError, OSError) as error:
            print(f"evalguard: cannot write {args.png!r}: {error}", file=sys.stderr)
            return 2
        print(f"\nwrote {', '.join(map(str, [args.png, *maps]))}")
    return 0
