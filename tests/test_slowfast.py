"""Tests for slowfast.py: SlowFast-R50 exactness (parameters, FLOPs, parity with pytorchvideo's
slowfast_r50, PySlowFast checkpoint names), ImageNet inflation, masking of padded frames in
training (SlowFast and masked_batch_norm), and the layers computed another way than PyTorch's
(strided 1x1x1 and temporal-tap convolutions, the frame max-pool, channels-last). CPU only, random
weights, nothing is downloaded. The Kinetics checkpoint layouts are in test_checkpoint_formats.py.

    python -m pytest tests/test_slowfast.py
"""

import copy
import importlib
import os
import re
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrained  # noqa: E402
import slowfast  # noqa: E402
from test_model import (  # noqa: E402
    assert_same_training_step,
    pad_with_noise,
    random_video,
    randomize_,
    relative_error,
    train_step_on,
)


def require(module_name):
    """Import a dev-only dependency: skip when it is missing locally, fail in CI (CI set)."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        if "CI" in os.environ:
            pytest.fail(f"{module_name} is missing in CI: pip install -r requirements-dev.txt")
        pytest.skip(f"{module_name} not installed (pip install -r requirements-dev.txt)")


# ---------------------------------------------------------------------------------------------
# SlowFast-R50 is the published network


@pytest.mark.parametrize("arch, parameters, features", [
    ("r50", 33_644_488, 2048 + 256),      # the published SlowFast-R50 backbone
    ("small", 3_243_620, 1024 + 128),
    ("tiny", 693_194, 512 + 64),
])
def test_slowfast_parameter_count(arch, parameters, features):
    with torch.device("meta"):
        video = slowfast.SlowFast(arch)
    assert sum(p.numel() for p in video.parameters()) == parameters
    assert video.out_channels == features


def test_slowfast_r50_flops():
    with torch.device("meta"):
        video = slowfast.SlowFast("r50")
        clip = torch.zeros(1, 3, 32, 224, 224, dtype=torch.uint8)
        mask = torch.ones(1, 32, dtype=torch.bool)
        with FlopCounterMode(display=False) as counter:
            features = video(clip, mask)
    assert features.shape == (1, 2304)
    assert abs(counter.get_total_flops() / 100.6e9 - 1) < 0.01


@pytest.mark.parametrize("fast, plain", [
    (lambda: slowfast.TemporalTapConv3d(3, 4, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3)),
     lambda: nn.Conv3d(3, 4, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False)),
    (lambda: slowfast.TemporalTapConv3d(3, 4, (3, 5, 5), stride=(1, 1, 1), padding=(0, 2, 2)),
     lambda: nn.Conv3d(3, 4, (3, 5, 5), stride=(1, 1, 1), padding=(0, 2, 2), bias=False)),
    (lambda: slowfast.StridedPointwiseConv3d(6, 5, (1, 2, 2)),
     lambda: nn.Conv3d(6, 5, 1, stride=(1, 2, 2), bias=False)),
    (lambda: slowfast.StridedPointwiseConv3d(6, 5, (2, 3, 2)),
     lambda: nn.Conv3d(6, 5, 1, stride=(2, 3, 2), bias=False)),
])
def test_faster_convolutions_equal_the_plain_one(fast, plain):
    """The stem and downsampling convolutions computed another way: same parameter name and
    shape, same output, same gradients for input and weight."""
    fast, plain = fast(), plain()
    assert fast.weight.shape == plain.weight.shape and list(fast.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        plain.weight.copy_(torch.randn(plain.weight.shape, generator=torch.Generator().manual_seed(0)))
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, fast.in_channels, 7, 15, 17, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for conv in (fast, plain):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape))
        outputs.append(y)
        grads.append((xi.grad, conv.weight.grad))
    assert outputs[0].shape == outputs[1].shape and outputs[0].is_contiguous()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)  # sums of ~700 products
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_frame_max_pool_equals_max_pool_3d():
    """The stem's 1x3x3 max-pool as a 2-D pool: the same output and input gradient, odd sizes too."""
    x = torch.randn(2, 5, 7, 15, 18, generator=torch.Generator().manual_seed(0))
    outputs, grads = [], []
    for pool in (slowfast.FrameMaxPool(), nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))):
        xi = x.clone().requires_grad_()
        y = pool(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape))
        outputs.append(y)
        grads.append(xi.grad)
    assert outputs[0].shape == (2, 5, 7, 8, 9)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])


