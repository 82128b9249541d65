"""meld.py, prepare.py and data.py: MELD CSVs, synth, prepare (resumable, defects), dataset, collate,
sampler, loaders."""

import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg

import data
import loading
import meld
import prepare
from conftest import PREPARE_SETTINGS, ROOT, SHARED_MELD, SYNTH_SIZES, data_config

FIXTURES = Path(__file__).parent / "fixtures"


def defect_ids(root):
    """The ids synth made defective: last two train rows (no audio, truncated), last dev row (missing)."""
    train = meld.read_meld_csv(meld.find_csv(root, "train"), "train")
    dev = meld.read_meld_csv(meld.find_csv(root, "dev"), "dev")
    return {"no audio": train[-2].id, "corrupt": train[-1].id, "missing": dev[-1].id,
            "unlabelled": "test/final_videos_testdia0_utt0"}


# ---------------------------------------------------------------------------------------------- CSV

def test_csv_quirks_parse_identically_in_every_encoding():
    rows = [meld.read_meld_csv(FIXTURES / name, "dev")
            for name in ("meld_quirks_utf8.csv", "meld_quirks_utf8_bom.csv", "meld_quirks_cp1252.csv")]
    assert rows[0] == rows[1] == rows[2]
    first, _, third, fourth = rows[0]
    assert first.text == "Oh my God, he’s lost it. He’s totally lost it."
    assert (first.start, first.end) == ("00:20:57,256", "00:21:00,049")
    assert third.text == 'He said “no” — and then "we were on a break!"'
    assert (third.emotion, third.sentiment) == (meld.EMOTIONS.index("anger"), meld.SENTIMENTS.index("negative"))
    assert fourth.text == "Café latte … thanks." and fourth.speaker == "The Interviewer"
    assert [r.id for r in rows[0]] == ["dev/dia0_utt0", "dev/dia0_utt1", "dev/dia0_utt2", "dev/dia1_utt0"]


def test_unknown_label_is_refused_with_its_name_and_row(tmp_path):
    text = (FIXTURES / "meld_quirks_utf8.csv").read_text(encoding="utf-8").replace("What?,Monica,surprise",
                                                                                   "What?,Monica,happiness")
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv, row 3: unknown emotion label 'happiness'"):
        meld.read_meld_csv(path, "train")


