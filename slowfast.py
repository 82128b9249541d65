"""SlowFast-R50 8x8 exactly as published, for clips with padded frames: the network and the
masking it needs.

    from slowfast import SlowFast

    net = SlowFast("r50", init="imagenet")   # init "random", "imagenet" or "kinetics:PATH"
    features = net(video, mask, lengths)     # uint8 [B, 3, T, H, W], bool [B, T], ints -> [B, 2048 + 256]

Network: Feichtenhofer, Fan, Malik and He, "SlowFast Networks for Video Recognition", ICCV 2019
(arXiv:1812.03982), as PySlowFast and pytorchvideo's `create_slowfast` (hub `slowfast_r50`) build
it: alpha = 4 fast frames per slow frame, beta = 1/8 (fast width / slow width), no temporal
striding, fast->slow laterals (Conv3d 7x1x1, temporal stride alpha, 2 x C_fast channels)
concatenated onto the slow path after the stem, res2, res3 and res4. Written with torchvision's
ResNet names (conv1, bn1, layer1..layer4), so ImageNet ResNet-50 weights map onto the slow pathway
name for name and Kinetics-400 checkpoints onto the whole network (pretrained.py reads both).
VIDEO_PRESETS: "r50" (the published network, 33,644,488 parameters), "small" and "tiny" (the same
layout, fewer blocks and channels). Any T, H, W work.

Masking contract: mask [B, T] bool, True = real frame, real frames first and padding last, with the
real lengths as Python ints beside it (RealSteps; read from the mask when not given, one host sync).
Every tensor is zero at padded time steps: the input is zeroed, and every BatchNorm's output is
zero there (masked_batch_norm), which the other layers keep; every BatchNorm takes its training
statistics, and updates its running statistics, from real time steps only; pooling is a masked
mean over real time. So in eval and in training mode
the same real frames padded with anything give the same outputs, gradients and running statistics;
a sample with no real frame gives zeros. model.py's audio and text encoders use the same helpers.

Some layers are computed another way than the plain layer they stand for (StridedPointwiseConv3d
and TemporalTapConv3d on the CPU, FrameMaxPool everywhere): the same values, gradients, parameters
and state-dict names. Tested by tests/test_slowfast.py (parameter counts, FLOPs, parity with
pytorchvideo's slowfast_r50, padding invariance in training, the rewritten layers, channels-last).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrained

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


class RealSteps:
    """The real time steps of a padded batch at one temporal resolution, known on the device and on
    the host: mask bool [B, T] (True = real, real steps first) and lengths, the real steps of each
    sample as Python ints. With the lengths on the host every masked operation uses ops whose output
    sizes are known before they run, so a training step makes no host sync on CUDA (no nonzero, no
    boolean indexing, no .item()). lengths None: read from the mask (one host sync)."""

    def __init__(self, mask, lengths=None):
        self.mask = mask.bool()
        self.lengths = [int(k) for k in (self.mask.sum(1).tolist() if lengths is None else lengths)]
        if len(self.lengths) != mask.shape[0] or not all(0 <= k <= mask.shape[1] for k in self.lengths):
            raise ValueError(f"lengths {self.lengths} do not fit a mask of shape {list(mask.shape)}")
        self.padded = any(k < mask.shape[1] for k in self.lengths)
        self._rows = None

    @property
    def rows(self):
        """long [n], n = sum(lengths): b * T + t of every real step (b, t), in order. Built once, on
        the mask's device, by a stable sort of the flattened mask (real steps first)."""
        if self._rows is None:
            order = torch.argsort((~self.mask).flatten().to(torch.uint8), stable=True)
            self._rows = order[: sum(self.lengths)]
        return self._rows

    def every(self, stride):
        """Steps 0, stride, 2 stride, ... (the slow pathway's): mask [B, ceil(T / stride)]."""
        return RealSteps(self.mask[:, ::stride], [-(-k // stride) for k in self.lengths])


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


class GatherRows(torch.autograd.Function):
    """rows [n] of x [R, D] -> [n, D] (index_select); backward: index_copy into zeros. The rows are
    distinct, so both ways are exact and deterministic."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        rows, = ctx.saved_tensors
        return grad.new_zeros(ctx.num_rows, grad.shape[1]).index_copy_(0, rows, grad), None


class ScatterRows(torch.autograd.Function):
    """GatherRows' inverse: y [n, D] into rows [n] of zeros [num_rows, D]; backward: index_select."""

    @staticmethod
    def forward(ctx, y, rows, num_rows):
        ctx.save_for_backward(rows)
        return y.new_zeros(num_rows, y.shape[1]).index_copy_(0, rows, y)

    @staticmethod
    def backward(ctx, grad):
        rows, = ctx.saved_tensors
        return grad.index_select(0, rows), None, None


def masked_batch_norm(bn, x, mask, time_dim=2, pack="auto"):
    """bn(x) whose training statistics come from real time steps only, zero at padded steps.

    bn: an nn.BatchNorm1d/2d/3d; x [B, C, ...] with T at time_dim; mask: RealSteps, bool [B, T]
    (True = real, real steps first; the lengths are then read from it, one host sync) or None
    (nothing is padded). In training mode with padding, the real time steps of all samples are
    packed together and bn's own batch_norm runs on them (PyTorch's fused kernels: batch statistics,
    gradients, and the running mean and unbiased variance updated with bn.momentum, exactly as bn on
    the real positions alone), and the result is unpacked with zeros at padded steps. So padding,
    whatever it holds, changes neither the output at real positions, nor the gradients, nor the
    running statistics. In eval mode bn(x), zeroed at padded steps in place; with nothing padded
    bn(x) itself (cuDNN's kernel on CUDA). Parameters and buffers are bn's own, so state dicts are
    unchanged. pack: "index" (the (sample, step) rows gathered by index_select and scattered back by
    index_copy, with the rows RealSteps built once: one kernel each way, no layout change for
    channels-last activations), "slices" (per-sample slices into [1, C, ..n.., ...], the faster for
    contiguous activations on the CPU) or "auto" (index where the rows are contiguous). Neither
    makes a host sync: the sizes come from the host lengths."""
    if mask is None or getattr(mask, "is_meta", False):  # nothing padded; meta: shapes and FLOPs only
        return bn(x)
    steps = mask if isinstance(mask, RealSteps) else RealSteps(mask)
    if not steps.padded:
        return bn(x)
    if not bn.training:
        return mask_time_(bn(x), steps.mask, time_dim)
    if bn.track_running_stats:  # as nn.BatchNorm's forward: count the batch, momentum None = average
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)

    def norm(packed):
        return F.batch_norm(packed, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)

    perm = [0, time_dim] + [d for d in range(2, x.dim()) if d != time_dim] + [1]
    moved = x.permute(perm)   # [B, T, *S, C], a view: contiguous when each (sample, step) is one row (channels last)
    if pack == "index" or (pack == "auto" and moved.is_contiguous()):
        B, T, *S, C = moved.shape
        rows = GatherRows.apply(moved.reshape(B * T, -1), steps.rows)   # [n, S * C]
        packed = rows.view(-1, *S, C).movedim(-1, 1)                   # [n, C, *S], channels last
        normed = norm(packed).movedim(1, -1).reshape(rows.shape)       # [n, S * C]
        out = ScatterRows.apply(normed, steps.rows, B * T).view(moved.shape)
        return out.permute([perm.index(d) for d in range(x.dim())])    # x's shape and layout
    memory_format = torch.channels_last_3d if is_channels_last(x) else torch.contiguous_format
    packed = PackTime.apply(x, steps.lengths, memory_format, time_dim)  # [1, C, ..n.., ...]
    return UnpackTime.apply(norm(packed), steps.lengths, x.shape, memory_format, time_dim)


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
        """mask RealSteps or None (nothing padded): BatchNorm statistics from real time steps only.
        x is zero at padded time steps, and so is the output: every BatchNorm's output is, and the
        convolutions after the first are pointwise in time."""
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            identity = masked_batch_norm(bn, conv(x), mask)
        out = self.relu(masked_batch_norm(self.bn1, self.conv1(x), mask))
        out = self.relu(masked_batch_norm(self.bn2, self.conv2(out), mask))
        return self.relu(masked_batch_norm(self.bn3, self.conv3(out), mask) + identity)


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
        """x [B, 3, T, H, W], mask RealSteps or None -> [B, width, T, H/4, W/4] (BatchNorm statistics
        from real time steps; zero at padded steps)"""
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
        """slow_mask RealSteps [B, ceil(T / alpha)] or None: BatchNorm statistics from real slow
        steps; zero at padded slow steps."""
        return F.relu(masked_batch_norm(self.bn, self.conv(fast), slow_mask))


class SlowFast(nn.Module):
    """Masked SlowFast network (Feichtenhofer et al. 2019; see the module docstring).

    size: a key of VIDEO_PRESETS ("r50" is the published SlowFast-R50 8x8).
    init: "random", "imagenet" (torchvision ResNet-50 IMAGENET1K_V2 inflated into the slow
    pathway; the fast pathway and laterals stay random) or "kinetics:PATH" (the official
    Kinetics-400 SlowFast-R50 checkpoint, PySlowFast .pyth or pytorchvideo state dict).
    load_pretrained=False builds the same network (and normalisation) without loading weights.
    alpha: fast frames per slow frame (4 as published).

    forward(video uint8 [B, 3, T, H, W], mask bool [B, T], lengths=None: the real frames per clip as
    Python ints, which spare a host sync) -> [B, out_channels] (2048 + 256).
    Any T, H, W work: T need not be a multiple of alpha, pooling is not fixed-size.

    Errors: ValueError for an unknown size or init, or a pretrained init with a size other than
    r50; with load_pretrained, those of pretrained.load_imagenet_resnet50 (OSError) and
    pretrained.load_kinetics_checkpoint (FileNotFoundError, one-line ValueError).
    """

    def __init__(self, size="r50", init="random", load_pretrained=True, alpha=ALPHA):
        super().__init__()
        if size not in VIDEO_PRESETS:
            raise ValueError(f"unknown video size {size!r}; choose one of {sorted(VIDEO_PRESETS)}")
        if not (init in ("random", "imagenet") or init.startswith("kinetics:")):
            raise ValueError(f"unknown video init {init!r}; use random, imagenet or kinetics:PATH")
        if init != "random" and size != "r50":
            raise ValueError(f"--video-init {init} needs --video-size r50 (got {size})")
        preset = VIDEO_PRESETS[size]
        depths, ws, wf = preset["depths"], preset["slow_width"], preset["fast_width"]
        self.size, self.init, self.alpha, self.depths = size, init, alpha, tuple(depths)

        fast_channels = (wf, 4 * wf, 8 * wf, 16 * wf)   # fast stem, res2, res3, res4 outputs
        self.slow = Pathway(ws, depths, SLOW_TEMPORAL_KERNELS, stem_temporal_kernel=1,
                            lateral_channels=[LATERAL_RATIO * c for c in fast_channels])
        self.fast = Pathway(wf, depths, FAST_TEMPORAL_KERNELS, stem_temporal_kernel=5,
                            lateral_channels=(0, 0, 0, 0))
        # lateral[i] fuses after: 0 stem, 1 res2, 2 res3, 3 res4 (none after res5)
        self.lateral = nn.ModuleList([Lateral(c, alpha) for c in fast_channels])
        self.out_channels = self.slow.out_channels + self.fast.out_channels

        kinetics = init.startswith("kinetics:")
        mean, std = (KINETICS_MEAN, KINETICS_STD) if kinetics else (IMAGENET_MEAN, IMAGENET_STD)
        # not saved in the state dict: they follow from `init`, which the model config stores
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1), persistent=False)

        self.reset_parameters()
        if load_pretrained and init == "imagenet":
            pretrained.inflate_resnet50(self, pretrained.load_imagenet_resnet50(), LATERAL_INIT_GAIN)
        if load_pretrained and kinetics:
            self.load_state_dict(pretrained.load_kinetics_checkpoint(init[len("kinetics:"):], self.depths,
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
        """Concatenate lateral i onto the slow path: [B, Cs, Ts, h, w] -> [B, Cs + 2 Cf, Ts, h, w]
        (both zero at padded steps)."""
        return torch.cat([slow, self.lateral[i](fast, slow_mask)], dim=1)

    def forward_features(self, video, mask, lengths=None):
        """video uint8 [B, 3, T, H, W], mask bool [B, T] (True = real frame, real frames first),
        lengths: the real frames of each clip as Python ints (None: read from the mask, one host
        sync; not needed on the meta device).

        Returns slow [B, Cs, ceil(T/alpha), H/32, W/32], fast [B, Cf, T, H/32, W/32] and their
        masks [B, ceil(T/alpha)], [B, T]. Padded time steps of both maps are zero: the input is
        zeroed once, and every masked BatchNorm zeroes its output there (ReLU, max pooling over
        space and the convolutions keep zeros zero; only the first convolution of a block mixes
        time, and it reads a tensor that is zero at padded steps, as its own zero padding)."""
        fast_mask = mask.bool()
        slow_mask = fast_mask[:, :: self.alpha]
        fast_pad = None if fast_mask.is_meta and lengths is None else RealSteps(fast_mask, lengths)
        if fast_pad is not None and not fast_pad.padded:
            fast_pad = None                                 # nothing padded: the plain path
        slow_pad = None if fast_pad is None else fast_pad.every(self.alpha)
        fast = self.normalize(video, None if fast_pad is None else fast_pad.mask)   # [B, 3, T, H, W]
        slow = fast[:, :, :: self.alpha]                    # [B, 3, ceil(T/alpha), H, W]

        slow = self.slow.stem(slow, slow_pad)               # [B, Cs, Ts, H/4, W/4]
        fast = self.fast.stem(fast, fast_pad)               # [B, Cf, T, H/4, W/4]
        slow = self.fuse(0, slow, fast, slow_pad)
        for i, (slow_layer, fast_layer) in enumerate(zip(self.slow.layers, self.fast.layers)):
            for block in slow_layer:
                slow = block(slow, slow_pad)
            for block in fast_layer:
                fast = block(fast, fast_pad)
            if i < 3:
                slow = self.fuse(i + 1, slow, fast, slow_pad)
        return slow, fast, slow_mask, fast_mask

    def forward(self, video, mask, lengths=None):
        """-> [B, Cs + Cf]: masked mean over real time and mean over space of each pathway."""
        slow, fast, slow_mask, fast_mask = self.forward_features(video, mask, lengths)
        return torch.cat([masked_mean(slow, slow_mask), masked_mean(fast, fast_mask)], dim=1)

    def stages(self):
        """Freezing units -> modules: <stage> for stem, res2..res5 (the three pathways' parts of that
        stage together), then the finer {slow,fast,lateral}.<stage>. lateral.<stage> is the fusion
        that runs after <stage> (none after res5) together with the weights of the next slow stage
        that read it (LateralInputConv3d.lateral_weight, in an nn.ParameterList); the slow stage
        holds the rest of its parameters. So the lateral-reading weights are new parameters whatever
        the slow pathway was loaded from, and train while their slow stage is frozen."""
        fine = {}
        for path_name, path in (("slow", self.slow), ("fast", self.fast)):
            fine[f"{path_name}.stem"] = [path.conv1, path.bn1]
            for i, layer in enumerate(path.layers):
                fine[f"{path_name}.res{i + 2}"] = [layer]
        for i, stage in enumerate(("stem", "res2", "res3", "res4")):  # lateral i is read by slow layer i
            layer = self.slow.layers[i]
            reads = [m.lateral_weight for m in layer[0].modules() if isinstance(m, LateralInputConv3d)]
            fine[f"slow.res{i + 2}"] = [nn.ParameterList(p for p in layer.parameters()
                                                         if all(p is not r for r in reads))]
            fine[f"lateral.{stage}"] = [self.lateral[i], nn.ParameterList(reads)]
        coarse = {stage: [m for path in ("slow", "fast", "lateral") for m in fine.get(f"{path}.{stage}", [])]
                  for stage in ("stem", "res2", "res3", "res4", "res5")}
        return coarse | fine

    def pretrained_stages(self):
        """Stage names whose weights came from a pretrained checkpoint (for `init`)."""
        if self.init == "imagenet":
            return ["slow.stem", "slow.res2", "slow.res3", "slow.res4", "slow.res5"]
        if self.init.startswith("kinetics:"):
            return list(self.stages())
        return []
