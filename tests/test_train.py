"""train.py: schedule, accumulation, unfreezing, early stopping, checkpoints, exact resume, DDP,
the demo, W&B offline and the Hub upload failing cleanly."""

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import data
import evaluate
import loading
import meld
import model as model_lib
import runs
import slowfast
import train
from conftest import ROOT, data_config, needs_cuda

TIMING = ("seconds", "clips_per_s", "data_wait", "peak_memory_mb")


def small_args(cache, tiny_bert, out, *extra):
    """A CPU-sized run on the session's synth cache: every branch, tiny widths."""
    return ["--data", str(cache), "--out", str(out), "--video-size", "tiny", "--video-init", "random",
            "--text-model", str(tiny_bert), "--num-frames", "8", "--crop-size", "32", "--audio-channels", "4,8,8,8",
            "--fusion-dim", "32", "--batch-size", "2", "--accum-steps", "1", "--eval-batch-size", "2",
            "--epochs", "2", "--min-epochs", "2", "--workers", "0", "--device", "cpu", "--unfreeze", "", *extra]


def run_train(argv, **env):
    """train.py in a subprocess (one thread per process, offline)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                       WANDB_SILENT="true", PYTHONUNBUFFERED="1", **env)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                          env=environment, timeout=600)


def small_model(tiny_bert, modalities=("audio", "text")):
    torch.manual_seed(0)
    return model_lib.EmotionModel(model_lib.ModelConfig(modalities=modalities, video_size="tiny", video_init="random",
                                                        text_model=str(tiny_bert), audio_channels=(4, 8, 8, 8),
                                                        fusion_dim=32))


# ---------------------------------------------------------------------------------------------- schedule

def test_onecycle_schedule_is_sized_from_the_loader(cache, tokenizer):
    args = train.parse_args(["--epochs", "20", "--accum-steps", "2"])
    ds = data.ClipDataset(cache, "train", data.DataConfig(modalities=("text",)), tokenizer, train=True)
    loader = data.make_loader(ds, batch_size=4, train=True, workers=0)
    assert len(loader) == len(ds) // 4  # drop_last
    steps = train.optimizer_steps_per_epoch(len(loader), args.accum_steps)
    assert steps == len(ds) // 4 // 2
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([dict(params=[parameter], lr=args.lr)])
    scheduler = train.build_scheduler(optimizer, args, steps)
    N = args.epochs * steps
    lrs = []
    for _ in range(N):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[round(0.3 * N) - 1] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5)
    with pytest.raises(ValueError):
        scheduler.step()  # one step past N: the schedule was sized exactly
    assert train.onecycle_lr(0.0, 1e-3, args) == pytest.approx(1e-5)
    assert train.onecycle_lr(0.3, 1e-3, args) == pytest.approx(1e-3)


def test_cosine_and_plateau_schedules():
    """cosine: per optimizer step, each group from its own peak to peak / div / final-div; plateau:
    unchanged by optimizer steps, the LR halves after `patience` evaluations without a gain."""
    def optimizer():
        a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        return torch.optim.AdamW([dict(params=[a], lr=1e-3), dict(params=[b], lr=1e-4)])

    args = train.parse_args(["--scheduler", "cosine", "--epochs", "2", "--div-factor", "10"])
    opt = optimizer()
    scheduler = train.build_scheduler(opt, args, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[0] == pytest.approx([1e-3, 1e-4]) and lrs[5] == pytest.approx([5.5e-4, 5.5e-5])
    assert lrs[10] == pytest.approx([1e-4, 1e-5]) and all(x[0] >= y[0] for x, y in zip(lrs, lrs[1:]))

    args = train.parse_args(["--scheduler", "plateau", "--plateau-patience", "1", "--plateau-factor", "0.5"])
    opt = optimizer()
    scheduler = train.build_scheduler(opt, args, steps_per_epoch=5)
    for score in (0.3, 0.4, 0.4):   # a gain, then one evaluation without: still within patience
        scheduler.step(score)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    scheduler.step(0.39)              # the second without a gain
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])


def test_gradient_accumulation_equals_one_big_batch(cache, tiny_bert, tokenizer):
    """Three micro-batches of 4 with different class mixes == one batch of 12, through train.py's
    step function with the default class-weighted focal loss, BatchNorm in eval mode."""
    args = train.parse_args([])
    ds = data.ClipDataset(cache, "train", data_config(modalities=("audio", "text")), tokenizer)
    assert len(ds) >= 12
    samples = sorted((ds[i] for i in range(len(ds))), key=lambda s: s["emotion"])[-12:]  # micro-batches by class
    collate = lambda xs: data.collate(xs, pad_token_id=tokenizer.pad_token_id)  # noqa: E731
    micro = [collate(samples[i:i + 4]) for i in range(0, 12, 4)]
    assert len({tuple(b["emotion"].tolist()) for b in micro}) > 1
    criteria = train.build_criteria(args, ds.labels(), [("emotion", 7), ("sentiment", 3)])
    assert criteria["emotion"].alpha is not None and criteria["emotion"].gamma == 2.0
    assert criteria["sentiment"].alpha is None
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def gradients(batches):
        model = small_model(tiny_bert).eval()
        loss = train.accumulate_gradients(model, batches, criteria, args.sentiment_weight, None, scaler)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_micro, grads_micro = gradients(micro)
    loss_whole, grads_whole = gradients([collate(samples)])
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)
    assert grads_micro.keys() == grads_whole.keys() and len(grads_whole) > 20
    for name in grads_whole:
        torch.testing.assert_close(grads_micro[name], grads_whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_optimizer_step_skips_non_finite_gradients_and_still_updates_the_scaler():
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    layer(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norm, stepped = train.optimizer_step(layer, optimizer, scaler, clip_grad=1.0)
    assert not stepped and torch.equal(layer.weight, before) and layer.weight.grad is None
    layer(torch.tensor([[1.0, 1.0]])).sum().backward()
    norm, stepped = train.optimizer_step(layer, optimizer, scaler, clip_grad=1.0)
    assert stepped and not torch.equal(layer.weight, before)


# ---------------------------------------------------------------------------------------------- unfreezing

def test_unfreeze_schedule_trains_exactly_the_named_stages_from_their_epoch(cache, tiny_bert, tokenizer):
    schedule = train.parse_unfreeze("3:text.layer.1,6:text.layer.0,9:text.embeddings")
    model = small_model(tiny_bert, ("text",))
    frozen = train.frozen_at_start(model, schedule)
    assert sorted(frozen) == ["text.embeddings", "text.layer.0", "text.layer.1"]
    model_lib.set_frozen(model, frozen, True)
    args = train.parse_args([])
    optimizer = train.build_optimizer(model, args)
    ds = data.ClipDataset(cache, "train", data.DataConfig(modalities=("text",)), tokenizer)
    batch = data.collate([ds[i] for i in range(4)], pad_token_id=tokenizer.pad_token_id)
    criteria = train.build_criteria(args, ds.labels(), [("emotion", 7), ("sentiment", 3)])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    named = {"text.layer.1": 3, "text.layer.0": 6, "text.embeddings": 9}
    for epoch in range(11):
        if schedule.get(epoch):
            model_lib.set_frozen(model, schedule[epoch], False)
        before = {stage: {k: p.detach().clone() for k, p in train.stage_params(model,
                                                                               [stage]).items()} for stage in named}
        model.train()
        train.accumulate_gradients(model, [batch], criteria, 0.5, None, scaler)
        train.optimizer_step(model, optimizer, scaler, 1.0)
        for stage, start in named.items():
            after = train.stage_params(model, [stage])
            changed = any(not torch.equal(after[k], v) for k, v in before[stage].items())
            assert changed == (epoch >= start), (stage, epoch)
    heads = train.stage_params(model, ["heads"])
    assert all(p.requires_grad for p in heads.values())  # new parts trained all along


def test_laterals_learn_from_the_first_step_while_pretrained_slow_stages_stay_frozen(monkeypatch):
    """ImageNet-inflated SlowFast-R50 (random ResNet-50 weights, no download) under the default
    schedule: at epoch 0 every lateral (stem included) and every weight that reads one gets a
    gradient and moves in the first optimizer step, at the new parts' LR; every pretrained slow
    weight and BatchNorm statistic stays bitwise as loaded; after the step the lateral fusion
    changes what the model computes."""
    import torchvision
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    monkeypatch.setattr("pretrained.load_imagenet_resnet50", lambda: resnet)
    model = model_lib.EmotionModel(model_lib.ModelConfig(modalities=("video",), video_size="r50",
                                                         video_init="imagenet", head_hidden=(32, 16)))
    args = train.parse_args([])
    schedule = train.parse_unfreeze(args.unfreeze)
    assert not schedule.get(0)
    model_lib.set_frozen(model, train.frozen_at_start(model, schedule), True)
    optimizer = train.build_optimizer(model, args)
    scheduler = train.build_scheduler(optimizer, args, steps_per_epoch=10)
    stages = model.stages()
    lateral = {f"{stage}.{name}": p for stage in ("stem", "res2", "res3", "res4")
               for m in stages[f"video.lateral.{stage}"] for name, p in m.named_parameters()}
    readers = [p for m in model.video.slow.modules() if isinstance(m, slowfast.LateralInputConv3d)
               for p in [m.lateral_weight]]
    assert len(readers) == 8 and all(any(p is q for q in lateral.values()) for p in readers)
    pretrained = {n: p.detach().clone() for n, p in model.video.slow.named_parameters()
                  if not n.endswith("lateral_weight")}
    slow_stats = {n: b.clone() for n, b in model.video.slow.named_buffers()}
    before = {n: p.detach().clone() for n, p in lateral.items()}
    for group in optimizer.param_groups:  # the lateral parts learn at the new parts' LR
        if any(p is readers[0] for p in group["params"]):
            assert group["name"] == "video.new.decay" and not group["pretrained"]

    g = torch.Generator().manual_seed(1)
    batch = dict(video=torch.randint(0, 256, (2, 3, 16, 32, 32), dtype=torch.uint8, generator=g),
                 video_mask=torch.arange(16)[None, :] < torch.tensor([[16], [7]]),     # one clip padded
                 emotion=torch.tensor([1, 4]), sentiment=torch.tensor([0, 2]))
    criteria = train.build_criteria(args, [0, 1, 2, 3, 4, 5, 6], [("emotion", 7), ("sentiment", 3)])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    train.accumulate_gradients(model, [batch], criteria, args.sentiment_weight, None, scaler)
    no_gradient = [n for n, p in lateral.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_gradient, no_gradient
    train.optimizer_step(model, optimizer, scaler, args.clip_grad)
    scheduler.step()
    unchanged = [n for n, p in lateral.items() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    assert all(torch.equal(p, pretrained[n]) for n, p in model.video.slow.named_parameters() if n in pretrained)
    assert all(torch.equal(b, slow_stats[n]) for n, b in model.video.slow.named_buffers())

    model.eval()
    with torch.no_grad():
        out = model(batch)["emotion"]
        model.video.lateral[0].conv.weight.mul_(3.0)               # lateral.stem, read by slow res2
        assert (model(batch)["emotion"] - out).abs().max() > 1e-6


def test_unknown_or_empty_stage_is_an_error_at_start_up(cache, tiny_bert, tmp_path):
    result = run_train(small_args(cache, tiny_bert, tmp_path / "run", "--unfreeze", "3:video.res9"))
    assert result.returncode != 0 and "unknown stage 'video.res9'" in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before any training
    with pytest.raises(SystemExit, match="not EPOCH:STAGE"):
        train.parse_unfreeze("video.res5")


# ---------------------------------------------------------------------------------------------- early stopping

def test_early_stopping_patience_minimum_epochs_and_minimum_gain():
    stopper = runs.EarlyStopping(patience=2, min_epochs=5, min_delta=0.01)
    scores = [0.30, 0.35, 0.355, 0.359, 0.40, 0.405, 0.41, 0.42]
    improved, stops = [], []
    for epoch, score in enumerate(scores):
        improved.append(stopper.step(epoch, score))
        stops.append(stopper.should_stop(epoch))
    # +0.005 and +0.009 are below min_delta; 0.41 is only +0.01 over 0.40 (not more): no gain
    assert improved == [True, True, False, False, True, False, False, True]
    assert stops == [False, False, False, False, False, False, True, False]  # epoch 3 had patience used, but < 5 epochs
    assert stopper.best == 0.42 and stopper.best_epoch == 7
    restored = runs.EarlyStopping(2, 5, 0.01)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoints_are_atomic_plain_and_refuse_pickles(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runs.save_checkpoint(path, dict(model={"w": torch.ones(2)}, rng=runs.rng_state()))

    def cut_off(obj, f):  # a write killed halfway
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_off)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(path, dict(model={"w": torch.zeros(2)}))
    monkeypatch.undo()
    assert torch.equal(runs.load_checkpoint(path)["model"]["w"], torch.ones(2))

    import argparse
    torch.save(dict(args=argparse.Namespace(lr=1.0)), tmp_path / "pickled.pt")
    with pytest.raises(SystemExit, match="weights_only"):
        runs.load_checkpoint(tmp_path / "pickled.pt")


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    runs.save_checkpoint(tmp_path / "rng.pt", dict(rng=runs.rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    runs.set_rng_state(runs.load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# ---------------------------------------------------------------------------------------------- whole runs

def process_state(pid):
    """(state, parent pid) of a process from /proc/PID/stat (Linux), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(pid):
    """Process ids of every descendant of pid."""
    children = collections.defaultdict(list)
    for folder in Path("/proc").glob("[0-9]*"):
        state = process_state(folder.name)
        if state:
            children[state[1]].append(int(folder.name))
    found, todo = [], [pid]
    while todo:
        found += children[todo[-1]]
        todo = todo[:-1] + children[todo[-1]]
    return found


