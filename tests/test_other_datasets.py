"""--dataset csv: any labelled videos, audio files or images. Three synthetic data sets are made
here, each prepared with `prepare.prepare_csv` and learnt by a short CPU run of train.py:

- applause vs tone: 16 kHz WAV files, two classes (audio only; ROC-AUC and AP reported);
- shapes: 28 classes of 48x48 PNGs (7 colours x 4 shapes), an image classifier (one frame);
- synth MELD's temporal pair (surprise: a disk sweeping down; fear: the same frames in reverse), so
  that only a model that sees the order of frames separates them.

Plus the failure paths: a missing and a corrupt file in a manifest, and a label unknown to train.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

import meld
import prepare
import runs
import train
from conftest import ROOT

AUDIO_RATE = 16_000
SETTINGS = prepare.PrepareSettings(fps=10, short_side=48, max_seconds=15.0, jpeg_quality=90)


# ---------------------------------------------------------------------------------------------- generators

def write_wav(path, samples, rate=AUDIO_RATE):
    """float samples in [-1, 1] -> mono 16-bit PCM WAV."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def applause_or_tone(label, rng, rate=AUDIO_RATE):
    """1–2 s of audio. applause: 3–7 short bursts (40–120 ms) of broadband noise with a fast decay,
    one in each equal slot of the clip, so that silence separates them; tone: a steady sine at
    200–2,000 Hz. Both over faint background noise."""
    n = int(rng.uniform(1.0, 2.0) * rate)
    x = rng.normal(0, 0.01, n)                                    # background
    if label == "applause":
        bursts = int(rng.integers(3, 8))
        slot = n // bursts                                        # >= 142 ms
        for i in range(bursts):
            length = int(rng.uniform(0.04, 0.12) * rate)
            start = i * slot + int(rng.integers(0, slot - length))
            envelope = np.exp(-np.arange(length) / (0.3 * length))
            x[start:start + length] += rng.uniform(0.2, 0.5) * envelope * rng.normal(0, 1, length)
    else:
        t = np.arange(n) / rate
        x += rng.uniform(0.15, 0.4) * np.sin(2 * np.pi * rng.uniform(200, 2000) * t + rng.uniform(0, 2 * np.pi))
    return x


def make_audio_set(folder, n=80, seed=0):
    """n WAV files, half applause, half tone; manifest.csv with path,label (no split column)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = ("applause", "tone")[i % 2]
        write_wav(folder / f"sound{i:03d}.wav", applause_or_tone(label, rng))
        rows.append(dict(path=f"sound{i:03d}.wav", label=label))
    return write_manifest(folder / "manifest.csv", rows)


COLOURS = {"red": (220, 40, 40), "green": (40, 190, 50), "blue": (40, 70, 230), "yellow": (230, 220, 40),
           "magenta": (210, 50, 210), "cyan": (40, 210, 210), "white": (235, 235, 235)}
SHAPES = ("disk", "square", "triangle", "ring")  # all unchanged by a horizontal flip


def shape_image(colour, shape, rng, size=48):
    """uint8 [3, size, size]: a shape of a colour on a dark noisy background, with jitter in
    position, size and colour, and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-4, 4, size=2)
    r = rng.uniform(8, 12)
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == "square":
        mask = (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    elif shape == "triangle":  # apex up
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2 * 1.1)
    else:
        mask = (dy ** 2 + dx ** 2 <= r ** 2) & (dy ** 2 + dx ** 2 >= (0.55 * r) ** 2)
    image = rng.uniform(10, 50, size=3)[:, None, None] + rng.normal(0, 8, size=(3, size, size))
    fill = np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.0) + rng.normal(0, 8, size=3)
    image = np.where(mask[None], fill[:, None, None] + rng.normal(0, 8, size=(3, size, size)), image)
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))


