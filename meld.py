"""MELD's vocabulary and files: labels, splits, modalities, and the readers of every CSV and manifest.

    rows = meld.read_meld_csv("MELD.Raw/train_sent_emo.csv", "train")   # [Utterance, ...] in file order
    rows[0].text, rows[0].speaker, meld.EMOTIONS[rows[0].emotion]
    meld.read_manifest("data/meld-cache")                               # {id: entry} of a prepared cache

MELD (Poria et al., ACL 2019, https://affective-meld.github.io/): utterances of *Friends* with 7
emotions and 3 sentiments, in `{split}_sent_emo.csv` files beside the MELD.Raw mp4 folders. The same
readers serve a user's own manifest (`prepare.py --csv`). This file is the bottom of the import graph:
it imports nothing of this repository, and prepare.py, data.py, train.py and evaluate.py read MELD
through it.
"""

import collections
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

# The one label order used everywhere (model heads, metrics, checkpoints, reports).
EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
SENTIMENTS = ("neutral", "positive", "negative")
SPLITS = ("train", "dev", "test")

MELD_COLUMNS = ("Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
                "Utterance_ID", "Season", "Episode", "StartTime", "EndTime")
# Where MELD.Raw keeps each split's mp4 files once its archives are unpacked.
VIDEO_DIRS = {"train": "train/train_splits", "dev": "dev/dev_splits_complete",
              "test": "test/output_repeated_splits_test"}

AUDIO_RATE = 16_000   # Hz, mono: the audio.npy that prepare stores, what the log-mel and speech models read
MODALITIES = ("video", "audio", "text")
DATASETS = ("meld", "csv")   # MELD's CSVs (emotion + sentiment), or a `prepare.py --csv` cache (one task)
# MELD train's utterance durations (EndTime - StartTime of its 9,989 rows), seconds, at the
# quantiles 0, 0.05, ..., 1: what bench.py --durations meld draws clip lengths from (np.interp).
MELD_TRAIN_SECONDS = (0.01, 0.67, 1.01, 1.19, 1.38, 1.55, 1.73, 1.92, 2.08, 2.25, 2.46,
                      2.67, 2.92, 3.17, 3.50, 3.92, 4.46, 5.25, 6.34, 7.92, 41.04)


class DamagedClip(ValueError):
    """A prepared clip whose files cannot be read (cut short by an interrupted copy, or gone): the
    message names the clip's folder and how to prepare it again (prepare.py --verify)."""


def check_modalities(modalities):
    """-> the given modalities as a tuple in MODALITIES order. ValueError (naming the unknown ones) for
    an empty selection or a name not in MODALITIES."""
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"unknown modality {', '.join(map(repr, unknown))}; give a comma-separated, "
                         f"non-empty subset of {','.join(MODALITIES)}")
    return tuple(m for m in MODALITIES if m in modalities)


def split_file(dataset, split):
    """The file that defines a split: MELD's {split}_sent_emo.csv, or the {split}_clips.csv that
    `prepare.py --csv` writes (dataset "csv")."""
    return f"{split}_clips.csv" if dataset == "csv" else f"{split}_sent_emo.csv"


# ------------------------------------------------------------------------------------------------
# MELD CSVs
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Utterance:
    id: str            # "train/dia0_utt0": split and clip name, unique across the dataset
    split: str
    dialogue: int
    index: int         # Utterance_ID inside the dialogue
    text: str
    speaker: str
    emotion: int       # index into EMOTIONS
    sentiment: int     # index into SENTIMENTS
    start: str = ""    # StartTime / EndTime as written, e.g. "00:16:16,059" (times in the episode)
    end: str = ""
    label: int = -1    # --dataset csv: index into the class list (emotion and sentiment are then -1)