def test_slowfast_architecture_details():
    video = slowfast.SlowFast("tiny")
    assert video.slow.conv1.kernel_size == (1, 7, 7) and video.fast.conv1.kernel_size == (5, 7, 7)
    slow_kt = [layer[0].conv1.kernel_size[0] for layer in video.slow.layers]
    fast_kt = [layer[0].conv1.kernel_size[0] for layer in video.fast.layers]
    assert slow_kt == [1, 1, 3, 3] and fast_kt == [3, 3, 3, 3]
    for lateral in video.lateral:
        conv = lateral.conv
        assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 1, 1), (4, 1, 1), (3, 0, 0))
        assert conv.out_channels == 2 * conv.in_channels
    for block in video.slow.layer3:   # no temporal striding anywhere
        assert block.conv2.stride[0] == 1
    # any T (not a multiple of alpha) and any H, W: no fixed-size pooling
    out = video.eval()(random_video(2, 13, 50, 38), torch.ones(2, 13, dtype=torch.bool))
    assert out.shape == (2, video.out_channels) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Parity with pytorchvideo and PySlowFast checkpoints


@pytest.fixture(scope="module")
def reference_slowfast():
    """pytorchvideo's create_slowfast() (= slowfast_r50) with every parameter and BN buffer random."""
    require("pytorchvideo")
    from pytorchvideo.models.slowfast import create_slowfast
    torch.manual_seed(0)
    return randomize_(create_slowfast(), seed=1).eval()


def ptv_to_pyslowfast(key):
    """pytorchvideo key -> PySlowFast key, written from PySlowFast's module names
    (slowfast/models/{stem_helper,resnet_helper,video_model_builder,head_helper}.py)."""
    rules = [
        (r"^blocks\.0\.multipathway_blocks\.(\d)\.conv\.", lambda m: f"s1.pathway{m[1]}_stem.conv."),
        (r"^blocks\.0\.multipathway_blocks\.(\d)\.norm\.", lambda m: f"s1.pathway{m[1]}_stem.bn."),
        (r"^blocks\.(\d)\.multipathway_fusion\.conv_fast_to_slow\.",
         lambda m: f"s{int(m[1]) + 1}_fuse.conv_f2s."),
        (r"^blocks\.(\d)\.multipathway_fusion\.norm\.", lambda m: f"s{int(m[1]) + 1}_fuse.bn."),
        (r"^blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.",
         lambda m: f"s{int(m[1]) + 1}.pathway{m[2]}_res{m[3]}."),
        (r"\.branch1_conv\.", lambda m: ".branch1."),
        (r"\.branch1_norm\.", lambda m: ".branch1_bn."),
        (r"\.branch2\.conv_([abc])\.", lambda m: f".branch2.{m[1]}."),
        (r"\.branch2\.norm_([abc])\.", lambda m: f".branch2.{m[1]}_bn."),
        (r"^blocks\.6\.proj\.", lambda m: "head.projection."),
    ]
    for pattern, replace in rules:
        key = re.sub(pattern, replace, key)
    return key


