"""From a prepared cache to batches: frame sampling, augmentation, the dataset, collate, the loaders.

    config = data.DataConfig.for_model(model_config, num_frames=32, crop_size=224)   # what the model reads
    train = data.ClipDataset("data/meld-cache", "train", config, tokenizer, train=True)
    loader = data.make_loader(train, batch_size=16, train=True, workers=4)
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))

`ClipDataset` reads a cache written by `prepare.py` (or, for modalities=("text",), just the CSVs
of any MELD folder), and `collate` builds the batch every model in this repo takes:

    video        uint8 [B, 3, T, H, W]   real frames first, zero padding last
                 (decode="device": a loading.JpegVideo of the files until to_device decodes it)
    video_mask   bool  [B, T]            True = real frame
    audio        float [B, n_mels, A]    natural-log mel power, 100 frames per second
                 (audio_input="waveform": float [B, 1, S], 16 kHz samples in [-1, 1])
    audio_mask   bool  [B, A] (or [B, S])
    input_ids, attention_mask, token_type_ids   long [B, L]   padded to the longest in the batch
    emotion      long  [B]               index into meld.EMOTIONS
    sentiment    long  [B]               index into meld.SENTIMENTS
                 (dataset "csv": label long [B], index into the classes of the train split)
    ids          list[str]               e.g. "train/dia0_utt0"

A modality that is not selected is absent from the batch and is never read from disk. Training
draws are keyed by (seed, epoch, index): a resumed run loads exactly what an uninterrupted one would.
"""

import argparse
import collections
import copy
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import torchaudio
import torchvision.transforms.v2.functional as TF
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg

import cli
import loading
import meld
import slowfast

FRAME_SAMPLINGS = ("fixed", "uniform")   # sample_frame_indices
SAMPLERS = ("random", "balanced")       # make_loader
VIDEO_PADDINGS = ("longest", "fixed")   # collate
MEL_HOP = 160         # samples: 10 ms at 16 kHz, so A = 100 audio frames per second
MEL_WINDOW = 400      # samples: 25 ms


