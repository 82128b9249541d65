"""Evaluate a checkpoint, draw training curves, or predict the emotion of any mp4 (predict.py).

    python evaluate.py --checkpoint runs/demo/best.pt --data runs/demo/data/cache --split test
    python evaluate.py --checkpoint runs/demo/best.pt --data runs/demo/data/cache --split test --views 3
    python evaluate.py curves runs/demo
    python evaluate.py predict --checkpoint runs/demo/best.pt --video clip.mp4 --text "Oh my God!"

The model and the data settings are rebuilt from the configuration stored in the checkpoint: no
training flag has to be repeated. Evaluation writes metrics_<split>.json, a classification report
on stdout, confusion_<split>.png (counts and row-normalised) and f1_<split>.png in evaluation/
beside the checkpoint (or in --out). With --views N each clip is seen through N evenly spaced
temporal windows and their probabilities averaged (multi-view testing); single- and multi-view
numbers are both reported. train.py uses `predict`, `split_metrics` and the reports for dev and test.
"""

import itertools
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from tqdm import tqdm

import cli
import data
import loading
import meld
import model as model_lib
import runs

# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def classification_metrics(y_true, y_pred, class_names, probabilities=None):
    """Accuracy, macro F1, weighted F1, per-class precision/recall/F1/support and the confusion
    matrix (rows: true class, columns: predicted), over every class in class_names, including
    classes that never occur in y_true or y_pred (their F1 is 0, as scikit-learn's zero_division=0).
    Two classes and probabilities [n, 2] given: also ROC-AUC and average precision of the second
    class (None when y_true holds one class only). Plain Python numbers and lists, ready for JSON."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    binary = {}
    if len(class_names) == 2 and probabilities is not None:
        both = len(set(y_true.tolist())) == 2
        score = np.asarray(probabilities)[:, 1]
        binary = {"roc_auc": float(roc_auc_score(y_true, score)) if both else None,
                  "average_precision": float(average_precision_score(y_true, score)) if both else None}
    return binary | {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def labelled(predictions, dataset, index):
    """The clips of predictions {id: (probs of each task)} in id order, for task dataset.tasks[index]
    -> (true class indices, predicted class indices, probabilities)."""
    rows, task = {r.id: r for r in dataset.rows}, dataset.tasks[index][0]
    ids = sorted(predictions)
    probabilities = [predictions[i][index] for i in ids]
    return [getattr(rows[i], task) for i in ids], [int(np.argmax(p)) for p in probabilities], probabilities


def split_metrics(predictions, dataset):
    """{id: (probs of each task in dataset.tasks)} against the dataset's labels -> {task: metrics}.
    Predictions for only some of the split's clips (a capped evaluation) are marked in each task's
    metrics as "partial": "N of M clips"."""
    metrics = {}
    for index, (task, names) in enumerate(dataset.tasks):
        y_true, y_pred, probabilities = labelled(predictions, dataset, index)
        metrics[task] = classification_metrics(y_true, y_pred, names, probabilities)
        if len(predictions) < len(dataset):
            metrics[task]["partial"] = f"{len(predictions)} of {len(dataset)} clips"
    return metrics


def report(y_true, y_pred, names, title, metrics):
    """A title line with weighted F1, scikit-learn's classification_report (per class, accuracy,
    macro and weighted averages), and ROC-AUC and AP when metrics holds them (two classes)."""
    lines = [f"{title}: weighted F1 {metrics['weighted_f1']:.4f}",
             classification_report(y_true, y_pred, labels=list(range(len(names))), target_names=list(names),
                                   digits=4, zero_division=0)]
    lines += [f"{label:>12} {metrics[key]:.4f}" for key, label in (("roc_auc", "ROC-AUC"), ("average_precision", "AP"))
              if metrics.get(key) is not None]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, loader, device, amp_dtype=None, world=1, progress=None, max_batches=0):
    """Probabilities for every clip of the loader's split, each counted once: under DDP each rank
    runs its own shard and the results are gathered. -> {id: (probs of each task, in the model's
    head order: emotion, sentiment for MELD)}. progress: a progress-bar label (rank 0 shows it;
    None = no bar). max_batches > 0: only that many batches per rank (smoke runs)."""
    model.eval()
    results = {}
    batches = itertools.islice(loader, max_batches or None)
    for batch in tqdm(batches, desc=progress, total=min(len(loader), max_batches or len(loader)), leave=False,
                      disable=progress is None or (world > 1 and dist.get_rank() > 0), dynamic_ncols=True,
                      unit="batch"):
        batch = data.to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(batch)
        probs = [logits.float().softmax(-1).cpu() for logits in out.values()]
        for i, clip_id in enumerate(batch["ids"]):
            results[clip_id] = tuple(p[i].tolist() for p in probs)
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, results)
        results = {k: v for shard in shards for k, v in shard.items()}
    return results


def predict_views(model, dataset, device, views=1, batch_size=16, workers=0):
    """Probabilities averaged over `views` evenly spaced temporal windows per clip (1 = the centre
    window, as in training's evaluation). -> {id: (probs of each task)}."""
    per_view = []
    for view in range(views):
        loader = data.make_loader(dataset.with_view(view, views), batch_size=batch_size, train=False, workers=workers)
        per_view.append(predict(model, loader, device, progress=f"{dataset.split} view {view + 1}/{views}"))
    return {clip_id: tuple(np.mean([p[clip_id][k] for p in per_view], axis=0).tolist() for k in range(len(first)))
            for clip_id, first in per_view[0].items()}


def load_checkpoint_model(path, device):
    """Rebuild the model from the configuration stored in a train.py checkpoint (no download)."""
    checkpoint = runs.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise SystemExit(f"{path}: not a train.py checkpoint (it has no model_config; a bare state dict or a "
                         "Kinetics file goes to train.py --video-init kinetics:PATH)")
    model = model_lib.EmotionModel(model_lib.ModelConfig(**checkpoint["model_config"]), load_pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model_lib.place(model, device).eval(), checkpoint


def dataset_for(checkpoint, root, split, decode="cpu"):
    """A ClipDataset (evaluation mode) with the data configuration and classes the checkpoint was
    trained with (the classes of a csv dataset come from the checkpoint, never from root); decode:
    where video frames are decoded (data.ClipDataset)."""
    config = data.DataConfig(**checkpoint["data_config"])
    text_model = checkpoint["model_config"]["text_model"]
    tokenizer = model_lib.load_tokenizer(text_model) if "text" in config.modalities else None
    classes = dict(checkpoint["tasks"]).get("label") if config.dataset == "csv" else None
    return data.ClipDataset(root, split, config, tokenizer, classes=classes, decode=decode)


def write_predictions(path, predictions, dataset):
    """One JSON line per clip, readable alone: {"id": "dev/dia0_utt0", "emotion": {"true": "joy",
    "predicted": "neutral", "probabilities": {"neutral": 0.41, "surprise": 0.02, ...}}, "sentiment": {...}}
    (--dataset csv: one task, "label"); classes in the order of the model's outputs."""
    rows = {r.id: r for r in dataset.rows}
    lines = []
    for clip_id, probabilities in sorted(predictions.items()):
        line = dict(id=clip_id)
        for (task, names), p in zip(dataset.tasks, probabilities):
            line[task] = dict(true=names[getattr(rows[clip_id], task)], predicted=names[int(np.argmax(p))],
                              probabilities=dict(zip(names, p)))
        lines.append(json.dumps(line) + "\n")
    cli.write_atomic(path, "".join(lines))


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def plot_confusion(confusion, names, path, title):
    """Counts and row-normalised (recall) confusion matrices side by side, numbers in the cells
    (rows: true class, columns: predicted), drawn by scikit-learn's ConfusionMatrixDisplay."""
    counts = np.asarray(confusion)
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    n = min(len(names), 16)  # beyond 16 classes the cells shrink instead of the figure growing
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * n, 1.5 + 0.7 * n))
    for ax, matrix, label, fmt in ((axes[0], counts, "count", "d"), (axes[1], normalised, "fraction of true class",
                                                                     ".2f")):
        ConfusionMatrixDisplay(matrix, display_labels=list(names)).plot(
            ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=45, text_kw=dict(fontsize=8))
        ax.set_title(f"{title} ({label})")
    fig.tight_layout()
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
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def evaluate_main(argv):
    parser = cli.ArgumentParser(
        description=__doc__,
        epilog="other commands:\n"
               "  python evaluate.py curves RUN_DIR        training curves of a run -> RUN_DIR/curves.png\n"
               "  python evaluate.py predict --help        predict the emotion of mp4 files, audio files or text")
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    parser.add_argument("--data", required=True,
                        help="cache written by prepare.py (or a CSV folder for text-only models)")
    parser.add_argument("--split", default="test", choices=meld.SPLITS, help="split to evaluate")
    parser.add_argument("--views", type=cli.positive(int), default=1,
                        help="temporal windows per clip, probabilities averaged (1 = centre)")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON and PNG files (default: evaluation/ beside the checkpoint, so that "
                             "train.py's own plots are kept)")
    parser.add_argument("--batch-size", type=cli.positive(int), default=16, help="clips per batch")
    parser.add_argument("--workers", type=cli.non_negative(int), default=2, help="DataLoader worker processes")
    parser.add_argument("--decode", default="auto", choices=["auto", *loading.DECODES],
                        help="where video frames are decoded, as train.py's --decode (auto: on CUDA, nvJPEG)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device)
    model, checkpoint = load_checkpoint_model(args.checkpoint, device)
    out = Path(args.out or Path(args.checkpoint).parent / "evaluation")
    with cli.one_line_errors():  # a bad CSV or cache, an --out that cannot be made: one line that names it
        dataset = dataset_for(checkpoint, args.data, args.split, loading.resolve_decode(args.decode, device))
        out.mkdir(parents=True, exist_ok=True)
    print(dataset.summary())
    if len(dataset) == 0:
        raise SystemExit(f"{args.data}: the {args.split} split has no usable clip ({dataset.summary()})")

    results = {"checkpoint": str(args.checkpoint), "split": args.split, "views": args.views}
    for key, views in (("single_view", 1), ("multi_view", args.views))[:1 + (args.views > 1)]:
        predictions = predict_views(model, dataset, device, views, args.batch_size, args.workers)
        results[key] = split_metrics(predictions, dataset)
        for index, (task, names) in enumerate(dataset.tasks):
            y_true, y_pred, _ = labelled(predictions, dataset, index)
            print("\n" + report(y_true, y_pred, names, f"{args.split} {task} ({key.replace('_', '-')})",
                                results[key][task]))
    final = results.get("multi_view", results["single_view"])
    cli.write_atomic(out / f"metrics_{args.split}.json", json.dumps(results, indent=2) + "\n")
    write_reports(out, args.split, final, dataset.tasks,
                  f"{args.split}" + (f", {args.views} views" if args.views > 1 else ""))
    print("\nwrote " + ", ".join(str(out / f"{name}_{args.split}.{ext}")
                                  for name, ext in (("metrics", "json"), ("confusion", "png"), ("f1", "png"))))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "curves":
        if len(argv) != 2:
            raise SystemExit("usage: python evaluate.py curves RUN_DIR")
        print(f"wrote {plot_curves(argv[1])}")
    elif argv and argv[0] == "predict":
        import predict  # the predict command lives in predict.py (it decodes media as prepare.py does)
        return predict.main(argv[1:])
    elif argv and not argv[0].startswith("-"):
        raise SystemExit(f"evaluate.py: unknown command {argv[0]!r}; the commands are curves and predict, or "
                         "--checkpoint CKPT --data DATA to evaluate (see --help)")
    else:
        return evaluate_main(argv)


if __name__ == "__main__":
    main()
