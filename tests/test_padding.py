"""Padding that costs nothing: masked layers that size their work from lengths known on the host
(no tensor value read, so no host sync on CUDA), batches padded only to their longest clip, clips
grouped by frame count, and the batch after the current one moved ahead."""

import copy
import statistics

import pytest
import torch
import torch.nn as nn
from test_train import assert_killed_run_resumes_exactly
from torch._subclasses.fake_tensor import FakeTensorMode

import bench
import data
import loading
import meld
import model as model_lib
import slowfast
from conftest import data_config
from test_model import randomize_


def channels_last_params_(net):
    """slowfast.channels_last_ for a network made under FakeTensorMode (module.to cannot swap fake
    parameters): every Conv3d parameter replaced by its channels-last copy."""
    for m in net.modules():
        if isinstance(m, nn.Conv3d):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last_3d)))
    return net


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_padded_training_step_reads_no_tensor_value(layout, monkeypatch):
    """SlowFast-R50 forward and backward in training mode on a padded batch, and the audio CNN's,
    under FakeTensorMode: tensors without values, where nonzero, boolean indexing, .item() or
    .tolist() of a tensor raise. With the lengths given on the host nothing does, so on CUDA these
    steps make no host sync. Channels-last (as on CUDA) packs by gathered rows, once per BatchNorm."""
    gathers = []
    gather = slowfast.GatherRows.apply
    monkeypatch.setattr(slowfast.GatherRows, "apply", lambda *a: gathers.append(a[0].shape) or gather(*a))
    lengths = [32, 12, 32, 7]
    with FakeTensorMode():
        mask = torch.arange(32)[None] < torch.tensor(lengths)[:, None]
        with pytest.raises(Exception):  # the mode refuses what reads values: the lengths from the mask
            slowfast.RealSteps(mask)
        net = slowfast.SlowFast("r50").train()
        video = torch.randint(0, 256, (4, 3, 32, 224, 224), dtype=torch.uint8)
        if layout == "channels_last":
            channels_last_params_(net)
            video = video.contiguous(memory_format=torch.channels_last_3d)
        features = net(video, mask, lengths)
        features.sum().backward()
        assert features.shape == (4, 2304) and net.slow.conv1.weight.grad.shape == net.slow.conv1.weight.shape

        config = model_lib.ModelConfig(modalities=("audio",), video_init="random")
        audio = model_lib.AudioCNN(config).train()
        audio_lengths = [300, 120, 0]
        audio_mask = torch.arange(300)[None] < torch.tensor(audio_lengths)[:, None]
        out = audio(torch.randn(3, config.n_mels, 300), audio_mask, audio_lengths)
        out.sum().backward()
        assert out.shape == (3, audio.out_channels)
    batch_norms = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert len(gathers) == (batch_norms if layout == "channels_last" else 0)


def test_real_steps_know_the_rows_and_the_slow_pathways_steps():
    mask = torch.arange(6)[None] < torch.tensor([[6], [2], [0]])
    steps = slowfast.RealSteps(mask, [6, 2, 0])
    assert steps.padded and steps.rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    slow = steps.every(4)
    assert slow.lengths == [2, 1, 0] and torch.equal(slow.mask, mask[:, ::4]) and slow.rows.tolist() == [0, 1, 2]
    assert not slowfast.RealSteps(torch.ones(2, 3, dtype=torch.bool), [3, 3]).padded
    with pytest.raises(ValueError, match="do not fit"):
        slowfast.RealSteps(mask, [7, 2, 0])


