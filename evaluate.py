"""Evaluate a checkpoint, draw training curves, or predict the emotion of any mp4.

    python evaluate.py --checkpoint runs/demo/best.pt --data runs/demo/data/cache --split test
    python evaluate.py --checkpoint runs/demo/best.pt --data runs/demo/data/cache --split test --views 3
    python evaluate.py curves runs/demo
    python evaluate.py predict --checkpoint runs/demo/best.pt --video clip.mp4 --text "Oh my God!"

The model is rebuilt from the configuration stored in the checkpoint (loaded with
weights_only=True): no training flag has to be repeated. Evaluation writes metrics_<split>.json,
a classification report on stdout, confusion_<split>.png (counts and row-normalised) and
f1_<split>.png next to the checkpoint (or in --out). With --views N each clip is seen through N
evenly spaced temporal windows and their probabilities averaged (multi-view testing); single- and
multi-view numbers are both reported. Checkpoints are written (`save_checkpoint`, by train.py)
and read (`load_checkpoint`, `load_checkpoint_model`) here; train.py also uses `predict` and
`split_metrics` for dev and test.
"""

import json
import sys
import tempfile
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
import meld
import model as model_lib

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
    """{id: (probs of each task in dataset.tasks)} against the dataset's labels -> {task: metrics}."""
    metrics = {}
    for index, (task, names) in enumerate(dataset.tasks):
        y_true, y_pred, probabilities = labelled(predictions, dataset, index)
        metrics[task] = classification_metrics(y_true, y_pred, names, probabilities)
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
def predict(model, loader, device, amp_dtype=None, world=1, progress=None):
    """Probabilities for every clip of the loader's split, each counted once: under DDP each rank
    runs its own shard and the results are gathered. -> {id: (probs of each task, in the model's
    head order: emotion, sentiment for MELD)}. progress: a progress-bar label (rank 0 shows it;
    None = no bar)."""
    model.eval()
    results = {}
    for batch in tqdm(loader, desc=progress, disable=progress is None or (world > 1 and dist.get_rank() > 0),
                      leave=False, dynamic_ncols=True, unit="batch"):
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