def context_sizes(text):
    """--context: "PAST" or "PAST,FUTURE" (utterances >= 0) -> [past, future]."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not PAST or PAST,FUTURE (numbers of utterances >= 0)")
    return sizes + [0] * (2 - len(sizes))


@dataclass
class DataConfig:
    """How a clip becomes tensors. Its settings are train.py's flags of the same names; modalities,
    n_mels and audio_input are what the model reads, from its ModelConfig (`for_model`). Stored in
    every checkpoint, so evaluate.py reads clips as the run did. ValueError for an unknown choice,
    and for audio without n_mels and audio_input."""
    modalities: tuple = cli.derived("ModelConfig.modalities")
    n_mels: int = cli.derived("ModelConfig.n_mels: log-mel bands")
    audio_input: str = cli.derived("ModelConfig.audio_input: logmel [n_mels, A] or waveform [1, S]")
    frame_multiple: int = cli.derived("the video backbone's temporal stride (SlowFast's alpha): video is "
                                      "padded to a multiple of it", default=1)
    dataset: str = cli.setting("meld", "meld: a MELD cache (emotion + sentiment); csv: a cache made by "
                               "`prepare.py --csv` (one task, the manifest's labels)", choices=meld.DATASETS)
    num_frames: int = cli.setting(32, "frames per clip at the cached rate (fast pathway; slow takes every 4th)",
                                  type=cli.positive(int))
    video_padding: str = cli.setting("longest", "longest: a batch's video padded to its longest clip (rounded up "
                                     "to a multiple of SlowFast's alpha); fixed: to --num-frames (static shapes)",
                                     choices=VIDEO_PADDINGS)
    crop_size: int = cli.setting(224, "square crop, pixels", type=cli.positive(int))
    frame_sampling: str = cli.setting("fixed", "fixed: consecutive frames at the cached rate; uniform: spread over "
                                      "the utterance", choices=FRAME_SAMPLINGS)
    hflip: float = cli.setting(0.5, "probability of a horizontal flip in training (0 = never: where left and "
                               "right differ)", type=cli.probability)
    max_audio_seconds: float = cli.setting(10.0, "audio kept per clip, seconds", type=cli.positive(float))
    max_text_tokens: int = cli.setting(128, "tokens per utterance, context included", type=cli.positive(int))
    context: tuple = cli.setting((0, 0), "PAST[,FUTURE]: utterances of the dialogue before and after the target "
                                 "given as text context (future context needs the rest of the conversation: "
                                 "offline only)", type=context_sizes)
    speakers: bool = cli.setting(True, "with --context, write each utterance as 'Speaker: text' (--no-speakers: "
                                 "the text alone)")

    def __post_init__(self):
        if self.modalities is None:
            raise ValueError("DataConfig needs the model's modalities: DataConfig.for_model(model_config, ...)")
        self.modalities = list(meld.check_modalities(self.modalities))  # a list, as a JSON round trip gives
        if "audio" in self.modalities and (self.audio_input, self.n_mels) in ((None, None), ("logmel", None)):
            raise ValueError("DataConfig with audio needs the model's n_mels and audio_input: "
                             "DataConfig.for_model(model_config, ...)")
        if self.audio_input not in ("logmel", "waveform", None):
            raise ValueError(f"audio_input must be logmel or waveform, got {self.audio_input!r}")
        cli.check_choices(self)
        past, future = (self.context, 0) if isinstance(self.context, int) else self.context   # an int: past only
        if past < 0 or future < 0:
            raise ValueError(f"context must be two numbers of utterances >= 0 (past, future), got {self.context}")
        self.context = [int(past), int(future)]

    @classmethod
    def for_model(cls, model_config, **settings):
        """The data a model reads: modalities, n_mels, audio_input and frame_multiple from its ModelConfig."""
        return cls(modalities=model_config.modalities, n_mels=model_config.n_mels,
                   audio_input=model_config.audio_input,
                   frame_multiple=slowfast.ALPHA if model_config.video_arch == "slowfast" else 1, **settings)


# --- Sampling and augmentation ----------------------------------------------------------------------------------------

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


def draw_augmentation(h, w, crop_size, generator, hflip=0.5):
    """The training transform's parameters for frames of h x w pixels, drawn from `generator`:
    scale jitter (short side uniform in crop·[8/7, 10/7], i.e. 256–320 for 224, as SlowFast
    trains), a random square crop, a horizontal flip with probability `hflip` (0 for data where
    left and right differ in meaning), rotation within ±15°, brightness and contrast within ±20%.
    -> (top, left, box, flip, degrees, brightness, contrast): augment_video's arguments after crop_size."""
    box = round(crop_size * min(h, w) / _uniform(generator, crop_size * 8 / 7, crop_size * 10 / 7))
    top = int(torch.randint(h - box + 1, (1,), generator=generator))
    left = int(torch.randint(w - box + 1, (1,), generator=generator))
    flip = float(torch.rand((), generator=generator)) < hflip
    degrees = _uniform(generator, -15, 15)
    brightness, contrast = _uniform(generator, 0.8, 1.2), _uniform(generator, 0.8, 1.2)
    return top, left, box, flip, degrees, brightness, contrast


def transform_frames(frames, crop_size, params=None):
    """t frames uint8 [3, h, w] (a list, or a tensor [t, 3, h, w]) -> uint8 [3, t, crop, crop] (the
    model's layout, contiguous), the same geometry for every frame of the clip, computed where the
    frames are (CPU or CUDA). Frames are cropped before they are stacked.

    params None (evaluation): resize the short side to crop·8/7 (256 for 224) and take the centre
    crop. Training: draw_augmentation's tuple, applied by augment_video: crop, scale, flip and
    rotation (zeros outside the frame) are one bilinear `grid_sample` from the source frames, and
    the colour change one affine map on its float output. Not a chain of torchvision.transforms.v2:
    that resamples the clip once per step (several times slower in the loader) and draws from the
    global RNG, not from the generator keyed by (seed, epoch, index).
    """
    if params is not None:
        return augment_video(frames, crop_size, *params)
    _, h, w = frames[0].shape
    box = round(crop_size * min(h, w) / round(crop_size * 8 / 7))
    top, left = (h - box) // 2, (w - box) // 2
    crop = torch.stack([f[:, top:top + box, left:left + box] for f in frames], dim=1)  # [3, t, box, box]
    return TF.resize(crop, [crop_size, crop_size], antialias=True)


