"""Speech encoders from transformers (wav2vec2, HuBERT, WavLM) as an audio branch: `--audio-encoder
hf:NAME_OR_PATH`, model.AUDIO_ENCODERS["hf:"].

    encoder = SpeechEncoder(ModelConfig(audio_encoder="hf:facebook/wav2vec2-base"))
    features = encoder(wave, mask)       # float [B, 1, S] at 16 kHz, bool [B, S] -> [B, hidden_size]

What it takes to run a pretrained speech model on padded batches as transformers documents it:
per-clip normalisation over real samples, the attention mask only for models trained with one,
output frames past each clip's length left out of the mean, batches shorter than the receptive
field padded. Tested by tests/test_encoders.py (padding, freezing, rebuilding, errors) and
tests/test_inputs.py (short clips) with tiny random wav2vec2 models; nothing is downloaded.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrained
from slowfast import mask_time, masked_mean


class SpeechEncoder(nn.Module):
    """A transformers speech encoder (wav2vec2, HuBERT, WavLM: AutoModel, config.audio_encoder
    "hf:NAME_OR_PATH") on the 16 kHz waveform, mean-pooled over its real output frames.

    Each clip is normalised to zero mean and unit variance over its real samples (as
    Wav2Vec2FeatureExtractor does) and its padding set to zero. attention_mask is passed only to
    models with feat_extract_norm "layer" (wav2vec2-large-lv60, HuBERT-large, WavLM), which are then
    padding invariant; "group" models (wav2vec2-base, HuBERT-base) take zero padding without a mask,
    as the transformers docs say to run them, so padding changes their output. Output frames past a
    clip's length (_get_feat_extract_output_lengths) are left out of the mean.
    forward(wave float [B, 1, S] in [-1, 1], mask bool [B, S]) -> [B, D]. A clip with no sample, or
    shorter than the receptive field (400 samples for wav2vec2), gives zeros; a batch shorter than
    the receptive field (in training: than the model's own time masks) is zero-padded to it."""

    def __init__(self, config, load_pretrained=True):
        super().__init__()
        name_or_path = config.audio_encoder[len("hf:"):]
        self.model = pretrained.load_transformer(name_or_path, load_pretrained, "--audio-encoder")
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise ValueError(f"--audio-encoder hf:{name_or_path}: {type(self.model).__name__} is not "
                             "a wav2vec2-style speech encoder (wav2vec2, HuBERT, WavLM)")
        model_config = self.model.config
        self.use_attention_mask = getattr(model_config, "feat_extract_norm", None) == "layer"
        self.out_channels = model_config.hidden_size
        self.receptive_field = 1                           # samples that make one output frame
        for kernel, stride in zip(reversed(model_config.conv_kernel), reversed(model_config.conv_stride)):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        masks_time = getattr(model_config, "apply_spec_augment", False) and getattr(model_config, "mask_time_prob", 0)
        frames = getattr(model_config, "mask_time_length", 1) if masks_time else 1   # in training
        self.min_train_samples = self.receptive_field + math.prod(model_config.conv_stride) * (frames - 1)

    def forward(self, wave, mask, lengths=None):
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
        # transformers makes the waveform require grad in training unless its own
        # freeze_feature_encoder() ran; follow set_frozen instead, so a frozen extractor builds no graph
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
        stages = pretrained.transformer_stages(self.model)
        stages["feature_extractor"] += stages.pop("feature_projection", [])
        return stages

    def pretrained_stages(self):
        return list(self.stages())