def test_channels_last_training_packs_by_rows_as_the_plain_layout_packs_by_slices():
    """Training mode, float64, padded clips: the channels-last network (index_select/index_copy of
    its rows) and the contiguous one (per-sample slices) give the same features, gradients and
    running statistics."""
    torch.manual_seed(0)
    plain = randomize_(slowfast.SlowFast("tiny"), seed=3).double().train()
    rows = slowfast.channels_last_(copy.deepcopy(plain))
    lengths = [16, 5, 11]
    video = torch.randint(0, 256, (3, 3, 16, 32, 32), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    mask = torch.arange(16)[None] < torch.tensor(lengths)[:, None]
    results = []
    for net, layout in ((plain, torch.contiguous_format), (rows, torch.channels_last_3d)):
        out = net(video.contiguous(memory_format=layout), mask, lengths)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape))
        results.append((out, {n: p.grad for n, p in net.named_parameters()}, dict(net.named_buffers())))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-9, atol=1e-12, msg=name)
    for name, buffer in results[0][2].items():
        torch.testing.assert_close(buffer, results[1][2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_padding_to_the_longest_clip_gives_what_padding_to_num_frames_gives(cache, tokenizer):
    """The loader's batches padded to their longest clip (rounded up to alpha = 4) instead of to
    --num-frames: the same real frames and masks, fewer padded ones, and a training step of the
    video network on them (float64) gives the same features, gradients and running statistics."""
    batches = {}
    for padding in data.VIDEO_PADDINGS:
        config = data_config(("video",), num_frames=48, crop_size=32, video_padding=padding)
        ds = data.ClipDataset(cache, "train", config, tokenizer, train=True, seed=1)
        batches[padding] = list(data.make_loader(ds, batch_size=2, train=True, workers=0, pin_memory=False))
    shorter = 0
    torch.manual_seed(0)
    net = randomize_(slowfast.SlowFast("tiny"), seed=5).double()
    for longest, fixed in zip(batches["longest"], batches["fixed"]):
        T = longest["video"].shape[2]
        assert longest["video_lengths"] == fixed["video_lengths"] and fixed["video"].shape[2] == 48
        assert T == min(48, -(-max(longest["video_lengths"]) // 4) * 4)
        assert torch.equal(longest["video"], fixed["video"][:, :, :T]) and not fixed["video"][:, :, T:].any()
        assert torch.equal(longest["video_mask"], fixed["video_mask"][:, :T])
        shorter += T < 48
        steps = []
        for batch in (longest, fixed):
            copy_ = copy.deepcopy(net).train()
            out = copy_(batch["video"], batch["video_mask"], batch["video_lengths"])
            out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape))
            steps.append((out, {n: p.grad for n, p in copy_.named_parameters()}, dict(copy_.named_buffers())))
        torch.testing.assert_close(steps[0][0], steps[1][0], rtol=1e-9, atol=1e-12)
        for name in steps[0][1]:
            torch.testing.assert_close(steps[0][1][name], steps[1][1][name], rtol=1e-8, atol=1e-12, msg=name)
        for name in steps[0][2]:
            torch.testing.assert_close(steps[0][2][name], steps[1][2][name], rtol=1e-9, atol=1e-12, msg=name)
    assert shorter > 0


def test_padded_length_rounds_up_to_alpha_but_never_past_num_frames():
    assert data.padded_length([5, 2], multiple=4) == 8 and data.padded_length([8, 2], multiple=4) == 8
    assert data.padded_length([5, 2], multiple=4, limit=6) == 6        # --num-frames 6: not past it
    assert data.padded_length([3, 1], multiple=4, limit=3) == 3
    assert data.padded_length([0, 0], multiple=4) == 4 and data.padded_length([5], num_frames=32) == 32
    samples = [dict(id=str(k), emotion=0, sentiment=0, video=torch.zeros(3, k, 4, 4, dtype=torch.uint8))
               for k in (3, 1)]
    assert data.collate(samples, frame_multiple=4, frame_limit=3)["video"].shape[2] == 3


def test_grouping_by_length_batches_clips_of_similar_frame_counts():
    """--group-by-length with video on MELD-like lengths (MELD train's durations at 10 fps, at most
    32 frames): the frames of a batch span a narrow range, so padding to the longest clip pads
    little; without grouping most batches span most of the range."""
    frames = bench.meld_frame_counts(2000, 32, fps=10)
    spans, padded = {}, {}
    for grouped in (False, True):
        sampler = loading.ClipSampler([0] * len(frames), shuffle=True, seed=0, batch_size=16,
                                      lengths=frames if grouped else None)
        order = [i for _, i, _ in sampler]
        batches = [order[k:k + 16] for k in range(0, len(order) - 15, 16)]
        spans[grouped] = statistics.median(max(frames[i] for i in b) - min(frames[i] for i in b) for b in batches)
        slots = sum(data.padded_length([frames[i] for i in b], multiple=4) * len(b) for b in batches)
        padded[grouped] = 1 - sum(frames[i] for b in batches for i in b) / slots
    fixed = 1 - sum(frames) / (32 * len(frames))
    assert spans[True] <= 1 and spans[False] >= 20, spans
    assert padded[True] < 0.1 < 0.2 < padded[False] <= fixed, (padded, fixed)   # MELD: nearly every batch holds a 32


def test_group_lengths_count_frames_with_video_then_tokens(cache, tokenizer):
    config = data_config(("video", "text"), num_frames=24, crop_size=32)
    ds = data.ClipDataset(cache, "train", config, tokenizer, train=True, seed=1)
    keys = data.group_lengths(ds)
    frames = [min(ds.entries[r.id]["frames"], 24) for r in ds.rows]
    tokens = [len(t["input_ids"]) for t in ds.tokens]
    assert sorted(range(len(keys)), key=keys.__getitem__) == sorted(range(len(keys)),
                                                                    key=lambda i: (frames[i], tokens[i]))
    assert data.group_lengths(data.ClipDataset(cache, "train", data_config(("video",), num_frames=24), tokenizer,
                                               train=True, seed=1)) == frames
    with pytest.raises(ValueError, match="video or the text"):
        data.make_loader(data.ClipDataset(cache, "train", data_config(("audio",)), tokenizer, train=True), 2,
                         train=True, workers=0, group_by_length=True)


def test_grouped_video_run_killed_mid_epoch_resumes_exactly(cache, tiny_bert, tmp_path):
    """--group-by-length with video, padded to each batch's longest clip: a run killed (SIGKILL)
    inside epoch 1 and resumed ends bitwise as the uninterrupted run."""
    extra = ("--num-frames", "24", "--group-by-length", "--deterministic", "--save-every", "1")
    log = assert_killed_run_resumes_exactly(cache, tiny_bert, tmp_path, extra, epoch=1, step=2, epochs=2)
    assert len(log) == 2


def test_one_ahead_hands_out_the_batches_in_order_on_the_device():
    """loading.OneAhead on the CPU: each batch moved by to_device when asked for, in the loader's
    order, and nothing after the last (CUDA, with its side stream: tests/test_cuda.py)."""
    batches = [dict(x=torch.full((2,), float(i)), ids=[i]) for i in range(3)]
    moved = []
    out = list(loading.OneAhead(batches, lambda b, d: moved.append(b["ids"][0]) or data.to_device(b, d), "cpu"))
    assert [b["ids"] for b in out] == [[0], [1], [2]] and moved == [0, 1, 2]
    assert all(torch.equal(b["x"], batches[i]["x"]) for i, b in enumerate(out))


def test_meld_durations_table_gives_meld_like_lengths():
    frames = bench.meld_frame_counts(4000, 32, fps=10, seed=1)
    assert min(frames) >= 1 and max(frames) == 32
    assert 0.6 < sum(f < 32 for f in frames) / len(frames) < 0.7       # MELD train: 65% shorter than 32 frames
    assert 0.25 < 1 - sum(frames) / (32 * len(frames)) < 0.31          # and 28% of the frame slots padding
    assert len(meld.MELD_TRAIN_SECONDS) == 21 and list(meld.MELD_TRAIN_SECONDS) == sorted(meld.MELD_TRAIN_SECONDS)