def augment_video(frames, crop_size, top, left, box, flip, degrees, brightness, contrast):
    """The training transform with its parameters given: t x uint8 [3, h, w] -> uint8 [3, t, crop, crop]."""
    t, C = len(frames), frames[0].shape[0]
    # affine_grid maps output coordinates (u, v) in [-1, 1]² to input coordinates in the box:
    # on the image: mirror when flipping, then rotate by `degrees` (counter-clockwise, as torchvision).
    cos, sin, mirror = math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), -1.0 if flip else 1.0
    theta = torch.tensor([[[cos * mirror, -sin * mirror, 0.0], [sin, cos, 0.0]]], device=frames[0].device)
    grid = F.affine_grid(theta, [1, 1, crop_size, crop_size], align_corners=False)       # [1, crop, crop, 2]
    crop = torch.stack([f[:, top:top + box, left:left + box] for f in frames], dim=1)     # [3, t, box, box]
    # Frames as channels, channels-last: grid_sample then computes each output location's source
    # position and weights once and reads the 3*t values beside each other.
    crop = crop.view(1, C * t, box, box).to(torch.float32, memory_format=torch.channels_last)
    out = F.grid_sample(crop, grid, mode="bilinear", align_corners=False)                # [1, 3*t, crop, crop]
    out = out.reshape(C, t, crop_size, crop_size)
    # brightness b, then contrast c around the frame's mean: c·(b·x) + (1 − c)·b·mean;
    # + 0.5 then truncation is rounding. In-place ops: one pass each over the clip.
    mean = out.view(C, t, -1).mean((0, 2)).view(1, t, 1, 1)                              # [1, t, 1, 1]
    out = out.mul_(brightness * contrast).add_(mean.mul_((1 - contrast) * brightness).add_(0.5))
    return out.clamp_(0, 255).to(torch.uint8)


def spec_augment(logmel, generator, freq_masks=2, freq_width=8, time_masks=2, time_fraction=0.1):
    """SpecAugment (Park et al., 2019) on [n_mels, A]: masked bands are set to the clip's mean.
    Not torchaudio's FrequencyMasking/TimeMasking: they draw from the global RNG, so a clip's masks
    would depend on the worker that loads it instead of following `generator` (seed, epoch, index)."""
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


def dialogue_context(rows, utterances, past, future):
    """For each of rows, the utterances of `utterances` (meld.Utterance) around it in its own
    dialogue, ordered by utterance id (never by file order): up to `past` before it and `future`
    after it, nearest first. -> [(past, future)], one pair of lists per row. Context never crosses
    dialogues; callers pass the utterances of one split (or of one --dialogue file)."""
    dialogues = collections.defaultdict(list)
    for u in utterances:
        dialogues[u.dialogue].append(u)
    for turns in dialogues.values():
        turns.sort(key=lambda u: u.index)
    context = []
    for row in rows:
        turns = dialogues.get(row.dialogue, [])
        before = [u for u in turns if u.index < row.index][::-1][:past]
        after = [u for u in turns if u.index > row.index][:future]
        context.append((before, after))
    return context


# --- The dataset ------------------------------------------------------------------------------------------------------