def test_parity_with_pytorchvideo(reference_slowfast):
    ours = slowfast.SlowFast("r50").eval()
    converted = pretrained.convert_slowfast_state_dict(reference_slowfast.state_dict(), ours.depths,
                                                     ours.state_dict())
    ours.load_state_dict(converted, strict=True)
    video, mask = random_video(1, 16, 64, 64, seed=2), torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        x = ours.normalize(video, mask)                          # [1, 3, 16, 64, 64]
        reference = [x[:, :, ::4].clone(), x.clone()]            # it overwrites its input list
        for block in reference_slowfast.blocks[:5]:              # stem, fusions, res2..res5
            reference = block(reference)
        slow, fast, _, _ = ours.forward_features(video, mask)
        features = ours(video, mask)
    assert slow.shape == reference[0].shape == (1, 2048, 4, 2, 2)
    assert fast.shape == reference[1].shape == (1, 256, 16, 2, 2)
    torch.testing.assert_close(slow, reference[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, reference[1], rtol=1e-4, atol=1e-4)
    pooled = torch.cat([reference[0].mean((2, 3, 4)), reference[1].mean((2, 3, 4))], dim=1)
    torch.testing.assert_close(features, pooled, rtol=1e-4, atol=1e-4)

    # and back: our state dict exports to pytorchvideo's names and shapes through the same key map
    exported = {pretrained.slowfast_key_map(ours.depths)[k][0]: v for k, v in ours.state_dict().items()}
    head = {k: v for k, v in reference_slowfast.state_dict().items() if k.startswith(pretrained.KINETICS_HEAD_PREFIXES)}
    again = copy.deepcopy(reference_slowfast)
    again.load_state_dict(exported | head, strict=True)
    for key, tensor in reference_slowfast.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_pyslowfast_checkpoint_loads_strictly(reference_slowfast, tmp_path):
    reference_state = reference_slowfast.state_dict()
    pyslowfast_state = {ptv_to_pyslowfast(k): v for k, v in reference_state.items()}
    assert "s1.pathway0_stem.conv.weight" in pyslowfast_state
    assert "s2.pathway0_res0.branch2.a_bn.running_var" in pyslowfast_state
    assert "s4_fuse.conv_f2s.weight" in pyslowfast_state
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"epoch": 196, "model_state": pyslowfast_state}, path)

    ours = slowfast.SlowFast("r50", init=f"kinetics:{path}")
    expected = slowfast.SlowFast("r50")
    expected.load_state_dict(pretrained.convert_slowfast_state_dict(reference_state, expected.depths,
                                                                  expected.state_dict()))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    # hand-checked correspondences, independent of the key map
    assert torch.equal(ours.slow.conv1.weight, pyslowfast_state["s1.pathway0_stem.conv.weight"])
    assert torch.equal(ours.fast.layer4[2].bn3.running_var,
                       pyslowfast_state["s5.pathway1_res2.branch2.c_bn.running_var"])
    assert torch.equal(ours.lateral[2].conv.weight, pyslowfast_state["s3_fuse.conv_f2s.weight"])
    shortcut = pyslowfast_state["s3.pathway0_res0.branch1.weight"]         # [512, 256 + 64, 1, 1, 1]
    assert torch.equal(ours.slow.layer2[0].downsample[0].weight, shortcut[:, :256])
    assert torch.equal(ours.slow.layer2[0].downsample[0].lateral_weight, shortcut[:, 256:])
    assert torch.equal(ours.state_dict()["slow.layer2.0.downsample.0.weight"], shortcut)
    assert ours.mean.flatten().tolist() == pytest.approx([0.45] * 3)     # Kinetics normalisation
    assert ours.std.flatten().tolist() == pytest.approx([0.225] * 3)

    # strict: a stray key or a missing key is an error
    for broken in ({**pyslowfast_state, "s2.pathway0_res9.branch2.a.weight": torch.zeros(1)},
                   {k: v for k, v in pyslowfast_state.items() if k != "s3_fuse.bn.running_mean"}):
        torch.save({"model_state": broken}, path)
        with pytest.raises(ValueError, match="not a SlowFast-R50 state dict"):
            slowfast.SlowFast("r50", init=f"kinetics:{path}")


# ---------------------------------------------------------------------------------------------
# ImageNet inflation


