"""bench.py runs at a tiny size and ends with one JSON line (so that it cannot rot)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--clips", "4", "--width", "64", "--height", "36", "--seconds", "1.5",
         "--num-frames", "4", "--crop-size", "16", "--batch-size", "2", "--loader-clips", "4",
         "--prepare-workers", "1", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    benches = [(r["bench"], r["workers"]) for r in report["results"]]
    assert benches == [("prepare", 1), ("loader", 0), ("loader", 1), ("loader", 2)]
    assert all(r["clips_per_s"] > 0 for r in report["results"])
    assert report["results"][3]["shape"] == [2, 3, 4, 16, 16]
