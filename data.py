"""MELD data: CSV parsing, synthetic MELD-format clips, one-time extraction, dataset and loaders.

    python data.py synth --out data/synth                          # small MELD-format set, no network
    python data.py prepare --meld-root data/synth --out data/synth-cache
    python data.py prepare --meld-root /path/to/MELD.Raw --out data/meld-cache --workers 8
    python data.py prepare --csv my_clips.csv --out data/my-cache     # any labelled videos, audio, images

`prepare` decodes every clip once (frames as JPEG at a fixed rate and short side, audio as 16 kHz
mono int16) and writes `manifest.jsonl`, one line per clip with its status. It can be killed at any
moment and re-run with the same command: finished clips are kept, half-written ones are redone.

`MELDDataset` reads that cache (or, for `modalities=("text",)`, just the CSVs of any MELD folder),
and `collate` builds the batch every model in this repo takes:

    video        uint8 [B, 3, T, H, W]   real frames first, zero padding last
    video_mask   bool  [B, T]            True = real frame
    audio        float [B, n_mels, A]    natural-log mel power, 100 frames per second
                 (audio_input="waveform": float [B, 1, S], 16 kHz samples in [-1, 1])
    audio_mask   bool  [B, A] (or [B, S])
    input_ids, attention_mask, token_type_ids   long [B, L]   padded to the longest in the batch
    emotion      long  [B]               index into EMOTIONS
    sentiment    long  [B]               index into SENTIMENTS
                 (--dataset csv: label long [B], index into the classes of the train split)
    ids          list[str]               e.g. "train/dia0_utt0"

A modality that is not selected is absent from the batch and is never read from disk.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import ctypes
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import torchaudio
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg, read_file

# The one label order used everywhere (model heads, metrics, checkpoints, reports).
EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
SENTIMENTS = ("neutral", "positive", "negative")
SPLITS = ("train", "dev", "test")

MELD_COLUMNS = ("Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
                "Utterance_ID", "Season", "Episode", "StartTime", "EndTime")
# Where MELD.Raw keeps each split's mp4 files once its archives are unpacked.
VIDEO_DIRS = {"train": "train/train_splits", "dev": "dev/dev_splits_complete",
              "test": "test/output_repeated_splits_test"}

AUDIO_RATE = 16_000   # Hz, mono, what prepare stores and the log-mel reads
MEL_HOP = 160         # samples: 10 ms, so A = 100 audio frames per second
MEL_WINDOW = 400      # samples: 25 ms


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
        return [s for s in SPLITS if (Path(root) / f"{s}_clips.csv").is_file()]
    return [s for s in SPLITS if find_csv(root, s) is not None]


# ------------------------------------------------------------------------------------------------
# Any labelled clips, audio files or images: a CSV manifest (--dataset csv)
# ------------------------------------------------------------------------------------------------

CLIP_COLUMNS = ("id", "path", "label", "text", "group")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXIF_ORIENTATION = 0x0112   # the EXIF tag: 1 upright … 8, mirrored and/or turned (TIFF 6.0 / Exif 2.3)


def read_manifest_csv(path):
    """A user's manifest: columns path and label, optional text, split, group (others ignored).
    -> list of dicts with those five keys, paths resolved against the CSV's folder. A missing column,
    an empty path or label, or a split other than train/dev/test is a ValueError naming the row."""
    path = Path(path)
    reader = csv_reader(path)
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    missing = [c for c in ("path", "label") if c not in fields]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue                                 # a spreadsheet's trailing row of empty cells
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


def assign_splits(rows, ratio=(0.8, 0.1, 0.1), seed=0):
    """Rows without a split get one: per label, a seeded shuffle cut by ratio (stratified); a
    label with fewer rows than splits goes to train first. Rows that have a split keep it."""
    ratio = np.asarray(ratio, dtype=float) / sum(ratio)
    by_label = collections.defaultdict(list)
    for i, row in enumerate(rows):
        if not row["split"]:
            by_label[row["label"]].append(i)
    rng = np.random.default_rng(seed)
    for label in sorted(by_label):
        indices = rng.permutation(by_label[label])
        counts = np.floor(ratio * len(indices)).astype(int)
        counts[0] += len(indices) - counts.sum()         # the remainder trains
        for split, part in zip(SPLITS, np.split(indices, np.cumsum(counts)[:-1])):
            for i in part:
                rows[i]["split"] = split
    return rows


def csv_clip_id(row):
    """"split/stem-hash": readable, unique per source path, stable across runs."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(row["path"]).stem)[:40]
    return f"{row['split']}/{stem}-{hashlib.sha1(row['path'].encode()).hexdigest()[:8]}"


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


# ------------------------------------------------------------------------------------------------
# synth: MELD-format synthetic clips
# ------------------------------------------------------------------------------------------------
# Every emotion leaves a trace in every modality, but each modality carries the true class only with
# some probability (otherwise the trace of a random class), independently: each branch alone is
# capped well below 100% and fusing them beats the best single one. In video, the trace is the colour
# of a disk that sweeps across the frame; surprise and fear share a colour and differ only in the
# direction of the sweep: a fear clip is the frames of a surprise clip in reverse order, so only a
# model that sees time can tell them apart. Their sweep is vertical, a direction that the training
# augmentation (horizontal flip, small rotations) keeps. Audio: a tone whose pitch depends on the class. Text: a
# keyword of the class among filler words.

TEMPORAL_PAIR = ("surprise", "fear")   # same frames, opposite order
SYNTH_COLOURS = {"neutral": (160, 160, 160), "surprise": (255, 200, 0), "fear": (255, 200, 0),
                 "sadness": (40, 90, 255), "joy": (40, 220, 60), "disgust": (150, 60, 200),
                 "anger": (240, 30, 30)}
SYNTH_PITCH = {e: 250.0 * 1.4 ** i for i, e in enumerate(EMOTIONS)}  # Hz, 250 … 1,882
SYNTH_WORDS = {"neutral": ("okay", "fine", "alright", "sure"),
               "surprise": ("wow", "really", "seriously", "whoa"),
               "fear": ("scared", "afraid", "terrified", "nervous"),
               "sadness": ("sad", "sorry", "miss", "lonely"),
               "joy": ("great", "love", "happy", "wonderful"),
               "disgust": ("gross", "ew", "disgusting", "yuck"),
               "anger": ("hate", "angry", "furious", "shut")}
SYNTH_FILLER = ("i", "you", "we", "think", "the", "coffee", "apartment", "said", "that", "was", "just",
                "so", "going", "tonight", "there", "know", "it’s", "i’m", "don’t", "and", "this", "guy")
SYNTH_SPEAKERS = ("Rachel", "Ross", "Monica", "Chandler", "Joey", "Phoebe")
# MELD's train label counts, square-rooted: imbalanced like MELD, but rare classes still appear.
SYNTH_PRIOR = np.sqrt([4710, 1205, 268, 683, 1743, 271, 1109]) / np.sqrt([4710, 1205, 268, 683, 1743, 271, 1109]).sum()
SYNTH_INFORMATIVE = {"video": 0.6, "audio": 0.6, "text": 0.7}
SYNTH_AUDIO_RATE = 22_050  # Hz, stereo: prepare has to resample and downmix, as for MELD's 48 kHz