def test_inflated_slow_pathway_reproduces_resnet50_frame_by_frame(monkeypatch):
    torch.manual_seed(0)
    resnet = randomize_(torchvision.models.resnet50(), seed=3).eval()
    monkeypatch.setattr(pretrained, "load_imagenet_resnet50", lambda: resnet)
    video_model = slowfast.SlowFast("r50", init="imagenet").eval()   # inflates `resnet`
    assert video_model.mean.flatten().tolist() == pytest.approx(list(slowfast.IMAGENET_MEAN))
    assert (video_model.slow.layer3[0].conv1.weight[:, :, [0, 2]] == 0).all()  # non-centre taps
    # the weights that read the laterals: new, small, not zero (so the laterals get gradients)
    lateral_weights = [m.lateral_weight for m in video_model.slow.modules()
                       if isinstance(m, slowfast.LateralInputConv3d)]
    assert len(lateral_weights) == 8                                      # conv_a and shortcut of 4 stages
    for w in lateral_weights:
        expected_std = slowfast.LATERAL_INIT_GAIN * (2 / (w.shape[0] * w[0, 0].numel())) ** 0.5   # He, fan_out
        assert w.std().item() == pytest.approx(expected_std, rel=0.1)

    outputs = {}

    def keep(name):
        return lambda module, inputs, output: outputs.__setitem__(name, output)

    stages = [("stem", video_model.slow.maxpool, resnet.maxpool)]
    stages += [(f"res{i + 2}", video_model.slow.layers[i][-1], getattr(resnet, f"layer{i + 1}"))
               for i in range(4)]
    for name, ours, theirs in stages:
        ours.register_forward_hook(keep(f"ours.{name}"))
        theirs.register_forward_hook(keep(f"resnet.{name}"))

    clip, mask = random_video(1, 12, 64, 64, seed=4), torch.ones(1, 12, dtype=torch.bool)

    def errors():
        """relative error of our slow pathway against ResNet-50 frame by frame, per stage"""
        with torch.no_grad():
            video_model(clip, mask)
            frames = video_model.normalize(clip, mask)[:, :, ::4]     # slow frames [1, 3, 3, 64, 64]
            B, C, T, H, W = frames.shape
            resnet(frames.transpose(1, 2).reshape(B * T, C, H, W))    # [B*T, 3, H, W]
        result = {}
        for name, _, _ in stages:
            ours_out = outputs[f"ours.{name}"]                        # [B, C, T, h, w]
            B, C, T, h, w = ours_out.shape
            ours_frames = ours_out.transpose(1, 2).reshape(B * T, C, h, w)
            result[name] = relative_error(ours_frames, outputs[f"resnet.{name}"])
        return result

    assert max(errors().values()) < 0.02                                 # as initialised: near ResNet-50
    with torch.no_grad():
        for w in lateral_weights:
            w.zero_()
    assert all(e < 1e-5 for e in errors().values()), errors()            # without laterals: exactly it


def test_imagenet_weights_offline_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(OSError) as error:
        slowfast.SlowFast("r50", init="imagenet")
    message = str(error.value)
    assert "\n" not in message and "--video-init random" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


# ---------------------------------------------------------------------------------------------
# Masking: padding changes nothing, in training too