def make_image_set(folder, per_split=(12, 3, 3), seed=0):
    """28 classes ("red-disk" …), PNGs with an explicit split column: per_split images per class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            label = f"{colour}-{shape}"
            for split, count in zip(meld.SPLITS, per_split):
                for i in range(count):
                    name = f"images/{label}-{split}{i}.png"
                    (folder / name).parent.mkdir(exist_ok=True)
                    write_png(shape_image(colour, shape, rng), str(folder / name))
                    rows.append(dict(path=name, label=label, split=split))
    return write_manifest(folder / "manifest.csv", rows)


def make_temporal_pair_set(folder, n=120, seed=0):
    """n clips of synth MELD's temporal pair, made by its own generator (prepare.synth_frames): even i
    surprise (the disk sweeps down), odd i fear (the frames of a surprise clip of its own random draw
    in reverse order, so the disk sweeps up). Both classes show the same set of frames and the same
    colour: a single frame, or a mean over frames, cannot tell them apart. Video only, 96x54, 12 fps,
    1.5–3 s; labelled with the emotion names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = prepare.TEMPORAL_PAIR[i % 2]
        frames = prepare.synth_frames(label, rng.uniform(1.5, 3.0), 96, 54, 12, seed=int(rng.integers(2 ** 31)))
        prepare.write_mp4(folder / f"clip{i:03d}.mp4", frames, 12)  # no audio stream
        rows.append(dict(path=f"clip{i:03d}.mp4", label=label))
    return write_manifest(folder / "manifest.csv", rows)


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- runs

def prepared(tmp_path_factory, name, make, **prepare_kwargs):
    """Make a data set with `make(folder)` and prepare it into a cache; -> the cache folder."""
    folder = tmp_path_factory.mktemp(name)
    manifest = make(folder / "source")
    prepare.prepare_csv(manifest, folder / "cache", settings=SETTINGS, progress=False, **prepare_kwargs)
    return folder / "cache"


@pytest.fixture(scope="module")
def audio_cache(tmp_path_factory):
    return prepared(tmp_path_factory, "applause", make_audio_set, split_ratio=(0.5, 0.25, 0.25), seed=0)  # 40/20/20


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory):
    return prepared(tmp_path_factory, "shapes", make_image_set)


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory):  # 60/30/30 clips: a test split large enough to read 85% from
    return prepared(tmp_path_factory, "pair", make_temporal_pair_set, split_ratio=(0.5, 0.25, 0.25), seed=0)