def synth_frames(trace, seconds, width, height, fps, seed):
    """Frames of one synthetic clip carrying the video trace of emotion `trace`: uint8 [N, H, W, 3].

    A disk of the trace's colour crosses a noisy background. For TEMPORAL_PAIR the two classes get
    the same frames (same seed), the second in reverse order: the disk moves down for the first and
    up for the second (vertical, so that a horizontal flip does not turn one class into the other).
    """
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * fps))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = (rng.uniform(0, 70, size=3).astype(np.float32) + 30 * (xx / width)[..., None]
                  + rng.normal(0, 8, size=(height, width, 1)).astype(np.float32))  # static texture
    radius = rng.uniform(0.12, 0.2) * height
    if trace in TEMPORAL_PAIR:  # top to bottom; reversed below for the second class of the pair
        x0, x1 = rng.uniform(0.35, 0.65, size=2) * width
        y0, y1 = 0.1 * height, 0.9 * height
    else:                       # left or right: only the colour carries the class
        x0, x1 = rng.permutation([0.1 * width, 0.9 * width])
        y0, y1 = rng.uniform(0.25, 0.75, size=2) * height
    colour = np.array(SYNTH_COLOURS[trace], np.float32)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        a = i / max(n - 1, 1)
        cx, cy = x0 + a * (x1 - x0), y0 + a * (y1 - y0)
        disk = (((xx - cx) ** 2 + (yy - cy) ** 2) < radius ** 2)[..., None]
        img = np.where(disk, colour, background) + rng.normal(0, 3)  # flicker
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    if trace == TEMPORAL_PAIR[1]:
        frames = frames[::-1].copy()
    return frames


def synth_audio(trace, seconds, rate, seed):
    """Stereo float32 [2, N] waveform: a syllable-modulated tone at the trace's pitch, in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    pitch = SYNTH_PITCH[trace] * rng.uniform(0.97, 1.03)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 2 * np.pi))
    tone = envelope * (np.sin(2 * np.pi * pitch * t) + 0.3 * np.sin(4 * np.pi * pitch * t))
    wave = rng.uniform(0.1, 0.3) * tone + rng.uniform(0.02, 0.08) * rng.standard_normal(t.size)
    return np.stack([wave, wave]).astype(np.float32)


def synth_text(trace, rng):
    words = list(rng.choice(SYNTH_FILLER, size=rng.integers(2, 7)))
    words.insert(rng.integers(0, len(words) + 1), rng.choice(SYNTH_WORDS[trace]))
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", "..."])


def write_mp4(path, frames, fps, audio=None, audio_rate=SYNTH_AUDIO_RATE):
    """H.264 (yuv420p) + AAC mp4 with PyAV. frames: uint8 [N, H, W, 3]; audio: float32 [C, S] or None."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "20"})
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        if audio is not None:
            sound = container.add_stream("aac", rate=audio_rate, layout="stereo" if audio.shape[0] == 2 else "mono")
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            for start in range(0, audio.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, start:start + 1024]),
                                                   format="fltp", layout=sound.layout.name)
                chunk.sample_rate, chunk.pts = audio_rate, start
                container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))


def _clock(seconds):
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def _synth_clip(task):
    """Worker: write one synthetic mp4. defect: None, "no audio" or "truncated"."""
    path, traces, seconds, seed, width, height, fps, defect = task
    frames = synth_frames(traces["video"], seconds, width, height, fps, seed)
    audio = None if defect == "no audio" else synth_audio(traces["audio"], seconds, SYNTH_AUDIO_RATE, seed)
    write_mp4(path, frames, fps, audio, SYNTH_AUDIO_RATE)
    if defect == "truncated":  # the index (moov atom) at the end of the file is lost
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])


def synth_rows(size, rng, min_seconds=0.5, max_seconds=6.0):
    """The annotations of `size` synthetic utterances, grouped in dialogues of 1–6, with the trace each
    modality carries: the true emotion with probability SYNTH_INFORMATIVE[m], else a random one."""
    rows, dialogue, clock = [], 0, 60.0
    while len(rows) < size:
        season, episode = rng.integers(1, 11), rng.integers(1, 25)
        for index in range(min(int(rng.integers(1, 7)), size - len(rows))):
            emotion = EMOTIONS[rng.choice(len(EMOTIONS), p=SYNTH_PRIOR)]
            traces = {m: emotion if rng.random() < p else EMOTIONS[rng.integers(len(EMOTIONS))]
                      for m, p in SYNTH_INFORMATIVE.items()}
            seconds = float(rng.uniform(min_seconds, max_seconds))
            sentiment = {"neutral": "neutral", "joy": "positive",
                         "surprise": rng.choice(["positive", "negative"])}.get(emotion, "negative")
            rows.append(dict(emotion=emotion, sentiment=sentiment, traces=traces, seconds=seconds,
                             seed=int(rng.integers(2 ** 31)), dialogue=dialogue, index=index,
                             speaker=rng.choice(SYNTH_SPEAKERS), text=synth_text(traces["text"], rng),
                             season=season, episode=episode, start=clock))
            clock += seconds + rng.uniform(0.1, 1.0)
        dialogue += 1
    return rows