def _utf16_codec(raw):
    """The codec of a UTF-16 file (a spreadsheet's "Unicode text"), else None. Without a BOM it is told
    by its zero bytes: ASCII in UTF-16 LE is "S\0r\0", in BE "\0S\0r"; UTF-8 and cp1252 CSVs have none."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"  # reads the BOM for the byte order and drops it
    head = raw[:4096]
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if odd > len(head) // 8 and even * 4 < odd:
        return "utf-16-le"
    if even > len(head) // 8 and odd * 4 < even:
        return "utf-16-be"
    return None


def read_text(path):
    """Decode a CSV file (a MELD annotation CSV or a user's manifest) to str, line endings kept.

    Accepted: UTF-16 LE or BE, with or without BOM; otherwise line by line, each line UTF-8 (a UTF-8
    BOM at the start is dropped) or, where it is not valid UTF-8, cp1252: MELD.Raw's own CSVs are
    cp1252, and a UTF-8 file with one row typed in an old editor keeps its UTF-8 rows intact.
    Raises a one-line ValueError naming the file for a line that is neither UTF-8 nor cp1252 (with its
    1-based line number and the byte), for broken UTF-16, and for NUL characters (UTF-32, binary files).
    """
    # Not chardet/charset-normalizer: they guess one encoding per file, which mangles mixed files.
    raw = Path(path).read_bytes()
    codec = _utf16_codec(raw)
    if codec:
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: looks like {codec.upper()} but is not ({e.reason} at byte {e.start}); "
                             f"save the file as UTF-8") from None
    else:
        lines = raw.removeprefix(b"\xef\xbb\xbf").splitlines(keepends=True)  # \r, \n, \r\n: never in a character
        text = "".join(_decode_line(path, n, line) for n, line in enumerate(lines, start=1))
    if "\0" in text:
        raise ValueError(f"{path}: contains NUL characters (UTF-32, or not a text file?); save the file as UTF-8")
    return text


def _decode_line(path, n, line):
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return line.decode("cp1252")
    except UnicodeDecodeError as e:  # cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined
        raise ValueError(f"{path}, line {n}: neither UTF-8 nor cp1252 (byte 0x{line[e.start]:02X} at column "
                         f"{e.start + 1}); save the file as UTF-8") from None


def csv_reader(path):
    """csv.DictReader over read_text(path) with the delimiter its header line uses: comma, tab (a
    spreadsheet's "Unicode text" export) or semicolon (spreadsheets where the decimal mark is a
    comma). Not csv.Sniffer: it guesses from whole rows, and MELD's utterances are full of commas."""
    text = read_text(path)
    delimiter = max(",\t;", key=text.split("\n", 1)[0].count)
    return csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)


