"""The loader's machinery, apart from what a sample holds (data.py): the order of an epoch's
samples, video decoded on the training device, and loader workers that keep their memory.

    sampler = loading.ClipSampler(labels, shuffle=True, seed=0)   # keys (epoch, index, draw)
    sampler.set_epoch(3, skip=64)                      # epoch 3 after its first 64 samples (a resume)
    decode = loading.resolve_decode("auto", device)   # "device" on CUDA, "cpu" elsewhere
    video = loading.JpegVideo.pack(clips, transform)  # in collate: each clip's files and augmentation
    batch = video.decode(device)                       # in data.to_device: one decode_jpeg call, then transform
    for batch in loading.OneAhead(loader, to_device, device): ...   # batch i + 1 moved while batch i runs
    DataLoader(..., worker_init_fn=loading.reuse_freed_memory)

With decode "device" the loader's workers read each clip's JPEG files and draw its augmentation,
collate packs the bytes into a JpegVideo, and data.to_device decodes the whole batch in one
torchvision.io.decode_jpeg call on the device (nvJPEG on CUDA) and applies the same transform as
the workers: the same batch (bitwise on the CPU), about 1/4 of the bytes between processes at
32 x 224^2. Measured in docs/PERFORMANCE.md; tested by tests/test_data.py, tests/test_context.py,
tests/test_train.py (exact resume) and tests/test_cuda.py.
"""

import collections
import ctypes
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Sampler
from torchvision.io import decode_jpeg

DECODES = ("cpu", "device")   # where video frames are decoded: the loader's workers, or the training device
PREFETCH = 4                  # batches each loader worker prepares ahead
TIMEOUT = 300                 # seconds without a batch from the workers before the loader gives up (a hung worker)


JPEG_END = b"\xff\xd9"          # every JPEG file ends with its EOI marker; one cut short by a copy does not


def read_jpegs(folder, picks):
    """The files {k:06d}.jpg of a prepared clip's folder for k in picks -> their bytes. ValueError
    naming the first one cut short; FileNotFoundError for one that is gone."""
    files = [(Path(folder) / f"{k:06d}.jpg").read_bytes() for k in picks]
    cut = next((k for k, f in zip(picks, files) if not f.endswith(JPEG_END)), None)
    if cut is not None:
        raise ValueError(f"{cut:06d}.jpg is cut short")
    return files


def check_shared_memory(batch_bytes, workers, path="/dev/shm"):
    """OSError in one line when the shared memory the loader's workers pass batches through (PyTorch
    uses /dev/shm; a container's default is 64 MB) is smaller than the batches they prepare ahead:
    otherwise a worker fails to allocate and the main process waits forever."""
    if workers == 0 or not os.path.isdir(path):
        return
    need, free = batch_bytes * workers * PREFETCH, shutil.disk_usage(path).free
    if need > free:
        raise OSError(f"{path}: {free / 2 ** 20:.0f} MB free, and --workers {workers} need about "
                      f"{need / 2 ** 20:.0f} MB for the batches they prepare ahead: give the container more (docker "
                      f"run --shm-size={math.ceil(need * 1.5 / 2 ** 30)}g), or lower --workers or --batch-size "
                      "(--workers 0 needs none)")