def test_missing_column_is_refused(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_text("Sr No.,Utterance,Speaker,Emotion\n1,Hi,Ross,joy\n")
    with pytest.raises(ValueError, match=r"cut\.csv: missing column"):
        meld.read_meld_csv(path, "train")


@pytest.mark.skipif(not SHARED_MELD.is_dir(), reason="MELD_TEST_DATA is not set")
def test_real_meld_dev_csv_counts():
    rows = meld.read_meld_csv(SHARED_MELD / "dev_sent_emo.csv", "dev")
    assert len(rows) == 1109
    counts = collections.Counter(meld.EMOTIONS[r.emotion] for r in rows)
    assert counts == {"neutral": 470, "joy": 163, "anger": 153, "surprise": 150, "sadness": 111,
                      "fear": 40, "disgust": 22}
    assert rows[0].text == "Oh my God, he’s lost it. He’s totally lost it."


def test_synth_csvs_have_meld_columns_and_parse(synth_root):
    for split, size in zip(meld.SPLITS, SYNTH_SIZES):
        path = synth_root / f"{split}_sent_emo.csv"
        raw = path.read_bytes()
        assert raw.startswith(",".join(meld.MELD_COLUMNS).encode() + b"\r\n")
        assert b'"00:' in raw  # times quoted because of their comma, as in MELD
        rows = meld.read_meld_csv(path, split)
        assert len(rows) == size
        assert all(r.text for r in rows)


# ---------------------------------------------------------------------------------------------- synth

def test_temporal_pair_has_the_same_frames_in_opposite_order():
    first, second = prepare.TEMPORAL_PAIR
    a = prepare.synth_frames(first, 2.0, 64, 36, 24, seed=11)
    b = prepare.synth_frames(second, 2.0, 64, 36, 24, seed=11)
    assert a.shape == b.shape and len(a) == 48
    np.testing.assert_array_equal(a, b[::-1])
    assert not np.array_equal(a, b)  # the order differs, so the pair is not separable without time
    assert sorted(f.tobytes() for f in a) == sorted(f.tobytes() for f in b)
    other = prepare.synth_frames("joy", 2.0, 64, 36, 24, seed=11)
    assert not np.array_equal(np.sort(a.reshape(-1)), np.sort(other.reshape(-1)))  # colour differs


def test_synth_is_reproducible_from_seed(tmp_path):
    kwargs = dict(sizes=(3, 1, 1), seed=5, width=32, height=18, fps=12, max_seconds=1.0)
    prepare.synth(tmp_path / "a", **kwargs)
    prepare.synth(tmp_path / "b", **kwargs)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 3 + 3 + 3 + 0 + 2  # CSVs, traces, train, dev (missing), test + stray
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    prepare.synth(tmp_path / "c", **(kwargs | dict(seed=6)))
    assert (tmp_path / "a/train_sent_emo.csv").read_bytes() != (tmp_path / "c/train_sent_emo.csv").read_bytes()


def test_synth_traces_are_partial_so_fusion_beats_each_modality():
    """Each modality carries the true emotion only part of the time, independently of the others:
    an oracle that reads one modality perfectly is capped, and a vote of the three beats the best."""
    rows = prepare.synth_rows(6000, np.random.default_rng(0))
    right = collections.Counter()
    for r in rows:
        votes = collections.Counter(r["traces"][m] for m in ("text", "audio", "video"))
        fused, n = votes.most_common(1)[0]
        fused = fused if n > 1 else r["traces"]["text"]  # no majority: trust the most reliable one
        right.update({m: r["traces"][m] == r["emotion"] for m in ("text", "audio", "video")})
        right["fused"] += fused == r["emotion"]
    single = {m: right[m] / len(rows) for m in ("text", "audio", "video")}
    for m, p in prepare.SYNTH_INFORMATIVE.items():
        assert abs(single[m] - (p + (1 - p) / 7)) < 0.03, single
    assert right["fused"] / len(rows) > max(single.values()) + 0.05, (right, single)
    counts = collections.Counter(r["emotion"] for r in rows)
    assert counts.most_common(1)[0][0] == "neutral" and set(counts) == set(meld.EMOTIONS)


def test_synth_traces_can_be_read_back_from_the_decoded_media(synth_root, cache):
    """The trace written into each mp4 survives H.264/AAC and prepare: text by keyword, audio by
    pitch, video by the colour of the disk."""
    traces = {t["id"]: t for t in map(json.loads, (synth_root / "train_synth_traces.jsonl").read_text().splitlines())}
    rows = meld.read_meld_csv(synth_root / "train_sent_emo.csv", "train")
    manifest = meld.read_manifest(cache)
    rows = [r for r in rows if manifest[r.id]["status"] == "ok" and manifest[r.id]["audio_samples"]]
    keyword = {w: e for e, words in prepare.SYNTH_WORDS.items() for w in words}
    pitches = np.array([prepare.SYNTH_PITCH[e] for e in meld.EMOTIONS])
    colours = {e: np.array(c, float) for e, c in prepare.SYNTH_COLOURS.items()}
    for r in rows:
        words = [w.strip(".!?,").lower() for w in r.text.split()]
        assert traces[r.id]["text"] == next(keyword[w] for w in words if w in keyword)
        wave = np.load(cache / r.id / "audio.npy").astype(float)
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / meld.AUDIO_RATE)[np.argmax(spectrum[1:]) + 1]
        assert traces[r.id]["audio"] == meld.EMOTIONS[int(np.argmin(np.abs(np.log(pitches / peak))))]
        frames = torch.stack(data.decode_jpeg([torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                                               for p in sorted((cache / r.id).glob("*.jpg"))]))
        pixels = frames.permute(0, 2, 3, 1).reshape(-1, 3).float().numpy()
        distance = {e: np.abs(pixels - c).sum(1).min() for e, c in colours.items()}  # closest pixel
        nearest = min(distance, key=distance.get)
        expected = traces[r.id]["video"]
        assert nearest == expected or {nearest, expected} == set(prepare.TEMPORAL_PAIR), (r.id, distance)


# ---------------------------------------------------------------------------------------------- prepare

def test_prepare_manifest_records_every_defect_with_its_reason(synth_root, cache):
    manifest = meld.read_manifest(cache)
    ids = defect_ids(synth_root)
    assert manifest[ids["corrupt"]]["status"] == "error"
    assert manifest[ids["corrupt"]]["reason"].startswith("corrupt")
    assert manifest[ids["missing"]]["status"] == "error"
    assert manifest[ids["missing"]]["reason"].startswith("missing")
    assert manifest[ids["unlabelled"]]["status"] == "error"
    assert manifest[ids["unlabelled"]]["reason"].startswith("unlabelled")
    no_audio = manifest[ids["no audio"]]
    assert no_audio["status"] == "ok" and no_audio["reason"] == "no audio stream"
    assert no_audio["audio_samples"] == 0 and no_audio["frames"] > 0
    assert sum(e["status"] == "ok" for e in manifest.values()) == sum(SYNTH_SIZES) - 2
    assert len(manifest) == sum(SYNTH_SIZES) + 1  # every CSV row and the stray file