def synth(out, sizes=(96, 24, 24), seed=0, width=160, height=90, fps=24, min_seconds=0.5, max_seconds=6.0,
          workers=1):
    """Write a MELD.Raw-shaped folder of synthetic clips to `out`; returns the number of rows per split.

    Defects on purpose, as in the real MELD.Raw: in train a truncated mp4 (moov atom lost) and a clip
    with no audio stream; in dev a CSV row whose mp4 is missing; in test a stray unlabelled mp4.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts, tasks = {}, []
    for split, size in zip(SPLITS, sizes):
        folder = out / VIDEO_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        rows = synth_rows(size, rng, min_seconds, max_seconds)
        with open(out / f"{split}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)  # minimal quoting and \r\n line ends, as in MELD's files
            writer.writerow(MELD_COLUMNS)
            for sr, r in enumerate(rows, start=1):
                writer.writerow([sr, r["text"], r["speaker"], r["emotion"], r["sentiment"], r["dialogue"],
                                 r["index"], r["season"], r["episode"], _clock(r["start"]),
                                 _clock(r["start"] + r["seconds"])])
        with open(out / f"{split}_synth_traces.jsonl", "w") as f:  # what each modality carries, for checks
            f.writelines(json.dumps(dict(id=f"{split}/dia{r['dialogue']}_utt{r['index']}", emotion=r["emotion"],
                                         **r["traces"])) + "\n" for r in rows)
        last = len(rows) - 1
        for i, r in enumerate(rows):
            if split == "dev" and i == last:
                continue  # missing: referenced by the CSV, never written
            defect = {last - 1: "no audio", last: "truncated"}.get(i) if split == "train" else None
            tasks.append((folder / f"dia{r['dialogue']}_utt{r['index']}.mp4", r["traces"], r["seconds"],
                          r["seed"], width, height, fps, defect))
        if split == "test":  # stray file, named like the unlabelled extras of MELD.Raw's test folder
            tasks.append((folder / "final_videos_testdia0_utt0.mp4", {"video": "neutral", "audio": "neutral"},
                          1.0, seed, width, height, fps, None))
        counts[split] = len(rows)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_synth_clip, tasks, chunksize=4)
    else:
        for task in tasks:
            _synth_clip(task)
    return counts


# ------------------------------------------------------------------------------------------------
# prepare: decode every clip once
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareSettings:
    fps: float = 10.0            # frames kept per second of clip
    short_side: int = 256        # pixels: frames are shrunk so that min(H, W) is this (never enlarged)
    max_seconds: float = 15.0    # seconds kept per clip (MELD has a few clips of several minutes)
    jpeg_quality: int = 90


def _frame_targets(t, duration, fps, next_k):
    """Target frame numbers k >= next_k with k / fps before the end of the source frame shown from t."""
    ks = []
    while next_k / fps < t + duration - 1e-6:  # a gap in the source repeats the next frame
        ks.append(next_k)
        next_k += 1
    return ks, next_k


def extract_clip(src, dst, settings, threads=0):
    """Decode src (mp4) into the folder dst: 000000.jpg … at settings.fps and short side, audio.npy
    (int16, 16 kHz mono). Memory stays bounded: frames are resized and written as they are decoded,
    and decoding stops at settings.max_seconds. threads: decoder threads (0 = one per core).

    Frames are stored as a player shows them: non-square pixels are stretched to the display
    aspect ratio (width × sample aspect ratio) and the track's display matrix is applied
    (display_orientation: a rotation by a multiple of 90°, then possibly a mirror). The manifest
    fields `rotation` (degrees, counter-clockwise), `mirrored` and `sample_aspect_ratio`
    ("num:den") record what was done. Returns the manifest fields; raises ValueError (no
    stream, no frame, a rotation that is not a multiple of 90°) or av.FFmpegError (undecodable
    data)."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    if Path(src).suffix.lower() in IMAGE_SUFFIXES:
        return extract_image(src, dst, settings)
    frames_written, audio, audio_samples, video_seconds = 0, [], 0, 0.0
    with av.open(str(src)) as container:
        source_seconds = (container.duration or 0) / av.time_base
        vstream = container.streams.video[0] if container.streams.video else None
        astream = container.streams.audio[0] if container.streams.audio else None
        if vstream is None and astream is None:
            raise ValueError("no video and no audio stream")
        streams = [s for s in (vstream, astream) if s is not None]
        for s in streams:
            s.thread_type = "AUTO"
            s.codec_context.thread_count = threads
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE) if astream else None
        src_fps = float(vstream.average_rate or 25) if vstream else 25.0
        next_k, t0, size, rotation, mirrored, sar, done = 0, None, None, 0, False, 1, set()
        for packet in container.demux(streams):
            stream = packet.stream
            if stream in done:
                continue
            for frame in packet.decode():
                if stream is vstream:
                    t0 = frame.time if t0 is None else t0
                    t = (frame.time - t0) if frame.time is not None else frames_written / settings.fps
                    if t >= settings.max_seconds:
                        done.add(vstream)
                        break
                    ks, next_k = _frame_targets(t, 1.0 / src_fps, settings.fps, next_k)
                    if not ks:
                        continue
                    if size is None:
                        sar = vstream.codec_context.sample_aspect_ratio or vstream.sample_aspect_ratio or 1
                        size = display_size(frame.width, frame.height, sar, settings.short_side)
                        rotation, mirrored = display_orientation(frame)
                    rgb = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
                    image = torch.from_numpy(rgb.to_ndarray()).permute(2, 0, 1)           # [3, h, w] uint8
                    image = torch.rot90(image, rotation // 90, dims=(1, 2))               # counter-clockwise
                    jpeg = encode_jpeg((image.flip(2) if mirrored else image).contiguous(),
                                       quality=settings.jpeg_quality).numpy().tobytes()
                    for k in ks:
                        (dst / f"{k:06d}.jpg").write_bytes(jpeg)
                    frames_written = next_k
                    video_seconds = min(t + 1.0 / src_fps, settings.max_seconds)
                else:
                    for chunk in resampler.resample(frame):
                        audio.append(chunk.to_ndarray().reshape(-1))
                        audio_samples += len(audio[-1])
                    if audio_samples >= settings.max_seconds * AUDIO_RATE:
                        done.add(astream)
                        break
            if len(done) == len(streams):
                break
        if resampler is not None and astream not in done:
            for chunk in resampler.resample(None):
                audio.append(chunk.to_ndarray().reshape(-1))
    audio = np.concatenate(audio)[: int(settings.max_seconds * AUDIO_RATE)] if audio else np.zeros(0, np.int16)
    if len(audio):
        np.save(dst / "audio.npy", audio.astype(np.int16))
    if vstream is not None and frames_written == 0:
        raise ValueError("video stream decoded to no frames")
    reasons = []
    if vstream is None:
        reasons.append("no video stream")
    if astream is None:
        reasons.append("no audio stream")
    elif len(audio) == 0:
        reasons.append("audio stream decoded to no samples")
    kept = max(video_seconds, len(audio) / AUDIO_RATE)
    truncated = source_seconds > settings.max_seconds + 0.5
    if truncated:
        reasons.append(f"too long: kept the first {settings.max_seconds:g} of {source_seconds:.1f} s")
    width, height = (size[::-1] if rotation % 180 else size) if size else (0, 0)     # as stored
    return dict(status="ok", reason="; ".join(reasons), frames=frames_written, fps=settings.fps,
                source_fps=round(src_fps, 3) if vstream else 0, width=width, height=height,
                rotation=rotation, mirrored=mirrored,
                sample_aspect_ratio=f"{sar.numerator}:{sar.denominator}" if size else "1:1",
                seconds=round(kept, 3), source_seconds=round(source_seconds, 3), truncated=truncated,
                audio_samples=int(len(audio)))


def display_size(width, height, sample_aspect_ratio, short_side):
    """(w, h) to resize a decoded width x height frame to: its display size (width × sample aspect
    ratio, height), shrunk so that min(w, h) <= short_side (never enlarged)."""
    display_width = width * float(sample_aspect_ratio)
    scale = min(1.0, short_side / min(display_width, height))
    return max(1, round(display_width * scale)), max(1, round(height * scale))


def display_orientation(frame):
    """(rotation, mirrored) that show a decoded av.VideoFrame as a player does: rotate it
    counter-clockwise by rotation degrees (0, 90, 180 or 270), then mirror it left-right if
    mirrored. From the frame's DISPLAYMATRIX side data (FFmpeg's libavutil/display.h: 16.16
    fixed point [a b u; c d v; x y w], a point (p, q) shown at (a·p + c·q, b·p + d·q)); none
    means upright. A rotation that is not a multiple of 90° is a ValueError."""
    matrix = next((bytes(d) for d in frame.side_data if d.type.name == "DISPLAYMATRIX"), None)
    if matrix is None:
        return 0, False
    a, b, _, c, d = np.frombuffer(matrix, dtype=np.int32)[:5].astype(float)
    mirrored = bool(a * d - b * c < 0)
    if mirrored:                     # undo the mirror (it negates the first column) to read the rotation
        a, c = -a, -c
    angle = math.degrees(math.atan2(c, a))
    if abs(angle - 90 * round(angle / 90)) > 1:
        raise ValueError(f"display rotation of {angle:.0f}° is not a multiple of 90°")
    return round(angle / 90) % 4 * 90, mirrored


def extract_image(src, dst, settings):
    """An image -> dst/000000.jpg at the cache's short side (never enlarged): a one-frame clip,
    turned upright by its EXIF orientation (1–8, JPEG and PNG), which the manifest field
    `exif_orientation` records (1 = none or absent)."""
    try:
        image = decode_image(read_file(str(src)), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)                             # [3, h, w] uint8
        with PIL.Image.open(src) as header:                                       # reads the header only
            orientation = int(header.getexif().get(EXIF_ORIENTATION, 1))
    except (RuntimeError, PIL.UnidentifiedImageError) as e:
        raise ValueError(f"not a readable image ({str(e).strip().splitlines()[0]})") from None
    if image.dtype != torch.uint8:                                              # 16-bit PNG
        image = TF.to_dtype(image, torch.uint8, scale=True)
    h, w = image.shape[1:]
    width, height = display_size(w, h, 1, settings.short_side)
    if (height, width) != (h, w):
        image = TF.resize(image, [height, width], antialias=True)
    (dst / "000000.jpg").write_bytes(encode_jpeg(image, quality=settings.jpeg_quality).numpy().tobytes())
    return dict(status="ok", reason="no audio stream", frames=1, fps=settings.fps, source_fps=0, width=width,
                height=height, exif_orientation=orientation, seconds=0.0, source_seconds=0.0, truncated=False,
                audio_samples=0)


def _prepare_one(task):
    """Worker: extract one clip into a temporary folder, then rename it into place (atomic)."""
    clip_id, src, out, settings, threads, error = task
    entry = dict(id=clip_id, split=clip_id.split("/")[0], file=src and str(src))
    if error:
        return entry | dict(status="error", reason=error)
    entry["source"] = source_stamp(src)
    final = Path(out) / clip_id
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = extract_clip(src, tmp, settings, threads)
    except Exception as e:  # whatever one file does, the other clips are still prepared
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(e).replace(str(src), "").strip(" :;'\"").split("\n")[0] or type(e).__name__
        kind = ("corrupt" if isinstance(e, (av.FFmpegError, ValueError)) else "unreadable" if isinstance(e, OSError)
                else f"failed ({type(e).__name__})")
        return entry | dict(status="error", reason=f"{kind}: {message}")
    shutil.rmtree(final, ignore_errors=True)  # left by a run killed between rename and manifest line
    os.rename(tmp, final)
    return entry | info


def source_stamp(src):
    """[size in bytes, modification time in ns] of a source file (None if it is gone): a clip whose
    source changed since it was prepared is prepared again."""
    try:
        stat = os.stat(src)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _needs_prepare(entry, src):
    """Whether a clip's manifest entry (None: never tried) leaves it to do: it failed (the file may
    have been fixed since), or its source changed (entries without `source` predate the stamp)."""
    return entry is None or entry["status"] != "ok" or ("source" in entry and entry["source"] != source_stamp(src))


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


def _worker_init():
    torch.set_num_threads(1)


def _start_cache(out, settings):
    """Create the cache folder and record the settings; continuing with other settings is an error."""
    out.mkdir(parents=True, exist_ok=True)
    settings = PrepareSettings(float(settings.fps), int(settings.short_side), float(settings.max_seconds),
                               int(settings.jpeg_quality))
    settings_path, wanted = out / "prepare.json", dict(settings.__dict__, audio_rate=AUDIO_RATE)
    if settings_path.exists() and json.loads(settings_path.read_text()) != wanted:
        raise SystemExit(f"{out} was prepared with {settings_path.read_text().strip()}; asked for {wanted}. "
                         "Use the same settings to continue it, or another --out.")
    settings_path.write_text(json.dumps(wanted) + "\n")
    return settings


def _write_atomic(path, text):
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def prepare(meld_root, out, splits=SPLITS, settings=PrepareSettings(), workers=1, progress=True):
    """Decode MELD.Raw (or synth output) at meld_root into the cache folder out. Resumable.

    Returns {split: Counter(reason)} for the clips processed in this call and before."""
    meld_root, out = Path(meld_root), Path(out)
    if not any(find_csv(meld_root, split) for split in splits):
        raise FileNotFoundError(f"{meld_root}: no {'/'.join(splits)}_sent_emo.csv here or in its split folders; "
                                "--meld-root is the unpacked MELD.Raw folder (or the output of `data.py synth`)")
    settings = _start_cache(out, settings)
    tasks = []
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0  # cores shared by the workers
    for split in splits:
        csv_path = find_csv(meld_root, split)
        if csv_path is None:
            print(f"{split}: no {split}_sent_emo.csv under {meld_root}: skipped")
            continue
        rows = read_meld_csv(csv_path, split)
        _write_atomic(out / f"{split}_sent_emo.csv", read_text(csv_path))
        folder = meld_root / VIDEO_DIRS[split]
        videos = {p.name.lower(): p for p in (folder.iterdir() if folder.is_dir() else [])
                  if p.suffix.lower() == ".mp4" and p.is_file()}                  # dia0_utt0.mp4 or .MP4
        for row in rows:
            name = row.id.split("/")[1]
            src = videos.pop(f"{name.lower()}.mp4", folder / f"{name}.mp4")
            tasks.append((row.id, src, out, settings, threads, None if src.is_file() else f"missing: {src} not found"))
        for stray in sorted(videos.values()):
            tasks.append((f"{split}/{stray.stem}", stray, out, settings, threads, f"unlabelled: not in {csv_path.name}"))
    return _run_prepare(meld_root, out, tasks, workers, progress)


def prepare_csv(csv_path, out, settings=PrepareSettings(), split_ratio=(0.8, 0.1, 0.1), seed=0, workers=1,
                progress=True):
    """Decode every file a manifest CSV lists (videos, audio-only files, images) into the cache
    folder out, as `prepare` does for MELD, and write out/{split}_clips.csv (id, path, label, text,
    group). Rows without a split are split by label, seeded (assign_splits). Resumable."""
    out = Path(out)
    settings = _start_cache(out, settings)
    rows = assign_splits(read_manifest_csv(csv_path), split_ratio, seed)
    train_labels = {r["label"] for r in rows if r["split"] == "train"}
    unknown = next((r for r in rows if r["label"] not in train_labels), None)
    if unknown:
        raise ValueError(f"{csv_path}: label {unknown['label']!r} ({unknown['path']}) is in the {unknown['split']} "
                         f"split but not in train, whose labels are {sorted(train_labels)} (labels are case-sensitive)")
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    tasks, seen = [], {}
    for row in rows:
        row["id"] = csv_clip_id(row)
        if row["id"] in seen:
            raise ValueError(f"{csv_path}: {row['path']} is listed twice")
        seen[row["id"]] = row
        src = Path(row["path"])
        tasks.append((row["id"], src, out, settings, threads, None if src.is_file() else f"missing: {src} not found"))
    for split in SPLITS:
        lines = io.StringIO()
        writer = csv.DictWriter(lines, CLIP_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if r["split"] == split)
        _write_atomic(out / f"{split}_clips.csv", lines.getvalue())
    return _run_prepare(csv_path, out, tasks, workers, progress)


def _run_prepare(source, out, tasks, workers, progress):
    """Extract the clips of `tasks` that out/manifest.jsonl does not hold as done: never tried,
    failed before (the file may have been fixed since) or whose source file changed. A line is
    appended per clip as it finishes (so a killed run resumes), and at the end the manifest is
    rewritten with one line per clip. Prints and returns {split: Counter(reason)}."""
    from tqdm import tqdm

    for split in {t[0].split("/")[0] for t in tasks}:
        (out / split).mkdir(exist_ok=True)
        for stale in (out / split).glob(".tmp-*"):
            shutil.rmtree(stale)
    done = read_manifest(out)
    manifest = out / "manifest.jsonl"
    _write_atomic(manifest, "".join(json.dumps(e) + "\n" for e in done.values()))  # no line cut off by a kill
    todo = [t for t in tasks if _needs_prepare(done.get(t[0]), t[1])]
    print(f"prepare {source} -> {out}: {len(tasks)} clips, {len(tasks) - len(todo)} already done, "
          f"{len(todo)} to do with {workers} worker(s)")
    with open(manifest, "a") as f, contextlib.ExitStack() as stack:
        if workers > 1 and len(todo) > 1:  # a worker killed (out of memory) raises BrokenProcessPool, never hangs
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                          initializer=_worker_init)
            stack.callback(pool.shutdown, cancel_futures=True)  # on an interrupt, clips not started are dropped
            results = (future.result() for future in
                       concurrent.futures.as_completed([pool.submit(_prepare_one, t) for t in todo]))
        else:
            results = map(_prepare_one, todo)
        try:
            for entry in tqdm(results, total=len(todo), disable=not progress, unit="clip"):
                f.write(json.dumps(entry) + "\n")
                f.flush()
                done[entry["id"]] = entry
        except concurrent.futures.process.BrokenProcessPool:
            raise SystemExit(f"prepare {out}: a worker process died (out of memory?); the {len(done)} clips done so "
                             "far are kept: run the same command again, with fewer --workers") from None
    _write_atomic(manifest, "".join(json.dumps(e) + "\n" for e in done.values()))
    summary = collections.defaultdict(collections.Counter)
    for entry in done.values():
        summary[entry["split"]][entry["status"] if not entry["reason"] else entry["reason"].split(":")[0]] += 1
    for split, counts in summary.items():
        print(f"  {split}: " + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()))
    return dict(summary)


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------