def read_meld_csv(path, split):
    """Parse one MELD annotation CSV into a list of Utterance, in file order.

    Columns are found by name (extra columns are ignored). Labels are matched case-insensitively;
    an unknown label, a missing column or a non-integer id is a ValueError naming the file and row.
    """
    path = Path(path)
    reader = csv_reader(path)
    missing = [c for c in ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    rows, seen = [], set()
    for line, row in enumerate(reader, start=2):  # line 1 is the header
        if not any((v or "").strip() for v in row.values()):
            continue                                 # a spreadsheet's trailing row of empty cells
        where = f"{path}, row {line}"
        emotion, sentiment = row["Emotion"].strip().lower(), row["Sentiment"].strip().lower()
        if emotion not in EMOTIONS:
            raise ValueError(f"{where}: unknown emotion label {row['Emotion']!r} (expected one of {EMOTIONS})")
        if sentiment not in SENTIMENTS:
            raise ValueError(f"{where}: unknown sentiment label {row['Sentiment']!r} (expected one of {SENTIMENTS})")
        try:
            dialogue, index = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except ValueError:
            raise ValueError(f"{where}: Dialogue_ID/Utterance_ID must be integers, got "
                             f"{row['Dialogue_ID']!r}/{row['Utterance_ID']!r}") from None
        uid = f"{split}/dia{dialogue}_utt{index}"
        if uid in seen:
            raise ValueError(f"{where}: duplicate utterance dia{dialogue}_utt{index}")
        seen.add(uid)
        rows.append(Utterance(uid, split, dialogue, index, row["Utterance"].strip(), row["Speaker"].strip(),
                              EMOTIONS.index(emotion), SENTIMENTS.index(sentiment),
                              (row.get("StartTime") or "").strip(), (row.get("EndTime") or "").strip()))
    return rows


def find_csv(root, split):
    """`{split}_sent_emo.csv` at the top of root (prepare's cache, synth, shared copies) or in root/split/."""
    for candidate in (Path(root) / f"{split}_sent_emo.csv", Path(root) / split / f"{split}_sent_emo.csv"):
        if candidate.is_file():
            return candidate
    return None


def available_splits(root, dataset="meld"):
    if dataset == "csv":
        return [s for s in SPLITS if (Path(root) / split_file(dataset, s)).is_file()]
    return [s for s in SPLITS if find_csv(root, s) is not None]


# ------------------------------------------------------------------------------------------------
# Any labelled clips, audio files or images: a CSV manifest (--dataset csv)
# ------------------------------------------------------------------------------------------------

CLIP_COLUMNS = ("id", "path", "label", "text", "group")


def named_rows(path, required):
    """The rows of a CSV whose column names are matched without regard to case or surrounding
    spaces: -> (1-based line number, {lower-case name: stripped cell}) for every row that is not
    all empty (a spreadsheet's trailing rows). ValueError naming the file when a column of
    `required` (lower-case names) is missing."""
    reader = csv_reader(path)
    missing = [c for c in required if c not in [f.strip().lower() for f in reader.fieldnames or []]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    for line, raw in enumerate(reader, start=2):                   # line 1 is the header
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if any(row.values()):
            yield line, row


def read_manifest_csv(path):
    """A user's manifest: columns path and label, optional text, split, group (others ignored).
    -> list of dicts with those five keys, paths resolved against the CSV's folder. A missing column,
    an empty path or label, or a split other than train/dev/test is a ValueError naming the row."""
    path = Path(path)
    rows = []
    for line, row in named_rows(path, ("path", "label")):
        if not row["path"] or not row["label"]:
            raise ValueError(f"{path}, row {line}: empty path or label")
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise ValueError(f"{path}, row {line}: split {split!r} is not one of {SPLITS}")
        rows.append(dict(path=os.path.abspath(path.parent / row["path"]), label=row["label"],  # links kept
                         text=row.get("text", ""), split=split, group=row.get("group", "")))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_clips_csv(root, split, classes):
    """{split}_clips.csv of a prepared csv dataset -> list of Utterance (label = index into classes;
    group = the dialogue for --context). A label missing from classes is a ValueError."""
    path = Path(root) / f"{split}_clips.csv"
    rows, position = [], collections.Counter()
    for line, row in enumerate(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")), start=2):
        if row["label"] not in classes:
            raise ValueError(f"{path}, row {line}: label {row['label']!r} is not a class of the train split "
                             f"(or of the checkpoint: {', '.join(classes)})")
        group = row["group"] or row["id"]
        rows.append(Utterance(row["id"], split, group, position[group], row["text"], "", -1, -1,
                              label=classes.index(row["label"])))
        position[group] += 1
    return rows


def csv_classes(root):
    """The class list of a prepared csv dataset: the sorted labels of its train split."""
    path = Path(root) / "train_clips.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no train split (prepare --csv writes it)")
    return sorted({row["label"] for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))})


def read_manifest(cache):
    """Manifest lines of a cache as {id: entry}. A last line cut off by a kill is ignored."""
    path = Path(cache) / "manifest.jsonl"
    entries = {}
    if path.exists():
        for line in path.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            entry = json.loads(line)
            entries[entry["id"]] = entry
    return entries


