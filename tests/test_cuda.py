"""The CUDA paths: fp16 autocast with a GradScaler, masking under fp16, a --demo run on the GPU.
Skipped on machines without a GPU (CI); run them where there is one:

    python -m pytest tests/test_cuda.py tests/test_train.py -k cuda

(test_train.py's exact-resume and DDP tests take a CUDA variant too; DDP over NCCL needs 2 GPUs.)
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torchvision.io import decode_jpeg

import data
import loading
import model as model_lib
import slowfast
import train
from conftest import ROOT, data_config, needs_cuda

pytestmark = needs_cuda()
CUDA = torch.device("cuda")


def small_model(tiny_bert, **kwargs):
    """On the GPU as train.py places it: 3-D convolutions channels-last (model.place)."""
    torch.manual_seed(0)
    net = model_lib.EmotionModel(model_lib.ModelConfig(**dict(dict(
        modalities=("video", "audio", "text"), video_size="tiny", video_init="random", text_model=str(tiny_bert),
        n_mels=16, audio_channels=(8, 16), fusion_dim=32), **kwargs)))
    return model_lib.place(net, CUDA)


def random_batch(B=4, T=16, size=32, n_mels=16, A=40, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(video=torch.randint(0, 256, (B, 3, T, size, size), dtype=torch.uint8, generator=g),
                video_mask=torch.ones(B, T, dtype=torch.bool), audio=torch.randn(B, n_mels, A, generator=g),
                audio_mask=torch.ones(B, A, dtype=torch.bool), input_ids=torch.randint(1000, 2000, (B, L), generator=g),
                attention_mask=torch.ones(B, L, dtype=torch.long), token_type_ids=torch.zeros(B, L, dtype=torch.long),
                emotion=torch.arange(B) % 7, sentiment=torch.arange(B) % 3)


def test_auto_amp_is_fp16_with_a_scaler_on_cuda():
    dtype, scaler = train.amp_settings(train.parse_args([]), CUDA)
    assert dtype == torch.float16 and scaler.is_enabled()


def test_fp16_gradients_match_fp32_and_an_overflow_skips_the_step_and_lowers_the_scale(tiny_bert, monkeypatch):
    """train.py's step under fp16 autocast + GradScaler gives the fp32 gradients (unscaled, within
    fp16 precision); a step whose gradients overflow is skipped, and scaler.update() still halves
    the scale (the seed project skipped such steps without updating the scaler). The fp32 reference
    is fp32: TF32 off (PyTorch lets cuDNN convolutions use TF32 by default, whose 10-bit mantissa
    is fp16's, so the reference would carry the error it measures, by as much as the GPU's choice
    of kernels makes it)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    args = train.parse_args([])
    batch = data.to_device(random_batch(), CUDA)
    criteria = {t: c.to(CUDA) for t, c in train.build_criteria(args, list(range(7)), [("emotion", 7), ("sentiment",
                                                                                                       3)]).items()}

    def gradients(amp_dtype):
        net = small_model(tiny_bert).eval()  # eval: BatchNorm uses running statistics, the same in both
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is not None)
        loss = train.accumulate_gradients(net, [batch], criteria, args.sentiment_weight, amp_dtype, scaler)
        scaler.unscale_(torch.optim.SGD(net.parameters(), lr=0))
        return loss, {n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None}

    loss16, grads16 = gradients(torch.float16)
    loss32, grads32 = gradients(None)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert grads16.keys() == grads32.keys() and len(grads32) > 20
    errors = {name: float((grads16[name] - grads32[name]).norm() / grads32[name].norm().clamp_min(1e-12))
              for name in grads32}  # per tensor, for the message
    every16, every32 = (torch.cat([g[name].flatten() for name in grads32]) for g in (grads16, grads32))
    worst = sorted(errors.items(), key=lambda item: -item[1])[:3]
    # All gradients together (measured on an H100: 0.013). Not tensor by tensor: some are zero up to
    # rounding (attention key biases), and in this small random network some stem and BatchNorm
    # gradients move by tens of percent when fp16 rounding flips a max-pool or ReLU decision.
    assert float((every16 - every32).norm() / every32.norm()) < 0.02, worst

    net = small_model(tiny_bert).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    # a scale the first step cannot overflow at (at 2^16, the default, a gradient above 1 in any
    # activation overflows fp16, and then the step is rightly skipped: a property of the network)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    train.accumulate_gradients(net, [batch], criteria, args.sentiment_weight, torch.float16, scaler)
    norm, stepped = train.optimizer_step(net, optimizer, scaler, clip_grad=1.0)
    assert stepped and scaler.get_scale() == 2.0 ** 8
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    scaler.update(1e38)  # so large that fp16 gradients overflow
    train.accumulate_gradients(net, [batch], criteria, args.sentiment_weight, torch.float16, scaler)
    norm, stepped = train.optimizer_step(net, optimizer, scaler, clip_grad=1.0)
    assert not stepped and scaler.get_scale() == pytest.approx(1e38 / 2, rel=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_channels_last_placement_computes_what_the_plain_layout_does(tiny_bert, monkeypatch):
    """model.place() on CUDA: 3-D convolution weights and the video activations channels-last;
    outputs and gradients (fp32 without TF32, eval mode) as with the plain layout."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = small_model(tiny_bert, modalities=("video",)).eval()
    assert slowfast.is_channels_last(net.video.slow.layer1[0].conv2.weight)
    plain = small_model(tiny_bert, modalities=("video",)).eval()
    for m in plain.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous()
    assert not slowfast.is_channels_last(plain.video.slow.layer1[0].conv2.weight)
    batch = data.to_device(random_batch(B=2, T=12), CUDA)
    batch["video_mask"][1, 7:] = False
    results = []
    for m in (net, plain):
        out = m(batch)["emotion"]
        out.backward(torch.cos(torch.arange(out.numel(), device=CUDA, dtype=out.dtype)).view(out.shape))
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[1][1].items():
        assert (results[0][1][name] - grad).norm() <= 1e-3 * grad.norm() + 1e-7, name


def test_video_padding_does_not_change_logits_under_fp16(tiny_bert):
    """Padded frames (noise) are masked under fp16 autocast on the GPU as on the CPU in fp32: a
    padded clip's logits equal the unpadded clip's within fp16 rounding, far closer than the
    logits the same clip gets when its padding is (wrongly) treated as real frames."""
    net = small_model(tiny_bert, modalities=("video",)).eval()
    lengths, T = [1, 5, 8, 13, 16], 16
    batch = random_batch(B=len(lengths), T=T)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        padded = net(data.to_device(dict(video=batch["video"], video_mask=mask), CUDA))["emotion"].float()
        unmasked = net(data.to_device(dict(video=batch["video"], video_mask=torch.ones_like(mask)), CUDA))
        for i, k in enumerate(lengths[:-1]):  # the last clip has no padding
            alone = net(data.to_device(dict(video=batch["video"][i:i + 1, :, :k],
                                            video_mask=torch.ones(1, k, dtype=torch.bool)), CUDA))["emotion"].float()
            wrong = (unmasked["emotion"][i].float() - alone[0]).abs().max()
            assert (padded[i] - alone[0]).abs().max() < 0.05 * wrong, (i, k)


@pytest.mark.parametrize("train_mode", [True, False])
def test_decoding_on_cuda_gives_the_workers_batch_within_rounding(cache, tokenizer, train_mode):
    """decode="device" on CUDA (nvJPEG, pinned JpegVideo through worker processes) against the
    workers' CPU decode: the same clips, masks and padding; decoded frames and transformed clips
    equal up to the rounding of nvJPEG and the CUDA kernels (differences printed)."""
    config = data_config(num_frames=24, crop_size=40)
    batches = {}
    for decode in loading.DECODES:
        ds = data.ClipDataset(cache, "train", config, tokenizer, train=train_mode, seed=5, decode=decode)
        loader = data.make_loader(ds, batch_size=4, train=train_mode, workers=2)
        loader.sampler.set_epoch(1)
        batches[decode] = list(loader)
    frame_diffs, clip_diffs = [], []
    for workers, jpegs in zip(batches["cpu"], batches["device"]):
        video = jpegs["video"]
        files = list(video.data.split(video.sizes))
        on_cuda = torch.stack(decode_jpeg(files, device=CUDA)).cpu().float()
        frame_diffs.append((on_cuda - torch.stack(decode_jpeg(files)).float()).abs().flatten())
        batch = data.to_device(jpegs, CUDA)
        assert batch["video"].device.type == "cuda" and batch["video"].dtype == torch.uint8
        assert batch["ids"] == workers["ids"] and torch.equal(batch["video_mask"].cpu(), workers["video_mask"])
        padding = ~workers["video_mask"][:, None, :, None, None].expand_as(workers["video"])
        assert batch["video"].cpu()[padding].eq(0).all()
        clip_diffs.append((batch["video"].cpu().float() - workers["video"].float()).abs()[~padding])
    frame_diffs, clip_diffs = torch.cat(frame_diffs), torch.cat(clip_diffs)
    print(f"nvJPEG vs CPU frames: mean {frame_diffs.mean():.3f}, max {frame_diffs.max():.0f}; "
          f"transformed clips: mean {clip_diffs.mean():.3f}, max {clip_diffs.max():.0f} (levels of 255)")
    assert frame_diffs.mean() < 1.0 and clip_diffs.mean() < 1.5


def test_demo_runs_on_cuda_with_fp16(tiny_bert, tmp_path):
    """python train.py --demo --device cuda: fp16 autocast, frames decoded on the GPU (--decode
    auto), finite losses, GPU memory in the log, every output written."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--demo", "--device", "cuda", "--out", str(out), "--text-model",
         str(tiny_bert), "--epochs", "2", "--min-epochs", "2", "--max-steps-per-epoch", "3"],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cuda, 1 process(es), amp torch.float16" in result.stdout
    assert "video frames decoded on cuda by to_device" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["train_loss"] == r["train_loss"] and r["peak_memory_mb"] > 0 for r in log)
    assert (out / "best.pt").is_file() and (out / "test_metrics.json").is_file()