def run_script(script, *argv):
    """A script of the repository in a subprocess (one thread, offline); fails the test on an error."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True,
                            env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_csv(cache, out, *extra):
    """train.py --dataset csv on a prepared cache (random init, CPU) -> the test metrics of best.pt."""
    run_script("train.py", "--dataset", "csv", "--data", str(cache), "--out", str(out), "--video-init", "random",
               "--unfreeze", "", "--accum-steps", "1", "--workers", "0", "--device", "cpu", "--seed", "0", *extra)
    return json.loads((out / "test_metrics.json").read_text())["test"]["label"]


# ---------------------------------------------------------------------------------------------- learning

@pytest.mark.parametrize("encoder", ["lstm", "cnn"])
def test_audio_encoders_tell_applause_from_tones(audio_cache, tmp_path, encoder):
    """Two classes (chance 50%): each audio encoder reaches >= 90% test accuracy, and the binary
    metrics (ROC-AUC, average precision) are reported; evaluate.py rebuilds the run from best.pt."""
    extra = dict(lstm=["--audio-encoder", "lstm", "--audio-features", "mfcc", "--scheduler", "plateau", "--lr", "1e-3",
                       "--batch-size", "4", "--epochs", "7", "--min-epochs", "7"],
                 cnn=["--audio-encoder", "cnn", "--audio-channels", "8,16,16,16", "--lr", "3e-3", "--batch-size", "8",
                      "--epochs", "10", "--min-epochs", "10"])[encoder]
    out = tmp_path / "run"
    metrics = train_csv(audio_cache, out, "--modalities", "audio", "--fusion-dim", "32", *extra)
    print(f"\naudio {encoder}: test accuracy {metrics['accuracy']:.3f}, ROC-AUC {metrics['roc_auc']:.3f}, "
          f"AP {metrics['average_precision']:.3f}")
    assert metrics["n"] == 20 and metrics["accuracy"] >= 0.9
    assert metrics["roc_auc"] >= 0.9 and metrics["average_precision"] >= 0.9
    assert set(metrics["per_class"]) == {"applause", "tone"}
    assert runs.load_checkpoint(out / "best.pt")["tasks"] == [["label", ["applause", "tone"]]]
    if encoder == "lstm":  # evaluate.py: the model and the data settings rebuilt from best.pt alone
        run_script("evaluate.py", "--checkpoint", str(out / "best.pt"), "--data", str(audio_cache), "--split", "test",
                   "--out", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu")
        again = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())["single_view"]["label"]
        assert again["confusion"] == metrics["confusion"]
        assert again["roc_auc"] == pytest.approx(metrics["roc_auc"])
        # the classes are the checkpoint's, whatever the evaluated folder's train split holds
        other = tmp_path / "other-cache"
        shutil.copytree(audio_cache, other)
        train_rows = list(csv.DictReader(open(other / "train_clips.csv", newline="")))
        train_rows[0]["label"] = "aardvark"                          # sorts first: would shift every index
        write_manifest(other / "train_clips.csv", train_rows)
        for folder in ("relabelled", "no-train-split"):
            if folder == "no-train-split":
                (other / "train_clips.csv").unlink()
            run_script("evaluate.py", "--checkpoint", str(out / "best.pt"), "--data", str(other), "--split", "test",
                       "--out", str(tmp_path / folder), "--workers", "0", "--device", "cpu")
            again = json.loads((tmp_path / folder / "metrics_test.json").read_text())["single_view"]["label"]
            assert again["confusion"] == metrics["confusion"] and set(again["per_class"]) == {"applause", "tone"}


def test_frames_model_classifies_28_kinds_of_images(image_cache, tmp_path):
    """7 colours x 4 shapes, 12 training images each: the 2-D CNN on one frame reaches >= 5x chance."""
    metrics = train_csv(image_cache, tmp_path / "run", "--modalities", "video", "--video-arch", "frames",
                        "--video-size", "tiny", "--num-frames", "1", "--crop-size", "32", "--fusion-dim", "32",
                        "--batch-size", "16", "--epochs", "4", "--min-epochs", "4", "--lr", "3e-3")
    print(f"\nimages (28 classes): test accuracy {metrics['accuracy']:.3f}")
    assert len(metrics["per_class"]) == 28 and metrics["n"] == 28 * 3
    assert metrics["accuracy"] >= 5 / 28 and "roc_auc" not in metrics  # the binary metrics: two classes only


def test_only_slowfast_tells_surprise_from_fear_on_synth_meld_video(pair_cache, tmp_path):
    """Synth MELD's temporal pair (the same frames in opposite order): SlowFast separates the two
    classes, the frames baseline (a 2-D CNN and a mean over time) cannot."""
    common = ["--modalities", "video", "--video-size", "tiny", "--num-frames", "8", "--frame-sampling", "uniform",
              "--crop-size", "32", "--fusion-dim", "32", "--batch-size", "8", "--lr", "3e-3"]
    slowfast = train_csv(pair_cache, tmp_path / "slowfast", *common, "--video-arch", "slowfast",
                         "--epochs", "20", "--min-epochs", "20")
    # frames has nothing to learn: it overfits the training clips, more epochs would not help it
    frames = train_csv(pair_cache, tmp_path / "frames", *common, "--video-arch", "frames",
                       "--epochs", "8", "--min-epochs", "8")
    print(f"\nsurprise vs fear (video only): test accuracy slowfast {slowfast['accuracy']:.3f}, "
          f"frames {frames['accuracy']:.3f}")
    assert set(slowfast["per_class"]) == set(prepare.TEMPORAL_PAIR) and slowfast["n"] == 30
    assert slowfast["accuracy"] >= 0.85
    assert frames["accuracy"] <= 0.7


# ---------------------------------------------------------------------------------------------- failures

def test_prepare_csv_records_missing_and_corrupt_files_and_resumes(tmp_path, capsys):
    """A manifest with audio files in a subfolder, an image, a corrupt mp4 and a missing file: each
    failure is recorded with its reason, the rest is prepared, and the same call again only retries
    the two failures (the files may have been fixed); a fixed file is then prepared."""
    source = tmp_path / "source"
    rng = np.random.default_rng(0)
    rows = []
    (source / "sub").mkdir(parents=True)
    for i, label in enumerate(("applause", "tone", "applause", "tone")):
        write_wav(source / "sub" / f"ok{i}.wav", applause_or_tone(label, rng))
        rows.append(dict(path=f"sub/ok{i}.wav", label=label))
    write_png(shape_image("red", "disk", rng), str(source / "picture.png"))
    rows.append(dict(path="picture.png", label="tone"))
    (source / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))
    rows += [dict(path="broken.mp4", label="tone"), dict(path="gone.wav", label="applause")]
    manifest = write_manifest(source / "manifest.csv", rows)

    prepare.prepare_csv(manifest, tmp_path / "cache", settings=SETTINGS, split_ratio=(1, 0, 0), progress=False)
    entries = {Path(e["file"]).name: e for e in meld.read_manifest(tmp_path / "cache").values()}
    assert len(entries) == 7
    assert entries["gone.wav"]["status"] == "error" and entries["gone.wav"]["reason"].startswith("missing")
    assert "gone.wav" in entries["gone.wav"]["reason"]
    assert entries["broken.mp4"]["status"] == "error" and entries["broken.mp4"]["reason"].startswith("corrupt")
    for i in range(4):
        entry = entries[f"ok{i}.wav"]
        assert entry["status"] == "ok" and entry["reason"] == "no video stream" and entry["frames"] == 0
        assert entry["audio_samples"] > AUDIO_RATE and (tmp_path / "cache" / entry["id"] / "audio.npy").is_file()
    picture = entries["picture.png"]
    assert picture["status"] == "ok" and picture["frames"] == 1 and picture["audio_samples"] == 0
    assert (tmp_path / "cache" / picture["id"] / "000000.jpg").is_file()

    before = (tmp_path / "cache" / "manifest.jsonl").read_text()
    capsys.readouterr()
    prepare.prepare_csv(manifest, tmp_path / "cache", settings=SETTINGS, split_ratio=(1, 0, 0), progress=False)
    assert "5 already done, 2 to do" in capsys.readouterr().out
    assert (tmp_path / "cache" / "manifest.jsonl").read_text() == before
    write_wav(source / "gone.wav", applause_or_tone("applause", rng))          # the missing file turns up
    prepare.prepare_csv(manifest, tmp_path / "cache", settings=SETTINGS, split_ratio=(1, 0, 0), progress=False)
    entries = {Path(e["file"]).name: e for e in meld.read_manifest(tmp_path / "cache").values()}
    assert entries["gone.wav"]["status"] == "ok" and len(entries) == 7
    assert (tmp_path / "cache" / "manifest.jsonl").read_text().count("\n") == 7     # one line per clip


def test_label_absent_from_train_is_an_error_naming_it(tmp_path):
    """A dev label that train lacks stops prepare before any decoding, naming the manifest, the label
    and the file; a cache whose dev split was edited afterwards stops train.py, naming its row."""
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (label, split) in enumerate([("applause", "train"), ("tone", "train"), ("applause", "train"),
                                        ("tone", "train"), ("applause", "dev"), ("surprise", "dev")]):
        write_wav(source / f"clip{i}.wav", applause_or_tone(label if label != "surprise" else "tone", rng))
        rows.append(dict(path=f"clip{i}.wav", label=label, split=split))
    manifest = write_manifest(source / "manifest.csv", rows)
    with pytest.raises(ValueError) as error:
        prepare.prepare_csv(manifest, tmp_path / "cache", settings=SETTINGS, progress=False)
    message = str(error.value)
    assert "'surprise'" in message and "manifest.csv" in message and "clip5.wav" in message and "\n" not in message
    assert not (tmp_path / "cache" / "manifest.jsonl").exists()
    rows[-1]["label"] = "tone"
    prepare.prepare_csv(write_manifest(source / "manifest.csv", rows), tmp_path / "cache", settings=SETTINGS,
                     progress=False)
    dev = (tmp_path / "cache" / "dev_clips.csv").read_text()
    (tmp_path / "cache" / "dev_clips.csv").write_text(dev.replace(",tone,", ",surprise,"))
    with pytest.raises((SystemExit, ValueError)) as error:
        train.main(["--dataset", "csv", "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                    "--modalities", "audio", "--audio-encoder", "lstm", "--epochs", "1", "--workers", "0",
                    "--device", "cpu", "--unfreeze", "", "--video-init", "random"])
    message = str(error.value)
    assert "'surprise'" in message and ("dev_clips.csv" in message or "clip5" in message)
    assert not (tmp_path / "run" / "last.pt").exists()