def window_start(extra, generator=None, view=0, num_views=1):
    """Start of a window that leaves `extra` steps of a longer sequence out: uniform at random in
    training (a generator given); in evaluation view v of num_views windows spaced evenly from the
    start to the end (num_views 1: the centre). Frames and audio use it alike, so view v of a clip
    takes its frames and its audio from the same part of the clip."""
    if generator is not None:
        return int(torch.randint(extra + 1, (1,), generator=generator))
    if num_views > 1:
        return round(view * extra / (num_views - 1))
    return extra // 2


def sample_frame_indices(available, num_frames, mode, generator=None, view=0, num_views=1):
    """Which of `available` cached frames (at the fixed rate) to read for one clip.

    mode "fixed": num_frames consecutive frames from window_start (temporal jitter in training,
    view v of num_views evenly spaced windows in evaluation).
    mode "uniform": one frame from each of num_frames equal segments spanning the whole clip:
    at a random place in its segment in training; in evaluation at (v + 1/2) / num_views of it
    for view v (num_views 1: the segment's centre), so views take different frames once the
    segments are num_views frames long.
    A clip shorter than num_frames gives all its frames: the caller pads and masks.
    """
    if available <= num_frames:
        return list(range(available))
    if mode == "fixed":
        start = window_start(available - num_frames, generator, view, num_views)
        return list(range(start, start + num_frames))
    if mode == "uniform":
        edges = np.linspace(0, available, num_frames + 1)
        offsets = (torch.rand(num_frames, generator=generator).numpy() if generator is not None
                   else (view + 0.5) / num_views)
        return np.minimum((edges[:-1] + offsets * np.diff(edges)).astype(int), available - 1).tolist()
    raise ValueError(f"unknown frame sampling {mode!r} (expected 'fixed' or 'uniform')")


