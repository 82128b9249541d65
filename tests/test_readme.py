"""Every command the README shows in a code block runs, in README order, in a fresh folder, and
exits 0. Paths the user supplies are replaced by synthetic stand-ins made here (MELD.Raw by
`prepare.py synth`, the applause and image manifests by small generated files), and sizes are shrunk
by flags appended to each command (argparse keeps the last value). Skipped: making and entering the
virtual environment, `pip install` and the test command itself; `--device cuda` commands without a GPU."""

import os
import re
import shlex
import subprocess
import sys
import wave

import numpy as np
import torch
from PIL import Image

from conftest import ROOT

# The user's own paths in the README -> what stands in for them here.
USER_PATHS = {"/path/to/MELD.Raw": "data/synth", "path/to/MELD/data/MELD": "data/synth",
              "clip.mp4": "data/synth/test/output_repeated_splits_test/dia0_utt0.mp4",
              "conversation.csv": "data/conversation.csv"}
SMALL_MODEL = ["--video-size", "tiny", "--video-init", "random", "--num-frames", "8", "--crop-size", "32",
               "--audio-channels", "4,8,8,8", "--fusion-dim", "16", "--batch-size", "2", "--accum-steps", "1",
               "--eval-batch-size", "8", "--epochs", "1", "--min-epochs", "1", "--max-steps-per-epoch", "2",
               "--workers", "0", "--device", "cpu", "--unfreeze", ""]
SHRINK = {  # (script, first argument or None) -> flags appended
    ("train.py", None): SMALL_MODEL,
    ("prepare.py", "synth"): ["--sizes", "24,8,8"],
    ("prepare.py", None): ["--workers", "2"],
    ("evaluate.py", None): ["--device", "cpu", "--workers", "0"],
    ("evaluate.py", "predict"): ["--device", "cpu"],
    ("evaluate.py", "curves"): [],
    ("seeds.py", None): SMALL_MODEL + ["--data", "runs/demo/data/cache"],   # after its "--": train.py's flags
    ("bench.py", None): ["--clips", "2", "--width", "160", "--height", "90", "--seconds", "1", "--loader-clips", "8",
                         "--loader-workers", "0", "--batch-size", "2", "--num-frames", "8", "--crop-size", "32",
                         "--prepare-workers", "1", "--model-iters", "1", "--pairs", "1"],
}


def readme_blocks():
    """[(language, text)] of every fenced code block of the README, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def bash_commands(text):
    """Lines of a bash block, continuation lines joined, comments dropped -> [argv]."""
    return [argv for argv in (shlex.split(line, comments=True) for line in text.replace("\\\n", " ").splitlines())
            if argv]


def make_applause_manifest(folder, rng):
    """data/applause/manifest.csv as the README describes it: path,label of WAV clips."""
    (folder / "clips").mkdir(parents=True)
    lines = ["path,label"]
    for i in range(20):
        label = ("applause", "speech")[i % 2]
        samples = rng.normal(0, 0.3 if label == "applause" else 0.05, 8000)
        with wave.open(str(folder / "clips" / f"{i:04d}.wav"), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(16_000)
            f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        lines.append(f"clips/{i:04d}.wav,{label}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def make_image_manifest(folder, rng):
    """data/images/manifest.csv: path,label,split of JPEGs, a published split kept."""
    (folder / "images").mkdir(parents=True)
    lines = ["path,label,split"]
    splits = ("train",) * 8 + ("dev", "dev", "test", "test")
    for i, split in enumerate(splits):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "images" / f"{i:04d}.jpg")
        lines.append(f"images/{i:04d}.jpg,{('awe', 'fear')[i % 2]},{split}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def command_line(argv, text_model):
    """A README argv -> the argv run here: this repository's scripts, user paths replaced, sizes
    shrunk; None for what is not run here."""
    if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"] or argv[1:3] == ["-m", "venv"]:
        return None
    if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda") and not torch.cuda.is_available():
        return None
    argv = [USER_PATHS.get(a, a) for a in argv]
    if argv[0] == "torchrun":   # two processes on this CPU machine (gloo), as the DDP tests run
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                *argv[argv.index("--nproc_per_node") + 2:]]
        script_at = 5
    else:
        assert argv[0] == "python", argv
        argv = [sys.executable, *argv[1:]]
        script_at = 1
    script = argv[script_at]
    argv[script_at] = str(ROOT / script)
    first = argv[script_at + 1] if len(argv) > script_at + 1 and not argv[script_at + 1].startswith("-") else None
    extra = SHRINK.get((script, first), SHRINK.get((script, None)))
    if script in ("train.py", "seeds.py"):
        extra = extra + ["--text-model", text_model]
    return argv + extra


def test_every_readme_command_runs(tmp_path, tiny_bert):
    rng = np.random.default_rng(0)
    make_applause_manifest(tmp_path / "data" / "applause", rng)
    make_image_manifest(tmp_path / "data" / "images", rng)
    (tmp_path / "data" / "conversation.csv").write_text("Speaker,Utterance\nRachel,Hi.\nRoss,Hi! How are you?\n"
                                                        "Rachel,Fine. We were on a break!\n")
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    ran, outside = [], []
    for language, text in readme_blocks():
        if language == "bash":
            for argv in bash_commands(text):
                outside += [a for a in argv if a.startswith(("../", "/")) and a not in USER_PATHS]
                command = command_line(argv, tiny_bert)
                if command is None:
                    continue
                result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=environment,
                                        timeout=900)
                assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
                ran.append(shlex.join(argv))
        elif language == "python":  # the README's Python example, with its workers in this process
            code = text.replace("workers=8", "workers=0")
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"],
                           cwd=tmp_path, env=environment, check=True, timeout=600, capture_output=True)
            ran.append("python example")
    assert not outside, f"README paths outside the repository that the user does not supply: {outside}"
    assert len(ran) >= 15 and any("torchrun" in c for c in ran) and "python example" in ran, ran
    print("\n".join(["ran:"] + ran))


def test_the_commands_in_docs_use_settings_that_exist():
    """docs/*.md show longer runs than a test can make (real MELD, a GPU): their train.py and
    bench.py command lines, --train-args included, must still parse with today's flags."""
    import bench
    import train
    checked = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for language, text in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            for argv in bash_commands(text) if language == "bash" else []:
                if argv[1] == "train.py":
                    train.parse_args(argv[2:])
                elif argv[1] == "bench.py":
                    args = bench.get_args_parser().parse_args(argv[2:])
                    train.parse_args(shlex.split(args.train_args))
                else:
                    continue
                checked += 1
    assert checked >= 6