def test_prepare_frames_and_audio_match_the_clip(synth_root, cache):
    manifest = meld.read_manifest(cache)
    for entry in manifest.values():
        if entry["status"] != "ok":
            continue
        jpgs = sorted(p.name for p in (cache / entry["id"]).glob("*.jpg"))
        assert jpgs == [f"{k:06d}.jpg" for k in range(entry["frames"])]
        assert entry["fps"] == PREPARE_SETTINGS.fps and entry["source_fps"] == 24
        assert abs(entry["frames"] - entry["source_seconds"] * PREPARE_SETTINGS.fps) <= 1.5
        assert min(entry["width"], entry["height"]) == 48 and not entry["truncated"]
        if entry["audio_samples"]:
            audio = np.load(cache / entry["id"] / "audio.npy")
            assert audio.dtype == np.int16 and audio.shape == (entry["audio_samples"],)
            assert abs(len(audio) / meld.AUDIO_RATE - entry["source_seconds"]) < 0.1
    for split in meld.SPLITS:  # CSVs copied as UTF-8
        assert (cache / f"{split}_sent_emo.csv").read_bytes().decode("utf-8") == \
            meld.read_text(synth_root / f"{split}_sent_emo.csv")


def test_prepare_caps_long_clips_and_records_it(synth_root, tmp_path):
    settings = prepare.PrepareSettings(fps=10, short_side=32, max_seconds=0.5)
    train = meld.read_meld_csv(synth_root / "train_sent_emo.csv", "train")
    src = synth_root / meld.VIDEO_DIRS["train"] / (train[0].id.split("/")[1] + ".mp4")
    info = prepare.extract_clip(src, tmp_path / "clip", settings)
    assert info["truncated"] and info["reason"].startswith("too long")
    assert info["frames"] == 5 and info["audio_samples"] == 8000
    assert info["source_seconds"] > 0.5 and len(list((tmp_path / "clip").glob("*.jpg"))) == 5


def test_prepare_refuses_to_mix_settings(synth_root, cache):
    with pytest.raises(SystemExit, match="prepared with"):
        prepare.prepare_meld(synth_root, cache, settings=prepare.PrepareSettings(fps=5), progress=False)


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.jsonl"}