def test_a_padded_training_step_makes_no_host_sync():
    """SlowFast and the audio CNN forward and backward in training mode on padded batches, laid
    out as train.py places them (channels-last), with the lengths given on the host as collate
    gives them: torch.cuda.set_sync_debug_mode("error") raises at any host sync inside."""
    torch.manual_seed(0)
    net = model_lib.place(slowfast.SlowFast("tiny"), CUDA).train()
    config = model_lib.ModelConfig(modalities=("audio",), video_init="random", n_mels=16, audio_channels=(8, 16))
    audio = model_lib.AudioCNN(config).to(CUDA).train()
    lengths, audio_lengths = [16, 5, 11, 16], [40, 13, 0, 27]
    video = torch.randint(0, 256, (4, 3, 16, 32, 32), dtype=torch.uint8).to(CUDA)
    mask = (torch.arange(16)[None] < torch.tensor(lengths)[:, None]).to(CUDA)
    mel = torch.randn(4, 16, 40, device=CUDA)
    audio_mask = (torch.arange(40)[None] < torch.tensor(audio_lengths)[:, None]).to(CUDA)
    for checked in (False, True):   # the first step warms up cuDNN and the allocator
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            loss = net(video, mask, lengths).sum() + audio(mel, audio_mask, audio_lengths).sum()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is not None for p in net.parameters())


def test_one_ahead_moves_the_next_batch_on_a_side_stream_and_hands_out_the_same_batches(cache, tokenizer):
    """loading.OneAhead on CUDA: the batches equal those data.to_device gives one by one (decoded on
    the device), in the loader's order, and each is ready on the step's stream."""
    config = data_config(num_frames=16, crop_size=32)
    ds = data.ClipDataset(cache, "train", config, tokenizer, train=False, decode="device")
    loader = data.make_loader(ds, batch_size=4, train=False, workers=0)
    direct = [data.to_device(batch, CUDA) for batch in loader]
    ahead = list(loading.OneAhead(loader, data.to_device, CUDA))
    assert len(ahead) == len(direct) >= 2
    for a, b in zip(ahead, direct):
        assert a.keys() == b.keys() and a["ids"] == b["ids"]
        for key, value in a.items():
            if torch.is_tensor(value):
                assert value.is_cuda and torch.equal(value, b[key]), key