def _uniform(generator, low, high):
    return low + (high - low) * float(torch.rand((), generator=generator))


def transform_video(frames, crop_size, generator=None, hflip=0.5):
    """t frames uint8 [3, h, w] (a list, or a tensor [t, 3, h, w]) -> uint8 [3, t, crop, crop] (the
    model's layout, contiguous), the same geometry for every frame of the clip. Frames are cropped
    before they are stacked.

    Evaluation: resize the short side to crop·8/7 (256 for 224) and take the centre crop.
    Training (a generator given): scale jitter (short side uniform in crop·[8/7, 10/7], i.e. 256–320
    for 224, as SlowFast trains), a random square crop, a horizontal flip with probability `hflip`
    (0 for data where left and right differ in meaning), rotation within ±15° (zeros
    outside the frame), brightness and contrast within ±20%. Crop, scale, flip and rotation are one
    bilinear `grid_sample` from the source frames, and the colour change one affine map on its
    float output: about 3x cheaper than applying the steps one by one.
    """
    C, h, w = frames[0].shape
    short = min(h, w)
    if generator is None:
        box = round(crop_size * short / round(crop_size * 8 / 7))
        top, left = (h - box) // 2, (w - box) // 2
        crop = torch.stack([f[:, top:top + box, left:left + box] for f in frames], dim=1)  # [3, t, box, box]
        return TF.resize(crop, [crop_size, crop_size], antialias=True)
    box = round(crop_size * short / _uniform(generator, crop_size * 8 / 7, crop_size * 10 / 7))
    top = int(torch.randint(h - box + 1, (1,), generator=generator))
    left = int(torch.randint(w - box + 1, (1,), generator=generator))
    flip = float(torch.rand((), generator=generator)) < hflip
    angle = _uniform(generator, -15, 15)
    brightness, contrast = _uniform(generator, 0.8, 1.2), _uniform(generator, 0.8, 1.2)
    return augment_video(frames, crop_size, top, left, box, flip, angle, brightness, contrast)


def augment_video(frames, crop_size, top, left, box, flip, degrees, brightness, contrast):
    """The training transform with its parameters given: t x uint8 [3, h, w] -> uint8 [3, t, crop, crop]."""
    t, C = len(frames), frames[0].shape[0]
    # affine_grid maps output coordinates (u, v) in [-1, 1]² to input coordinates in the box:
    # on the image: mirror when flipping, then rotate by `degrees` (counter-clockwise, as torchvision).
    cos, sin, mirror = math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), -1.0 if flip else 1.0
    theta = torch.tensor([[[cos * mirror, -sin * mirror, 0.0], [sin, cos, 0.0]]])        # [1, 2, 3]
    grid = F.affine_grid(theta, [1, 1, crop_size, crop_size], align_corners=False)       # [1, crop, crop, 2]
    crop = torch.stack([f[:, top:top + box, left:left + box] for f in frames], dim=1)     # [3, t, box, box]
    # Frames as channels, channels-last: grid_sample then computes each output location's source
    # position and weights once and reads the 3*t values beside each other (about 3x faster).
    crop = crop.view(1, C * t, box, box).to(torch.float32, memory_format=torch.channels_last)
    out = F.grid_sample(crop, grid, mode="bilinear", align_corners=False)                # [1, 3*t, crop, crop]
    out = out.reshape(C, t, crop_size, crop_size)
    # brightness b, then contrast c around the frame's mean: c·(b·x) + (1 − c)·b·mean;
    # + 0.5 then truncation is rounding. In-place ops: one pass each over the clip.
    mean = out.view(C, t, -1).mean((0, 2)).view(1, t, 1, 1)                              # [1, t, 1, 1]
    out = out.mul_(brightness * contrast).add_(mean.mul_((1 - contrast) * brightness).add_(0.5))
    return out.clamp_(0, 255).to(torch.uint8)