def test_prepare_resumes_after_sigkill(synth_root, cache, tmp_path):
    out = tmp_path / "cache"
    command = [sys.executable, str(ROOT / "prepare.py"), "--meld-root", str(synth_root), "--out", str(out),
               "--workers", "1", "--fps", str(PREPARE_SETTINGS.fps), "--short-side", str(PREPARE_SETTINGS.short_side)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest, deadline = out / "manifest.jsonl", time.time() + 120
    while time.time() < deadline and process.poll() is None:  # one clip done, another one being written
        lines = manifest.read_text().count("\n") if manifest.exists() else 0
        if lines >= 1 and any(out.glob("*/.tmp-*")):
            break
        time.sleep(0.001)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(meld.read_manifest(out))
    assert 1 <= done_before < sum(SYNTH_SIZES) + 1, "the kill did not land mid-run"

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed, reference = meld.read_manifest(out), meld.read_manifest(cache)
    assert sorted(json.dumps(e, sort_keys=True) for e in resumed.values()) == \
        sorted(json.dumps(e, sort_keys=True) for e in reference.values())
    assert manifest.read_text().count("\n") == len(resumed)  # no clip done twice, no cut-off line
    assert _tree(out) == _tree(cache)
    assert not list(out.glob("*/.tmp-*"))


# ---------------------------------------------------------------------------------------------- dataset

def test_round_trip_batches_carry_frames_audio_and_labels(synth_root, cache, tokenizer):
    T, crop = 32, 40
    ds = data.ClipDataset(cache, "train", data_config(num_frames=T, crop_size=crop), tokenizer)
    manifest = meld.read_manifest(cache)
    rows = {r.id: r for r in meld.read_meld_csv(synth_root / "train_sent_emo.csv", "train")}
    loader = data.make_loader(ds, batch_size=4, train=False, workers=0)
    seen = []
    for batch in loader:
        B = len(batch["ids"])
        assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (B, 3, T, crop, crop)
        assert batch["video_mask"].dtype == torch.bool and batch["audio_mask"].dtype == torch.bool
        assert batch["audio"].shape[:2] == (B, 64) and batch["audio"].dtype == torch.float32
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        for i, clip_id in enumerate(batch["ids"]):
            entry, row = manifest[clip_id], rows[clip_id]
            real = min(entry["frames"], T)
            assert batch["video_mask"][i].tolist() == [True] * real + [False] * (T - real)
            assert batch["video"][i, :, real:].eq(0).all() and batch["video"][i, :, :real].float().mean() > 5
            audio_frames = entry["audio_samples"] // data.MEL_HOP + 1
            assert batch["audio_mask"][i].sum() == audio_frames
            assert not batch["audio_mask"][i, audio_frames:].any()
            assert batch["emotion"][i] == row.emotion and batch["sentiment"][i] == row.sentiment
            n_tokens = int(batch["attention_mask"][i].sum())
            assert tokenizer.decode(batch["input_ids"][i, 1:n_tokens - 1]) == tokenizer.decode(
                tokenizer(row.text, add_special_tokens=False)["input_ids"])
            assert (batch["input_ids"][i, n_tokens:] == tokenizer.pad_token_id).all()
        seen += batch["ids"]
    assert sorted(seen) == sorted(r.id for r in ds.rows) and len(seen) == len(set(seen))


@pytest.mark.parametrize("train", [True, False])
def test_decoding_on_the_device_gives_the_batch_the_workers_decode(cache, tokenizer, train):
    """decode="device" on the CPU: the workers pass JPEG files and the drawn augmentation, to_device
    decodes them; frames, padding, masks and every other field equal the workers' batch bitwise,
    over two epochs of training (different draws each) or an evaluation pass, with workers."""
    config = data_config(num_frames=24, crop_size=40)  # synth clips have 5 to 50 frames: some padded
    batches = {}
    for decode in loading.DECODES:
        ds = data.ClipDataset(cache, "train", config, tokenizer, train=train, seed=5, decode=decode)
        loader = data.make_loader(ds, batch_size=4, train=train, workers=2, pin_memory=False)
        batches[decode] = []
        for epoch in range(2 if train else 1):
            loader.sampler.set_epoch(epoch)
            batches[decode] += [data.to_device(batch, torch.device("cpu")) for batch in loader]
    assert len(batches["cpu"]) == len(batches["device"]) >= 4
    padded = 0
    for workers, device in zip(batches["cpu"], batches["device"]):
        assert workers.keys() == device.keys() and workers["ids"] == device["ids"]
        for key in workers:
            if torch.is_tensor(workers[key]):
                assert workers[key].dtype == device[key].dtype and torch.equal(workers[key], device[key]), key
            else:
                assert workers[key] == device[key], key
        padded += int((~device["video_mask"]).any())
    assert padded > 0


def test_jpeg_video_holds_the_files_and_decodes_them_as_the_workers_do(cache, tokenizer):
    """The bytes a JpegVideo carries are the clips' files: decoded they are bitwise the frames
    load_video decodes; the augmentation drawn in the worker is the one load_video applies."""
    ds = data.ClipDataset(cache, "train", data_config(num_frames=8, crop_size=32), tokenizer, train=True,
                          decode="device")
    samples = [ds[(3, i)] for i in range(3)]
    batch = data.collate(samples, num_frames=8, crop_size=32)
    video = batch["video"]
    assert isinstance(video, loading.JpegVideo) and video.frames == [len(s["video_jpeg"][0]) for s in samples]
    assert all(len(p) == 7 for p in video.params)                        # drawn: training
    frames = decode_jpeg(list(video.data.split(video.sizes)))
    start = 0
    for i, s in enumerate(samples):   # each clip's frames: a window of consecutive frames of its folder
        own = [decode_jpeg(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8))
               for f in sorted((cache / s["id"]).glob("*.jpg"))]
        t = video.frames[i]
        assert t == min(8, len(own))
        assert any(all(torch.equal(frames[start + k], own[j + k]) for k in range(t))
                   for j in range(len(own) - t + 1)), s["id"]
        start += t
    cpu = data.ClipDataset(cache, "train", data_config(num_frames=8, crop_size=32), tokenizer, train=True)
    expected = data.collate([cpu[(3, i)] for i in range(3)], num_frames=8, crop_size=32)
    assert torch.equal(video.decode(torch.device("cpu")), expected["video"])


