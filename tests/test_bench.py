"""bench.py runs every section at a tiny size and ends with one JSON line (so that it cannot rot)."""

import collections
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--clips", "4", "--width", "64", "--height", "36", "--seconds", "1.5",
         "--num-frames", "8", "--crop-size", "32", "--batch-size", "2", "--loader-clips", "4",
         "--prepare-workers", "1", "--model-iters", "1", "--pairs", "1", "--matmul-size", "256",
         "--train-clips", "20", "--train-epochs", "1", "--train-paddings", "fixed,grouped", "--durations", "meld",
         "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["results"]
    by_bench = collections.defaultdict(list)
    for r in rows:
        by_bench[r["bench"]].append(r)
    assert [r["workers"] for r in by_bench["prepare"]] == [1]
    profile, = by_bench["worker_profile"]
    assert all(profile[k] > 0 for k in ("read", "decode", "transform", "audio", "collate", "jpeg_collate"))
    assert 0 < profile["jpeg_batch_mb"] < profile["batch_mb"]
    assert [(r["decode"], r["workers"]) for r in by_bench["loader"]] == [
        ("cpu", 0), ("cpu", 1), ("cpu", 2), ("device", 0), ("device", 1), ("device", 2)]
    assert all(r["shape"] == [2, 3, 8, 32, 32] and r["dtype"] == "torch.uint8" for r in by_bench["loader"])
    assert all(r["clips"] == 4 for r in by_bench["loader"])     # --loader-clips, even mid-epoch
    assert all(r["wait_ms_per_batch"] >= 0 and r["to_device_ms_per_batch"] >= 0 for r in by_bench["loader"])
    assert all(r["to_device_ms_per_batch"] > 0 for r in by_bench["loader"] if r["decode"] == "device")  # decodes
    assert [r["name"] for r in by_bench["model"]] == ["r50 video", "r50 video+audio+text", "r50 audio", "r50 text",
                                                      "demo video", "demo video+audio+text"]
    assert by_bench["model"][0]["frames"] == 8 and by_bench["model"][4]["frames"] == 16
    assert [r["name"] for r in by_bench["optimizer"]] == ["AdamW step (foreach)"]
    assert by_bench["optimizer"][0]["seconds_per_step"] > 0
    assert by_bench["slowfast"][0]["name"] == "ours"
    if len(by_bench["slowfast"]) == 2:  # pytorchvideo installed: the comparison ran
        assert by_bench["slowfast"][0]["time_ratio_vs_pytorchvideo"] > 0
    assert all(r["clips_per_s"] > 0 for b in ("prepare", "loader", "model", "slowfast") for r in by_bench[b])
    assert all(0 < r["flop_utilisation"] for r in by_bench["model"] + by_bench["slowfast"])
    assert report["matmul_gflop_per_s"] > 0
    masking = by_bench["masked_bn"]
    assert [r["name"] for r in masking] == [
        "unpadded", "half padded, plain BN", "half padded, masked BN", "MELD lengths, padded to --num-frames",
        "MELD lengths, padded to the longest"]
    assert masking[0]["time_ratio"] == 1.0 and all(r["time_ratio"] > 0 for r in masking)
    assert masking[2]["lengths"] == [8, 3] and masking[3]["frames"] == 8
    assert masking[3]["lengths"] == masking[4]["lengths"]
    assert masking[4]["frames"] == -(-max(masking[4]["lengths"]) // 4) * 4
    assert [(r["decode"], r["padding"], r["epoch"]) for r in by_bench["train"]] == [
        (decode, padding, epoch)
        for decode in ("cpu", "device") for padding in ("fixed", "grouped") for epoch in (0, "all")]
    assert all(0 <= r["data_wait"] <= 1 for r in by_bench["train"])
    assert all(r["meld_epoch_s"] > 0 for r in by_bench["train"] if r["epoch"] == "all")