def resolve_decode(decode, device):
    """The --decode flag for a run on `device` (torch.device): "auto" decodes on the device when it
    is CUDA (nvJPEG) and in the loader's workers otherwise; "cpu" and "device" are kept."""
    return ("device" if device.type == "cuda" else "cpu") if decode == "auto" else decode


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
    Not DistributedSampler + WeightedRandomSampler: together they cannot shard a balanced draw, skip
    the consumed part of an epoch (exact resume), or number repeated draws for their augmentation.
    """

    def __init__(self, labels, shuffle, balanced=False, num_replicas=1, rank=0, seed=0, pad=True, lengths=None,
                 batch_size=1):
        self.labels, self.shuffle, self.balanced = torch.as_tensor(labels), shuffle, balanced
        self.num_replicas, self.rank, self.seed, self.pad = num_replicas, rank, seed, pad
        self.lengths, self.batch_size = None if lengths is None else torch.as_tensor(lengths), batch_size
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
        if self.lengths is not None:
            order = self._group_by_length(order, generator)
        seen, keys = collections.Counter(), []   # (index, draw) over every rank's samples
        for i in order.tolist():
            keys.append((i, seen[i]))
            seen[i] += 1
        return keys[self.rank::self.num_replicas]

    def _group_by_length(self, order, generator, pool=50):
        """Batches of similar lengths, to pad less: the order is cut into pools of `pool` global
        batches (batch_size x num_replicas samples each), each pool sorted by length (longest first),
        cut into its global batches, and the batches of the epoch shuffled; all from the epoch's
        generator, so the order can still be rebuilt on resume. Samples after the last whole global
        batch stay at the end (training drops them)."""
        step = self.batch_size * self.num_replicas
        whole = len(order) // step * step
        batches = []
        for start in range(0, whole, step * pool):
            chunk = order[start:min(start + step * pool, whole)]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(chunk.split(step))
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return torch.cat(shuffled + [order[whole:]])

    def __len__(self):
        n = len(self.labels)
        per_rank = math.ceil(n / self.num_replicas) if self.pad else len(range(self.rank, n, self.num_replicas))
        return per_rank - self.skip

    def __iter__(self):
        return iter([(self.epoch, i, draw) for i, draw in self._order()[self.skip:]])


@dataclass
class JpegVideo:
    """A batch's video still JPEG-encoded: what collate gives for ClipDataset(decode="device")."""
    data: torch.Tensor     # uint8 [N]: every frame's JPEG file, clip after clip
    sizes: list            # bytes of each frame's file
    frames: list           # frames of each clip, t_i
    params: list           # each clip's augmentation (data.draw_augmentation's tuple; None in evaluation)
    transform: object      # (per-clip frame lists, params) -> the batch's video (data.transform_clips)

    @classmethod
    def pack(cls, clips, transform):
        """clips: per clip (t_i uint8 tensors, one JPEG file each; its augmentation params)."""
        files = [f for jpegs, _ in clips for f in jpegs]
        return cls(torch.cat(files), [len(f) for f in files], [len(jpegs) for jpegs, _ in clips],
                   [params for _, params in clips], transform)

    def pin_memory(self):  # DataLoader(pin_memory=True) calls it
        return replace(self, data=self.data.pin_memory())

    def decode(self, device):
        """Every frame of the batch decoded on `device` in one decode_jpeg call (nvJPEG on CUDA; its
        rounding differs from libjpeg-turbo's), then transformed there -> the batch's video."""
        frames = decode_jpeg(list(self.data.split(self.sizes)), device=device)   # N x uint8 [3, h, w]
        starts = [sum(self.frames[:i]) for i in range(len(self.frames))]
        return self.transform([frames[start:start + t] for start, t in zip(starts, self.frames)], self.params)


class OneAhead:
    """The batches of `batches` through to_device(batch, device), one ahead on CUDA: when batch i is
    handed out, batch i + 1 is fetched and its copies to the device (and its decoding there, for
    JpegVideo) are queued on a side stream, so they overlap the step on batch i; the step's stream
    waits for them before it uses the batch (and the caching allocator is told which stream uses
    its tensors). Elsewhere each batch is moved when it is asked for. The same batches in the same
    order either way: a step's batches, and so exact resume, do not change."""

    def __init__(self, batches, to_device, device):
        self.batches, self.to_device, self.device = iter(batches), to_device, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ahead = self._fetch() if self.stream is not None else None

    def _fetch(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(self.stream):
            return self.to_device(batch, self.device)

    def __iter__(self):
        return self

    def __next__(self):
        if self.stream is None:
            return self.to_device(next(self.batches), self.device)
        batch, self.ahead = self.ahead, None
        if batch is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for value in batch.values():
            if torch.is_tensor(value) and value.is_cuda:
                value.record_stream(current)
        self.ahead = self._fetch()
        return batch


def reuse_freed_memory(_worker_id=None):
    """DataLoader worker_init_fn: let glibc's malloc keep and reuse freed memory (blocks up to its
    32 MiB maximum from the heap, no trimming below 1 GiB). A clip allocates several 5-20 MB buffers,
    each otherwise a fresh mapping paid for again in page faults. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