@pytest.mark.parametrize("dims, time_dim", [((3, 5, 6, 4, 4), 2), ((3, 5, 4, 6), 3), ((3, 5, 6), 2)])
def test_masked_batch_norm_packs_by_slices_and_by_index_alike(dims, time_dim):
    """The CPU packing (per-sample slices) and the CUDA one (boolean indexing), run here on the CPU
    in float64: the same outputs, gradients and running statistics as BatchNorm on real steps."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(dims, generator=g, dtype=torch.float64) * 3 + 1
    lengths = [2, 6, 1]
    mask = torch.arange(dims[time_dim])[None, :] < torch.tensor(lengths)[:, None]
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(dims)](dims[1]).double()
    randomize_(bn, seed=16).train()
    results = []
    for pack in ("slices", "index"):
        norm, inputs = copy.deepcopy(bn), x.clone().requires_grad_()
        out = slowfast.masked_batch_norm(norm, inputs, mask, time_dim, pack=pack)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(17), dtype=out.dtype))
        results.append((out, inputs.grad, norm.weight.grad, norm.running_var, norm.num_batches_tracked))
        # padded steps: output zero, no gradient
        padded = ~mask.reshape([3] + [1] * (time_dim - 1) + [dims[time_dim]] + [1] * (len(dims) - time_dim - 1))
        assert (out.masked_select(padded.expand_as(out)) == 0).all()
        assert (inputs.grad.masked_select(padded.expand_as(out)) == 0).all()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # against nn.BatchNorm on the real steps alone, gathered by hand
    reference = copy.deepcopy(bn)
    real = torch.cat([x[b].narrow(time_dim - 1, 0, k) for b, k in enumerate(lengths)], dim=time_dim - 1)[None]
    expected = reference(real)
    got = torch.cat([results[0][0][b].narrow(time_dim - 1, 0, k) for b, k in enumerate(lengths)], dim=time_dim - 1)
    torch.testing.assert_close(got[None], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][3], reference.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", ["tiny", "small", "r50"])
@pytest.mark.parametrize("lengths, T1, T2", [([1, 6, 13], 16, 21), ([30, 31, 33], 33, 40)])
def test_slowfast_padding_changes_nothing_in_training(size, lengths, T1, T2):
    """Training mode: BatchNorm statistics come from real frames only, so the same real frames
    padded to two lengths with noise give the same features, gradients and running statistics."""
    torch.manual_seed(0)
    model = randomize_(slowfast.SlowFast(size), seed=11).double()
    real = torch.rand(len(lengths), 3, max(lengths), 32, 32, generator=torch.Generator().manual_seed(12),
                      dtype=torch.float64) * 255
    steps = [train_step_on(model, *pad_with_noise(real, lengths, T, 2, seed=T), time_dim=2) for T in (T1, T2)]
    assert_same_training_step(*steps)
    moved = [n for n, b in steps[0][3].items() if not torch.equal(b, model.get_buffer(n))]
    assert len(moved) == len(steps[0][3])                             # every BatchNorm was in training mode


# ---------------------------------------------------------------------------------------------
# Channels-last layout (model.place on CUDA)


def test_channels_last_layout_gives_the_same_results():
    """model.place() puts 3-D convolution weights channels-last on CUDA; the network computes the same
    values and gradients in that layout (checked here on the CPU), and its activations stay
    channels-last through the stem's max-pool and the fast stem. Eval mode: in training mode this
    small random network is so ill-conditioned at 40x40 that a 1e-5 relative change of one weight
    tensor moves its gradients by 10% (a ReLU or max-pool decision flips), so any change of
    summation order, a layout's included, does the same."""
    torch.manual_seed(0)
    plain = slowfast.SlowFast("tiny")
    randomize_(plain, seed=1)
    fast = slowfast.channels_last_(copy.deepcopy(plain))
    assert slowfast.is_channels_last(fast.slow.layer1[0].conv2.weight) and \
        not slowfast.is_channels_last(plain.slow.layer1[0].conv2.weight)
    video, mask = random_video(2, 12, 40, 40, seed=2), torch.arange(12)[None] < torch.tensor([[12], [7]])
    outputs, grads = [], []
    for net in (plain, fast):
        net.eval()
        y = net(video, mask)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape))
        outputs.append(y)
        grads.append({n: p.grad for n, p in net.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-4, msg=name)
    x = torch.randn(2, 4, 8, 16, 16)
    layout = x.contiguous(memory_format=torch.channels_last_3d)
    assert slowfast.is_channels_last(slowfast.FrameMaxPool()(layout)) and \
        torch.equal(slowfast.FrameMaxPool()(layout), slowfast.FrameMaxPool()(x))
    assert slowfast.is_channels_last(fast.fast.conv1(layout[:, :3]))