def test_defective_clips_never_reach_a_batch(synth_root, cache, tokenizer):
    ids = defect_ids(synth_root)
    everything = data.ClipDataset(cache, "train", data_config(num_frames=8, crop_size=32), tokenizer)
    batches = list(data.make_loader(everything, batch_size=5, train=False, workers=0))
    seen = {i for b in batches for i in b["ids"]}
    assert not seen & set(ids.values())
    assert everything.excluded == {"corrupt": 1, "no audio": 1}
    assert "2 excluded: 1 corrupt, 1 no audio" in everything.summary()
    # The clip without audio is good video: used when audio is not selected, never with fake audio.
    video_only = data.ClipDataset(cache, "train", data.DataConfig(modalities=("video", "text"), num_frames=8,
                                                                  crop_size=32), tokenizer)
    assert ids["no audio"] in {r.id for r in video_only.rows} and ids["corrupt"] not in {r.id for r in video_only.rows}
    assert video_only.excluded == {"corrupt": 1}
    dev = data.ClipDataset(cache, "dev", data.DataConfig(modalities=("video",), num_frames=8, crop_size=32))
    assert dev.excluded == {"missing": 1} and ids["missing"] not in {r.id for r in dev.rows}
    assert "audio" not in dev[0] and "input_ids" not in dev[0]


def test_unprepared_cache_is_a_clear_error(synth_root, tokenizer):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        data.ClipDataset(synth_root, "train", data.DataConfig(modalities=("video",)))


@pytest.mark.skipif(not SHARED_MELD.is_dir(), reason="MELD_TEST_DATA is not set")
def test_text_only_on_the_real_csvs_needs_no_media(tokenizer):
    ds = data.ClipDataset(SHARED_MELD, "dev", data.DataConfig(modalities=("text",)), tokenizer)
    assert len(ds) == 1109 and not ds.excluded
    batch = next(iter(data.make_loader(ds, batch_size=8, train=False, workers=0)))
    assert set(batch) == {"ids", "emotion", "sentiment", "input_ids", "attention_mask", "token_type_ids", "target_mask"}
    assert batch["ids"][0] == "dev/dia0_utt0" and batch["emotion"][0] == meld.EMOTIONS.index("sadness")
    assert meld.available_splits(SHARED_MELD) == ["train", "dev"]
    with pytest.raises(FileNotFoundError, match="test_sent_emo.csv"):
        data.ClipDataset(SHARED_MELD, "test", data.DataConfig(modalities=("text",)), tokenizer)


def test_text_context_prepends_previous_utterances_with_speakers(tokenizer, tmp_path):
    (tmp_path / "dev_sent_emo.csv").write_bytes((FIXTURES / "meld_quirks_utf8.csv").read_bytes())
    ds = data.ClipDataset(tmp_path, "dev", data.DataConfig(modalities=("text",), context=2), tokenizer)
    text = tokenizer.decode(ds[2]["input_ids"])  # dia0_utt2, after Phoebe's and Monica's lines
    assert text.startswith("[CLS] phoebe : oh my god") and "monica : what? [SEP] ross : he said" in text
    assert set(ds[2]["token_type_ids"]) == {0, 1}
    alone = ds[0]  # first of its dialogue: no context
    assert set(alone["token_type_ids"]) == {0}
    assert tokenizer.decode(alone["input_ids"]).startswith("[CLS] phoebe : oh my")
    assert set(ds[3]["token_type_ids"]) == {0}  # dia1: Phoebe's dialogue 0 is not its context
    short = data.ClipDataset(tmp_path, "dev", data.DataConfig(modalities=("text",), context=2, max_text_tokens=32),
                             tokenizer)
    assert tokenizer.decode(short[2]["input_ids"]).startswith("[CLS] monica : what? [SEP] ross : he said")  # oldest
    none = data.ClipDataset(tmp_path, "dev", data.DataConfig(modalities=("text",), context=0), tokenizer)
    assert tokenizer.decode(none[2]["input_ids"]).startswith("[CLS] he said")


def test_frame_sampling():
    assert data.sample_frame_indices(5, 8, "fixed") == [0, 1, 2, 3, 4]
    assert data.sample_frame_indices(20, 8, "fixed") == list(range(6, 14))  # centred
    g = torch.Generator().manual_seed(0)
    starts = {data.sample_frame_indices(20, 8, "fixed", g)[0] for _ in range(200)}
    assert starts == set(range(13))  # temporal jitter over every valid start
    views = [data.sample_frame_indices(20, 8, "fixed", view=v, num_views=3) for v in range(3)]
    assert [v[0] for v in views] == [0, 6, 12]
    uniform = data.sample_frame_indices(80, 8, "uniform")
    assert uniform == [5, 15, 25, 35, 45, 55, 65, 75]
    views = [data.sample_frame_indices(80, 8, "uniform", view=v, num_views=3) for v in range(3)]
    assert views == [[1, 11, 21, 31, 41, 51, 61, 71], [5, 15, 25, 35, 45, 55, 65, 75],
                     [8, 18, 28, 38, 48, 58, 68, 78]]
    jittered = data.sample_frame_indices(80, 8, "uniform", g)
    assert all(10 * i <= k < 10 * (i + 1) for i, k in enumerate(jittered))
    with pytest.raises(ValueError, match="unknown frame sampling"):
        data.sample_frame_indices(80, 8, "random")


