"""Tests for the encoders beside SlowFast / AudioCNN and for the task heads: the per-frame ResNet
baseline (video_arch="frames"), the MFCC-BiLSTM audio encoder (audio_encoder="lstm"), transformers
speech encoders (audio_encoder="hf:PATH", a tiny random wav2vec2 saved to a temporary folder),
and heads for any list of tasks. CPU only, nothing is downloaded.

    python -m pytest tests/test_encoders.py
"""

import dataclasses
import json
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchaudio
import torchvision
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import pretrained  # noqa: E402
from test_model import random_video, randomize_  # noqa: E402

SMALL = dict(fusion_dim=32, fusion_heads=2, head_hidden=(32, 16), video_init="random")   # small fusion and heads


def frames_resnet(size, init="random", **kwargs):
    return M.FrameResNet(M.ModelConfig(video_arch="frames", video_size=size, video_init=init), **kwargs)


def lengths_mask(lengths, total):
    """[len(lengths), total] bool, True for the first lengths[i] steps of row i."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def parameter_ids(modules):
    return [id(p) for m in modules for p in m.parameters()]


# ---------------------------------------------------------------------------------------------
# Frames: a 2-D ResNet per frame


def test_frames_equal_the_torchvision_resnet_per_frame():
    """One frame is the image classifier's pooled features; T frames are their mean."""
    frames = randomize_(frames_resnet("tiny"), seed=1).eval()
    resnet = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    missing, unexpected = resnet.load_state_dict(frames.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and not unexpected   # the same names, fc dropped
    resnet.fc = nn.Identity()
    resnet.eval()
    video = random_video(2, 5, 40, 36, seed=2)
    images = (video.float() / 255 - torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1, 1)) \
        / torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        single = frames(video[:, :, :1], torch.ones(2, 1, dtype=torch.bool))
        clip = frames(video, torch.ones(2, 5, dtype=torch.bool))
        per_frame = resnet(images.transpose(1, 2).reshape(10, 3, 40, 36)).view(2, 5, -1)
    assert single.shape == clip.shape == (2, 512) and frames.out_channels == 512
    torch.testing.assert_close(single, per_frame[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip, per_frame.mean(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [6, 1])
def test_frames_model_forward_and_backward(T):
    torch.manual_seed(0)
    model = M.EmotionModel(M.ModelConfig(modalities=("video",), video_arch="frames", video_size="tiny",
                                         **SMALL)).train()
    out = model(dict(video=random_video(3, T, 32, 32), video_mask=torch.ones(3, T, dtype=torch.bool)))
    assert out["emotion"].shape == (3, 7) and out["sentiment"].shape == (3, 3)
    (out["emotion"].sum() + out["sentiment"].sum()).backward()
    assert model.video.conv1.weight.grad.abs().sum() > 0


def test_frames_padding_does_not_change_the_output():
    frames = randomize_(frames_resnet("tiny"), seed=3).eval()
    lengths, T = [1, 3, 6, 0], 8
    clips = random_video(len(lengths), T, 32, 32, seed=4)         # padded frames are noise
    mask = lengths_mask(lengths, T)
    with torch.no_grad():
        out = frames(clips, mask)
        for i, k in enumerate(lengths[:3]):
            alone = frames(clips[i:i + 1, :, :k], torch.ones(1, k, dtype=torch.bool))
            torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        unmasked = frames(clips, torch.ones_like(mask))
    assert (out[3] == 0).all()                                    # no frame: zeros
    assert (unmasked[:3] - out[:3]).abs().max() > 1e-2            # the noise would matter


def test_frames_stages_and_pretrained_stages():
    model = M.EmotionModel(M.ModelConfig(modalities=("video",), video_arch="frames", video_size="tiny", **SMALL))
    stages = model.stages()
    video_stages = [f"video.{s}" for s in ("stem", "res2", "res3", "res4", "res5")]
    assert [s for s in stages if s.startswith("video.")] == video_stages
    ids = [i for s in video_stages for i in parameter_ids(stages[s])]
    assert sorted(ids) == sorted(id(p) for p in model.video.parameters())   # each exactly once
    assert model.pretrained_stages() == []
    with torch.device("meta"):
        imagenet = M.EmotionModel(M.ModelConfig(modalities=("video",), video_arch="frames", video_size="r50",
                                                video_init="imagenet"), load_pretrained=False)
    assert imagenet.pretrained_stages() == video_stages
    M.set_frozen(model, ["video.res5"], True)
    assert not any(p.requires_grad for p in model.video.layer4.parameters())
    assert all(p.requires_grad for p in model.video.layer3.parameters())


def test_frames_imagenet_loads_torchvision_weights_by_name(monkeypatch):
    torch.manual_seed(0)
    source = torchvision.models.resnet18().state_dict()
    requested = []
    monkeypatch.setattr(pretrained, "load_imagenet_state_dict",
                        lambda weights, hint: requested.append(weights) or source)
    frames = frames_resnet("small", "imagenet")
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    ours = frames.state_dict()
    assert set(ours) == {k for k in source if not k.startswith("fc.")}
    assert all(torch.equal(ours[k], source[k]) for k in ours)


def test_frames_imagenet_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(OSError) as error:
        frames_resnet("small", "imagenet")
    message = str(error.value)
    assert "\n" not in message and "--video-init random" in message and "ResNet18" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__
    with pytest.raises(ValueError, match="no ImageNet weights for the tiny"):
        frames_resnet("tiny", "imagenet")
    with pytest.raises(ValueError, match="kinetics:PATH is for --video-arch slowfast"):
        frames_resnet("r50", "kinetics:/some.pyth")


# ---------------------------------------------------------------------------------------------
# Audio: MFCC -> BiLSTM -> attention pooling


def test_lstm_mfcc_is_torchaudio_mfcc():
    """The DCT of the natural-log mel input is torchaudio's MFCC with log_mels=True."""
    lstm = M.AudioLSTM(M.ModelConfig(n_mels=64, audio_features="mfcc"))
    wave = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    reference = torchaudio.transforms.MFCC(16000, n_mfcc=40, log_mels=True,
                                           melkwargs=dict(n_fft=400, hop_length=160, n_mels=64))
    mel = torch.log(reference.MelSpectrogram(wave) + 1e-6)          # [1, 64, A]
    torch.testing.assert_close(lstm.features(mel), reference(wave))
    fewer = M.AudioLSTM(M.ModelConfig(n_mels=16, audio_features="mfcc"))
    assert fewer.features.dct.shape == (16, 16)                      # fewer mel bins: all of them


def test_lstm_forward_backward_and_silence():
    torch.manual_seed(0)
    lstm = M.AudioLSTM(M.ModelConfig(n_mels=16, audio_features="mfcc")).train()
    mel = torch.randn(3, 16, 40)
    out = lstm(mel, lengths_mask([40, 17, 0], 40))
    assert out.shape == (3, 256) and lstm.out_channels == 256
    assert torch.isfinite(out).all() and (out[2] == 0).all()      # no audio: zeros, no NaN
    out.sum().backward()
    for name, p in lstm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():                                          # a batch with no audio at all
        assert (lstm(mel, torch.zeros(3, 40, dtype=torch.bool)) == 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):              # as train.py's AMP runs it
        assert lstm(mel, lengths_mask([40, 17, 0], 40)).dtype == torch.bfloat16


def test_lstm_padding_does_not_change_the_output():
    torch.manual_seed(0)
    lstm = randomize_(M.AudioLSTM(M.ModelConfig(n_mels=16, audio_features="mfcc")), seed=5).eval()
    lengths, A = [1, 4, 23, 60], 64
    g = torch.Generator().manual_seed(6)
    mel = torch.randn(len(lengths), 16, A, generator=g) * 5        # padded frames are noise
    mask = lengths_mask(lengths, A)
    with torch.no_grad():
        out = lstm(mel, mask)
        for i, k in enumerate(lengths):
            alone = lstm(mel[i:i + 1, :, :k], torch.ones(1, k, dtype=torch.bool))
            torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        unmasked = lstm(mel, torch.ones_like(mask))
    assert (unmasked[:3] - out[:3]).abs().max() > 1e-2            # the noise would matter


# ---------------------------------------------------------------------------------------------
# Audio: transformers speech encoders on the waveform


@pytest.fixture(scope="module", params=["layer", "group"])
def tiny_wav2vec2(request, tmp_path_factory):
    """A 2-layer, 32-wide random wav2vec2 (feat_extract_norm as the parameter), saved as a local
    model folder: total stride 10 samples, receptive field 20."""
    folder = tmp_path_factory.mktemp(f"wav2vec2-{request.param}")
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2,
        feat_extract_norm=request.param, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    return request.param, str(folder)


def random_waves(lengths, S, seed=0):
    """Waves [B, 1, S] in [-1, 1] (noise also past each length) and their mask [B, S]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(len(lengths), 1, S, generator=g) * 2 - 1, lengths_mask(lengths, S)


def test_hf_forward_backward_and_stages(tiny_wav2vec2):
    norm, path = tiny_wav2vec2
    torch.manual_seed(0)
    model = M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_encoder=f"hf:{path}", **SMALL)).train()
    assert model.audio_input == "waveform" and model.audio.use_attention_mask == (norm == "layer")
    stages = model.stages()
    audio_stages = [s for s in stages if s.startswith("audio.")]
    assert audio_stages == ["audio.feature_extractor", "audio.layer.0", "audio.layer.1",
                            "audio.encoder", "audio.masked_spec_embed"]
    ids = [i for s in audio_stages for i in parameter_ids(stages[s])]
    assert sorted(ids) == sorted(id(p) for p in model.audio.parameters())   # each exactly once
    assert model.pretrained_stages() == audio_stages
    assert {g["name"] for g in M.param_groups(model)} >= {"audio.pretrained.decay", "heads.new.decay"}

    # a clip with no sample and one shorter than the receptive field: finite zeros, in training too
    wave, mask = random_waves([3000, 1700, 0, 12], 3000)
    out = model(dict(audio=wave, audio_mask=mask))
    assert out["emotion"].shape == (4, 7) and torch.isfinite(out["emotion"]).all()
    features = model.audio(wave, mask)
    assert features.shape == (4, 32) and (features[2:] == 0).all()
    (out["emotion"].sum() + out["sentiment"].sum()).backward()
    extractor = model.audio.model.feature_extractor.conv_layers[0].conv.weight
    assert extractor.grad is not None and extractor.grad.abs().sum() > 0


def test_hf_frozen_stage_gets_no_gradient(tiny_wav2vec2):
    _, path = tiny_wav2vec2
    model = M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_encoder=f"hf:{path}", **SMALL)).train()
    M.set_frozen(model, ["audio.feature_extractor", "audio.layer.0"], True)
    graph = []   # a frozen feature extractor builds no graph (no backward pass through it)
    model.audio.model.feature_extractor.register_forward_hook(
        lambda module, inputs, output: graph.append(output.requires_grad))
    wave, mask = random_waves([2000, 1500], 2000)
    out = model(dict(audio=wave, audio_mask=mask))
    out["emotion"].sum().backward()
    assert graph == [False]
    frozen = list(model.audio.model.feature_extractor.parameters()) \
        + list(model.audio.model.feature_projection.parameters()) \
        + list(model.audio.model.encoder.layers[0].parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None for p in model.audio.model.encoder.layers[1].parameters())


def test_hf_padding(tiny_wav2vec2):
    """"layer" models get an attention mask: padding with anything leaves the output unchanged.
    "group" models get zero padding and no mask: the padding's content is ignored (zeroed), but a
    padded clip differs from the clip alone (GroupNorm over the padded length, attention over
    padded frames): what the transformers docs describe for these models."""
    norm, path = tiny_wav2vec2
    encoder = M.SpeechEncoder(M.ModelConfig(audio_encoder=f"hf:{path}")).eval()
    lengths, S = [4000, 2500, 800], 4000
    wave, mask = random_waves(lengths, S, seed=1)                  # padded samples are noise
    with torch.no_grad():
        out = encoder(wave, mask)
        alone = torch.cat([encoder(wave[i:i + 1, :, :k], torch.ones(1, k, dtype=torch.bool))
                           for i, k in enumerate(lengths)])
        zero_padded = encoder(torch.where(mask[:, None], wave, 0.0), mask)
        unmasked = encoder(wave, torch.ones_like(mask))
    torch.testing.assert_close(zero_padded, out, rtol=0, atol=0)
    torch.testing.assert_close(out[0], alone[0], rtol=1e-5, atol=1e-5)     # nothing padded
    assert (unmasked[1:] - out[1:]).abs().max() > 1e-2                     # the noise would matter
    if norm == "layer":
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    else:
        assert (out[1:] - alone[1:]).abs().amax(1).min() > 1e-3


def test_hf_loading_and_rebuild(tiny_wav2vec2):
    _, path = tiny_wav2vec2
    saved = transformers.Wav2Vec2Model.from_pretrained(path).state_dict()
    model = M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_encoder=f"hf:{path}", **SMALL)).eval()
    assert all(torch.equal(model.audio.model.state_dict()[k], v) for k, v in saved.items())
    config = json.loads(json.dumps(dataclasses.asdict(model.config)))
    rebuilt = M.EmotionModel(M.ModelConfig(**config), load_pretrained=False).eval()        # from_config: random
    assert not torch.equal(rebuilt.audio.model.encoder.layers[0].feed_forward.output_dense.weight,
                           saved["encoder.layers.0.feed_forward.output_dense.weight"])
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    batch = dict(zip(("audio", "audio_mask"), random_waves([1500, 900], 1500)))
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["emotion"], rebuilt(batch)["emotion"])


def test_hf_errors(monkeypatch, tiny_bert):
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError) as error:
        M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_encoder="hf:some-org/not-a-cached-model"))
    message = str(error.value)
    assert "\n" not in message and "--audio-encoder" in message and "cnn or lstm" in message
    with pytest.raises(ValueError, match="not a wav2vec2-style speech encoder"):
        M.SpeechEncoder(M.ModelConfig(audio_encoder=f"hf:{tiny_bert}"))


# ---------------------------------------------------------------------------------------------
# Tasks, options, rebuilding


def test_single_task_model():
    model = M.EmotionModel(M.ModelConfig(modalities=("audio",), n_mels=16, audio_channels=(8, 16), tasks=(("label", 2),
                                                                                                          ),
                                         **SMALL)).eval()
    assert model.config.tasks == [["label", 2]] and list(model.heads) == ["label"]
    assert model.audio_input == "logmel"
    out = model(dict(audio=torch.randn(4, 16, 30), audio_mask=torch.ones(4, 30, dtype=torch.bool)))
    assert list(out) == ["label"] and out["label"].shape == (4, 2)
    assert list(model.stages())[-1] == "heads"


def test_unknown_options_name_the_choices():
    with pytest.raises(ValueError, match="cnn.*lstm.*hf:NAME_OR_PATH"):
        M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_encoder="mfcc"))
    with pytest.raises(ValueError, match="frames.*slowfast.*video_size"):
        M.EmotionModel(M.ModelConfig(modalities=("video",), video_arch="tiny"))
    with pytest.raises(ValueError, match="distinct names"):
        M.EmotionModel(M.ModelConfig(modalities=("audio",), tasks=(("a", 2), ("a", 3))))


def test_config_rebuilds_frames_lstm_single_task():
    torch.manual_seed(0)
    model = M.EmotionModel(M.ModelConfig(modalities=("video", "audio"), video_arch="frames", video_size="tiny",
                                         audio_encoder="lstm", n_mels=16, tasks=(("label", 2),), **SMALL))
    randomize_(model, seed=8).eval()
    config = json.loads(json.dumps(dataclasses.asdict(model.config)))    # survives a plain-dict round trip
    assert (config["video_arch"], config["video_size"], config["audio_encoder"]) == ("frames", "tiny", "lstm")
    rebuilt = M.EmotionModel(M.ModelConfig(**config), load_pretrained=False).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    batch = dict(video=random_video(3, 4, 32, 32), video_mask=lengths_mask([4, 2, 1], 4),
                 audio=torch.randn(3, 16, 25), audio_mask=lengths_mask([25, 10, 0], 25))
    with torch.no_grad():
        a, b = model(batch), rebuilt(batch)
    assert list(a) == ["label"] and a["label"].shape == (3, 2)
    torch.testing.assert_close(a["label"], b["label"])
