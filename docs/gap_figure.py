"""Draw the "three sources of bias" figure from a real run: how the running accuracy becomes the clean one.

Reads the EvalGuard scalars of a run trained with ``decompose=True`` (``examples/digits.py --decompose``) through the
report command's loader, and draws, for the first and the last evaluated epoch, a waterfall: running accuracy, plus
the weight-drift effect (pass C), plus the augmentation effect (pass B), plus the train-mode effect, equals the clean
accuracy. Called by ``docs/make_figures.sh``:

    python docs/gap_figure.py LOGDIR docs/images/three-sources.png
"""

from __future__ import annotations

import argparse

from matplotlib.figure import Figure

from lightning_evalguard.report import MetricLog, load_runs

#: The steps of the waterfall, from the running value to the clean one, and what each pass changes.
STEPS = (
    ("effect/weight_drift", "+ weight drift\n= pass C"),
    ("effect/augmentation", "+ augmentation\n= pass B"),
    ("effect/train_mode", "+ train mode\n= clean"),
)


def draw(metric: MetricLog, path: str) -> None:
    rows = [row for row in metric.rows if all(group in row.values for group, _ in STEPS) and "running" in row.values]
    if not rows:
        raise SystemExit(f"{metric.prefix}/{metric.name}: no decomposed epoch; train with decompose=True")
    chosen = [rows[0], rows[-1]] if len(rows) > 1 else rows
    figure = Figure(figsize=(11.0, 3.8), layout="constrained")
    axes = figure.subplots(1, len(chosen), squeeze=False)[0]
    for axis, row in zip(axes, chosen, strict=True):
        labels = ["running\n(train_acc)"] + [label for _, label in STEPS] + ["clean\n(EvalGuard)"]
        level = row.values["running"]
        axis.bar(0, level, color="tab:blue")
        axis.text(0, level, f"{level:.3f}", ha="center", va="bottom", fontsize=9)
        for position, (group, _) in enumerate(STEPS, start=1):
            effect = row.values[group]
            color = "tab:green" if effect >= 0 else "tab:red"
            axis.bar(position, effect, bottom=level, color=color, alpha=0.8)
            axis.text(
                position, max(level, level + effect), f"{effect * 100:+.1f} pts", ha="center", va="bottom", fontsize=9
            )
            level += effect
        clean = row.values["clean"]
        axis.bar(len(STEPS) + 1, clean, color="tab:orange")
        axis.text(len(STEPS) + 1, clean, f"{clean:.3f}", ha="center", va="bottom", fontsize=9)
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        low = min(row.values["running"], clean)
        axis.set_ylim(max(0.0, low - 0.15), min(1.05, max(level, clean) + 0.06))
        epoch = metric.x(row)
        axis.set_title(
            f"{metric.x_label} {epoch}: gap {row.values['clean'] - row.values['running']:+.3f}"
            f" = sum of the three effects",
            fontsize=10,
        )
        axis.set_ylabel(metric.name)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("From the running train accuracy to the clean one (examples/digits.py --decompose)", fontsize=11)
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("png")
    parser.add_argument("--metric", default="acc")
    args = parser.parse_args()
    metrics = [metric for run in load_runs(args.logdir) for metric in run.metrics if metric.name == args.metric]
    if not metrics:
        raise SystemExit(f"no EvalGuard metric {args.metric!r} under {args.logdir}")
    draw(metrics[0], args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