class ClipDataset(Dataset):
    """One split of a prepared cache (MELD, synth, or `prepare.py --csv`; for text alone any folder
    with the CSVs) as samples for `collate`; split=None: only the clip loaders, for predict.

    Training items are keyed by (epoch, index, draw): sample i's augmentation in epoch e comes from
    a generator seeded with (seed, e, i[, draw]), whichever worker loads it, so a resumed run sees
    the same augmentations, and a balanced sampler's repeats differ. classes: a csv dataset's class
    list (default: root's train labels; evaluate.py passes the checkpoint's). view, num_views: the
    window evaluation takes (multi-view testing). decode: "cpu" (frames decoded in the workers) or
    "device" (loading.JpegVideo); the same batch either way. Clips whose extraction failed or that
    lack a selected modality (text that is empty) are excluded and counted by reason in
    self.excluded, never replaced by a blank."""

    def __init__(self, root, split, config, tokenizer=None, train=False, seed=0, classes=None,
                 view=0, num_views=1, decode="cpu"):
        if decode not in loading.DECODES:
            raise ValueError(f"unknown decode {decode!r} (expected one of {loading.DECODES})")
        self.root, self.split, self.config, self.train, self.seed = Path(root), split, config, train, seed
        self.decode = decode
        self.modalities = tuple(config.modalities)
        self.view, self.num_views = view, num_views
        self.max_audio_frames = max(1, int(config.max_audio_seconds * meld.AUDIO_RATE / MEL_HOP))
        self.max_audio_samples = max(1, int(config.max_audio_seconds * meld.AUDIO_RATE))
        self.tokenizer = tokenizer
        self.tasks = meld.tasks(config.dataset, self.root if split is not None else None, classes)
        rows = meld.read_split(self.root, config.dataset, split, self.tasks[0][1]) if split is not None else []
        self.excluded, self.entries, all_rows = collections.Counter(), {}, rows
        if {"video", "audio"} & set(self.modalities) and split is not None:
            rows, self.entries, self.excluded = meld.prepared_clips(self.root, rows, split, self.modalities)
        if "text" in self.modalities:  # no token the model would see: it would train on [CLS] [SEP] alone
            if tokenizer is None:
                raise ValueError("the text modality needs a tokenizer (model.load_tokenizer)")
            self.pad_token_id, self.token_ids = tokenizer.pad_token_id, {}
            kept = [r for r in rows if self.has_text(r.text)]
            if len(kept) < len(rows):
                self.excluded["no text"] += len(rows) - len(kept)
            rows = kept
        self.rows = rows

        if "text" in self.modalities:
            spoken = [r for r in all_rows if self.has_text(r.text)]  # context comes from the CSV, whatever the clips
            self.tokens = [self.tokenize(r, past, future)
                           for r, (past, future) in zip(rows, dialogue_context(rows, spoken, *config.context))]
        if "audio" in self.modalities:
            self.melspec = torchaudio.transforms.MelSpectrogram(
                sample_rate=meld.AUDIO_RATE, n_fft=MEL_WINDOW, hop_length=MEL_HOP, n_mels=config.n_mels)

    def tokenize(self, target, past=(), future=()):
        """The text input of one utterance with its dialogue context (dialogue_context's past and
        future, nearest first; "Speaker: text" with context and config.speakers):
        [CLS] past, oldest first [SEP] target [SEP] future [SEP], a side without context left out.
        Whole utterances are kept, nearest first and alternating sides, within max_text_tokens; the
        target is never cut for context. -> dict of lists: input_ids; target_mask (1 on the target,
        or everywhere without context); token_type_ids if the tokenizer uses them (1 on the target
        and its [SEP] when context is around it)."""
        tokenizer = self.tokenizer
        budget = self.config.max_text_tokens - 2                        # [CLS] target [SEP]
        target_ids = self.utterance_ids(target)[:budget]
        budget -= len(target_ids)
        kept = ([], [])                                                 # past, future: nearest first
        for distance in range(max(len(past), len(future))):
            for side, utterances in enumerate((past, future)):
                if distance < len(utterances) and len(kept[side]) == distance:  # this side still open
                    ids = self.utterance_ids(utterances[distance])
                    cost = len(ids) + (0 if kept[side] else 1)          # a block's [SEP] comes with its first
                    if cost <= budget:
                        kept[side].append(ids)
                        budget -= cost
        before = [i for ids in reversed(kept[0]) for i in ids] + [tokenizer.sep_token_id] * bool(kept[0])
        after = [i for ids in kept[1] for i in ids] + [tokenizer.sep_token_id] * bool(kept[1])
        start = 1 + len(before)
        input_ids = [tokenizer.cls_token_id, *before, *target_ids, tokenizer.sep_token_id, *after]
        alone = not (kept[0] or kept[1])
        target_mask = [1] * len(input_ids) if alone else [0] * start + [1] * len(target_ids) + [0] * (1 + len(after))
        encoded = dict(input_ids=input_ids, target_mask=target_mask)
        if "token_type_ids" in tokenizer.model_input_names:
            encoded["token_type_ids"] = [0] * start + [int(not alone)] * (len(target_ids) + 1) + [0] * len(after)
        return encoded

    def has_text(self, text):
        """Whether text gives the tokenizer any token (whitespace, zero-width and direction marks, a BOM
        or a soft hyphen alone give none)."""
        if text not in self.token_ids:
            self.token_ids[text] = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return bool(self.token_ids[text])

    def utterance_ids(self, utterance):
        """Token ids of one utterance as the model reads it ("Speaker: text" with context), tokenised once."""
        speaker = self.config.speakers and any(self.config.context) and utterance.speaker
        line = f"{utterance.speaker}: {utterance.text}" if speaker else utterance.text
        if line not in self.token_ids:
            self.token_ids[line] = self.tokenizer(line, add_special_tokens=False, verbose=False)["input_ids"]
        return self.token_ids[line]

    def summary(self):
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.excluded.items(), key=lambda x: (-x[1], x[0])))
        return (f"{self.split}: {len(self.rows)} clips ({'+'.join(self.modalities)})"
                + (f", {sum(self.excluded.values())} excluded: {reasons}" if self.excluded else ""))

    def with_view(self, view, num_views):
        """A copy that evaluates through window `view` of `num_views` (the rows and tokens are shared)."""
        dataset = copy.copy(self)
        dataset.view, dataset.num_views = view, num_views
        return dataset

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
        try:   # a file of the cache cut short or gone: one line naming it, and how to redo it
            if "video" in self.modalities and self.decode == "device":
                sample["video_jpeg"] = self.read_video(self.root / row.id, self.entries[row.id]["frames"], generator)
            elif "video" in self.modalities:
                sample["video"] = self.load_video(self.root / row.id, self.entries[row.id]["frames"], generator)
            if "audio" in self.modalities:
                sample["audio"] = self.load_audio(self.root / row.id, generator)
        except (OSError, ValueError, RuntimeError) as e:
            raise meld.DamagedClip(f"{self.root / row.id}: cannot be read ({cli.first_line(e)}): the cache is "
                                   f"damaged; `python prepare.py ... --out {self.root} --verify` prepares such "
                                   "clips again") from None
        if "text" in self.modalities:
            sample.update(self.tokens[index])
        return sample

    def load_video(self, folder, available, generator=None):
        """Frames of one prepared clip folder -> uint8 [3, t, crop, crop], t <= num_frames.
        Evaluation takes window self.view of self.num_views (multi-view testing; 1 = the centre)."""
        jpegs, params = self.read_video(folder, available, generator)
        return transform_frames(decode_jpeg(jpegs), self.config.crop_size, params)   # [3, t, crop, crop]

    def read_video(self, folder, available, generator=None):
        """The JPEG files of the clip's sampled frames (t x uint8 [bytes]) and its augmentation
        (draw_augmentation's tuple in training, None in evaluation; the size from the first header)."""
        picks = sample_frame_indices(available, self.config.num_frames, self.config.frame_sampling, generator,
                                     self.view, self.num_views)
        files = loading.read_jpegs(folder, picks)
        params = None
        if generator is not None:
            w, h = PIL.Image.open(io.BytesIO(files[0])).size        # the header alone is read
            params = draw_augmentation(h, w, self.config.crop_size, generator, self.config.hflip)
        return [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files], params

    def load_audio(self, folder, generator=None):
        """audio.npy of one prepared clip folder -> log-mel [n_mels, A], A = 1 + samples // 160 up to
        max_audio_frames (a window as load_video's; a clip too short for the STFT's reflect padding is
        zero-padded past its end), SpecAugment in training; audio_input "waveform": the samples in
        [-1, 1] as [1, S], windowed alike, without SpecAugment (speech models mask their own)."""
        wave = np.load(Path(folder) / "audio.npy", mmap_mode="r")
        if self.config.audio_input == "waveform":
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