def spec_augment(logmel, generator, freq_masks=2, freq_width=8, time_masks=2, time_fraction=0.1):
    """SpecAugment (Park et al., 2019) on [n_mels, A]: masked bands are set to the clip's mean."""
    n_mels, length = logmel.shape
    logmel, fill = logmel.clone(), logmel.mean()
    for _ in range(freq_masks):
        width = int(torch.randint(freq_width + 1, (1,), generator=generator))
        start = int(torch.randint(max(n_mels - width, 0) + 1, (1,), generator=generator))
        logmel[start:start + width] = fill
    for _ in range(time_masks):
        width = int(torch.randint(int(time_fraction * length) + 1, (1,), generator=generator))
        start = int(torch.randint(max(length - width, 0) + 1, (1,), generator=generator))
        logmel[:, start:start + width] = fill
    return logmel


class MELDDataset(Dataset):
    """One split of MELD (or synth) as samples for `collate`.

    root: a cache written by `prepare`, or for modalities=("text",) any folder with the CSVs.
    split=None: no rows, only the clip loaders (load_video, load_audio, tokenize) with these settings,
    for clips prepared elsewhere (evaluate.py predict).
    Items are keyed by (epoch, index, draw) when training: the augmentation of sample i in epoch e
    comes from a generator seeded with (seed, e, i), the same whichever worker loads it, so a
    resumed run sees the same augmentations as an uninterrupted one; the k-th repeat of a sample in
    one epoch (draw k > 0: the balanced sampler draws with replacement) is seeded with
    (seed, e, i, k), so repeats are augmented differently. Plain integer keys mean epoch 0, draw 0.

    dataset "csv": classes = the class list (default: the sorted labels of root's train split;
    evaluate.py passes the checkpoint's, so indices mean what they meant in training).

    Clips are excluded, and counted in self.excluded by reason, when their extraction failed or when
    they lack a selected modality (for example the video-only clip with no audio stream is used when
    audio is not selected, and excluded when it is; a row whose utterance is empty or whitespace is
    excluded as "no text" when text is selected). Nothing is ever replaced by a blank.
    """

    def __init__(self, root, split, modalities=("video", "audio", "text"), tokenizer=None, train=False,
                 num_frames=32, crop_size=224, frame_sampling="fixed", n_mels=64, max_audio_seconds=10.0,
                 max_text_tokens=128, context=0, seed=0, audio_input="logmel", dataset="meld", hflip=0.5,
                 classes=None):
        self.root, self.split, self.modalities, self.train = Path(root), split, tuple(modalities), train
        unknown = set(self.modalities) - {"video", "audio", "text"}
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of video, audio, text; got {modalities}")
        self.num_frames, self.crop_size, self.frame_sampling, self.hflip = num_frames, crop_size, frame_sampling, hflip
        self.view, self.num_views = 0, 1  # evaluation window (evaluate.py --views sets them)
        if audio_input not in ("logmel", "waveform"):
            raise ValueError(f"audio_input must be logmel or waveform, got {audio_input!r}")
        self.audio_input = audio_input
        self.max_audio_frames = max(1, int(max_audio_seconds * AUDIO_RATE / MEL_HOP))
        self.max_audio_samples = max(1, int(max_audio_seconds * AUDIO_RATE))
        self.seed = seed
        self.tokenizer, self.max_text_tokens = tokenizer, max_text_tokens
        rows = []
        if dataset == "csv":  # one task: the manifest's labels, classes from the train split (or given)
            self.tasks = [("label", tuple(classes) if classes is not None
                           else tuple(csv_classes(self.root)) if split is not None else ())]
            if split is not None:
                if not (self.root / f"{split}_clips.csv").is_file():
                    raise FileNotFoundError(f"{self.root / f'{split}_clips.csv'}: no {split} split here "
                                            "(python data.py prepare --csv MANIFEST --out CACHE writes it)")
                rows = read_clips_csv(self.root, split, self.tasks[0][1])
        elif dataset == "meld":
            self.tasks = [("emotion", EMOTIONS), ("sentiment", SENTIMENTS)]
            if split is not None:
                csv_path = find_csv(self.root, split)
                if csv_path is None:
                    raise FileNotFoundError(f"{self.root / f'{split}_sent_emo.csv'}: no {split} split here")
                rows = read_meld_csv(csv_path, split)
        else:
            raise ValueError(f"unknown dataset {dataset!r} (expected 'meld' or 'csv')")

        self.excluded = collections.Counter()
        self.entries = {}
        if {"video", "audio"} & set(self.modalities) and split is not None:
            manifest = read_manifest(self.root)
            if not manifest:
                source = (f"--meld-root {self.root} --out data/meld-cache` and pass --data data/meld-cache"
                          if (self.root / VIDEO_DIRS[split]).is_dir() else "--meld-root MELD_RAW (or --csv "
                          f"MANIFEST) --out {self.root}` first")
                raise FileNotFoundError(f"{self.root}: not a prepared cache (no manifest.jsonl) and the model "
                                        f"reads {'+'.join(self.modalities)}: run `python data.py prepare {source}, "
                                        "or use --modalities text, which reads the CSVs alone")
            missing = [r.id for r in rows if r.id not in manifest]
            if missing:
                raise ValueError(f"{self.root / 'manifest.jsonl'}: {len(missing)} of {len(rows)} {split} clips "
                                 f"(e.g. {missing[0]}) were never prepared; re-run prepare to finish it")
            kept = []
            for r in rows:
                entry = manifest[r.id]
                if entry["status"] != "ok":
                    self.excluded[entry["reason"].split(":")[0]] += 1
                elif "video" in self.modalities and entry["frames"] == 0:
                    self.excluded["no video"] += 1
                elif "audio" in self.modalities and entry["audio_samples"] == 0:
                    self.excluded["no audio"] += 1
                else:
                    kept.append(r)
                    self.entries[r.id] = entry
            all_rows, rows = rows, kept
        else:
            all_rows = rows
        if "text" in self.modalities:  # an empty transcript would train on [CLS] [SEP] alone
            kept = [r for r in rows if r.text.strip()]
            if len(kept) < len(rows):
                self.excluded["no text"] += len(rows) - len(kept)
            rows = kept
        self.rows = rows

        if "text" in self.modalities:
            if tokenizer is None:
                raise ValueError("the text modality needs a tokenizer (model.load_tokenizer)")
            self.pad_token_id = tokenizer.pad_token_id
            history = collections.defaultdict(dict)  # context comes from the CSV, whatever the clips
            for r in all_rows:
                if r.text.strip():
                    history[r.dialogue][r.index] = f"{r.speaker}: {r.text}"
            self.tokens = [self.tokenize(r.text, [history[r.dialogue][i] for i in range(r.index - context, r.index)
                                                  if i in history[r.dialogue]])
                           for r in rows]
        if "audio" in self.modalities:
            self.melspec = torchaudio.transforms.MelSpectrogram(
                sample_rate=AUDIO_RATE, n_fft=MEL_WINDOW, hop_length=MEL_HOP, n_mels=n_mels)

    def tokenize(self, text, previous=()):
        """Token ids of an utterance; `previous` utterances ("Speaker: text", oldest first) form a
        first segment, dropping the oldest whole utterances that do not fit in max_text_tokens."""
        tokenizer, max_tokens, previous = self.tokenizer, self.max_text_tokens, list(previous)
        if previous:  # the utterance is counted only when there is context to fit around it
            budget = max_tokens - len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 3
            while previous and len(tokenizer(" ".join(previous), add_special_tokens=False)["input_ids"]) > budget:
                previous.pop(0)
        if previous:
            enc = tokenizer(" ".join(previous), text, truncation="only_second", max_length=max_tokens)
        else:
            enc = tokenizer(text, truncation=True, max_length=max_tokens)
        return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}

    def summary(self):
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.excluded.items(), key=lambda x: (-x[1], x[0])))
        return (f"{self.split}: {len(self.rows)} clips ({'+'.join(self.modalities)})"
                + (f", {sum(self.excluded.values())} excluded: {reasons}" if self.excluded else ""))

    def __len__(self):
        return len(self.rows)

    def labels(self):
        """Class indices of the first (primary) task, row by row."""
        return [getattr(r, self.tasks[0][0]) for r in self.rows]

    def __getitem__(self, key):
        epoch, index, draw = (*key, 0)[:3] if isinstance(key, tuple) else (0, key, 0)
        row = self.rows[index]
        generator = None
        if self.train:  # augmentation keyed by (seed, epoch, index[, draw]), not by worker
            entropy = [self.seed, epoch, index] + ([draw] if draw else [])
            state = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
            generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        sample = dict(id=row.id, **{task: getattr(row, task) for task, _ in self.tasks})
        if "video" in self.modalities:
            sample["video"] = self.load_video(self.root / row.id, self.entries[row.id]["frames"], generator)
        if "audio" in self.modalities:
            sample["audio"] = self.load_audio(self.root / row.id, generator)
        if "text" in self.modalities:
            sample.update(self.tokens[index])
        return sample

    def load_video(self, folder, available, generator=None):
        """Frames of one prepared clip folder -> uint8 [3, t, crop, crop], t <= num_frames.
        Evaluation takes window self.view of self.num_views (multi-view testing; 1 = the centre)."""
        picks = sample_frame_indices(available, self.num_frames, self.frame_sampling, generator,
                                     self.view, self.num_views)
        try:
            jpegs = [torch.frombuffer(bytearray((Path(folder) / f"{k:06d}.jpg").read_bytes()), dtype=torch.uint8)
                     for k in picks]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e.filename}: frame listed in manifest.jsonl is gone; "
                                    "the cache is damaged, re-run prepare into a new folder") from None
        frames = decode_jpeg(jpegs)                                  # t x [3, h, w] uint8
        return transform_video(frames, self.crop_size, generator, self.hflip)    # [3, t, crop, crop]

    def load_audio(self, folder, generator=None):
        """audio.npy of one prepared clip folder -> log-mel [n_mels, A], A = 1 + samples // 160
        up to max_audio_frames (a random window in training, the centre in evaluation; a clip of
        at most 200 samples, 12.5 ms, too short for the STFT's reflect padding, is zero-padded
        past its end instead), SpecAugment in training; or with
        audio_input="waveform" the samples in [-1, 1] as [1, S], S <= max_audio_samples, windowed
        the same way, without SpecAugment (speech models mask their own features in training).
        Evaluation takes the window of view self.view of self.num_views, as load_video does."""
        wave = np.load(Path(folder) / "audio.npy", mmap_mode="r")
        if self.audio_input == "waveform":
            extra = max(len(wave) - self.max_audio_samples, 0)
            start = window_start(extra, generator, self.view, self.num_views)
            wave = wave[start:start + self.max_audio_samples]
            return torch.from_numpy(np.asarray(wave, dtype=np.float32) / 32768.0)[None]      # [1, S]
        wave = torch.from_numpy(np.asarray(wave, dtype=np.float32) / 32768.0)
        frames = 1 + len(wave) // MEL_HOP                            # what a centred STFT gives
        if len(wave) <= MEL_WINDOW // 2:    # too short for the STFT's reflect padding: zeros after it
            wave = F.pad(wave, (0, MEL_WINDOW // 2 + 1 - len(wave)))
        logmel = torch.log(self.melspec(wave)[:, :frames] + 1e-6)     # [n_mels, A]
        if logmel.shape[1] > self.max_audio_frames:
            extra = logmel.shape[1] - self.max_audio_frames
            start = window_start(extra, generator, self.view, self.num_views)
            logmel = logmel[:, start:start + self.max_audio_frames]
        return spec_augment(logmel, generator) if generator is not None else logmel


def dataset_from_args(args, root, split, tokenizer, train=False, classes=None):
    """MELDDataset with the data settings of train.py's flags, given as a dict: vars(args) of a
    run, or the args stored in its checkpoint (evaluate.py, which passes the checkpoint's classes
    of a csv dataset)."""
    return MELDDataset(root, split, args["modalities"], tokenizer, train=train, num_frames=args["num_frames"],
                       crop_size=args["crop_size"], frame_sampling=args["frame_sampling"], n_mels=args["n_mels"],
                       max_audio_seconds=args["max_audio_seconds"], max_text_tokens=args["max_text_tokens"],
                       context=args["context"], seed=args["seed"],
                       audio_input="waveform" if args.get("audio_encoder", "cnn").startswith("hf:") else "logmel",
                       dataset=args.get("dataset", "meld"), hflip=args["hflip"], classes=classes)


def to_device(batch, device):
    """Tensors of a batch to the device (non-blocking from pinned memory); ids stay a list."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def pad_time(items, length):
    """Tensors [C, t_i, ...] -> zero-padded [B, C, length, ...] and mask bool [B, length] (True = real)."""
    C, _, *rest = items[0].shape
    padded = torch.zeros(len(items), C, length, *rest, dtype=items[0].dtype)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, x in enumerate(items):
        padded[i, :, : x.shape[1]] = x
        mask[i, : x.shape[1]] = True
    return padded, mask


def collate(samples, num_frames=None, pad_token_id=0, tasks=("emotion", "sentiment")):
    """List of samples -> the batch dict of the module docstring (one long [B] per task name).
    Video is padded to num_frames."""
    batch = dict(ids=[s["id"] for s in samples], **{t: torch.tensor([s[t] for s in samples]) for t in tasks})
    B = len(samples)
    if "video" in samples[0]:  # [3, t, H, W] each -> [B, 3, T, H, W]
        T = num_frames or max(s["video"].shape[1] for s in samples)
        batch["video"], batch["video_mask"] = pad_time([s["video"] for s in samples], T)
    if "audio" in samples[0]:  # [n_mels, a] (or [1, s]) each -> [B, n_mels, A] (or [B, 1, S])
        A = max(s["audio"].shape[1] for s in samples)
        batch["audio"], batch["audio_mask"] = pad_time([s["audio"] for s in samples], A)
    if "input_ids" in samples[0]:
        L = max(len(s["input_ids"]) for s in samples)
        batch["input_ids"] = torch.full((B, L), pad_token_id, dtype=torch.long)
        batch["attention_mask"] = torch.zeros(B, L, dtype=torch.long)
        if "token_type_ids" in samples[0]:
            batch["token_type_ids"] = torch.zeros(B, L, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(s["input_ids"])
            batch["attention_mask"][i, :n] = 1
            if "token_type_ids" in s:
                batch["token_type_ids"][i, :n] = torch.tensor(s["token_type_ids"])
    return batch


class ClipSampler(Sampler):
    """Order of samples for one epoch, yielding (epoch, index, draw) keys, draw = how often the
    index came earlier in this epoch's order (0 unless balanced); the one sampler for every case.

    shuffle: a permutation from a generator of its own seeded with (seed, epoch), so the order of an
    epoch can be rebuilt on resume; balanced: draws with replacement, probability ∝ 1 / class count
    (what `WeightedRandomSampler` does); distributed (num_replicas > 1): rank r takes every
    num_replicas-th sample, as `DistributedSampler` does. Training pads the order to a multiple of
    num_replicas so every rank takes the same number of steps; evaluation (pad=False) does not, so
    every sample is seen exactly once across ranks. set_epoch(epoch, skip) starts after `skip`
    samples of this rank (the batches already consumed before an interruption).
    """

    def __init__(self, labels, shuffle, balanced=False, num_replicas=1, rank=0, seed=0, pad=True):
        self.labels, self.shuffle, self.balanced = torch.as_tensor(labels), shuffle, balanced
        self.num_replicas, self.rank, self.seed, self.pad = num_replicas, rank, seed, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _order(self):
        n = len(self.labels)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balanced:
            weights = 1.0 / torch.bincount(self.labels).float()[self.labels]
            order = torch.multinomial(weights, n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.pad and n % self.num_replicas:
            order = torch.cat([order, order[: self.num_replicas - n % self.num_replicas]])
        seen, keys = collections.Counter(), []   # (index, draw) over every rank's samples
        for i in order.tolist():
            keys.append((i, seen[i]))
            seen[i] += 1
        return keys[self.rank::self.num_replicas]

    def __len__(self):
        n = len(self.labels)
        per_rank = math.ceil(n / self.num_replicas) if self.pad else len(range(self.rank, n, self.num_replicas))
        return per_rank - self.skip

    def __iter__(self):
        return iter([(self.epoch, i, draw) for i, draw in self._order()[self.skip:]])


def reuse_freed_memory(_worker_id=None):
    """DataLoader worker_init_fn: let glibc's malloc keep and reuse freed memory (blocks up to its
    32 MiB maximum from the heap, no trimming below 1 GiB). A clip allocates several 5–20 MB buffers;
    by default each is a fresh mapping whose first-touch page faults took about a third of a
    worker's time (bench.py loader: 15 -> 19 clips/s). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def make_loader(dataset, batch_size, train, workers=2, sampler="random", seed=0, num_replicas=1, rank=0,
                pin_memory=None):
    """DataLoader over a MELDDataset: ClipSampler (random or balanced, sharded when distributed),
    drop_last in training (BatchNorm in the heads cannot take a batch of one, and equal micro-batches
    keep gradient accumulation exact), persistent workers that reuse freed memory, pinned memory
    when CUDA is available."""
    if sampler not in ("random", "balanced"):
        raise ValueError(f"unknown sampler {sampler!r} (expected 'random' or 'balanced')")
    order = ClipSampler(dataset.labels(), shuffle=train, balanced=train and sampler == "balanced",
                        num_replicas=num_replicas, rank=rank, seed=seed, pad=train)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order, drop_last=train, num_workers=workers,
        collate_fn=functools.partial(collate, num_frames=dataset.num_frames if "video" in dataset.modalities else None,
                                     pad_token_id=getattr(dataset, "pad_token_id", 0),
                                     tasks=[task for task, _ in dataset.tasks]),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=reuse_freed_memory,
        generator=torch.Generator().manual_seed(seed))  # worker seeds from here, not the global RNG


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and the default of every flag that has one."""

    def _get_help_string(self, action):
        shown = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown += " (default: '')" if action.default == "" else " (default: %(default)s)"
        return shown


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, and a usage mistake (unknown flag or choice, bad value) as one
    line on stderr, exit code 2, instead of the usage text and the error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind):
    """An argparse type: kind(text) (int or float) that must be > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__           # argparse names the type in "invalid int value"
    return parse


