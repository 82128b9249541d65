"""The plots of a run and of an evaluation: confusion matrices, per-class F1, training curves.

    plots.write_reports(out, "test", metrics, tasks)   # confusion_test.png, f1_test.png
    plots.plot_curves("runs/demo")                     # runs/demo/curves.png from log.jsonl

Drawn with matplotlib and scikit-learn's ConfusionMatrixDisplay from the metrics evaluate.py
computes; tested by tests/test_first_hour.py (labels, the best epoch marked, clip counts) and
tests/test_evaluate.py.
"""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay


def plot_confusion(confusion, names, path, title):
    """Counts and row-normalised (recall) confusion matrices side by side, numbers in the cells
    (rows: true class, columns: predicted), drawn by scikit-learn's ConfusionMatrixDisplay."""
    counts = np.asarray(confusion)
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    n = min(len(names), 16)  # beyond 16 classes the cells shrink instead of the figure growing
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * n, 1.5 + 0.7 * n), layout="constrained")   # nothing cut off
    for ax, matrix, label, fmt in ((axes[0], counts, "count", "d"), (axes[1], normalised, "fraction of true class",
                                                                     ".2f")):
        ConfusionMatrixDisplay(matrix, display_labels=list(names)).plot(
            ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=45, text_kw=dict(fontsize=8))
        ax.set_title(f"{title} ({label})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class_f1(metrics, path, title, tasks):
    """One bar chart per task of tasks [(task, class names)]: F1 of each class, its number of clips
    (support) under its name, weighted F1 as a line."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(11, 0.35 * sum(len(n) for _, n in tasks)), 4.2),
                             gridspec_kw=dict(width_ratios=[len(n) for _, n in tasks]), squeeze=False)
    for ax, (task, names) in zip(axes[0], tasks):
        f1 = [metrics[task]["per_class"][n]["f1"] for n in names]
        support = [int(metrics[task]["per_class"][n]["support"]) for n in names]
        bars = ax.bar([f"{n}\n{k} clip{'s' * (k != 1)}" for n, k in zip(names, support)], f1, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(metrics[task]["weighted_f1"], color="tab:red", linestyle="--",
                   label=f"weighted F1 {metrics[task]['weighted_f1']:.3f}")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title}: {task}")
        ax.set_ylabel("F1")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out, split, metrics, tasks, title=None):
    """confusion_<split>.png (the first task's) and f1_<split>.png for {task: metrics}."""
    title = title or split
    task, names = tasks[0]
    plot_confusion(metrics[task]["confusion"], names, Path(out) / f"confusion_{split}.png", f"{title}: {task}")
    plot_per_class_f1(metrics, Path(out) / f"f1_{split}.png", title, tasks)


def plot_curves(run_dir):
    """Training loss, learning rates and dev weighted F1 per epoch from log.jsonl -> curves.png."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.exists():
        raise SystemExit(f"{log}: not found (is {run_dir} a train.py output folder?)")
    records = []
    for n, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise SystemExit(f"{log}, line {n}: not a whole record (cut short?); train.py rewrites the file after "
                             "every epoch") from None
    if not records:
        raise SystemExit(f"{log}: no epoch recorded yet; curves are drawn once an epoch has ended")
    epochs = [r["epoch"] for r in records]
    best = records[-1].get("best_epoch")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in records], marker="o")
    axes[0].set_title("training loss (mean over the epoch's steps)")
    axes[0].set_ylabel("loss")
    schedules = {}  # groups that share one LR curve are drawn once, named together
    for group in records[0]["lr"]:
        if group.endswith(".decay") or group.endswith(".no_decay"):
            curve = tuple(r["lr"][group] for r in records)
            name = group.rsplit(".", 1)[0]
            if name not in schedules.setdefault(curve, []):
                schedules[curve].append(name)
    for (curve, names), style in zip(schedules.items(), ("-", "--", ":", "-.") * len(schedules)):
        axes[1].plot(epochs, curve, linestyle=style, marker=".", label=", ".join(names))
    axes[1].set_yscale("log")
    axes[1].set_title("learning rate at the end of the epoch")
    axes[1].set_ylabel("learning rate")
    axes[1].legend(fontsize=7)
    for task in records[0]["dev"]:
        axes[2].plot(epochs, [r["dev"][task]["weighted_f1"] for r in records], marker="o", label=task)
    axes[2].set_title("dev weighted F1")
    axes[2].set_ylabel("weighted F1")
    for ax in axes:
        if best is not None:
            ax.axvline(best, color="tab:green", linestyle="--", linewidth=1,
                       label=f"best epoch ({best})" if ax is axes[2] else None)
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_main(argv):
    """`python evaluate.py curves RUN_DIR` (argv: what follows `curves`): plot_curves, or its usage."""
    if argv in (["--help"], ["-h"]):
        print("usage: python evaluate.py curves RUN_DIR\n\nTraining loss, learning rates and dev weighted F1 per "
              "epoch from RUN_DIR/log.jsonl -> RUN_DIR/curves.png (the best epoch marked).")
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        raise SystemExit("usage: python evaluate.py curves RUN_DIR (the --out of train.py)")
    print(f"wrote {plot_curves(argv[0])}")