# --- Batches: collate, the loaders ------------------------------------------------------------------------------------

def to_device(batch, device):
    """Tensors of a batch to the device (non-blocking from pinned memory); a loading.JpegVideo is
    decoded there and transformed as the workers would have; ids stay a list."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v.decode(device)
            if isinstance(v, loading.JpegVideo) else v for k, v in batch.items()}


def transform_clips(clips, params, num_frames, crop_size):
    """Each clip's frames (t_i x uint8 [3, h, w]) through transform_frames with its params, zero-padded
    to num_frames frames -> uint8 [B, 3, num_frames, crop, crop], where the frames are."""
    return pad_time([transform_frames(f, crop_size, p) for f, p in zip(clips, params)], num_frames)[0]


def pad_time(items, length):
    """Tensors [C, t_i, ...] -> zero-padded [B, C, length, ...] and mask bool [B, length] (True = real),
    on the items' device."""
    C, _, *rest = items[0].shape
    padded = torch.zeros(len(items), C, length, *rest, dtype=items[0].dtype, device=items[0].device)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, x in enumerate(items):
        padded[i, :, : x.shape[1]] = x
        mask[i, : x.shape[1]] = True
    return padded, mask


def padded_length(lengths, num_frames=None, multiple=1, limit=None):
    """Frames a batch of clips with these real lengths is padded to: num_frames if given (fixed
    padding), else the longest rounded up to a multiple (at least one frame), but not past limit."""
    longest = max(max(lengths), 1)
    return num_frames or max(longest, min(-(-longest // multiple) * multiple, limit or float("inf")))


def collate_padding(config):
    """collate's num_frames, frame_multiple and frame_limit for a DataConfig (--video-padding)."""
    return dict(num_frames=config.num_frames if config.video_padding == "fixed" else None,
                frame_multiple=config.frame_multiple, frame_limit=config.num_frames)


def collate(samples, num_frames=None, pad_token_id=0, tasks=("emotion", "sentiment"), crop_size=None,
            frame_multiple=1, frame_limit=None):
    """List of samples -> the batch dict of the module docstring (one long [B] per task name).
    Video is padded to num_frames, or with num_frames None to the batch's longest clip rounded up to
    frame_multiple, at most frame_limit (padded_length); samples read for decoding on the device (video_jpeg) give a
    loading.JpegVideo of crop_size frames as "video". The real lengths are also given as lists of
    ints (video_lengths, audio_lengths), which stay on the host: the model's masked layers size
    their work from them without a host sync."""
    batch = dict(ids=[s["id"] for s in samples], **{t: torch.tensor([s[t] for s in samples]) for t in tasks})
    if "video" in samples[0]:  # [3, t, H, W] each -> [B, 3, T, H, W]
        batch["video_lengths"] = [s["video"].shape[1] for s in samples]
        T = padded_length(batch["video_lengths"], num_frames, frame_multiple, frame_limit)
        batch["video"], batch["video_mask"] = pad_time([s["video"] for s in samples], T)
    if "video_jpeg" in samples[0]:  # (t_i files, params) each
        batch["video_lengths"] = [len(s["video_jpeg"][0]) for s in samples]
        T = padded_length(batch["video_lengths"], num_frames, frame_multiple, frame_limit)
        transform = functools.partial(transform_clips, num_frames=T, crop_size=crop_size)
        batch["video"] = loading.JpegVideo.pack([s["video_jpeg"] for s in samples], transform)
        batch["video_mask"] = torch.arange(T)[None, :] < torch.tensor(batch["video_lengths"])[:, None]
    if "audio" in samples[0]:  # [n_mels, a] (or [1, s]) each -> [B, n_mels, A] (or [B, 1, S])
        batch["audio_lengths"] = [s["audio"].shape[1] for s in samples]
        A = max(batch["audio_lengths"])
        batch["audio"], batch["audio_mask"] = pad_time([s["audio"] for s in samples], A)
    if "input_ids" in samples[0]:  # [L_i] each -> [B, L], L the longest
        ids = [torch.tensor(s["input_ids"]) for s in samples]
        batch["input_ids"] = pad_sequence(ids, batch_first=True, padding_value=pad_token_id)
        batch["attention_mask"] = pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
        for key in ("token_type_ids", "target_mask"):
            if key in samples[0]:
                batch[key] = pad_sequence([torch.tensor(s[key]) for s in samples], batch_first=True)
    return batch


def make_loader(dataset, batch_size, train, workers=2, sampler="random", seed=0, num_replicas=1, rank=0,
                pin_memory=None, group_by_length=False):
    """DataLoader over a ClipDataset: loading.ClipSampler (random or balanced, sharded when distributed),
    drop_last in training (BatchNorm in the heads cannot take a batch of one, and equal micro-batches
    keep gradient accumulation exact), persistent workers that reuse freed memory, pinned memory
    when CUDA is available. group_by_length (training, video or text selected): batches of clips of
    similar frame counts, or texts of similar token counts (group_lengths, loading.ClipSampler).
    ValueError for an unknown sampler, or for group_by_length without video or text."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (expected one of {SAMPLERS})")
    if group_by_length and not {"text", "video"} & set(dataset.modalities):
        raise ValueError("--group-by-length groups clips by their frame counts (video) or texts by their token "
                         "counts: it needs the video or the text modality")
    config = dataset.config
    loading.check_shared_memory(batch_bytes(dataset, batch_size), workers)
    lengths = group_lengths(dataset) if group_by_length and train else None
    order = loading.ClipSampler(dataset.labels(), shuffle=train, balanced=train and sampler == "balanced",
                        num_replicas=num_replicas, rank=rank, seed=seed, pad=train, lengths=lengths,
                        batch_size=batch_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order, drop_last=train, num_workers=workers,
        collate_fn=functools.partial(collate, **collate_padding(config),
                                     pad_token_id=getattr(dataset, "pad_token_id", 0),
                                     crop_size=config.crop_size,
                                     tasks=[task for task, _ in dataset.tasks]),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0, prefetch_factor=loading.PREFETCH if workers > 0 else None,
        timeout=loading.TIMEOUT if workers > 0 else 0,
        worker_init_fn=loading.reuse_freed_memory,
        generator=torch.Generator().manual_seed(seed))  # worker seeds from here, not the global RNG


def group_lengths(dataset):
    """The key --group-by-length sorts clips by: with video the frames a clip gives (then its token
    count, with text), else its token count. Frames are where the time goes, and with exact masking
    a clip's result does not depend on what it shares a batch with."""
    tokens = [len(t["input_ids"]) for t in dataset.tokens] if "text" in dataset.modalities else None
    if "video" not in dataset.modalities:
        return tokens
    frames = [min(dataset.entries[row.id]["frames"], dataset.config.num_frames) for row in dataset.rows]
    if tokens is None:
        return frames
    return [f * (max(tokens) + 1) + t for f, t in zip(frames, tokens)]


def batch_bytes(dataset, batch_size):
    """About the bytes of one batch of dataset (its longest clips): what a loader worker hands over."""
    config = dataset.config
    video = 3 * config.num_frames * config.crop_size ** 2 // (4 if dataset.decode == "device" else 1)
    audio = 4 * config.max_audio_seconds * (meld.AUDIO_RATE if config.audio_input == "waveform"
                                            else (config.n_mels or 0) * meld.AUDIO_RATE / MEL_HOP)
    return int(batch_size * (video * ("video" in config.modalities) + audio * ("audio" in config.modalities)))


def make_loaders(root, config, tokenizer, args, decode="cpu", rank=0, world=1):
    """{split: DataLoader} for the splits root has (train's with --batch-size, the others with
    --eval-batch-size; args: train.py's settings). An empty test split is skipped, an empty train or
    dev refused (SystemExit naming the folder); rank 0 prints each split's summary."""
    available, loaders = meld.available_splits(root, config.dataset), {}
    for split in meld.SPLITS:
        if split not in available:
            if rank == 0:
                print(f"{split}: no {meld.split_file(config.dataset, split)} in {root}: not evaluated")
            continue
        ds = ClipDataset(root, split, config, tokenizer, train=split == "train", seed=args.seed, decode=decode)
        if rank == 0:
            print(ds.summary() + (": not evaluated" if len(ds) == 0 and split == "test" else ""))
        if len(ds) == 0 and split != "test":
            raise SystemExit(f"{root}: the {split} split has no usable clip ({ds.summary()})")
        if len(ds):
            loaders[split] = make_loader(
                ds, args.batch_size if split == "train" else args.eval_batch_size, train=split == "train",
                workers=args.workers, sampler=args.sampler, seed=args.seed, num_replicas=world, rank=rank,
                group_by_length=args.group_by_length)
    return loaders
