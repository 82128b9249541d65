"""SlowFast-R50 8x8 exactly as published, for video clips with padded frames: the network, the
masking it needs, ImageNet ResNet-50 inflation into its slow pathway, and the official Kinetics-400
checkpoints.

    from slowfast import SlowFast

    net = SlowFast("r50", init="imagenet")   # init "random", "imagenet" or "kinetics:PATH"
    features = net(video, mask)              # uint8 [B, 3, T, H, W], bool [B, T] -> [B, 2048 + 256]

model.py builds it for video_arch="slowfast" (model.VIDEO_ARCHS) and moves it to the device with
model.place (3-D convolution weights channels-last on CUDA); model.py's audio and text encoders
use the masking helpers defined here (mask_time, masked_mean, masked_batch_norm). This module
does not import model.py.

Network: SlowFast-R50 8x8 of Feichtenhofer, Fan, Malik and He, "SlowFast Networks for Video
Recognition", ICCV 2019 (arXiv:1812.03982), as PySlowFast (github.com/facebookresearch/SlowFast)
and pytorchvideo (`pytorchvideo.models.slowfast.create_slowfast`, hub `slowfast_r50`) build it:
alpha = 4 fast frames per slow frame, beta = 1/8 (fast width / slow width), no temporal striding,
fast->slow laterals (Conv3d 7x1x1, temporal stride alpha, 2 x C_fast channels) concatenated onto
the slow path after the stem, res2, res3 and res4. It is written out with torchvision's ResNet
names (conv1, bn1, layer1..layer4; conv1/conv2/conv3 in a block), so that ImageNet ResNet-50
weights map onto the slow pathway name for name and the Kinetics checkpoints map onto the whole
network through `slowfast_key_map`. VIDEO_PRESETS: "r50" (the published network, 33,644,488
parameters), "small" and "tiny" (same layout, fewer blocks and channels). Any T, H, W work.

Masking contract for padded frames: mask [B, T] bool, True = real frame, real frames first and
padding last. Every tensor is zeroed at padded time steps after each operation that can make them
non-zero; every BatchNorm takes its training statistics, and updates its running statistics, from
real time steps only (masked_batch_norm); pooling is a masked mean over real time. So in eval and
in training mode the same real frames padded with anything give the same outputs, gradients and
BatchNorm running statistics; a sample with no real frame gives zeros.

Weights (`init`): "imagenet" inflates torchvision's ResNet-50 IMAGENET1K_V2 into the slow pathway
(centre inflation, inflate_resnet50: a static clip gives the 2-D network's activations); the fast
pathway and the laterals stay random. "kinetics:PATH" reads the official Kinetics-400
SlowFast-R50 checkpoint (load_kinetics_checkpoint): a pytorchvideo (blocks.*) or PySlowFast
(s1.*, ... in a .pyth) state dict, bare or inside the wrappers and key prefixes of PySlowFast,
pytorchvideo hub, Lightning, DDP and torch.compile files, or a .safetensors file; always with
torch.load(weights_only=True), and strictly (every backbone tensor, nothing but the 400-class
head left over). A Caffe2 .pkl or any other file is a one-line ValueError naming the file (a
missing file, FileNotFoundError).

Some layers are computed another way than the plain PyTorch layer they stand for
(StridedPointwiseConv3d and TemporalTapConv3d on the CPU, FrameMaxPool everywhere); each gives
the same values and gradients, and has the plain layer's parameters and state-dict names.

Tested, on the CPU with random weights and nothing downloaded, by tests/test_slowfast.py
(parameter counts, FLOPs, parity with pytorchvideo's slowfast_r50, PySlowFast checkpoint names,
ImageNet inflation, padding invariance in training, the rewritten layers, channels-last) and
tests/test_checkpoint_formats.py (Kinetics checkpoint layouts):

    python -m pytest tests/test_slowfast.py tests/test_checkpoint_formats.py
"""

import os
import pickletools
import warnings
import zipfile

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import cli

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
    """unpack_time with pack_time as its backward: [1, C, ..n.., ...] -> [B, C, ..T.., ...]."""

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
    the same parameter, state-dict name and result. Why: on the CPU the strided kernel loses to the
    plain one by more than the subsampling saves. On CUDA the plain strided convolution runs.
    stride (st, sh, sw): x [B, C_in, T, H, W] -> [B, C_out, ceil(T/st), ceil(H/sh), ceil(W/sw)]"""

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
    same parameter, state-dict name and result; used for the fast stem (5 x 7 x 7 from 3 channels).
    Why: on the CPU PyTorch's 3-D weight gradient is slow with so few input channels, and the 2-D
    one is not. Input frames are not copied per tap. On CUDA the plain 3-D convolution runs
    (cuDNN's is fast). x [B, C_in, T, H, W] -> [B, C_out, T + 2 pt - kt + 1, H', W'] (H', W' as
    Conv2d's), channels-last when the weight is. A temporal stride other than 1 is a ValueError."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        if self.stride[0] != 1:
            raise ValueError("TemporalTapConv3d needs temporal stride 1")

    def forward(self, x):
        if x.is_cuda:  # cuDNN's 3-D kernels are fast there (channels-last, see model.place)
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
    """True for a 5-D tensor laid out channels-last (NDHWC), as model.place makes the CUDA video
    model."""
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


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
        """[layer1, layer2, layer3, layer4] (res2..res5), each an nn.Sequential of Bottleneck3d."""
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
    """Masked SlowFast network (alpha = 4, beta = fast_width / slow_width): Feichtenhofer et al. 2019,
    laid out as PySlowFast and pytorchvideo's create_slowfast (see the module docstring).

    size: a key of VIDEO_PRESETS ("r50" is the published SlowFast-R50 8x8).
    init: "random", "imagenet" (torchvision ResNet-50 IMAGENET1K_V2 inflated into the slow
    pathway; the fast pathway and laterals stay random) or "kinetics:PATH" (the official
    Kinetics-400 SlowFast-R50 checkpoint, PySlowFast .pyth or pytorchvideo state dict).
    load_pretrained=False builds the same network (and normalisation) without loading weights.

    forward(video uint8 [B, 3, T, H, W], mask bool [B, T]) -> [B, out_channels] (2048 + 256).
    Any T, H, W work: T need not be a multiple of alpha, pooling is not fixed-size.

    Errors: ValueError for an unknown size or init, or a pretrained init with a size other than
    r50; with load_pretrained, OSError when the ImageNet weights cannot be fetched, and those of
    load_kinetics_checkpoint (FileNotFoundError, one-line ValueError) for kinetics:PATH.
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
    the torch hub cache or the network. A failure is an OSError of one line ending in hint (what to
    pass)."""
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # URLError, timeouts, proxies: all mean the same to the user
        raise OSError(f"could not fetch ImageNet weights {weights} ({type(e).__name__}, "
                           f"offline?): {hint}") from None


def load_imagenet_resnet50():
    """torchvision ResNet-50 with IMAGENET1K_V2 weights, for the SlowFast slow pathway (OSError when
    they cannot be fetched)."""
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
    tests/test_slowfast.py), and yet every lateral gets a gradient from the first step (with zero
    there, the laterals themselves would get none until these weights had moved). A slow pathway
    whose state-dict names differ from the ResNet's (fc aside) is a ValueError."""
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
                         f"weights_only=True failed: {type(e).__name__}: {cli.first_line(e)})") from None
    state = unwrap_state_dict(checkpoint)
    if not state:
        top = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{flag}: holds no state dict of tensors (top level: {top})")
    try:
        return convert_slowfast_state_dict(state, depths, own_state)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None

