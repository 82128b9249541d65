"""Long runs in the real world: never a hang, no finished work lost, nothing silently wrong. Each
test builds the situation users met (a small /dev/shm, a cache cut short, a full disk, two
prepare jobs on one cache, a run interrupted before its first checkpoint, data moved, an old
checkpoint, a text budget beyond the model, another device, γ < 1, variable-frame-rate video,
late audio, invisible text, a class train lacks, a killed worker, Ctrl-C, odd command lines)."""

import csv
import errno
import fractions
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import torch
from test_first_hour import one_line_exit
from test_train import descendants, small_args
from torchvision.io import decode_jpeg, read_file

import data
import evaluate
import loading
import meld
import prepare
import runs
import train
from conftest import PREPARE_SETTINGS, ROOT
from losses import FocalLoss


def text_args(root, tiny_bert, out, *extra):
    """A text-only run of one epoch of one step, straight from the CSVs in root."""
    return ["--data", str(root), "--modalities", "text", "--text-model", str(tiny_bert), "--out", str(out),
            "--batch-size", "2", "--accum-steps", "1", "--epochs", "1", "--min-epochs", "1",
            "--max-steps-per-epoch", "1", "--workers", "0", "--device", "cpu", "--unfreeze", "", *extra]


def stopped_with(main, argv):
    """main(argv) stops mid-run with SystemExit: -> its message, one line (progress bars may be above it)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code, stop.value.code
    return stop.value.code


def copy_cache(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy


# ---------------------------------------------------------------------------------------------- hangs, lost work

def test_a_small_shared_memory_is_refused_at_start_and_a_hung_worker_ends_in_one_line(cache, tiny_bert, tmp_path,
                                                                                      monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(loading.shutil, "disk_usage", lambda path: real(path)._replace(free=64 * 2 ** 20)
                        if str(path) == "/dev/shm" else real(path))
    argv = small_args(cache, tiny_bert, tmp_path / "run", "--workers", "2", "--num-frames", "32",
                      "--crop-size", "224", "--batch-size", "16", "--eval-batch-size", "16")
    line = one_line_exit(capsys, train.main, argv)
    assert "/dev/shm" in line and "--shm-size" in line and "--workers 0" in line
    monkeypatch.undo()

    get = data.ClipDataset.__getitem__                   # a worker that never answers (forked: it sees this)
    monkeypatch.setattr(data.ClipDataset, "__getitem__", lambda self, key: time.sleep(600) or get(self, key))
    monkeypatch.setattr(loading, "TIMEOUT", 3)

    def hang(*_):
        raise TimeoutError("the loader waited for a hung worker: no timeout")

    previous = signal.signal(signal.SIGALRM, hang)       # this test itself never hangs
    signal.alarm(90)
    try:
        line = stopped_with(train.main, small_args(cache, tiny_bert, tmp_path / "hung", "--workers", "1",
                                                   "--modalities", "audio"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "hung" in line and "no checkpoint was saved yet: run the same command again" in line


def test_a_damaged_cache_names_the_clip_keeps_the_epoch_and_is_redone_by_verify(cache, synth_root, tiny_bert,
                                                                                 tmp_path, capsys):
    copy = copy_cache(cache, tmp_path)
    victim = next(e for e in meld.read_manifest(copy).values() if e["split"] == "dev" and e["status"] == "ok")
    middle = f"{victim['frames'] // 2:06d}.jpg"                         # read by every evaluation window
    frame = copy / victim["id"] / middle
    frame.write_bytes(frame.read_bytes()[:200])                        # a copy interrupted halfway
    out = tmp_path / "run"
    argv = small_args(copy, tiny_bert, out, "--modalities", "video", "--max-steps-per-epoch", "2")
    line = stopped_with(train.main, argv)
    assert str(copy / victim["id"]) in line and "--verify" in line
    last = torch.load(out / "last.pt", weights_only=True)              # the epoch's training is kept
    assert (last["epoch"], last["step_in_epoch"]) == (0, 2)
    line = stopped_with(evaluate.main, ["--checkpoint", str(out / "last.pt"), "--data", str(copy), "--split", "dev",
                                        "--device", "cpu", "--workers", "0"])
    assert str(copy / victim["id"]) in line and "--verify" in line
    capsys.readouterr()                                                # the progress bars so far
    line = one_line_exit(capsys, prepare.main, ["--out", str(copy), "--verify"])
    assert "--verify" in line and "--meld-root" in line

    assert prepare.damage(copy, victim) == f"{middle} cut short"
    audio_victim = next(e for e in meld.read_manifest(copy).values() if e["audio_samples"] > 1000)
    npy = copy / audio_victim["id"] / "audio.npy"
    npy.write_bytes(npy.read_bytes()[:-400])
    assert "audio.npy" in prepare.damage(copy, audio_victim)
    prepare.main(["--meld-root", str(synth_root), "--out", str(copy), "--workers", "1", "--verify",
                  "--fps", "10", "--short-side", "48"])
    printed = capsys.readouterr().out
    assert f"{victim['id']}: damaged" in printed and f"{audio_victim['id']}: damaged" in printed
    assert all(prepare.damage(copy, e) is None for e in meld.read_manifest(copy).values() if e["status"] == "ok")
    train.main(argv + ["--resume", "auto"])
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["epoch"] == 0
    capsys.readouterr()
    clip = synth_root / meld.VIDEO_DIRS["test"] / "dia0_utt0.mp4"
    evaluate.main(["predict", "--checkpoint", str(out / "best.pt"), "--video", str(clip), "--text", "Oh my God",
                   "--device", "cpu"])
    assert "note: the checkpoint reads video only: the text is not used" in capsys.readouterr().err


def test_a_full_disk_stops_prepare_and_checkpoints_in_one_line_leaving_no_temporary_file(synth_root, cache, tiny_bert,
                                                                                         tmp_path, monkeypatch,
                                                                                         capsys):
    writes, real_write = [], type(tmp_path).write_bytes

    def write_bytes(path, content):
        writes.append(path)
        if len(writes) > 30:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, content)

    monkeypatch.setattr(type(tmp_path), "write_bytes", write_bytes)
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        prepare.prepare_meld(synth_root, out, ("train",), PREPARE_SETTINGS, workers=1, progress=False)
    assert "is full" in str(stop.value) and str(out) in str(stop.value)
    entries = meld.read_manifest(out)
    assert entries and not any("unreadable" in e["reason"] or "Errno" in e["reason"] for e in entries.values())
    assert (out / "manifest.jsonl").read_text().endswith("\n") and not list(out.rglob(".*.tmp"))
    monkeypatch.undo()

    def torch_save(obj, f):                                            # what torch.save says on a full disk
        open(f, "wb").write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_save)
    real = shutil.disk_usage
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: real(path)._replace(free=1024))
    run = tmp_path / "run"
    line = stopped_with(train.main, small_args(cache, tiny_bert, run, "--modalities", "audio"))
    assert "is full" in line and "--resume auto" in line
    assert not list(run.glob(".*.tmp")) and not (run / "last.pt").exists()


def test_two_prepare_jobs_on_one_cache_both_keep_their_clips(synth_root, tmp_path):
    out = tmp_path / "cache"
    commands = [[sys.executable, str(ROOT / "prepare.py"), "--meld-root", str(synth_root), "--out", str(out),
                 "--splits", split, "--workers", "1", "--fps", "10", "--short-side", "48"]
                for split in ("train", "dev")]
    jobs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], results
    entries = meld.read_manifest(out)
    for split in ("train", "dev"):
        rows = meld.read_meld_csv(meld.find_csv(synth_root, split), split)
        assert {r.id for r in rows} <= set(entries), split
    assert not list(out.rglob(".tmp-*"))


def test_a_start_that_saved_no_checkpoint_can_be_started_again(cache, tiny_bert, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    import wandb

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    argv = small_args(cache, tiny_bert, out, "--modalities", "audio", "--max-steps-per-epoch", "1", "--epochs", "1",
                      "--min-epochs", "1")
    line = one_line_exit(capsys, train.main, argv + ["--wandb"])
    assert "wandb login" in line and "WANDB_MODE=offline" in line
    assert (out / "args.json").exists() and not (out / "last.pt").exists()
    train.main(argv)                                                   # no --overwrite needed
    assert "a start that saved no checkpoint left args.json: replaced" in capsys.readouterr().out
    shutil.rmtree(out)
    step = train.accumulate_gradients
    monkeypatch.setattr(train, "accumulate_gradients", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    line = stopped_with(train.main, argv)                              # Ctrl-C in the first step
    assert line == "interrupted; no checkpoint was saved yet: run the same command again"
    monkeypatch.setattr(train, "accumulate_gradients", step)
    train.main(["--out", str(out), "--resume", "auto"])                # the start's settings, from its args.json
    printed = capsys.readouterr().out
    assert "no checkpoint in" in printed and "starting the run again with its args.json settings" in printed
    assert json.loads((out / "args.json").read_text())["modalities"] == ["audio"]
    assert (out / "test_metrics.json").exists()
    shutil.rmtree(out)
    out.mkdir()
    (out / "args.json").write_text("{}")
    train.main(argv + ["--resume", "auto"])
    assert (out / "test_metrics.json").exists()


def test_moved_data_and_model_folders_resume_when_they_hold_the_same_files(synth_root, tiny_bert, tmp_path, capsys):
    data_a, model_a = tmp_path / "data-a", tmp_path / "model-a"
    data_a.mkdir()
    for split in meld.SPLITS:
        shutil.copy(meld.find_csv(synth_root, split), data_a)
    shutil.copytree(tiny_bert, model_a)
    out = tmp_path / "run"
    train.main(text_args(data_a, model_a, out))
    data_b, model_b = tmp_path / "data-b", tmp_path / "model-b"
    data_a.rename(data_b)
    model_a.rename(model_b)
    capsys.readouterr()
    line = one_line_exit(capsys, train.main, ["--out", str(out), "--resume", "auto"])
    assert str(data_a) in line and "--data NEW" in line
    assert train.main(["--out", str(out), "--resume", "auto", "--data", str(data_b), "--text-model", str(model_b)])
    assert "nothing to do" in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(data_b, other)
    (other / "train_sent_emo.csv").write_text((other / "train_sent_emo.csv").read_text().replace("joy", "anger"))
    line = one_line_exit(capsys, train.main, ["--out", str(out), "--resume", "auto", "--data", str(other),
                                              "--text-model", str(model_b)])
    assert f"--data {other}" in line and "same files" in line


def test_a_checkpoint_from_before_the_config_dataclasses_is_evaluated(run, cache, tmp_path, capsys):
    old = torch.load(run / "best.pt", weights_only=True)
    del old["data_config"]
    for key in ("audio_features", "n_mfcc"):
        old["model_config"].pop(key), old["args"].pop(key)
    torch.save(old, tmp_path / "old.pt")
    results = evaluate.main(["--checkpoint", str(tmp_path / "old.pt"), "--data", str(cache), "--workers", "0",
                             "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert results["single_view"]["emotion"]["n"] > 0
    model, checkpoint = evaluate.load_checkpoint_model(tmp_path / "old.pt", torch.device("cpu"))
    assert checkpoint["data_config"]["num_frames"] == old["args"]["num_frames"]


def test_a_text_budget_beyond_the_models_positions_is_refused_at_start(synth_root, tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"                                  # the tiny BERT has 256 positions
    line = one_line_exit(capsys, train.main, text_args(synth_root, tiny_bert, out, "--max-text-tokens", "300"))
    assert "--max-text-tokens 300" in line and "256" in line and not (out / "last.pt").exists()


def test_resuming_with_another_autocast_is_refused_in_one_line(synth_root, tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(text_args(synth_root, tiny_bert, out, "--epochs", "2", "--min-epochs", "2"))   # CPU: autocast off
    last = torch.load(out / "last.pt", weights_only=True)
    last["epoch"] = 1                                        # not finished
    torch.save(last, out / "last.pt")
    capsys.readouterr()
    line = one_line_exit(capsys, train.main, ["--out", str(out), "--resume", "auto", "--amp", "fp16"])
    assert "autocast off" in line and "fp16" in line
    fp16_run = dict(amp="fp16", scaler={"scale": torch.tensor(1024.0)})
    with pytest.raises(SystemExit, match="autocast fp16.*would run off"):
        runs.check_amp(fp16_run, "off", train.parse_args([]), torch.device("cpu"), out / "last.pt")


# ---------------------------------------------------------------------------------------------- silently wrong

def test_focal_loss_gradients_are_finite_for_every_gamma_and_skipped_steps_are_counted(cache, tiny_bert, tmp_path,
                                                                                       monkeypatch, capsys):
    for gamma in (0.0, 0.25, 0.5, 0.99, 1.0, 2.0):
        logits = torch.tensor([[40.0, -40.0, -40.0], [0.3, 0.1, -0.2]], requires_grad=True)   # the first: certain
        FocalLoss(gamma)(logits, torch.tensor([0, 1])).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() > 0, gamma

    taken, real = [], train.optimizer_step                  # steps 2 and 3 of every epoch have NaN gradients

    def some_skipped(model, optimizer, scaler, clip_grad):
        taken.append(0)
        if len(taken) % 4 in (2, 3):
            optimizer.zero_grad(set_to_none=True)
            return float("nan"), False
        return real(model, optimizer, scaler, clip_grad)

    monkeypatch.setattr(train, "optimizer_step", some_skipped)
    out = tmp_path / "run"
    argv = small_args(cache, tiny_bert, out, "--modalities", "audio", "--max-steps-per-epoch", "4")
    train.main(argv)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [2, 2]
    assert "2 steps skipped (non-finite gradients)" in capsys.readouterr().out
    line = stopped_with(train.main, small_args(cache, tiny_bert, tmp_path / "stop", "--modalities", "audio",
                                               "--max-steps-per-epoch", "4", "--max-nonfinite", "2"))
    assert "2 optimizer steps in a row skipped" in line


def write_vfr(path, times_ms):
    """An H.264 mp4 whose frame i, a grey level 10 + 17 i, starts at times_ms[i] (a freeze between two)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"preset": "ultrafast", "crf": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = fractions.Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 + 17 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_frames_are_what_a_player_shows_and_audio_is_on_the_pictures_timeline(tmp_path):
    times = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 3000, 3100, 3200]   # frozen from 1 s to 3 s
    write_vfr(tmp_path / "vfr.mp4", times)
    info = prepare.extract_clip(tmp_path / "vfr.mp4", tmp_path / "vfr", prepare.PrepareSettings(fps=10, short_side=48))
    levels = [int(decode_jpeg(read_file(str(tmp_path / "vfr" / f"{k:06d}.jpg"))).float().mean().round())
              for k in range(info["frames"])]
    shown = [10 + 17 * max(i for i, t in enumerate(times) if t <= 100 * k) for k in range(info["frames"])]
    assert np.abs(np.subtract(levels, shown)).max() <= 2, (levels, shown)
    assert levels[11:30] == [levels[10]] * 19                           # the freeze shows the frame before it

    with av.open(str(tmp_path / "late.mov"), "w", format="mov") as container:   # audio from 1 s, picture from 0
        video = container.add_stream("libx264", rate=10, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("pcm_s16le", rate=meld.AUDIO_RATE, layout="mono")
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 100, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        tone = (np.sin(np.arange(32000) * 2 * np.pi * 440 / meld.AUDIO_RATE) * 10000).astype(np.int16)[None]
        for start in range(0, 32000, 1600):
            chunk = av.AudioFrame.from_ndarray(tone[:, start:start + 1600], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = meld.AUDIO_RATE, meld.AUDIO_RATE + start
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
    info = prepare.extract_clip(tmp_path / "late.mov", tmp_path / "late", prepare.PrepareSettings(fps=10))
    wave = np.load(tmp_path / "late" / "audio.npy")
    assert info["audio_offset"] == 1.0 and len(wave) == 3 * meld.AUDIO_RATE
    assert np.abs(wave[:meld.AUDIO_RATE - 100]).max() == 0 and np.abs(wave[meld.AUDIO_RATE + 100:]).max() > 5000


def write_meld_csv(path, rows):
    """rows: (dialogue, utterance, speaker, text, emotion)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(meld.MELD_COLUMNS)
        for n, (dialogue, index, speaker, text, emotion) in enumerate(rows):
            sentiment = {"joy": "positive", "neutral": "neutral", "surprise": "positive"}.get(emotion, "negative")
            writer.writerow([n + 1, text, speaker, emotion, sentiment, dialogue, index, 1, 1, "", ""])


def test_invisible_text_is_no_text_and_a_class_train_lacks_is_said(tmp_path, tiny_bert, tokenizer, capsys, caplog):
    invisible = ["\u200b", "\u200e\u200f", "\ufeff", "\u00ad", " \u200b "]
    rows = [(0, i, "Ross", text, "joy") for i, text in enumerate(invisible)]
    rows += [(1, i, "Monica", f"words number {i}", ("joy", "anger", "neutral")[i % 3]) for i in range(8)]
    write_meld_csv(tmp_path / "train_sent_emo.csv", rows)
    write_meld_csv(tmp_path / "dev_sent_emo.csv", [(0, 0, "Joey", "how you doin", "disgust"),
                                                   (0, 1, "Joey", "fine", "joy")])
    ds = data.ClipDataset(tmp_path, "train", data.DataConfig(modalities=("text",)), tokenizer)
    assert ds.excluded["no text"] == len(invisible) and len(ds) == 8
    out = tmp_path / "run"
    train.main(text_args(tmp_path, tiny_bert, out))
    printed = capsys.readouterr().out
    assert "note: train has no disgust clip (dev 1): the model cannot learn emotion disgust" in printed
    line = one_line_exit(capsys, evaluate.main, ["predict", "--checkpoint", str(out / "best.pt"), "--text",
                                                 "\u200b\u200e", "--device", "cpu"])
    assert "empty" in line and "utterance 1" in line
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not read")
    evaluate.main(["predict", "--checkpoint", str(out / "best.pt"), "--video", str(video), "--text", "hey",
                   "--device", "cpu"])
    assert "reads text only: the video files are not used" in capsys.readouterr().err
    import transformers
    transformers.utils.logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        assert ds.has_text("so " * 3000)                               # truncated later, by the text budget
    assert "longer than the specified maximum" not in caplog.text


# ---------------------------------------------------------------------------------------------- one clear line

def test_a_killed_loader_worker_and_ctrl_c_end_in_one_line_saying_how_to_go_on(cache, tiny_bert, tmp_path,
                                                                             monkeypatch, capsys):
    out = tmp_path / "killed"
    argv = small_args(cache, tiny_bert, out, "--modalities", "audio", "--workers", "2", "--epochs", "50",
                      "--min-epochs", "50", "--save-every", "1")
    job = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                       HF_HUB_OFFLINE="1"))
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    workers = descendants(job.pid)                       # the loader's (forked) workers
    assert workers, "no loader worker found"
    os.kill(workers[0], signal.SIGKILL)                  # what the out-of-memory killer does
    _, stderr = job.communicate(timeout=120)
    last = stderr.strip().splitlines()[-1]                # above it only the progress bars
    assert job.returncode not in (0, None) and "Traceback" not in stderr, stderr[-3000:]
    assert "loader worker" in last and "--resume auto" in last

    epoch = train.train_one_epoch

    def interrupted(*args, **kwargs):   # Ctrl-C in epoch 1, after epoch 0's checkpoint
        if args[6].epoch == 1:
            raise KeyboardInterrupt
        return epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    line = stopped_with(train.main, small_args(cache, tiny_bert, tmp_path / "ctrl-c", "--modalities", "audio",
                                               "--max-steps-per-epoch", "1"))
    resume = f"`python train.py --out {tmp_path / 'ctrl-c'} --resume auto`"
    assert line == f"interrupted; {resume} continues from the last checkpoint"


def test_odd_command_lines_get_one_line_or_the_right_result(cache, synth_root, run, tmp_path, tiny_bert, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    line = one_line_exit(capsys, train.main, small_args(cache, tiny_bert, tmp_path / "a-file"))
    assert "is a file" in line
    assert evaluate.main(["curves", "--help"]) is None and "RUN_DIR" in capsys.readouterr().out
    for text in ("", '{"epoch": 0, "train_lo'):
        (tmp_path / "log.jsonl").write_text(text)
        line = one_line_exit(capsys, evaluate.main, ["curves", str(tmp_path)])
        assert "log.jsonl" in line
    for ratio in ("0.8,0.2", "0.8,0.5,0.2", "-0.1,0.6,0.5", "a,b,c"):
        line = one_line_exit(capsys, prepare.main, ["--csv", "m.csv", "--out", str(tmp_path / "c"), "--split-ratio",
                                                    ratio])
        assert "--split-ratio" in line
    assert "--jpeg-quality" in one_line_exit(capsys, prepare.main, ["--meld-root", str(synth_root), "--out",
                                                                     str(tmp_path / "c"), "--jpeg-quality", "150"])
    assert not (tmp_path / "c").exists()
    (tmp_path / "clips").mkdir()                          # a refused --csv leaves no settings behind
    for i, split in enumerate(("train", "dev", "test")):
        (tmp_path / "clips" / f"{i}.wav").write_bytes(b"RIFF")
    (tmp_path / "m.csv").write_text("path,label,split\nclips/0.wav,a,train\nclips/1.wav,b,dev\nclips/2.wav,a,test\n")
    assert "'b'" in one_line_exit(capsys, prepare.main, ["--csv", str(tmp_path / "m.csv"), "--out",
                                                         str(tmp_path / "c"), "--fps", "5"])
    assert not (tmp_path / "c" / "prepare.json").exists()

    capsys.readouterr()
    results = evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video",
                             str(synth_root / meld.VIDEO_DIRS["test"] / "dia0_utt0.mp4"), "--text", "Oh my God",
                             "--device", "cpu"])
    assert results[0]["text"] == "Oh my God" and "'Oh my God'" in capsys.readouterr().out   # what was classified
    argv = small_args(cache, tiny_bert, tmp_path / "big-crop", "--modalities", "video", "--crop-size", "64",
                      "--max-steps-per-epoch", "1", "--epochs", "1", "--min-epochs", "1")
    train.main(argv)
    assert "--crop-size 64 enlarges the cache's frames (short side 48" in capsys.readouterr().out


def test_the_confusion_matrix_shows_every_label_inside_the_figure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import plots
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    plots.plot_confusion(np.arange(49).reshape(7, 7), meld.EMOTIONS, tmp_path / "c.png", "dev, best epoch 3: emotion")
    figure = figures[-1]
    figure.canvas.draw()
    renderer, inside = figure.canvas.get_renderer(), figure.bbox
    for ax in figure.axes:
        for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
            if text.get_text():
                box = text.get_window_extent(renderer)
                assert box.y0 >= 0 and box.x0 >= 0 and box.y1 <= inside.y1 and box.x1 <= inside.x1, text.get_text()


def test_a_newcomers_stops_and_slips_each_get_one_line(cache, synth_root, tiny_bert, tmp_path, monkeypatch, capsys):
    """What a newcomer met from a clean clone: --out below a file, a checkpoint resumed into another
    folder, --resume with --overwrite, Ctrl-C in prepare.py, and a prepare job's summary that
    counted the clips another job was preparing."""
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = small_args(cache, tiny_bert, afile / "sub", "--modalities", "audio")
    assert "afile is a file, not a folder" in one_line_exit(capsys, train.main, argv)
    run = tmp_path / "run"
    (run).mkdir()
    torch.save({}, run / "last.pt")
    line = one_line_exit(capsys, train.main, small_args(cache, tiny_bert, tmp_path / "fork", "--resume",
                                                        str(run / "last.pt")))
    assert f"--out {run} --resume" in line and "copy that folder" in line
    line = one_line_exit(capsys, train.main, small_args(cache, tiny_bert, run, "--resume", "auto", "--overwrite"))
    assert "choose one" in line

    fresh = tmp_path / "fresh"
    calls = []
    prepare_one = prepare._prepare_one

    def interrupted(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return prepare_one(task)

    monkeypatch.setattr(prepare, "_prepare_one", interrupted)
    argv = ["--meld-root", str(synth_root), "--out", str(fresh), "--workers", "1", "--fps", "10", "--short-side", "48"]
    line = stopped_with(prepare.main, argv + ["--splits", "train"])
    assert "interrupted" in line and "run the same command again" in line
    assert len(meld.read_manifest(fresh)) == 2                          # the clips done are kept
    monkeypatch.setattr(prepare, "_prepare_one", prepare_one)
    capsys.readouterr()
    prepare.main(argv + ["--splits", "dev"])
    summary = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert summary and all(line.startswith("dev:") for line in summary), summary