@pytest.mark.parametrize("sampling", ["fixed", "uniform"])
def test_views_take_different_frames_and_the_same_part_of_the_audio(cache, sampling):
    """Multi-view testing: view v of N reads other frames than the other views (both sampling
    modes) and an audio window at the same relative place in the clip."""
    ds = data.ClipDataset(cache, "test", data_config(modalities=("video", "audio"), num_frames=4, crop_size=32,
                                                         frame_sampling=sampling, max_audio_seconds=0.5))
    index = max(range(len(ds)), key=lambda i: ds.entries[ds.rows[i].id]["frames"])
    clip = ds.root / ds.rows[index].id
    available = ds.entries[ds.rows[index].id]["frames"]
    assert available >= 3 * 4, "the longest test clip is too short for three views"
    full = ds.melspec(torch.from_numpy(np.load(clip / "audio.npy").astype(np.float32) / 32768.0))
    extra = full.shape[1] - ds.max_audio_frames
    assert extra > 0
    picks, audio = [], []
    for view in range(3):
        seen = ds.with_view(view, 3)
        picks.append(data.sample_frame_indices(available, 4, sampling, view=view, num_views=3))
        audio.append(seen.load_audio(clip))
        assert torch.equal(seen[index]["audio"], audio[-1])
    assert len({tuple(p) for p in picks}) == 3
    for view, window in enumerate(audio):  # view 0 at the start, 1 in the middle, 2 at the end
        start = round(view * extra / 2)
        torch.testing.assert_close(window, torch.log(full[:, start:start + ds.max_audio_frames] + 1e-6))


def test_augmentation_is_keyed_by_epoch_and_index_not_by_worker(cache, tokenizer):
    ds = data.ClipDataset(cache, "train", data_config(num_frames=8, crop_size=32), tokenizer, train=True, seed=1)
    a, b, c = ds[(1, 3)], ds[(1, 3)], ds[(2, 3)]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    assert not torch.equal(a["video"], c["video"])
    evaluation = data.ClipDataset(cache, "train", data_config(num_frames=8, crop_size=32), tokenizer)
    assert torch.equal(evaluation[3]["video"], evaluation[(5, 3)]["video"])  # no randomness in eval

    def epoch_batches(workers):
        loader = data.make_loader(ds, batch_size=4, train=True, workers=workers, seed=1)
        loader.sampler.set_epoch(2)
        return list(loader)

    serial, parallel = epoch_batches(0), epoch_batches(2)
    assert len(serial) == len(ds) // 4
    for x, y in zip(serial, parallel):
        assert x["ids"] == y["ids"]
        for key in ("video", "video_mask", "audio", "audio_mask", "input_ids"):
            assert torch.equal(x[key], y[key]), key