@contextlib.contextmanager
def one_line_errors():
    """For a command line's set-up: a ValueError, OSError or ImportError (a value, file, folder or
    package the user gave or lacks; its message names it) ends the program with that message as
    one line on stderr and exit code 1, not a traceback. Errors of any other type keep theirs."""
    try:
        yield
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("synth", help="write MELD-format synthetic clips (MELD.Raw layout)")
    s.add_argument("--out", required=True, help="folder to write (MELD.Raw layout)")
    s.add_argument("--seed", type=int, default=0, help="everything written follows from this seed")
    s.add_argument("--sizes", default="96,24,24", help="utterances in train,dev,test")
    s.add_argument("--width", type=int, default=160, help="frame width in pixels (MELD: 1280)")
    s.add_argument("--height", type=int, default=90, help="frame height in pixels (MELD: 720)")
    s.add_argument("--fps", type=float, default=24, help="frame rate of the mp4 files (MELD: ~23.976)")
    s.add_argument("--min-seconds", type=float, default=0.5, help="shortest clip")
    s.add_argument("--max-seconds", type=float, default=6.0, help="longest clip")
    s.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel processes")
    p = commands.add_parser("prepare", help="decode every clip once into a cache folder (resumable)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--meld-root", help="MELD.Raw folder (or synth output)")
    source.add_argument("--csv", help="manifest CSV: path, label[, text, split, group] (videos, audio files, images)")
    p.add_argument("--out", required=True, help="cache folder to write; re-run the same command to continue")
    p.add_argument("--splits", default="train,dev,test", help="MELD: comma-separated splits to prepare")
    p.add_argument("--split-ratio", default="0.8,0.1,0.1", help="--csv rows without a split: train,dev,test shares")
    p.add_argument("--seed", type=int, default=0, help="--csv: seed of the stratified split")
    p.add_argument("--fps", type=positive(float), default=PrepareSettings.fps, help="frames kept per second")
    p.add_argument("--short-side", type=positive(int), default=PrepareSettings.short_side, help="frame short side, pixels")
    p.add_argument("--max-seconds", type=positive(float), default=PrepareSettings.max_seconds,
                   help="seconds kept per clip; longer clips are cut and marked truncated in the manifest")
    p.add_argument("--jpeg-quality", type=positive(int), default=PrepareSettings.jpeg_quality, help="JPEG quality 1-100")
    p.add_argument("--workers", type=positive(int), default=max(1, (os.cpu_count() or 1)), help="parallel processes")
    args = parser.parse_args(argv)
    with one_line_errors():  # a bad CSV: one line that names the file and row
        run_command(args)


def run_command(args):
    if args.command == "synth":
        sizes = tuple(int(x) for x in args.sizes.split(","))
        counts = synth(args.out, sizes, args.seed, args.width, args.height, args.fps, args.min_seconds,
                       args.max_seconds, args.workers)
        print(f"wrote {args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))
    else:
        settings = PrepareSettings(args.fps, args.short_side, args.max_seconds, args.jpeg_quality)
        if args.csv:
            ratio = tuple(float(x) for x in args.split_ratio.split(","))
            prepare_csv(args.csv, args.out, settings, ratio, args.seed, args.workers)
        else:
            prepare(args.meld_root, args.out, args.splits.split(","), settings, args.workers)


if __name__ == "__main__":
    main()
