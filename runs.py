"""Run management: checkpoints, exact resume, RNG states, run folders, early stopping, W&B and
the Hugging Face Hub. train.py calls it; it imports nothing of the training loop or of evaluation.

    runs.save_checkpoint(path, state)            # atomic, plain tensors (weights_only=True reads it)
    checkpoint = runs.load_checkpoint(path)      # one line naming the file if it cannot be read
    runs.save_checkpoints(out, stateful, progress, run, world, best=True)   # last.pt (and best.pt)
    progress = runs.restore(checkpoint, stateful, rank)                     # model, optimizer, ..., RNG

What last.pt holds to continue exactly: the state_dict of the model, optimizer, scheduler, scaler
and early stopping; the progress counters (epoch, optimizer step, position in the epoch, the
epoch's losses and reported scalars so far, the log); every rank's RNG states (python, numpy,
torch, every CUDA device) as tensors; and what the run is: its settings (args), the model's and
the data's configuration, the cache's prepare settings, the class names, the number of processes.
best.pt is the same without what only resuming reads (RESUME_ONLY). Tested by tests/test_train.py
(SIGKILL mid-epoch and resume, bitwise; DDP), tests/test_settings.py and tests/test_first_hour.py.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cli
import meld
import pretrained


@dataclass
class RunConfig:
    """What a run reads, where it lives and how it is managed: each field is a train.py flag."""
    data: str = cli.setting("data/meld-cache", "cache written by `prepare.py`; for --modalities text any folder "
                            "with the CSVs; synth = synthetic MELD made once in OUT/data (as --demo does)")
    out: str = cli.setting("runs/meld", "output folder")
    resume: str = cli.setting("", "'' = new run, auto = OUT/last.pt if present, or a checkpoint path")
    overwrite: bool = cli.setting(False, "start a new run in --out even if it holds one (its outputs are deleted "
                                  "first)")
    seed: int = cli.setting(0, "seed (each rank adds its rank)", type=cli.non_negative(int))
    device: str = cli.setting("auto", "auto, cpu, cuda, cuda:N")
    deterministic: bool = cli.setting(False, "deterministic algorithms (slower on CUDA)")
    save_every: int = cli.setting(0, "also write last.pt every N optimizer steps (0 = epoch ends only)",
                                  type=cli.non_negative(int))
    log_every: int = cli.setting(10, "optimizer steps between progress-bar updates", type=cli.positive(int))
    wandb: bool = cli.setting(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = cli.setting("meld-emotion", "W&B project")
    push_to_hub: str = cli.setting("", "Hugging Face Hub repo id to upload the best model to ('' = no)")


# --- Processes, seeds, the data a run reads ---------------------------------------------------------------------------

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


def data_root(args, out, rank, world):
    """Where the clips are: --data, or for --data synth synthetic MELD made once in OUT/data (rank 0)."""
    if args.data != "synth":
        return Path(args.data)
    if rank == 0:
        import prepare  # PyAV: only runs that decode media import it
        prepare.demo_cache(out / "data")
    if world > 1:
        dist.barrier()
    return out / "data" / "cache"


def data_notes(root, config, loaders):
    """What a user should know before training on this data: classes that train lacks (they cannot
    be learnt), frames the crop enlarges (the cache's short side is smaller than crop·8/7)."""
    said = []
    (task, names), counts = loaders["train"].dataset.tasks[0], {}
    for split, loader in loaders.items():
        counts[split] = np.bincount(loader.dataset.labels(), minlength=len(names))
    for c in (c for c, name in enumerate(names) if counts["train"][c] == 0):
        elsewhere = ", ".join(f"{s} {n[c]}" for s, n in counts.items() if s != "train" and n[c])
        said.append(f"note: train has no {names[c]} clip{f' ({elsewhere})' if elsewhere else ''}: the model cannot "
                    f"learn {task} {names[c]}; its F1 stays 0")
    prepared = Path(root) / "prepare.json"
    if "video" in config.modalities and prepared.is_file():
        short_side = json.loads(prepared.read_text())["short_side"]
        if round(config.crop_size * 8 / 7) > short_side:
            said.append(f"note: --crop-size {config.crop_size} enlarges the cache's frames (short side {short_side}, "
                        f"resized to {round(config.crop_size * 8 / 7)}): prepare with --short-side "
                        f"{round(config.crop_size * 8 / 7)} for sharper frames")
    return said


def check_data_folder(args, root):
    """Before anything is loaded: the data folder exists and has the train and dev splits."""
    if not root.is_dir():
        raise SystemExit(f"--data {root}: no such folder; give a cache written by `python prepare.py` "
                         "(or, for --modalities text, a folder with MELD's CSVs)")
    available = meld.available_splits(root, args.dataset)
    if "train" not in available or "dev" not in available:
        raise SystemExit(f"--data {root}: needs {meld.split_file(args.dataset, 'train')} and "
                         f"{meld.split_file(args.dataset, 'dev')} (found splits: {available or 'none'}; --dataset "
                         f"{args.dataset}); give the --out of `python prepare.py`, or for --modalities text the "
                         "folder holding MELD's CSVs")



# --- Checkpoint files -------------------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """torch.save, atomically (a temporary file renamed over path): a kill never leaves half a
    checkpoint, and a write that fails leaves no temporary file. state: tensors and plain
    containers only, so that load_checkpoint reads it with weights_only=True. SystemExit in one
    line when the disk is full (torch.save's own error does not say so)."""
    try:
        cli.write_atomic(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:
        if getattr(e, "errno", None) not in cli.DISK_FULL and shutil.disk_usage(Path(path).parent).free > 2 ** 26:
            raise
        raise SystemExit(f"writing {path} failed: {cli.disk_full(Path(path).parent)}; free some space, then "
                         f"`python train.py --out {Path(path).parent} --resume auto` continues from the last "
                         "checkpoint written") from None


def load_checkpoint(path, device="cpu"):
    """A train.py checkpoint: plain tensors and containers only (weights_only=True), so a checkpoint
    holding a pickled object is refused; SystemExit in one line naming the file when it cannot be
    read. Older checkpoints are brought up to date (upgrade)."""
    if not Path(path).is_file():
        what = "a folder, not a checkpoint file" if Path(path).is_dir() else "no such checkpoint file"
        raise SystemExit(f"{path}: {what} (train.py writes best.pt and last.pt in its --out)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for objects; RuntimeError/EOFError for a cut-off file
        raise SystemExit(f"{path}: cannot be loaded as a plain-tensor checkpoint (weights_only=True): "
                         f"{type(e).__name__}: {cli.first_line(e)}") from None
    return upgrade(checkpoint)


# The data settings of checkpoints written before data_config was stored (their flags had these names).
OLD_DATA_SETTINGS = ("dataset", "num_frames", "crop_size", "frame_sampling", "hflip", "max_audio_seconds",
                     "max_text_tokens", "context", "speakers")


def upgrade(checkpoint):
    """A checkpoint of older code, as this code reads it: the lstm audio encoder read MFCCs before
    --audio-features existed; a checkpoint without data_config gets it from its flags and model."""
    if not isinstance(checkpoint, dict):
        return checkpoint
    for key in ("model_config", "args"):
        config = checkpoint.get(key)
        if isinstance(config, dict) and config.get("audio_encoder") == "lstm" and "audio_features" not in config:
            config["audio_features"] = "mfcc"
    model, args = checkpoint.get("model_config"), checkpoint.get("args", {})
    if isinstance(model, dict) and "modalities" in model and "data_config" not in checkpoint:
        waveform = str(model.get("audio_encoder", "")).startswith("hf:")
        checkpoint["data_config"] = {k: args[k] for k in OLD_DATA_SETTINGS if k in args} | dict(
            modalities=model["modalities"], n_mels=model.get("n_mels", 64),
            audio_input="waveform" if waveform else "logmel")
    return checkpoint


# --- What a run is and where it is ------------------------------------------------------------------------------------

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


@dataclass
class Progress:
    """Where a run is, and what it has recorded so far."""
    epoch: int = 0                  # the epoch running (or next to run)
    step_in_epoch: int = 0          # optimizer steps of it done
    step: int = 0                   # optimizer steps done in all
    epoch_losses: list = field(default_factory=list)   # losses of this epoch's steps so far
    epoch_aux: dict = field(default_factory=dict)      # scalars the model reported, per step (model.report)
    epoch_skipped: int = 0          # this epoch's optimizer steps skipped for non-finite gradients
    skipped_in_a_row: int = 0       # skipped steps since the last one taken, across epochs
    history: list = field(default_factory=list)        # one record per finished epoch: log.jsonl
    wandb_id: str = None

    def next_epoch(self):
        """The epoch just recorded is done: the next one starts, with nothing of it collected yet."""
        self.epoch, self.step_in_epoch, self.epoch_losses, self.epoch_aux, self.epoch_skipped = \
            self.epoch + 1, 0, [], {}, 0

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{name: checkpoint[name] for name in cls.__dataclass_fields__ if name in checkpoint})


def describe_run(args, model_config, data_config, tasks, world, data_root, amp):
    """What a checkpoint says about the run that wrote it: its settings, the model's and the data's
    configuration, how its clips were decoded (the cache's prepare.json, for evaluate.py predict),
    the class names of each task, its number of processes, its autocast ("fp16", "bf16", "off") and
    what identifies its data and models whatever folder holds them (identity)."""
    prepare_json = Path(data_root) / "prepare.json"
    return dict(args=dict(vars(args)), model_config=asdict(model_config), data_config=asdict(data_config),
                prepare=json.loads(prepare_json.read_text()) if prepare_json.exists() else None,
                tasks=[[task, list(names)] for task, names in tasks], world_size=world, amp=amp,
                identity={key: identify(key, args, data_root) for key in IDENTIFIED})


# Settings that name a folder or file: on resume another place is accepted when it holds the same files.
IDENTIFIED = ("data", "text_model", "audio_encoder")


def identify(key, args, data_root):
    """What a setting of IDENTIFIED names, as a hash of the files that matter (not their place): the
    data's split CSVs, prepare settings and prepared clips; a local model folder's configuration and
    tokenizer (a hub name stands for itself)."""
    if key == "data":
        root, digest = Path(data_root), hashlib.sha256()
        for split in meld.SPLITS:
            path = meld.find_csv(root, split) if args.dataset == "meld" else root / meld.split_file("csv", split)
            digest.update(path.read_bytes() if path and path.is_file() else b"-")
        if (root / "prepare.json").is_file():
            digest.update((root / "prepare.json").read_bytes())
        for clip_id, entry in sorted(meld.read_manifest(root).items()):
            fields = [clip_id, entry["status"], entry.get("frames"), entry.get("audio_samples")]
            digest.update(json.dumps(fields).encode())
        return digest.hexdigest()
    value = getattr(args, key)
    return pretrained.identity(value[3:]) if key == "audio_encoder" and value.startswith("hf:") else (
        pretrained.identity(value) if key == "text_model" else value)


def rng_state():
    """This process's RNG states as tensors and plain values, so that torch.load(weights_only=True)
    reads them (np.random.get_state() as it is would not load)."""
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
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "epoch_losses", "epoch_aux", "epoch_skipped",
               "skipped_in_a_row")


def save_checkpoints(out, stateful, progress, run, world, best=False):
    """Rank 0 writes out/last.pt: the state_dict() of each object in stateful (model, optimizer,
    scheduler, scaler, early_stopping), progress, every rank's RNG states and run (describe_run);
    with best=True also out/best.pt, the same without RESUME_ONLY. Every rank must call it: all
    ranks' RNG states are gathered."""
    rng = rng_states(world)
    if world == 1 or dist.get_rank() == 0:
        state = {name: obj.state_dict() for name, obj in stateful.items()} | asdict(progress) | dict(rng=rng) | run
        save_checkpoint(out / "last.pt", state)
        if best:
            save_checkpoint(out / "best.pt", {k: v for k, v in state.items() if k not in RESUME_ONLY})


def restore(checkpoint, stateful, rank):
    """Load a last.pt into the stateful objects and this rank's RNGs. -> its Progress."""
    for name, obj in stateful.items():
        obj.load_state_dict(checkpoint[name])
    rng = checkpoint["rng"]
    set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a dict: a checkpoint of one process
    return Progress.from_checkpoint(checkpoint)


# --- Resuming: which run, and the same settings -----------------------------------------------------------------------

# Settings a resumed run may change: they cannot change what it computes.
RESUME_FREE = ("resume", "out", "overwrite", "workers", "log_every", "save_every", "wandb", "wandb_project",
               "push_to_hub", "device", "decode", "amp")      # the autocast itself is compared (check_amp)
# Settings of one command line, not of the run: never read from a config file, written to args.json
# or taken from the run on resume.
INVOCATION = ("resume", "overwrite")


def find_resume_path(flag, out, is_main=True):
    """--resume: '' = a new run (None), auto = out/last.pt if it exists (else None, said in a line),
    or a path: a checkpoint of the run in out (SystemExit for another folder's, whose log, best.pt
    and results stay there)."""
    if flag == "auto":
        if (out / "last.pt").exists():
            return out / "last.pt"
        if is_main:
            print(f"--resume auto: no checkpoint in {out} yet: starting the run again with its args.json settings"
                  if unfinished_start(out) else f"--resume auto: no last.pt in {out}: starting a new run")
        return None
    if flag and Path(flag).exists() and Path(flag).resolve().parent != out.resolve():
        raise SystemExit(f"--resume {flag}: a checkpoint of the run in {Path(flag).parent}, and --out is {out}; a run "
                         f"goes on in its own folder: --out {Path(flag).parent} --resume {flag} (to branch from it, "
                         "copy that folder and resume the copy)")
    return Path(flag) if flag else None


def unfinished_start(out):
    """Whether out holds only what a start that saved no checkpoint left (its args.json)."""
    return (out / "args.json").is_file() and not any((out / name).exists() for name in
                                                      ("last.pt", "best.pt", "test_metrics.json"))


def write_args(out, args, resumed):
    """out/args.json: the run's settings (INVOCATION's aside), a config file that repeats the run, and
    "argv": the command lines that started the run and, after it, each that resumed it."""
    path, argv = out / "args.json", [sys.argv]
    if resumed and path.exists():
        before = json.loads(path.read_text()).get("argv") or []
        argv = (before if isinstance(before[0], list) else [before]) + argv if before else argv
    settings = {k: v for k, v in vars(args).items() if k not in INVOCATION}
    cli.write_atomic(path, json.dumps(settings | dict(argv=argv), indent=2) + "\n")


def run_settings(checkpoint, defaults):
    """The settings a checkpoint's run used: every setting of `defaults` ({name: default}), a setting
    the checkpoint does not record (added since) at its default."""
    return defaults | {k: v for k, v in checkpoint.get("args", {}).items() if k in defaults}


def adopt_run_settings(args, checkpoint, given, defaults):
    """Resuming: every setting not given on this command line (or its --config) takes the run's value,
    so `--out RUN --resume auto` alone continues a run as it was (on its device, saving as often);
    given ones are compared by check_resume. INVOCATION settings are this command line's own."""
    for key, value in run_settings(checkpoint, defaults).items():
        if key not in given and key not in INVOCATION:
            setattr(args, key, value)


def check_resume(checkpoint, args, world, path, defaults, given):
    """Refuse, in one line, a resume whose settings (or process count) differ from the run's in
    anything that changes the result; RESUME_FREE settings may differ, and a setting of IDENTIFIED
    may name another place that holds the same files (moved data). Every setting is compared: one
    the checkpoint does not record is compared as its default."""
    if "optimizer" not in checkpoint:
        raise SystemExit(f"--resume {path}: holds the model only (best.pt keeps no optimizer state); resume from "
                         "the run's last.pt")
    if "data" not in given and args.data != "synth" and not Path(args.data).exists():
        raise SystemExit(f"--resume {path}: the run's --data {args.data} is gone (moved?); give its new place with "
                         "--data NEW (checked to hold the same data)")
    saved, now = run_settings(checkpoint, defaults), vars(args)
    root = Path(path).parent / "data" / "cache" if args.data == "synth" else Path(args.data)
    moved = {k for k in IDENTIFIED if saved[k] != now[k] and k in checkpoint.get("identity", {})
             and (k != "data" or root.is_dir()) and checkpoint["identity"][k] == identify(k, args, root)}
    changed = [k for k in defaults if k not in RESUME_FREE and saved[k] != now[k] and k not in moved]
    if changed:
        raise SystemExit(f"--resume {path}: the run was trained with {cli.format_flags(saved, changed)}, now "
                         f"{cli.format_flags(now, changed)}; that changes the result: pass the run's values (a moved "
                         "folder is accepted when it holds the same files), or start a new run with another --out")
    saved_world = checkpoint.get("world_size", 1)
    if saved_world != world:
        raise SystemExit(f"--resume {path}: the run was trained with {saved_world} process(es), now {world}; "
                         "that changes the result: resume with the same torchrun --nproc_per_node")


def check_amp(checkpoint, amp, args, device, path):
    """Refuse, in one line, a resume whose autocast ("fp16", "bf16", "off": --amp as resolved on this
    device) is not the run's: another device with --amp auto gives another one, and fp16's
    GradScaler state exists only with fp16. Older checkpoints that do not record it tell fp16 by
    their scaler state."""
    was = checkpoint.get("amp") or ("fp16" if checkpoint.get("scaler") else "off" if amp == "fp16" else None)
    if was is not None and was != amp:
        raise SystemExit(f"--resume {path}: the run trained with autocast {was}, and this one would run {amp} (--amp "
                         f"{args.amp} on {device.type}): that changes the result; resume on the run's kind of device, "
                         f"or pass --amp {was}")


def resumed_from(path, progress, finished):
    """The line printed when a run resumes: where it continues."""
    if finished:
        return f"resumed from {path}: the run is finished ({finished}) but was not tested: testing best.pt"
    return f"resumed from {path}: epoch {progress.epoch}, optimizer step {progress.step_in_epoch} of that epoch"


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


RUN_FILES = ("args.json", "log.jsonl", "last.pt", "best.pt", "test_metrics.json", "predictions_dev.jsonl",
             "predictions_test.jsonl", "confusion_dev.png", "confusion_test.png", "f1_dev.png", "f1_test.png",
             "curves.png")


def check_new_run_folder(out, overwrite, is_main):
    """A new run never silently replaces another: refuse a folder that holds one (a checkpoint or
    results), unless told to overwrite (then its outputs are deleted first, so none of the old run
    is left mixed in). What a start that saved no checkpoint left (args.json) is replaced, said in
    a line. An --out that is a file is refused."""
    file = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise SystemExit(f"--out {out}: {file} is a file, not a folder; choose another --out")
    held = [name for name in RUN_FILES if (out / name).exists()]
    started = [name for name in held if name in ("last.pt", "best.pt", "test_metrics.json")]
    if started and not overwrite:
        raise SystemExit(f"--out {out} already holds a run ({', '.join(held[:3])}{', …' if len(held) > 3 else ''}): "
                         "continue it with --resume auto, choose another --out, or pass --overwrite to replace it")
    if held and is_main:
        for name in held:
            (out / name).unlink()
        print(f"--overwrite: deleted the previous run's {', '.join(held)} in {out}" if started else
              f"--out {out}: a start that saved no checkpoint left {', '.join(held)}: replaced")


# --- Health of a run: memory, ranks in step ---------------------------------------------------------------------------

@contextlib.contextmanager
def stops_in_one_line(out=None):
    """The ways a long run stops that are not the code's bugs, each as one line saying how to go on:
    Ctrl-C, a loader worker killed (the out-of-memory killer) or stuck, a damaged cache. out: the
    training run's folder (its last.pt is how to go on), None for a command that is run again."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; {how_to_go_on(out)}") from None
    except meld.DamagedClip as e:   # raised in a loader worker: its message is the traceback's last line
        raise SystemExit(str(e).strip().splitlines()[-1].removeprefix("meld.DamagedClip: ")) from None
    except RuntimeError as e:
        if "DataLoader worker" in str(e) or "DataLoader timed out" in str(e):
            raise SystemExit(f"{cli.first_line(e)}: a loader worker died (out of memory?) or hung; lower --workers "
                             f"or --batch-size, then {how_to_go_on(out)}") from None
        raise


def how_to_go_on(out):
    """After a stop: resume from out/last.pt, or, where there is none, run the command again."""
    if out is not None and (Path(out) / "last.pt").exists():
        return f"`python train.py --out {out} --resume auto` continues from the last checkpoint"
    return "no checkpoint was saved yet: run the same command again" if out is not None else \
        "run the same command again"


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


def check_ranks_agree(model, world, epoch):
    """Under DDP: every rank's weights as a checksum (a collective call). RuntimeError if they
    differ (the run is broken). -> the checksums, by rank."""
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, params_checksum(model))
    if any(not torch.equal(sums[0], s) for s in sums):
        raise RuntimeError(f"epoch {epoch}: weights differ across ranks: {[s.tolist() for s in sums]}")
    return [s.tolist() for s in sums]


# --- What a run logs --------------------------------------------------------------------------------------------------

def epoch_record(model, optimizer, progress, dev, stopper, seconds, data_wait, clips, device, world):
    """One line of log.jsonl for the epoch just trained (progress.epoch) and evaluated on dev, with
    the scalars the model reported averaged over the epoch. Under DDP it also checks that every
    rank holds the same weights (a collective call)."""
    losses = progress.epoch_losses
    record = dict(epoch=progress.epoch, step=progress.step,
                  train_loss=float(np.mean(losses)) if losses else float("nan"),
                  lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                  dev={task: {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "partial") if k in m}
                       for task, m in dev.items()},
                  aux={name: float(np.mean(values)) for name, values in progress.epoch_aux.items()},
                  skipped_steps=progress.epoch_skipped,
                  best_epoch=stopper.best_epoch, seconds=round(seconds, 2),
                  clips_per_s=round(clips / seconds, 2) if seconds else 0.0,
                  data_wait=round(data_wait, 4), peak_memory_mb=round(peak_memory_mb(device), 1),
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if world > 1:  # the same weights on every rank, or the run is broken
        record["rank_checksums"] = check_ranks_agree(model, world, progress.epoch)
    return record


def epoch_summary(record, best):
    """The line printed after an epoch: loss, dev weighted F1 of each task, speed."""
    (primary, dev), *others = record["dev"].items()
    return (f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, dev{partial(record['dev'])} {primary} "
            f"weighted F1 {dev['weighted_f1']:.4f} (best {best:.4f} at epoch {record['best_epoch']}), "
            + "".join(f"{task} {m['weighted_f1']:.4f}, " for task, m in others)
            + (f"{record['skipped_steps']} steps skipped (non-finite gradients), " if record["skipped_steps"] else "")
            + f"{record['clips_per_s']} clips/s, data wait {record['data_wait']:.1%}")


def log_epoch(out, progress, best, dev_predictions, improved, dev, wandb_run=None):
    """After an epoch (rank 0): its line printed, log.jsonl rewritten with every record so far,
    predictions_dev.jsonl on a new best (improved), the record and dev predictions to W&B."""
    record = progress.history[-1]
    print(epoch_summary(record, best))
    cli.write_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in progress.history))
    if improved:
        write_predictions(out / "predictions_dev.jsonl", dev_predictions, dev)
    if wandb_run:
        log_wandb_epoch(wandb_run, record, dev_predictions, {r.id: r for r in dev.rows}, dev.tasks, progress.step)


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



def partial(metrics):
    """' (partial: 32 of 120 clips, --max-eval-batches)' for metrics of a capped evaluation, else ''."""
    note = next(iter(metrics.values())).get("partial")
    return f" (partial: {note})" if note else ""



# --- Weights & Biases, Hugging Face Hub -------------------------------------------------------------------------------

def start_wandb(args, out, progress):
    """A W&B run (resumed when progress has its id; WANDB_MODE=offline works without a network).
    SystemExit in one line when W&B cannot start (no login, no network)."""
    import wandb
    try:
        run = wandb.init(project=args.wandb_project, dir=str(out), config=vars(args), id=progress.wandb_id,
                         resume="allow" if progress.wandb_id else None)
    except Exception as e:
        raise SystemExit(f"--wandb: W&B could not start ({type(e).__name__}: {cli.first_line(e)}); log in with "
                         "`wandb login`, set WANDB_MODE=offline, or leave out --wandb") from None
    progress.wandb_id = run.id
    return run


def log_wandb_epoch(run, record, predictions, rows, tasks, step):
    """An epoch's record (dev metrics, speed, reported scalars), the dev confusion matrix of the
    primary task and a table of eight dev predictions. rows: {clip id: meld.Utterance}."""
    import wandb
    run.log({"epoch": record["epoch"], "train_loss_epoch": record["train_loss"],
             **{f"dev/{task}_{k}": v for task, m in record["dev"].items() for k, v in m.items()},
             **{f"aux/{k}": v for k, v in record["aux"].items()},
             "clips_per_s": record["clips_per_s"], "data_wait": record["data_wait"]}, step=step)
    task, names = tasks[0]
    ids = sorted(predictions)
    y_true = [getattr(rows[i], task) for i in ids]
    y_pred = [int(np.argmax(predictions[i][0])) for i in ids]
    run.log({f"dev/confusion_{task}": wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred,
                                                                  class_names=list(names))}, step=step)
    table = wandb.Table(columns=["id", "text", "true", "predicted", "p"])
    for i, truth, guess in list(zip(ids, y_true, y_pred))[:8]:
        table.add_data(i, rows[i].text, names[truth], names[guess], max(predictions[i][0]))
    run.log({"dev/samples": table}, step=step)


def finish(args, out, test_metrics, primary, wandb_run, world, is_main):
    """After testing: W&B's summary and end, the process group's end, the Hub upload (rank 0)."""
    if wandb_run:
        wandb_run.summary.update({f"{s}_{primary}_weighted_f1": test_metrics[s][primary]["weighted_f1"]
                                  for s in ("dev", "test") if s in test_metrics})
        wandb_run.finish()
    if world > 1:
        dist.destroy_process_group()
    if args.push_to_hub and is_main:
        push_to_hub(args.push_to_hub, out, test_metrics)


def push_to_hub(repo_id, out, test_metrics):
    """Best weights as safetensors, config.json, metrics and a model card, in one commit. SystemExit
    (one line, the run untouched, the upload staged in out/hub) if the upload fails."""
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    stage = out / "hub"
    stage.mkdir(exist_ok=True)
    best = load_checkpoint(out / "best.pt")
    save_file({k: v.contiguous() for k, v in best["model"].items()}, stage / "model.safetensors")
    tasks = best["tasks"]
    (stage / "config.json").write_text(json.dumps(dict(model_config=best["model_config"],
                                                       data_config=best["data_config"],
                                                       args=best["args"], tasks=tasks), indent=2) + "\n")
    (stage / "metrics.json").write_text(json.dumps(test_metrics, indent=2) + "\n")
    header = " | ".join(f"{task} weighted F1 | {task} accuracy" for task, _ in tasks)
    rows = "\n".join(f"| {split} | " + " | ".join(f"{m[t]['weighted_f1']:.4f} | {m[t]['accuracy']:.4f}"
                                                  for t, _ in tasks) + " |"
                     for split, m in test_metrics.items() if isinstance(m, dict))
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