def read_split(root, dataset, split, classes):
    """The rows of one split: MELD's CSV (dataset "meld") or the {split}_clips.csv of a `prepare.py --csv`
    cache (labels indexing classes). FileNotFoundError naming the file when the split is not there."""
    path = Path(root) / split_file(dataset, split)
    if dataset == "csv" and path.is_file():
        return read_clips_csv(root, split, classes)
    if dataset == "meld" and find_csv(root, split):
        return read_meld_csv(find_csv(root, split), split)
    raise FileNotFoundError(f"{path}: no {split} split here" + (
        " (python prepare.py --csv MANIFEST --out CACHE writes it)" if dataset == "csv" else ""))


def prepared_clips(root, rows, split, modalities):
    """The rows of a prepared cache whose clips have what `modalities` need -> (rows kept, {id: manifest
    entry}, Counter of the others by reason: the extraction's ("corrupt", ...), "no video", "no audio").
    FileNotFoundError for a folder without manifest.jsonl (saying how to prepare it), ValueError when
    some rows were never prepared."""
    root = Path(root)
    manifest = read_manifest(root)
    if not manifest:
        source = (f"--meld-root {root} --out data/meld-cache` and pass --data data/meld-cache"
                  if (root / VIDEO_DIRS[split]).is_dir() else f"--meld-root MELD_RAW (or --csv MANIFEST) --out {root}` "
                  "first")
        raise FileNotFoundError(f"{root}: not a prepared cache (no manifest.jsonl) and the model reads "
                                f"{'+'.join(modalities)}: run `python prepare.py {source} (a text-only model, "
                                "--modalities text, reads the CSVs alone)")
    missing = [r.id for r in rows if r.id not in manifest]
    if missing:
        raise ValueError(f"{root / 'manifest.jsonl'}: {len(missing)} of {len(rows)} {split} clips "
                         f"(e.g. {missing[0]}) were never prepared; re-run prepare to finish it")
    kept, entries, excluded = [], {}, collections.Counter()
    for r in rows:
        entry = manifest[r.id]
        if entry["status"] != "ok":
            excluded[entry["reason"].split(":")[0]] += 1
        elif "video" in modalities and entry["frames"] == 0:
            excluded["no video"] += 1
        elif "audio" in modalities and entry["audio_samples"] == 0:
            excluded["no audio"] += 1
        else:
            kept.append(r)
            entries[r.id] = entry
    return kept, entries, excluded


def tasks(dataset, root=None, classes=None):
    """The classification tasks of a dataset as [(task, class names)], the first the primary one:
    MELD's [("emotion", EMOTIONS), ("sentiment", SENTIMENTS)]; a csv cache's [("label", classes)],
    classes by default the sorted labels of root's train split (none without root). ValueError for
    another dataset name."""
    if dataset == "meld":
        return [("emotion", EMOTIONS), ("sentiment", SENTIMENTS)]
    if dataset == "csv":
        return [("label", tuple(classes) if classes is not None else tuple(csv_classes(root)) if root else ())]
    raise ValueError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")



def read_dialogue_csv(path):
    """A conversation to predict (evaluate.py predict --dialogue): columns Speaker and Utterance,
    optionally Video (a file per row; paths relative to the CSV's folder), names matched without
    regard to case, rows in the order spoken. -> (list of Utterance, one dialogue, indices 0, 1, …
    in row order; list of video paths, "" where none). ValueError naming the file for a missing
    column or no rows."""
    path = Path(path)
    utterances, videos = [], []
    for _, cell in named_rows(path, ("speaker", "utterance")):
        i = len(utterances)
        utterances.append(Utterance(f"{path.stem}/utt{i}", "", 0, i, cell["utterance"], cell["speaker"], -1, -1))
        videos.append(os.path.abspath(path.parent / cell["video"]) if cell.get("video") else "")
    if not utterances:
        raise ValueError(f"{path}: no rows")
    return utterances, videos
