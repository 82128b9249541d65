"""Predict the emotion and sentiment of any mp4 (or audio file, image, or text alone: what the
checkpoint's model reads) with a model trained by train.py. Run through evaluate.py:

    python evaluate.py predict --checkpoint runs/demo/best.pt --video clip.mp4 --text "Oh my God!"
    python evaluate.py predict --checkpoint runs/text-context/best.pt --dialogue conversation.csv

Each file is decoded with prepare.py's own code and the cache settings the checkpoint records, then
read as training read its clips (ClipDataset's loaders with the checkpoint's DataConfig), so a clip
is seen exactly as in evaluation. With --dialogue every utterance gets the dialogue context the
checkpoint was trained with. Mistakes (a missing file, a model that reads text given none, a
file that cannot be decoded) end in one line naming them. Tested by tests/test_evaluate.py,
tests/test_context.py and tests/test_inputs.py.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

import cli
import data
import evaluate
import meld


def get_args_parser():
    parser = cli.ArgumentParser(prog="evaluate.py predict", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="best.pt written by train.py")
    parser.add_argument("--video", nargs="*", default=[], help="mp4 files (decoded as prepare.py does)")
    parser.add_argument("--text", nargs="*", default=[], help="what is said in each clip, in the order of --video")
    parser.add_argument("--dialogue", help="a conversation: CSV with columns Speaker, Utterance (and Video, a file "
                                           "per row, for models that read video or audio); every utterance is "
                                           "predicted with the dialogue context the checkpoint was trained with")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list (one object per clip) instead of a table")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    return parser


def inputs(args, modalities, context):
    """What to classify: (utterances as meld.Utterance, video files, each utterance's (past, future)
    context). SystemExit in one line when they do not fit what the model reads."""
    media = {"video", "audio"} & set(modalities)
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
    return utterances, videos, contexts


def media_sample(name, folder, dataset, settings, modalities):
    """One file decoded as prepare.py decodes clips (into folder) and read as the dataset reads a
    clip -> {"video": ..., "audio": ...} for the modalities the model reads."""
    import prepare  # PyAV: only what decodes media imports it
    if not Path(name).is_file():
        raise SystemExit(f"{name}: {'a folder, not a file' if Path(name).is_dir() else 'no such file'}")
    try:
        info = prepare.extract_clip(name, folder, settings)
    except Exception as e:
        raise SystemExit(f"{name}: cannot be decoded ({cli.first_line(e, name)})") from None
    sample = {}
    if "video" in modalities:
        if not info["frames"]:
            raise SystemExit(f"{name}: has no video frames, and this model reads video")
        sample["video"] = dataset.load_video(folder, info["frames"])
    if "audio" in modalities:
        if not info["audio_samples"]:
            what = "no audio stream" if "no audio stream" in info["reason"] else "an audio stream with no samples"
            raise SystemExit(f"{name}: has {what}, and this model reads audio")
        sample["audio"] = dataset.load_audio(folder)
    return sample


def show(results, tasks):
    """The predictions as a table: each clip (and what is said in it) with its classes ranked by
    probability, with bars."""
    (primary, _), *others = tasks
    for row in results:
        said = [row[k] for k in ("speaker", "text") if k in row]
        print(": ".join([row["file"]] + ([f"{said[0]}: {said[1]}"] if len(said) == 2 else [repr(s) for s in said])))
        for label, p in row[primary].items():
            print(f"  {label:<10} {p:6.3f}  {'#' * round(40 * p)}")
        for task, _ in others:
            print(f"  {task}: " + ", ".join(f"{label} {p:.3f}" for label, p in row[task].items()))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = cli.resolve_device(args.device)
    model, checkpoint = evaluate.load_checkpoint_model(args.checkpoint, device)
    modalities = checkpoint["model_config"]["modalities"]
    utterances, videos, contexts = inputs(args, modalities, data.DataConfig(**checkpoint["data_config"]).context)
    with cli.one_line_errors():
        dataset = evaluate.dataset_for(checkpoint, ".", None, model=model)
    empty = [i + 1 for i, u in enumerate(utterances) if not dataset.has_text(u.text)] if "text" in modalities else []
    if empty:
        raise SystemExit(f"{args.dialogue or '--text'}: utterance {empty[0]} ({utterances[empty[0] - 1].text!r}) is "
                         "empty: no word the model reads, and this model reads text; give what is said in each clip")
    media = {"video", "audio"} & set(modalities)
    if videos and any(videos) and not media:
        print(f"note: the checkpoint reads {'+'.join(modalities)} only: the video files are not used", file=sys.stderr)
    if args.text and "text" not in modalities:
        print(f"note: the checkpoint reads {'+'.join(modalities)} only: the text is not used", file=sys.stderr)
    names = videos if media else [u.id for u in utterances]
    import prepare
    settings = prepare.PrepareSettings(**{k: v for k, v in (checkpoint.get("prepare") or {}).items()
                                          if k in prepare.PrepareSettings.__dataclass_fields__})
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            sample = dict(id=name) | (media_sample(name, Path(tmp) / f"clip{i}", dataset, settings, modalities)
                                      if media else {})
            if "text" in modalities:
                sample.update(dataset.tokenize(utterances[i], *contexts[i]))
            samples.append(sample)
    batch = data.collate(samples, **data.collate_padding(dataset.config),
                         pad_token_id=getattr(dataset, "pad_token_id", 0), tasks=())
    with torch.no_grad():
        out = model(data.to_device(batch, device))
    results = []
    for i, name in enumerate(names):
        row = {"file": name} | ({"speaker": utterances[i].speaker} if args.dialogue else {}) \
            | ({"text": utterances[i].text} if "text" in modalities else {})
        for task, labels in checkpoint["tasks"]:
            row[task] = dict(sorted(zip(labels, out[task][i].float().softmax(-1).tolist()), key=lambda x: -x[1]))
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        show(results, checkpoint["tasks"])
    return results
