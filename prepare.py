"""Decode every clip once into a cache folder, and write MELD-format synthetic clips.

    python prepare.py --meld-root /path/to/MELD.Raw --out data/meld-cache --workers 8
    python prepare.py --csv my_clips.csv --out data/my-cache     # any labelled videos, audio files, images
    python prepare.py synth --out data/synth                      # small MELD-format set, no network
    python prepare.py --meld-root data/synth --out data/synth-cache

A cache holds, per clip, `{split}/{clip}/000000.jpg …` (frames at a fixed rate and short side, as a
player shows them) and `audio.npy` (16 kHz mono int16), a copy of each split's CSV, `prepare.json`
(the settings) and `manifest.jsonl`, one line per clip with its status and what was done to it. It
can be killed at any moment and re-run with the same command: finished clips are kept, half-written
ones are redone, failed and changed ones retried, and with --verify damaged ones (files cut short)
redone. Several runs may fill one cache at once (one per split): the manifest is shared under a
lock. A full disk stops it in one line. Decoding is PyAV's (FFmpeg bundled). data.py reads the
cache; evaluate.py predict decodes new clips with `extract_clip`, as here.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import PIL.Image
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, read_file
from tqdm import tqdm

import cli
import loading
import meld

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
SYNTH_PITCH = {e: 250.0 * 1.4 ** i for i, e in enumerate(meld.EMOTIONS)}  # Hz, 250 … 1,882
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


def synth_rows(size, rng, min_seconds=0.5, max_seconds=6.0, quantiles=None):
    """The annotations of `size` synthetic utterances, grouped in dialogues of 1–6, with the trace each
    modality carries: the true emotion with probability SYNTH_INFORMATIVE[m], else a random one.
    Durations uniform in [min_seconds, max_seconds], or drawn from quantiles (seconds at equally
    spaced probabilities 0..1, such as meld.MELD_TRAIN_SECONDS) by interpolation."""
    rows, dialogue, clock = [], 0, 60.0
    while len(rows) < size:
        season, episode = rng.integers(1, 11), rng.integers(1, 25)
        for index in range(min(int(rng.integers(1, 7)), size - len(rows))):
            emotion = meld.EMOTIONS[rng.choice(len(meld.EMOTIONS), p=SYNTH_PRIOR)]
            traces = {m: emotion if rng.random() < p else meld.EMOTIONS[rng.integers(len(meld.EMOTIONS))]
                      for m, p in SYNTH_INFORMATIVE.items()}
            seconds = (float(np.interp(rng.uniform(), np.linspace(0, 1, len(quantiles)), quantiles))
                       if quantiles else float(rng.uniform(min_seconds, max_seconds)))
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
          workers=1, quantiles=None):
    """Write a MELD.Raw-shaped folder of synthetic clips to `out`; returns the number of rows per split.
    Durations as synth_rows draws them (quantiles: from a table of seconds, e.g. MELD train's).

    Defects on purpose, as in the real MELD.Raw: in train a truncated mp4 (moov atom lost) and a clip
    with no audio stream; in dev a CSV row whose mp4 is missing; in test a stray unlabelled mp4.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts, tasks = {}, []
    for split, size in zip(meld.SPLITS, sizes):
        folder = out / meld.VIDEO_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        rows = synth_rows(size, rng, min_seconds, max_seconds, quantiles)
        with open(out / f"{split}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)  # minimal quoting and \r\n line ends, as in MELD's files
            writer.writerow(meld.MELD_COLUMNS)
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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXIF_ORIENTATION = 0x0112   # the EXIF tag: 1 upright … 8, mirrored and/or turned (TIFF 6.0 / Exif 2.3)


@dataclass(frozen=True)
class PrepareSettings:
    fps: float = 10.0            # frames kept per second of clip
    short_side: int = 256        # pixels: frames are shrunk so that min(H, W) is this (never enlarged)
    max_seconds: float = 15.0    # seconds kept per clip (MELD has a few clips of several minutes)
    jpeg_quality: int = 90


def extract_clip(src, dst, settings, threads=0):
    """Decode src (mp4) into the folder dst: 000000.jpg … at settings.fps and short side, audio.npy
    (int16, 16 kHz mono). Memory stays bounded: frames are resized and written as they are decoded,
    and decoding stops at settings.max_seconds. threads: decoder threads (0 = one per core).

    Frame k is what a player shows at k / fps: the last source frame that started by then (its
    timestamp, so variable-frame-rate video and freezes are followed; the last frame shows for one
    average frame). Time 0 is the first video frame; audio is laid on that timeline: an audio
    stream that starts later is preceded by silence, one that starts earlier is cut (the manifest's
    `audio_offset`, seconds). Frames are stored as displayed: non-square pixels are stretched to the
    display aspect ratio and the track's display matrix is applied (display_orientation), recorded as
    `rotation` (degrees, counter-clockwise), `mirrored` and `sample_aspect_ratio` ("num:den").
    Returns the manifest fields; raises ValueError (no stream, no frame, a rotation that is not a
    multiple of 90°), av.FFmpegError (undecodable data) or OSError (writing, e.g. a full disk)."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    if Path(src).suffix.lower() in IMAGE_SUFFIXES:
        return extract_image(src, dst, settings)
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
        sar = (vstream.codec_context.sample_aspect_ratio or vstream.sample_aspect_ratio or 1) if vstream else 1
        frames, audio = _Frames(dst, settings, float(vstream.average_rate or 25) if vstream else 25.0, sar), []
        resampler = av.AudioResampler(format="s16", layout="mono", rate=meld.AUDIO_RATE) if astream else None
        done, audio_start, audio_samples = set(), None, 0
        for packet in container.demux(streams):
            if packet.stream in done:
                continue
            for frame in packet.decode():
                if packet.stream is vstream and not frames.add(frame):
                    done.add(vstream)
                    break
                if packet.stream is astream:
                    audio_start = frame.time if audio_start is None else audio_start
                    for chunk in resampler.resample(frame):
                        audio.append(chunk.to_ndarray().reshape(-1))
                        audio_samples += len(audio[-1])
                    if audio_samples >= settings.max_seconds * meld.AUDIO_RATE:
                        done.add(astream)
                        break
            if len(done) == len(streams):
                break
        frames.finish()
        if resampler is not None and astream not in done:
            for chunk in resampler.resample(None):
                audio.append(chunk.to_ndarray().reshape(-1))
    audio = np.concatenate(audio) if audio else np.zeros(0, np.int16)
    offset = (audio_start or 0.0) - frames.t0 if frames.t0 is not None and len(audio) else 0.0
    shift = round(offset * meld.AUDIO_RATE)            # > 0: silence first; < 0: the early part cut
    audio = np.concatenate([np.zeros(shift, audio.dtype), audio]) if shift > 0 else audio[-shift:]
    audio = audio[: int(settings.max_seconds * meld.AUDIO_RATE)]
    if len(audio):
        np.save(dst / "audio.npy", audio.astype(np.int16))
    if vstream is not None and frames.written == 0:
        raise ValueError("video stream decoded to no frames")
    reasons = ["no video stream"] * (vstream is None) + ["no audio stream"] * (astream is None)
    if astream is not None and len(audio) == 0:
        reasons.append("audio stream decoded to no samples")
    truncated = source_seconds > settings.max_seconds + 0.5
    if truncated:
        reasons.append(f"too long: kept the first {settings.max_seconds:g} of {source_seconds:.1f} s")
    size, rotation = frames.size, frames.rotation
    width, height = (size[::-1] if rotation % 180 else size) if size else (0, 0)     # as stored
    return dict(status="ok", reason="; ".join(reasons), frames=frames.written, fps=settings.fps,
                source_fps=round(frames.source_fps, 3) if vstream else 0, width=width, height=height,
                rotation=rotation, mirrored=frames.mirrored,
                sample_aspect_ratio=f"{frames.sar.numerator}:{frames.sar.denominator}" if size else "1:1",
                seconds=round(max(frames.seconds, len(audio) / meld.AUDIO_RATE), 3),
                source_seconds=round(source_seconds, 3), truncated=truncated, audio_samples=int(len(audio)),
                audio_offset=round(offset, 3))


class _Frames:
    """The frames of one clip as decoded, written as 000000.jpg … at settings.fps: each decoded frame
    is held until the next one's timestamp says how long it is shown."""

    def __init__(self, dst, settings, source_fps, sar):
        self.dst, self.settings, self.source_fps, self.sar = dst, settings, source_fps, sar
        self.t0, self.held, self.written, self.seconds = None, None, 0, 0.0
        self.size, self.rotation, self.mirrored = None, 0, False

    def add(self, frame):
        """A decoded av.VideoFrame; False once settings.max_seconds is reached (nothing more is needed)."""
        self.t0 = frame.time if self.t0 is None and frame.time is not None else self.t0
        t = frame.time - self.t0 if frame.time is not None and self.t0 is not None else (
            self.held[1] + 1.0 / self.source_fps if self.held else 0.0)
        if self.held is not None:
            self.write(self.held[0], min(t, self.settings.max_seconds))
        self.held = (frame, t) if t < self.settings.max_seconds else None
        return self.held is not None

    def finish(self):
        """The last frame, shown for one average frame (or up to max_seconds)."""
        if self.held is not None:
            self.write(self.held[0], min(self.held[1] + 1.0 / self.source_fps, self.settings.max_seconds))
            self.held = None

    def write(self, frame, until):
        """frame as every target frame k not written yet with k / fps before `until` (seconds)."""
        ks = []
        while self.written / self.settings.fps < until - 1e-6:
            ks.append(self.written)
            self.written += 1
        if not ks:
            return
        if self.size is None:
            self.size = display_size(frame.width, frame.height, self.sar, self.settings.short_side)
            self.rotation, self.mirrored = display_orientation(frame)
        rgb = frame.reformat(width=self.size[0], height=self.size[1], format="rgb24", interpolation="AREA")
        image = torch.rot90(torch.from_numpy(rgb.to_ndarray()).permute(2, 0, 1), self.rotation // 90, dims=(1, 2))
        jpeg = encode_jpeg((image.flip(2) if self.mirrored else image).contiguous(),
                           quality=self.settings.jpeg_quality).numpy().tobytes()       # [3, h, w] uint8, upright
        for k in ks:
            (self.dst / f"{k:06d}.jpg").write_bytes(jpeg)
        self.seconds = until


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
        raise ValueError(f"not a readable image ({cli.first_line(e)})") from None
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
    """Worker: extract one clip into a temporary folder (named by the prepare process that owns it),
    then rename it into place (atomic). A full disk is raised, not recorded against the clip."""
    clip_id, src, out, settings, threads, error, owner = task
    entry = dict(id=clip_id, split=clip_id.split("/")[0], file=src and str(src))
    if error:
        return entry | dict(status="error", reason=error)
    entry["source"] = source_stamp(src)
    final = Path(out) / clip_id
    tmp = final.parent / f".tmp-{owner}-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = extract_clip(src, tmp, settings, threads)
    except Exception as e:  # whatever one file does, the other clips are still prepared
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in cli.DISK_FULL:
            raise
        message = cli.first_line(e, src)
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


def _worker_init():
    torch.set_num_threads(1)


def _start_cache(out, settings):
    """Create the cache folder and record the settings; continuing with other settings is an error."""
    out.mkdir(parents=True, exist_ok=True)
    settings = PrepareSettings(float(settings.fps), int(settings.short_side), float(settings.max_seconds),
                               int(settings.jpeg_quality))
    settings_path, wanted = out / "prepare.json", dict(settings.__dict__, audio_rate=meld.AUDIO_RATE)
    if settings_path.exists() and json.loads(settings_path.read_text()) != wanted:
        raise SystemExit(f"{out} was prepared with {settings_path.read_text().strip()}; asked for {wanted}. "
                         "Use the same settings to continue it, or another --out.")
    cli.write_atomic(settings_path, json.dumps(wanted) + "\n")
    return settings


def prepare_meld(meld_root, out, splits=meld.SPLITS, settings=PrepareSettings(), workers=1, progress=True,
                 verify=False):
    """Decode MELD.Raw (or synth output) at meld_root into the cache folder out. Resumable; verify:
    also redo the clips whose files are damaged (see damage).

    Returns {split: Counter(reason)} for the clips processed in this call and before."""
    meld_root, out = Path(meld_root), Path(out)
    if not meld_root.is_dir():
        raise FileNotFoundError(f"{meld_root}: no such folder; --meld-root is the unpacked MELD.Raw folder "
                                "(or the output of `prepare.py synth`)")
    if (meld_root / "prepare.json").exists():
        raise ValueError(f"{meld_root}: is a prepared cache already (it has prepare.json); --meld-root is the "
                         "unpacked MELD.Raw folder (or the output of `prepare.py synth`), and train.py --data "
                         "takes this cache as it is")
    if not any(meld.find_csv(meld_root, split) for split in splits):
        raise FileNotFoundError(f"{meld_root}: no {'/'.join(splits)}_sent_emo.csv here or in its split folders; "
                                "--meld-root is the unpacked MELD.Raw folder (or the output of `prepare.py synth`)")
    settings = _start_cache(out, settings)
    tasks = []
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0  # cores shared by the workers
    for split in splits:
        csv_path = meld.find_csv(meld_root, split)
        if csv_path is None:
            print(f"{split}: no {split}_sent_emo.csv under {meld_root}: skipped")
            continue
        rows = meld.read_meld_csv(csv_path, split)
        cli.write_atomic(out / f"{split}_sent_emo.csv", meld.read_text(csv_path))
        folder = meld_root / meld.VIDEO_DIRS[split]
        videos = {p.name.lower(): p for p in (folder.iterdir() if folder.is_dir() else [])
                  if p.suffix.lower() == ".mp4" and p.is_file()}                  # dia0_utt0.mp4 or .MP4
        for row in rows:
            name = row.id.split("/")[1]
            src = videos.pop(f"{name.lower()}.mp4", folder / f"{name}.mp4")
            tasks.append((row.id, src, out, settings, threads, None if src.is_file() else f"missing: {src} not found"))
        for stray in sorted(videos.values()):
            tasks.append((f"{split}/{stray.stem}", stray, out, settings, threads,
                          f"unlabelled: not in {csv_path.name}"))
    return _run_prepare(meld_root, out, tasks, workers, progress, verify)


def demo_cache(folder, workers=2):
    """The demo's data: synthetic MELD (synth's defaults) in folder/raw, decoded at 10 fps, short side 90,
    into folder/cache; both kept and reused when present. -> the cache folder."""
    raw, cache = Path(folder) / "raw", Path(folder) / "cache"
    if not (raw / "test_sent_emo.csv").exists():
        synth(raw, workers=workers)
    prepare_meld(raw, cache, settings=PrepareSettings(fps=10, short_side=90), workers=workers)
    return cache


def prepare_csv(csv_path, out, settings=PrepareSettings(), split_ratio=(0.8, 0.1, 0.1), seed=0, workers=1,
                progress=True, verify=False):
    """Decode every file a manifest CSV lists (videos, audio-only files, images) into the cache
    folder out, as `prepare` does for MELD, and write out/{split}_clips.csv (id, path, label, text,
    group). Rows without a split are split by label, seeded (assign_splits). Resumable."""
    out = Path(out)
    rows = assign_splits(meld.read_manifest_csv(csv_path), split_ratio, seed)
    train_labels = {r["label"] for r in rows if r["split"] == "train"}
    unknown = next((r for r in rows if r["label"] not in train_labels), None)
    if unknown:
        raise ValueError(f"{csv_path}: label {unknown['label']!r} ({unknown['path']}) is in the {unknown['split']} "
                         f"split but not in train, whose labels are {sorted(train_labels)} (labels are case-sensitive)")
    seen = {}
    for row in rows:
        row["id"] = csv_clip_id(row)
        if row["id"] in seen:
            raise ValueError(f"{csv_path}: {row['path']} is listed twice")
        seen[row["id"]] = row
    settings = _start_cache(out, settings)     # only once the manifest is known to be usable
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    tasks = [(row["id"], Path(row["path"]), out, settings, threads,
              None if Path(row["path"]).is_file() else f"missing: {row['path']} not found") for row in rows]
    for split in meld.SPLITS:
        lines = io.StringIO()
        writer = csv.DictWriter(lines, meld.CLIP_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if r["split"] == split)
        cli.write_atomic(out / f"{split}_clips.csv", lines.getvalue())
    return _run_prepare(csv_path, out, tasks, workers, progress, verify)


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
        for split, part in zip(meld.SPLITS, np.split(indices, np.cumsum(counts)[:-1])):
            for i in part:
                rows[i]["split"] = split
    return rows


def csv_clip_id(row):
    """"split/stem-hash": readable, unique per source path, stable across runs."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(row["path"]).stem)[:40]
    return f"{row['split']}/{stem}-{hashlib.sha1(row['path'].encode()).hexdigest()[:8]}"


def damage(cache, entry):
    """Why a clip the manifest has as prepared ("ok") cannot be read as written, or None: a frame
    file missing, or cut short (a JPEG ends with the EOI marker FF D9), or audio.npy unreadable or
    shorter than its audio_samples. Reads each file's header and last bytes only."""
    folder = Path(cache) / entry["id"]
    for k in range(entry["frames"]):
        path = folder / f"{k:06d}.jpg"
        try:
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) != loading.JPEG_END:
                    return f"{path.name} cut short"
        except OSError:
            return f"{path.name} missing or empty"
    if entry["audio_samples"]:
        try:
            samples = len(np.load(folder / "audio.npy", mmap_mode="r"))
        except (OSError, ValueError) as e:
            return f"audio.npy unreadable ({cli.first_line(e)})"
        if samples != entry["audio_samples"]:
            return f"audio.npy holds {samples} of {entry['audio_samples']} samples"
    return None


@contextlib.contextmanager
def manifest_lock(out):
    """An exclusive lock on out's manifest (flock; released if the process dies): prepare runs that
    share a cache (one per split, as job arrays start them) add their lines without losing any."""
    with open(Path(out) / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _owner_alive(name):
    """Whether the prepare process whose pid a temporary folder's name holds (.tmp-PID-clip) runs."""
    try:
        os.kill(int(name.split("-")[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _write(out, write):
    """Run write() (or re-raise an error): a full disk stops prepare in one line naming it."""
    try:
        if isinstance(write, BaseException):
            raise write
        write()
    except OSError as error:
        if error.errno not in cli.DISK_FULL:
            raise
        raise SystemExit(f"prepare {out}: {cli.disk_full(out)}; the clips done so far are kept: free some space "
                         "and run the same command again") from None


def _run_prepare(source, out, tasks, workers, progress, verify=False):
    """Extract the clips of `tasks` that out/manifest.jsonl does not hold as done: never tried,
    failed before (the file may have been fixed since), whose source file changed, or (verify)
    whose files are damaged. A line is appended per clip as it finishes (so a killed run resumes),
    under a lock shared with any other prepare of the same cache, and at the end the manifest is
    rewritten with one line per clip, the other runs' included. A full disk stops it in one line.
    Prints and returns {split: Counter(reason)}."""
    for split in {t[0].split("/")[0] for t in tasks}:
        (out / split).mkdir(exist_ok=True)
        for stale in (out / split).glob(".tmp-*"):
            if not _owner_alive(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    manifest = out / "manifest.jsonl"
    with manifest_lock(out):
        done = meld.read_manifest(out)
        _write(out, lambda: cli.write_atomic(manifest, "".join(json.dumps(e) + "\n" for e in done.values())))
    damaged = {i: d for i, e in done.items() if verify and e["status"] == "ok" and (d := damage(out, e))}
    for clip_id, why in damaged.items():
        print(f"{clip_id}: damaged ({why}): prepared again")
    todo = [(*t, os.getpid()) for t in tasks if t[0] in damaged or _needs_prepare(done.get(t[0]), t[1])]
    print(f"prepare {source} -> {out}: {len(tasks)} clips, {len(tasks) - len(todo)} already done, "
          f"{len(todo)} to do with {workers} worker(s)" + (f" ({len(damaged)} damaged)" if verify else ""))
    with contextlib.ExitStack() as stack:
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
                with manifest_lock(out), open(manifest, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                done[entry["id"]] = entry
            with manifest_lock(out):
                done = meld.read_manifest(out)     # this run's lines and any other run's
                cli.write_atomic(manifest, "".join(json.dumps(e) + "\n" for e in done.values()))
        except concurrent.futures.process.BrokenProcessPool:
            raise SystemExit(f"prepare {out}: a worker process died (out of memory?); the {len(done)} clips done so "
                             "far are kept: run the same command again, with fewer --workers") from None
        except KeyboardInterrupt:
            raise SystemExit(f"prepare {out}: interrupted; the clips done so far are kept: run the same command "
                             "again to go on") from None
        except OSError as error:
            _write(out, error)
    summary = collections.defaultdict(collections.Counter)
    mine = {t[0] for t in tasks}   # this run's clips (another run may be preparing other splits)
    for entry in (e for e in done.values() if e["id"] in mine):
        summary[entry["split"]][entry["status"] if not entry["reason"] else entry["reason"].split(":")[0]] += 1
    for split, counts in summary.items():
        print(f"  {split}: " + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()))
    return dict(summary)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synth"]:
        return synth_main(argv[1:])
    parser = cli.ArgumentParser(
        description=__doc__,
        epilog="other command:\n  python prepare.py synth --help     write MELD-format synthetic clips")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--meld-root", help="MELD.Raw folder (or the output of `prepare.py synth`)")
    source.add_argument("--csv", help="manifest CSV: path, label[, text, split, group] (videos, audio files, images)")
    parser.add_argument("--out", help="cache folder to write; re-run the same command to continue")
    parser.add_argument("--splits", default="train,dev,test", help="MELD: comma-separated splits to prepare")
    parser.add_argument("--split-ratio", type=split_ratio, default="0.8,0.1,0.1",
                        help="--csv rows without a split: train,dev,test shares, each >= 0, summing to 1")
    parser.add_argument("--seed", type=cli.non_negative(int), default=0, help="--csv: seed of the stratified split")
    parser.add_argument("--fps", type=cli.positive(float), default=PrepareSettings.fps, help="frames kept per second")
    parser.add_argument("--short-side", type=cli.positive(int), default=PrepareSettings.short_side,
                        help="frame short side, pixels")
    parser.add_argument("--max-seconds", type=cli.positive(float), default=PrepareSettings.max_seconds,
                        help="seconds kept per clip; longer clips are cut and marked truncated in the manifest")
    parser.add_argument("--jpeg-quality", type=cli.positive(int, high=100), default=PrepareSettings.jpeg_quality,
                        help="JPEG quality 1-100")
    parser.add_argument("--workers", type=cli.positive(int), default=max(1, (os.cpu_count() or 1)),
                        help="parallel processes")
    parser.add_argument("--verify", action="store_true",
                        help="also check the files of every prepared clip (frames cut short, audio.npy shorter than "
                             "recorded) and prepare the damaged ones again")
    args = parser.parse_args(argv)
    if args.verify and args.out and not (args.meld_root or args.csv):
        parser.error(f"--verify prepares damaged clips again from their sources: give the --meld-root (or --csv) "
                     f"that {args.out} was prepared from, with its settings")
    if not (args.meld_root or args.csv) or not args.out:
        parser.error("give --meld-root MELD_RAW --out CACHE, or --csv MANIFEST --out CACHE")
    unknown = set(args.splits.split(",")) - set(meld.SPLITS)
    if unknown:
        parser.error(f"--splits {args.splits}: unknown split(s) {', '.join(sorted(unknown))}; choose from "
                     f"{','.join(meld.SPLITS)}")
    settings = PrepareSettings(args.fps, args.short_side, args.max_seconds, args.jpeg_quality)
    with cli.one_line_errors():  # a bad CSV: one line that names the file and row
        if args.csv:
            return prepare_csv(args.csv, args.out, settings, args.split_ratio, args.seed, args.workers,
                               verify=args.verify)
        return prepare_meld(args.meld_root, args.out, args.splits.split(","), settings, args.workers,
                            verify=args.verify)


def split_ratio(text):
    """--split-ratio: "TRAIN,DEV,TEST" shares, each >= 0, summing to 1 -> a tuple of 3 floats."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r} is not three shares train,dev,test, each >= 0, summing to 1")
    return shares


def synth_main(argv):
    parser = cli.ArgumentParser(prog="prepare.py synth", description="Write MELD-format synthetic clips "
                                "(the MELD.Raw layout: mp4 folders and the three *_sent_emo.csv).")
    parser.add_argument("--out", required=True, help="folder to write (MELD.Raw layout)")
    parser.add_argument("--seed", type=int, default=0, help="everything written follows from this seed")
    parser.add_argument("--sizes", type=cli.int_list, default="96,24,24", help="utterances in train,dev,test")
    parser.add_argument("--width", type=cli.positive(int), default=160, help="frame width in pixels (MELD: 1280)")
    parser.add_argument("--height", type=cli.positive(int), default=90, help="frame height in pixels (MELD: 720)")
    parser.add_argument("--fps", type=cli.positive(float), default=24,
                        help="frame rate of the mp4 files (MELD: ~23.976)")
    parser.add_argument("--min-seconds", type=cli.positive(float), default=0.5, help="shortest clip")
    parser.add_argument("--max-seconds", type=cli.positive(float), default=6.0, help="longest clip")
    parser.add_argument("--workers", type=cli.positive(int), default=max(1, (os.cpu_count() or 1)),
                        help="parallel processes")
    args = parser.parse_args(argv)
    if len(args.sizes) != len(meld.SPLITS):
        parser.error(f"--sizes: give {len(meld.SPLITS)} numbers (train,dev,test), got {len(args.sizes)}")
    if args.min_seconds > args.max_seconds:
        parser.error(f"--min-seconds {args.min_seconds:g} is more than --max-seconds {args.max_seconds:g}")
    with cli.one_line_errors():
        counts = synth(args.out, tuple(args.sizes), args.seed, args.width, args.height, args.fps, args.min_seconds,
                       args.max_seconds, args.workers)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))
    return counts


if __name__ == "__main__":
    main()
