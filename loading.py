"""What makes loading fast, apart from what a batch holds: video decoded on the training device,
and loader workers that keep their memory.

    decode = loading.resolve_decode("auto", device)   # "device" on CUDA, "cpu" elsewhere
    video = loading.JpegVideo.pack(clips, transform)  # in collate: each clip's files and augmentation
    batch = video.decode(device)                       # in data.to_device: one decode_jpeg call, then transform
    DataLoader(..., worker_init_fn=loading.reuse_freed_memory)

With decode "device" the loader's workers read each clip's JPEG files and draw its augmentation,
collate packs the bytes into a JpegVideo, and data.to_device decodes the whole batch in one
torchvision.io.decode_jpeg call on the device (nvJPEG on CUDA) and applies the same transform as
the workers: the same batch (bitwise on the CPU), about 1/4 of the bytes between processes at
32 x 224^2. Measured in docs/PERFORMANCE.md; tested by tests/test_data.py and tests/test_cuda.py.
"""

import ctypes
from dataclasses import dataclass, replace

import torch
from torchvision.io import decode_jpeg

DECODES = ("cpu", "device")   # where video frames are decoded: the loader's workers, or the training device


def resolve_decode(decode, device):
    """The --decode flag for a run on `device` (torch.device): "auto" decodes on the device when it
    is CUDA (nvJPEG) and in the loader's workers otherwise; "cpu" and "device" are kept."""
    return ("device" if device.type == "cuda" else "cpu") if decode == "auto" else decode


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