def test_video_transforms_geometry_and_colour():
    frames = torch.randint(0, 256, (6, 3, 48, 85), dtype=torch.uint8)
    out = data.transform_frames(frames, 32, data.draw_augmentation(48, 85, 32, torch.Generator().manual_seed(0)))
    assert out.shape == (3, 6, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
    ramp = torch.arange(85, dtype=torch.uint8).expand(6, 3, 48, 85).contiguous()
    centre = data.transform_frames(ramp, 42)  # short side 48 = 42 * 8/7: a pure centre crop
    assert torch.equal(centre, ramp[:, :, 3:45, 21:63].transpose(0, 1))
    # The fused training transform against the same steps done one by one ([t, 3] -> [3, t]).
    box = frames[:, :, 5:25, 10:30]

    def augment(*args):
        return data.augment_video(frames, *args).transpose(0, 1)

    assert torch.equal(augment(20, 5, 10, 20, False, 0.0, 1.0, 1.0), box)
    assert torch.equal(augment(20, 5, 10, 20, True, 0.0, 1.0, 1.0), box.flip(-1))
    assert torch.equal(augment(20, 5, 10, 20, False, 90.0, 1.0, 1.0), torch.rot90(box, 1, (2, 3)))
    assert torch.equal(augment(20, 5, 10, 20, True, 90.0, 1.0, 1.0), torch.rot90(box.flip(-1), 1, (2, 3)))
    small = augment(10, 0, 0, 40, False, 0.0, 1.0, 1.0)
    reference = torch.nn.functional.interpolate(frames[:, :, :40, :40].float(), size=(10, 10), mode="bilinear")
    assert (small.int() - reference.round().int()).abs().max() <= 1
    grey = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    grey[..., :4] = 200  # frame mean 150
    grey[1] = 50         # frame mean 50: each frame has its own mean
    bright = data.augment_video(grey, 8, 0, 0, 8, False, 0.0, 1.2, 1.0)
    assert bright[:, 0, :, 0].unique().tolist() == [240] and bright[:, 0, :, 7].unique().tolist() == [120]
    flat = data.augment_video(grey, 8, 0, 0, 8, False, 0.0, 1.0, 0.5)  # halfway to the frame's mean
    assert flat[:, 0, :, 0].unique().tolist() == [175] and flat[:, 0, :, 7].unique().tolist() == [125]
    assert flat[:, 1].unique().tolist() == [50]


def test_horizontal_flip_probability():
    """hflip=0 never mirrors a clip, 1 always does, the default 0.5 about half the time. Frames that
    brighten from left to right still do under any crop, scale and ±15° rotation unless mirrored."""
    frames = (torch.arange(85) * 3).to(torch.uint8).expand(4, 3, 48, 85).contiguous()

    def mirrored(hflip, seed):
        params = data.draw_augmentation(48, 85, 32, torch.Generator().manual_seed(seed), hflip)
        out = data.transform_frames(frames, 32, params).float()
        return bool(out[..., :16].mean() > out[..., 16:].mean())

    assert not any(mirrored(0.0, seed) for seed in range(40))
    assert all(mirrored(1.0, seed) for seed in range(40))
    assert 10 <= sum(mirrored(0.5, seed) for seed in range(40)) <= 30


def test_sampler_orders_shards_and_resumes():
    labels = [0] * 30 + [1] * 10 + [2] * 3
    full = loading.ClipSampler(labels, shuffle=True, seed=4)
    full.set_epoch(1)
    order = list(full)
    assert sorted(i for _, i, _ in order) == list(range(43)) and {(e, d) for e, _, d in order} == {(1, 0)}
    full.set_epoch(1, skip=10)
    assert list(full) == order[10:] and len(full) == 33
    full.set_epoch(2)
    assert list(full) != [(2, i, 0) for _, i, _ in order]
    # Evaluation across 4 ranks: disjoint shards, every sample exactly once.
    shards = [list(loading.ClipSampler(labels, shuffle=False, num_replicas=4, rank=r, pad=False)) for r in range(4)]
    flat = [i for shard in shards for _, i, _ in shard]
    assert sorted(flat) == list(range(43)) and [len(s) for s in shards] == [11, 11, 11, 10]
    # Training across 4 ranks: the same number of samples everywhere.
    train = [loading.ClipSampler(labels, shuffle=True, num_replicas=4, rank=r, seed=4) for r in range(4)]
    assert {len(list(s)) for s in train} == {11} and {len(s) for s in train} == {11}
    # Balanced: classes drawn about equally often.
    balanced = loading.ClipSampler(labels * 50, shuffle=True, balanced=True, seed=0)
    counts = collections.Counter(labels[i % 43] for _, i, _ in balanced)
    assert all(abs(n / sum(counts.values()) - 1 / 3) < 0.05 for n in counts.values()), counts


def test_balanced_sampler_repeats_get_their_own_augmentation(cache, tokenizer):
    """Drawn with replacement, a clip comes several times in one epoch: each repeat is its draw k
    (counted over every rank's samples) and is augmented differently; draw 0 keeps (seed, epoch, index)."""
    ds = data.ClipDataset(cache, "train", data_config(modalities=("video", "audio"), num_frames=8, crop_size=32),
                          train=True, seed=1)
    sampler = loading.ClipSampler(ds.labels(), shuffle=True, balanced=True, seed=0)
    sampler.set_epoch(3)
    keys = list(sampler)
    repeated = [(epoch, i, draw) for epoch, i, draw in keys if draw == 1]
    assert repeated, "no clip was drawn twice"
    for index in {i for _, i, _ in keys}:  # draws of an index count 0, 1, 2, ... in order
        assert [d for _, i, d in keys if i == index] == list(range(sum(i == index for _, i, _ in keys)))
    shards = [loading.ClipSampler(ds.labels(), shuffle=True, balanced=True, seed=0, num_replicas=2, rank=r)
              for r in range(2)]
    for shard in shards:
        shard.set_epoch(3)
    interleaved = [key for pair in zip(*shards) for key in pair]
    assert interleaved[:len(keys)] == keys                  # rank r takes every 2nd key, draws included
    epoch, index, _ = repeated[0]
    first, again = ds[(epoch, index, 0)], ds[(epoch, index, 1)]
    assert not torch.equal(first["video"], again["video"]) and not torch.equal(first["audio"], again["audio"])
    assert torch.equal(first["video"], ds[(epoch, index)]["video"])              # draw 0 = the plain key
    assert torch.equal(again["video"], ds[(epoch, index, 1)]["video"])           # and still reproducible


def test_loader_drops_the_last_partial_batch_in_training(cache, tokenizer):
    ds = data.ClipDataset(cache, "train", data.DataConfig(modalities=("text",)), tokenizer, train=True)
    loader = data.make_loader(ds, batch_size=4, train=True, workers=0)
    assert len(loader) == len(ds) // 4 and all(len(b["ids"]) == 4 for b in loader)
    assert len(data.make_loader(ds, batch_size=4, train=False, workers=0)) == math.ceil(len(ds) / 4)
    with pytest.raises(ValueError, match="unknown sampler"):
        data.make_loader(ds, batch_size=4, train=True, sampler="weighted")


def test_csv_manifest_is_split_by_label_and_bad_rows_name_the_row(tmp_path):
    manifest = tmp_path / "clips.csv"
    rows = [f"a/{i}.wav,{'yes' if i < 30 else 'no'}" for i in range(40)]
    manifest.write_text("Path,Label,Extra\n" + "\n".join(f"{r},x" for r in rows) + "\n")
    read = meld.read_manifest_csv(manifest)
    assert read[0]["path"] == str((tmp_path / "a/0.wav").resolve()) and read[0]["label"] == "yes"
    split = prepare.assign_splits([dict(r) for r in read], (0.8, 0.1, 0.1), seed=3)
    for label, n in (("yes", 30), ("no", 10)):   # stratified: every split has its share of each label
        counts = collections.Counter(r["split"] for r in split if r["label"] == label)
        assert counts == {"train": n - 2 * (n // 10), "dev": n // 10, "test": n // 10}
    again = prepare.assign_splits([dict(r) for r in read], (0.8, 0.1, 0.1), seed=3)
    assert [r["split"] for r in again] == [r["split"] for r in split]   # seeded
    assert prepare.csv_clip_id(split[0]) == prepare.csv_clip_id(dict(split[0]))  # stable ids
    assert len({prepare.csv_clip_id(r) for r in split}) == 40
    manifest.write_text("path,label,split\nx.wav,yes,train\ny.wav,,dev\n")
    with pytest.raises(ValueError, match="row 3: empty path or label"):
        meld.read_manifest_csv(manifest)
    manifest.write_text("path,label,split\nx.wav,yes,validation\n")
    with pytest.raises(ValueError, match="row 2: split 'validation'"):
        meld.read_manifest_csv(manifest)
    manifest.write_text("file,label\nx.wav,yes\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['path'\]"):
        meld.read_manifest_csv(manifest)


def test_prepare_csv_images_and_audio_files(tmp_path):
    """An image becomes a one-frame clip at the cache's short side; a wav file an audio-only clip."""
    from torchvision.io import write_png
    image = torch.zeros(3, 60, 120, dtype=torch.uint8)
    image[0, :, :60] = 255                                   # left half red
    write_png(image, str(tmp_path / "face.png"))
    with wave.open(str(tmp_path / "clap.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(8000) * 0.3) * 8000).astype(np.int16).tobytes())
    (tmp_path / "m.csv").write_text("path,label,split\nface.png,happy,train\nclap.wav,happy,dev\n")
    prepare.prepare_csv(tmp_path / "m.csv", tmp_path / "cache", prepare.PrepareSettings(short_side=30), progress=False)
    entries = {e["file"]: e for e in meld.read_manifest(tmp_path / "cache").values()}
    face, clap = entries[str((tmp_path / "face.png").resolve())], entries[str((tmp_path / "clap.wav").resolve())]
    assert (face["status"], face["frames"], face["width"], face["height"]) == ("ok", 1, 60, 30)
    frame = decode_jpeg(torch.frombuffer(bytearray((tmp_path / "cache" / face["id"] / "000000.jpg").read_bytes()),
                                         dtype=torch.uint8))
    assert frame[0, :, :25].float().mean() > 200 and frame[0, :, 35:].float().mean() < 50
    assert (clap["status"], clap["frames"], clap["reason"]) == ("ok", 0, "no video stream")
    assert abs(clap["audio_samples"] - 16000) < 400          # 1 s resampled to 16 kHz
    ds = data.ClipDataset(tmp_path / "cache", "train", data.DataConfig(modalities=("video",), dataset="csv",
                                                                       num_frames=4, crop_size=16))
    assert ds.tasks == [("label", ("happy",))] and ds[0]["label"] == 0 and ds[0]["video"].shape == (3, 1, 16, 16)