def kill_inside_epoch(command, out, epoch, step):
    """Start `command` (a train.py run writing to out, with --save-every 1), SIGKILL its whole
    process tree at the first checkpoint at or past optimizer step `step` of `epoch` (later, if a
    busy machine notices late), and return the checkpoint it left: mid-run, not finished."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment,
                               start_new_session=True)
    last, deadline, seen = out / "last.pt", time.time() + 300, None
    while time.time() < deadline and process.poll() is None:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp != seen:  # a new checkpoint (written atomically): where is the run?
            seen, state = stamp, torch.load(last, weights_only=True)
            if (state["epoch"], state["step_in_epoch"]) >= (epoch, step):
                break
        time.sleep(0.005)
    tree = [process.pid] + descendants(process.pid)   # torchrun's workers run in sessions of their own
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    while any((process_state(pid) or ("Z",))[0] != "Z" for pid in tree[1:]):  # until they are gone
        time.sleep(0.01)
    state = torch.load(last, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) >= (epoch, step), f"killed before epoch {epoch}, step {step}"
    assert not (out / "test_metrics.json").exists(), "the run ended before the kill"
    return state


def assert_killed_run_resumes_exactly(cache, tiny_bert, tmp_path, extra, epoch, step, epochs):
    """small_args + extra run whole (tmp_path/reference), and killed by SIGKILL at (epoch, step) then
    resumed with --resume auto (tmp_path/killed): the same run. -> its log."""
    reference = run_train(small_args(cache, tiny_bert, tmp_path / "reference", *extra))
    assert reference.returncode == 0, reference.stderr[-3000:]
    argv = small_args(cache, tiny_bert, tmp_path / "killed", *extra)
    kill_inside_epoch([sys.executable, str(ROOT / "train.py"), *argv], tmp_path / "killed", epoch=epoch, step=step)
    resumed = run_train(argv + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    return assert_same_run(tmp_path / "reference", tmp_path / "killed", epochs=epochs)


def assert_same_run(a, b, epochs):
    """Two output folders hold bitwise the same final weights, per-rank RNG states, log and metrics."""
    last_a, last_b = (torch.load(out / "last.pt", weights_only=True) for out in (a, b))
    assert last_a["model"].keys() == last_b["model"].keys()
    for key in last_a["model"]:
        assert torch.equal(last_a["model"][key], last_b["model"][key]), key
    assert len(last_a["rng"]) == len(last_b["rng"]) == last_a["world_size"]
    for rank, (x, y) in enumerate(zip(last_a["rng"], last_b["rng"])):  # each rank's stream where it ended
        assert torch.equal(x["torch"], y["torch"]) and x["python"] == y["python"], f"rank {rank}"
        assert torch.equal(x["numpy"][1], y["numpy"][1]) and x["numpy"][2] == y["numpy"][2], f"rank {rank}"
    log_a, log_b = ([json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (a, b))
    assert len(log_a) == len(log_b) == epochs
    for x, y in zip(log_a, log_b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert (a / "test_metrics.json").read_text() == (b / "test_metrics.json").read_text()
    return log_a

@pytest.mark.parametrize("device,decode", [("cpu", "cpu"), ("cpu", "device"),
                                           pytest.param("cuda", "device", marks=needs_cuda())])
def test_exact_resume_after_sigkill_mid_epoch(cache, tiny_bert, tmp_path, device, decode):
    """A run killed (SIGKILL) inside epoch 2, after the unfreeze at epoch 2, and resumed, ends
    with bitwise the same weights and the same metrics as the uninterrupted run; the balanced
    sampler's repeated draws included, and with frames decoded in the workers or on the device.
    On CUDA the run uses fp16 autocast with a GradScaler (--amp auto), whose state and the CUDA RNG
    are resumed."""
    extra = ("--epochs", "4", "--min-epochs", "4", "--workers", "2", "--deterministic", "--save-every", "1",
             "--unfreeze", "2:text.layer.1", "--sampler", "balanced", "--device", device, "--decode", decode)
    log = assert_killed_run_resumes_exactly(cache, tiny_bert, tmp_path, extra, epoch=2, step=2, epochs=4)
    assert log[2]["trainable"] > log[1]["trainable"]  # the unfreeze happened in epoch 2


def test_ddp_resume_restores_every_ranks_random_stream(cache, tiny_bert, tmp_path):
    """Two gloo ranks killed inside epoch 1 and resumed end where the uninterrupted run ends: each
    rank continues its own RNG stream (dropout differs per rank), not rank 0's."""
    extra = ("--epochs", "2", "--min-epochs", "2", "--deterministic", "--save-every", "1", "--modalities", "audio,text")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                str(ROOT / "train.py")]
    environment = dict(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    reference = subprocess.run(torchrun + small_args(cache, tiny_bert, tmp_path / "reference", *extra),
                               capture_output=True, text=True, env=dict(os.environ, **environment), timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    argv = small_args(cache, tiny_bert, tmp_path / "killed", *extra)
    state = kill_inside_epoch(torchrun + argv, tmp_path / "killed", epoch=1, step=1)
    assert state["world_size"] == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    resumed = subprocess.run(torchrun + argv + ["--resume", "auto"], capture_output=True, text=True,
                             env=dict(os.environ, **environment), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "reference", tmp_path / "killed", epochs=2)


def test_resume_refuses_changed_settings_and_leaves_a_finished_run_alone(cache, tiny_bert, tmp_path):
    out = tmp_path / "run"
    argv = small_args(cache, tiny_bert, out, "--modalities", "audio,text", "--epochs", "2", "--save-every", "1")
    kill_inside_epoch([sys.executable, str(ROOT / "train.py"), *argv], out, epoch=1, step=1)
    for flag, value in (("--lr", "0.002"), ("--batch-size", "4"), ("--seed", "1")):
        refused = run_train(argv + ["--resume", "auto", flag, value])
        assert refused.returncode != 0
        assert refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr, refused.stderr
        assert f"{flag} " in refused.stderr and value in refused.stderr
    resumed = run_train(argv + ["--resume", "auto", "--workers", "1"])     # workers cannot change the result
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and (out / "test_metrics.json").exists()

    outputs = ("last.pt", "best.pt", "test_metrics.json", "args.json", "log.jsonl")
    before = {name: (out / name).read_bytes() for name in outputs}
    finished = run_train(argv + ["--resume", "auto", "--log-every", "3"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "the run is finished (all 2 epochs done)" in finished.stdout
    assert {name: (out / name).read_bytes() for name in outputs} == before


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_default_unfreeze_skips_the_video_stages_of_a_model_without_video(cache, tiny_bert, tmp_path, modality):
    argv = small_args(cache, tiny_bert, tmp_path / "run", "--modalities", modality, "--epochs", "1",
                      "--min-epochs", "1", "--max-steps-per-epoch", "1")
    argv[argv.index("--unfreeze"):argv.index("--unfreeze") + 2] = []          # the default schedule
    result = run_train(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "skipped" in line]
    assert notes == ["note: --unfreeze stages of branches this model does not have are skipped: "
                     "video.res5, video.res4, video.res3"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda(2))])
def test_ddp_two_processes_evaluate_disjoint_shards_and_stay_in_sync(cache, tiny_bert, tmp_path, tokenizer, device):
    """torchrun with two ranks (gloo on CPU, NCCL on two GPUs): the same weights on every rank
    after every epoch, also after an unfreeze; each dev clip evaluated once; the gathered
    predictions equal a single-process evaluation of best.pt."""
    out = tmp_path / "ddp"
    argv = small_args(cache, tiny_bert, out, "--unfreeze", "1:text.layer.1", "--eval-batch-size", "2",
                      "--device", device)
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(ROOT / "train.py"), *argv],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    dev = data.ClipDataset(cache, "dev", data_config(modalities=("video", "audio", "text"), num_frames=8,
                                                         crop_size=32), tokenizer)
    assert len(dev) % (2 * 2) != 0  # the last shard is short: nothing may be counted twice
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for record in log:  # the same weights on both ranks, also after the unfreeze at epoch 1
        assert len(record["rank_checksums"]) == 2 and record["rank_checksums"][0] == record["rank_checksums"][1]
    assert log[1]["trainable"] > log[0]["trainable"]
    shards = [list(loading.ClipSampler(dev.labels(), shuffle=False, num_replicas=2, rank=r, pad=False))
              for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == len(dev)

    ddp_predictions = {p["id"]: p for p in map(json.loads, (out / "predictions_dev.jsonl").read_text().splitlines())}
    assert sorted(ddp_predictions) == sorted(r.id for r in dev.rows)
    best = runs.load_checkpoint(out / "best.pt")
    model = model_lib.EmotionModel(model_lib.ModelConfig(**best["model_config"]), load_pretrained=False)
    model.load_state_dict(best["model"])
    single = evaluate.predict(model, data.make_loader(dev, batch_size=3, train=False, workers=0), torch.device("cpu"))
    tolerance = {} if device == "cpu" else dict(rtol=0, atol=5e-3)  # the GPU run evaluates under fp16 autocast
    for clip_id, (emotion, sentiment) in single.items():
        for task, probabilities in (("emotion", emotion), ("sentiment", sentiment)):
            written = list(ddp_predictions[clip_id][task]["probabilities"].values())
            torch.testing.assert_close(torch.tensor(written), torch.tensor(probabilities), **tolerance)


def test_demo_end_to_end_with_wandb_offline_and_hub_upload_failing_cleanly(tmp_path):
    out = tmp_path / "demo"
    result = run_train(["--demo", "--out", str(out), "--epochs", "2", "--min-epochs", "2", "--max-steps-per-epoch", "2",
                        "--wandb", "--push-to-hub", "someone/meld-demo"])
    assert result.returncode != 0, "the upload cannot succeed offline"
    assert "--push-to-hub someone/meld-demo failed" in result.stderr and "untouched" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("--push-to-hub") and "Traceback" not in result.stderr
    for name in ("best.pt", "last.pt", "log.jsonl", "test_metrics.json", "args.json", "predictions_test.jsonl",
                 "confusion_test.png", "f1_test.png", "curves.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(metrics["test"]["emotion"]["per_class"]) == set(meld.EMOTIONS)
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert runs.load_checkpoint(out / "best.pt")["model_config"]["video_size"] == "tiny"
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert (out / "hub" / "model.safetensors").is_file() and (out / "hub" / "README.md").is_file()


@pytest.mark.parametrize("encoders", ["frames+lstm", "speech"])
def test_other_encoders_train_evaluate_and_rebuild(cache, tiny_bert, tmp_path, encoders):
    """--video-arch frames with --audio-encoder lstm, and --audio-encoder hf: (a tiny random wav2vec2
    folder; the loader then sends the waveform): a short run, plateau schedule, the speech encoder
    fine-tuned from the start at --lr-audio, the test split evaluated from the rebuilt best.pt."""
    out = tmp_path / "run"
    extra = ["--epochs", "1", "--min-epochs", "1", "--max-steps-per-epoch", "2", "--scheduler", "plateau"]
    if encoders == "speech":
        folder = tmp_path / "wav2vec2"
        config = transformers.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),
            conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2, feat_extract_norm="layer",
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
        transformers.Wav2Vec2Model(config).save_pretrained(folder)
        extra += ["--modalities", "audio,text", "--audio-encoder", f"hf:{folder}", "--lr-audio", "2e-5"]
    else:
        extra += ["--video-arch", "frames", "--audio-encoder", "lstm"]
    result = run_train(small_args(cache, tiny_bert, out, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    config = runs.load_checkpoint(out / "best.pt")["model_config"]
    if encoders == "speech":
        assert config["audio_encoder"] == f"hf:{tmp_path / 'wav2vec2'}"
        assert record["lr"]["audio.pretrained.decay"] == pytest.approx(2e-5)  # trained from the start, own LR
    else:
        assert (config["video_arch"], config["audio_encoder"]) == ("frames", "lstm")
        assert record["lr"]["video.new.decay"] == pytest.approx(1e-3)        # plateau: no per-step schedule
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["test"]["emotion"]["n"] > 0