def save_checkpoint(path, state):
    """torch.save, atomically (a temporary file renamed over path): a kill never leaves half a checkpoint.
    state: tensors and plain containers only, so that load_checkpoint reads it with weights_only=True."""
    cli.write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu"):
    """A train.py checkpoint: plain tensors and containers only (weights_only=True), so a
    checkpoint holding a pickled object is refused."""
    if not Path(path).is_file():
        what = "a folder, not a checkpoint file" if Path(path).is_dir() else "no such checkpoint file"
        raise SystemExit(f"{path}: {what} (train.py writes best.pt and last.pt in its --out)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for objects; RuntimeError/EOFError for a cut-off file
        raise SystemExit(f"{path}: cannot be loaded as a plain-tensor checkpoint (weights_only=True): "
                         f"{type(e).__name__}: {cli.first_line(e)}") from None


def load_checkpoint_model(path, device):
    """Rebuild the model from the configuration stored in a train.py checkpoint (no download)."""
    checkpoint = load_checkpoint(path)
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
    parser.add_argument("--decode", default="auto", choices=["auto", *data.DECODES],
                        help="where video frames are decoded, as train.py's --decode (auto: on CUDA, nvJPEG)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device)
    model, checkpoint = load_checkpoint_model(args.checkpoint, device)
    out = Path(args.out or Path(args.checkpoint).parent / "evaluation")
    with cli.one_line_errors():  # a bad CSV or cache, an --out that cannot be made: one line that names it
        dataset = dataset_for(checkpoint, args.data, args.split, data.resolve_decode(args.decode, device))
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


def predict_main(argv):
    parser = cli.ArgumentParser(prog="evaluate.py predict",
                                     description="Predict the emotion and sentiment of mp4 clips (or audio "
                                                 "files, images, or text alone: what the checkpoint's model reads).")
    parser.add_argument("--checkpoint", required=True, help="best.pt written by train.py")
    parser.add_argument("--video", nargs="*", default=[], help="mp4 files (decoded as prepare.py does)")
    parser.add_argument("--text", nargs="*", default=[], help="what is said in each clip, in the order of --video")
    parser.add_argument("--dialogue", help="a conversation: CSV with columns Speaker, Utterance (and Video, a file "
                                           "per row, for models that read video or audio); every utterance is "
                                           "predicted with the dialogue context the checkpoint was trained with")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list (one object per clip) instead of a table")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device)
    model, checkpoint = load_checkpoint_model(args.checkpoint, device)
    modalities = checkpoint["model_config"]["modalities"]
    media = {"video", "audio"} & set(modalities)
    context = data.DataConfig(**checkpoint["data_config"]).context
    if args.dialogue:
        if args.video or args.text:
            raise SystemExit("--dialogue gives the utterances (and videos) itself: leave out --video and --text")
        with cli.one_line_errors():
            utterances, videos = meld.read_dialogue_csv(args.dialogue)
        if media and not all(videos):
            raise SystemExit(f"{args.dialogue}: this model reads {' and '.join(sorted(media))}: give a Video for "
                             f"every row (row {videos.index('') + 2} has none)")
        contexts = data.dialogue_context(utterances, utterances, *context)
    else:
        videos = args.video
        utterances = [meld.Utterance(f"text {i + 1}", "", 0, i, text, "", -1, -1) for i, text in enumerate(args.text)]
        contexts = [((), ())] * len(utterances)
        if media and not videos:
            raise SystemExit(f"this model reads {' and '.join(sorted(media))}: pass --video FILE.mp4 ...")
        if not media and not utterances:
            raise SystemExit("this model reads text alone: pass --text UTTERANCE ... or --dialogue FILE.csv")
        if "text" in modalities and media and len(utterances) != len(videos):
            raise SystemExit(f"this model reads text ({'+'.join(modalities)}): pass --text with one utterance per "
                             f"clip, each in quotes ({len(videos)} clip(s), {len(utterances)} text(s) given)")
        if "text" in modalities and any(context):
            print(f"warning: this model was trained with dialogue context ({context[0]} utterances before, "
                  f"{context[1]} after): --text is read without it; pass --dialogue FILE.csv to give the "
                  "conversation", file=sys.stderr)
    empty = [i + 1 for i, u in enumerate(utterances) if not u.text.strip()] if "text" in modalities else []
    if empty:
        raise SystemExit(f"{args.dialogue or '--text'}: utterance {empty[0]} is empty, and this model reads text; "
                         "give what is said in each clip")
    dataset = dataset_for(checkpoint, ".", None)
    import prepare  # PyAV: decodes the --video files as prepare.py decodes clips
    settings = prepare.PrepareSettings(**{k: v for k, v in (checkpoint.get("prepare") or {}).items()
                                          if k in prepare.PrepareSettings.__dataclass_fields__})
    names = videos if media else [u.id for u in utterances]
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            sample = dict(id=name)
            if media:
                folder = Path(tmp) / f"clip{i}"
                if not Path(name).is_file():
                    raise SystemExit(f"{name}: {'a folder, not a file' if Path(name).is_dir() else 'no such file'}")
                try:  # the same decoding as prepare.py
                    info = prepare.extract_clip(name, folder, settings)
                except Exception as e:
                    raise SystemExit(f"{name}: cannot be decoded ({cli.first_line(e, name)})") from None
                if "video" in modalities:
                    if not info["frames"]:
                        raise SystemExit(f"{name}: has no video frames, and this model reads video")
                    sample["video"] = dataset.load_video(folder, info["frames"])
                if "audio" in modalities:
                    if not info["audio_samples"]:
                        what = ("no audio stream" if "no audio stream" in info["reason"]
                                else "an audio stream with no samples")
                        raise SystemExit(f"{name}: has {what}, and this model reads audio")
                    sample["audio"] = dataset.load_audio(folder)
            if "text" in modalities:
                sample.update(dataset.tokenize(utterances[i], *contexts[i]))
            samples.append(sample)
    batch = data.collate(samples, num_frames=dataset.config.num_frames if "video" in modalities else None,
                         pad_token_id=getattr(dataset, "pad_token_id", 0), tasks=())
    with torch.no_grad():
        out = model(data.to_device(batch, device))
    results = []
    for i, name in enumerate(names):
        row = {"file": name} | ({"speaker": utterances[i].speaker, "text": utterances[i].text} if args.dialogue else {})
        for task, labels in checkpoint["tasks"]:
            probs = out[task][i].float().softmax(-1).tolist()
            row[task] = dict(sorted(zip(labels, probs), key=lambda x: -x[1]))
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        (primary, _), *others = checkpoint["tasks"]
        for row in results:
            print(f"{row['file']}: {row['speaker']}: {row['text']}" if args.dialogue else row["file"])
            for label, p in row[primary].items():
                print(f"  {label:<10} {p:6.3f}  {'#' * round(40 * p)}")
            for task, _ in others:
                print(f"  {task}: " + ", ".join(f"{label} {p:.3f}" for label, p in row[task].items()))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "curves":
        if len(argv) != 2:
            raise SystemExit("usage: python evaluate.py curves RUN_DIR")
        print(f"wrote {plot_curves(argv[1])}")
    elif argv and argv[0] == "predict":
        return predict_main(argv[1:])
    elif argv and not argv[0].startswith("-"):
        raise SystemExit(f"evaluate.py: unknown command {argv[0]!r}; the commands are curves and predict, or "
                         "--checkpoint CKPT --data DATA to evaluate (see --help)")
    else:
        return evaluate_main(argv)


if __name__ == "__main__":
    main()
