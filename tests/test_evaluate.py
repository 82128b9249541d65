"""evaluate.py: metrics against scikit-learn and by hand, checkpoint evaluation with reports and
plots, multi-view testing, training curves, and predict on mp4 files."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

import data
import evaluate
import meld

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.read_bytes()[:8] == PNG, path
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 200 and width > 300


def test_metrics_agree_with_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    m = evaluate.classification_metrics(y_true, y_pred, meld.EMOTIONS)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred)
    for i, name in enumerate(meld.EMOTIONS):
        assert m["per_class"][name] == pytest.approx(dict(precision=precision[i], recall=recall[i], f1=f1[i],
                                                          support=support[i]))
    assert np.array(m["confusion"]).sum() == 300 and np.trace(m["confusion"]) == (y_true == y_pred).sum()


def test_binary_metrics_add_roc_auc_and_average_precision():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 2, 200)
    score = np.clip(0.3 * y_true + rng.random(200) * 0.7, 0, 1)          # informative, not perfect
    probabilities = np.stack([1 - score, score], 1)
    m = evaluate.classification_metrics(y_true, probabilities.argmax(1), ("quiet", "applause"), probabilities)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y_true, score)) and 0.6 < m["roc_auc"] < 1
    assert m["average_precision"] == pytest.approx(average_precision_score(y_true, score))
    assert "ROC-AUC" in evaluate.report(y_true, probabilities.argmax(1), ("quiet", "applause"), "test", m)
    one_class = evaluate.classification_metrics([1, 1], [1, 0], ("quiet", "applause"), [[0.2, 0.8], [0.6, 0.4]])
    assert one_class["roc_auc"] is None and one_class["average_precision"] is None  # undefined, not made up
    many = evaluate.classification_metrics([0, 1, 2], [0, 1, 1], ("a", "b", "c"), np.eye(3))
    assert "roc_auc" not in many


def test_metrics_by_hand_with_a_class_never_predicted():
    # classes a, b, c; c occurs (twice) but is never predicted
    m = evaluate.classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 1], ("a", "b", "c"))
    assert m["accuracy"] == pytest.approx(3 / 6)
    f1_a = 2 * (1 / 2 * 1 / 2) / (1 / 2 + 1 / 2)      # precision 1/2, recall 1/2
    f1_b = 2 * (2 / 4 * 1) / (2 / 4 + 1)              # precision 2/4, recall 2/2
    assert m["per_class"]["a"]["f1"] == pytest.approx(f1_a) and m["per_class"]["b"]["f1"] == pytest.approx(f1_b)
    assert m["per_class"]["c"] == dict(precision=0.0, recall=0.0, f1=0.0, support=2)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * f1_a + 2 * f1_b) / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 1, 0]]


def test_training_writes_plots_and_curves(run):
    for name in ("confusion_test.png", "f1_test.png", "confusion_dev.png", "curves.png"):
        assert_png(run / name)


def test_evaluate_a_checkpoint_writes_metrics_report_and_plots(run, cache, tmp_path, capsys):
    results = evaluate.main(["--checkpoint", str(run / "best.pt"), "--data", str(cache), "--split", "test",
                             "--views", "3", "--out", str(tmp_path), "--workers", "0", "--device", "cpu"])
    written = json.loads((tmp_path / "metrics_test.json").read_text())
    assert written["views"] == 3 and set(written) >= {"single_view", "multi_view"}
    assert written["single_view"]["emotion"]["n"] == 8 and set(written["multi_view"]) == {"emotion", "sentiment"}
    assert results["single_view"] == written["single_view"]
    assert_png(tmp_path / "confusion_test.png")
    assert_png(tmp_path / "f1_test.png")
    printed = capsys.readouterr().out
    assert "test emotion (single-view)" in printed and "weighted F1" in printed and "disgust" in printed


def test_multi_view_differs_from_single_view_only_when_there_are_several_views(run, cache):
    cpu = torch.device("cpu")
    model, checkpoint = evaluate.load_checkpoint_model(run / "best.pt", cpu)
    ds = evaluate.dataset_for(checkpoint, cache, "train")
    single = evaluate.predict(model, data.make_loader(ds, batch_size=4, train=False, workers=0), cpu)
    one = evaluate.predict_views(model, ds, cpu, views=1, batch_size=3)
    three = evaluate.predict_views(model, ds, cpu, views=3, batch_size=4)
    longer = [r.id for r in ds.rows if ds.entries[r.id]["frames"] > checkpoint["args"]["num_frames"]]
    assert len(longer) >= 5
    for clip_id in single:
        np.testing.assert_allclose(one[clip_id][0], single[clip_id][0], atol=1e-6)
    differs = [not np.allclose(three[i][0], single[i][0], atol=1e-6) for i in longer]
    assert all(differs), f"{sum(differs)} of {len(longer)} long clips changed with 3 views"
    for emotion, sentiment in three.values():
        assert sum(emotion) == pytest.approx(1) and sum(sentiment) == pytest.approx(1)


def test_curves_command(run, capsys):
    (run / "curves.png").unlink()
    evaluate.main(["curves", str(run)])
    assert_png(run / "curves.png")
    with pytest.raises(SystemExit, match="log.jsonl: not found"):
        evaluate.main(["curves", str(run / "nothing-here")])


def test_predict_ranks_emotions_of_an_mp4(run, synth_root, capsys):
    rows = meld.read_meld_csv(synth_root / "test_sent_emo.csv", "test")
    clip = synth_root / meld.VIDEO_DIRS["test"] / (rows[0].id.split("/")[1] + ".mp4")
    results = evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video", str(clip),
                             "--text", rows[0].text, "--json", "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == results and printed[0]["file"] == str(clip)
    probs = list(printed[0]["emotion"].values())
    assert set(printed[0]["emotion"]) == set(meld.EMOTIONS) and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1) and sum(printed[0]["sentiment"].values()) == pytest.approx(1)
    evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video", str(clip), "--text", rows[0].text])
    table = capsys.readouterr().out
    assert table.startswith(str(clip)) and "sentiment:" in table


def test_predict_errors_name_the_file(run, synth_root):
    train_rows = meld.read_meld_csv(synth_root / "train_sent_emo.csv", "train")
    truncated = synth_root / meld.VIDEO_DIRS["train"] / (train_rows[-1].id.split("/")[1] + ".mp4")
    with pytest.raises(SystemExit, match=f"{truncated}: cannot be decoded"):
        evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video", str(truncated), "--text", "hi"])
    good = synth_root / meld.VIDEO_DIRS["train"] / (train_rows[0].id.split("/")[1] + ".mp4")
    with pytest.raises(SystemExit, match="reads text"):
        evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video", str(good)])
    silent = synth_root / meld.VIDEO_DIRS["train"] / (train_rows[-2].id.split("/")[1] + ".mp4")
    with pytest.raises(SystemExit, match=f"{silent}: has no audio stream"):
        evaluate.main(["predict", "--checkpoint", str(run / "best.pt"), "--video", str(silent), "--text", "hi"])
