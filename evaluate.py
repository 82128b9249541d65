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

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import (
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
import plots
import pretrained
import runs

# --- Metrics ----------------------------------------------------------------------------------------------------------

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


# --- Prediction -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, loader, device, amp_dtype=None, world=1, progress=None, max_batches=0):
    """Probabilities for every clip of the loader's split, each counted once: under DDP each rank
    runs its own shard and the results are gathered. -> {id: (probs of each task, in the model's
    head order: emotion, sentiment for MELD)}. progress: a progress-bar label (rank 0 shows it;
    None = no bar). max_batches > 0: only that many batches per rank (smoke runs)."""
    model.eval()
    results = {}
    batches = itertools.islice(loading.OneAhead(loader, data.to_device, device), max_batches or None)
    for batch in tqdm(batches, desc=progress, total=min(len(loader), max_batches or len(loader)), leave=False,
                      disable=progress is None or (world > 1 and dist.get_rank() > 0), dynamic_ncols=True,
                      unit="batch"):
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
    unknown = set(checkpoint["model_config"]) - set(model_lib.ModelConfig.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"{path}: written by code with model settings this code lacks ({', '.join(sorted(unknown))}); "
                         "evaluate it with the code that trained it")
    model = model_lib.EmotionModel(model_lib.ModelConfig(**checkpoint["model_config"]), load_pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model_lib.place(model, device).eval(), checkpoint


def dataset_for(checkpoint, root, split, decode="cpu", model=None):
    """A ClipDataset (evaluation mode) with the data configuration and classes the checkpoint was
    trained with (the classes of a csv dataset come from the checkpoint, never from root); decode:
    where video frames are decoded (data.ClipDataset). With the model, ValueError when its text
    encoder reads fewer tokens than the data gives it."""
    config = data.DataConfig(**checkpoint["data_config"])
    text_model = checkpoint["model_config"]["text_model"]
    tokenizer = model_lib.load_tokenizer(text_model) if "text" in config.modalities else None
    if model is not None and tokenizer is not None:
        pretrained.check_max_tokens(model.text.model, tokenizer, config.max_text_tokens, text_model)
    classes = dict(checkpoint["tasks"]).get("label") if config.dataset == "csv" else None
    return data.ClipDataset(root, split, config, tokenizer, classes=classes, decode=decode)


# --- Command line -----------------------------------------------------------------------------------------------------

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
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: no such folder; give the cache the model was trained on (or, for a "
                         "text-only model, a folder with MELD's CSVs)")
    device = cli.resolve_device(args.device)
    model, checkpoint = load_checkpoint_model(args.checkpoint, device)
    out = Path(args.out or Path(args.checkpoint).parent / "evaluation")
    with cli.one_line_errors():  # a bad CSV or cache, an --out that cannot be made: one line that names it
        dataset = dataset_for(checkpoint, args.data, args.split, loading.resolve_decode(args.decode, device), model)
        out.mkdir(parents=True, exist_ok=True)
    print(dataset.summary())
    if len(dataset) == 0:
        raise SystemExit(f"{args.data}: the {args.split} split has no usable clip ({dataset.summary()})")

    results = {"checkpoint": str(args.checkpoint), "split": args.split, "views": args.views}
    for key, views in (("single_view", 1), ("multi_view", args.views))[:1 + (args.views > 1)]:
        with runs.stops_in_one_line():  # Ctrl-C, a dead loader worker, a damaged cache: one line
            predictions = predict_views(model, dataset, device, views, args.batch_size, args.workers)
        results[key] = split_metrics(predictions, dataset)
        for index, (task, names) in enumerate(dataset.tasks):
            y_true, y_pred, _ = labelled(predictions, dataset, index)
            print("\n" + report(y_true, y_pred, names, f"{args.split} {task} ({key.replace('_', '-')})",
                                results[key][task]))
    final = results.get("multi_view", results["single_view"])
    cli.write_atomic(out / f"metrics_{args.split}.json", json.dumps(results, indent=2) + "\n")
    plots.write_reports(out, args.split, final, dataset.tasks,
                  f"{args.split}" + (f", {args.views} views" if args.views > 1 else ""))
    print("\nwrote " + ", ".join(str(out / f"{name}_{args.split}.{ext}")
                                  for name, ext in (("metrics", "json"), ("confusion", "png"), ("f1", "png"))))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "curves":
        plots.curves_main(argv[1:])
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
