"""Text that reads the conversation: past and future context with speakers, truncation, target
pooling, length-grouped batches, `predict --dialogue`, and exact resume with all of them."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

import data
import evaluate
import loading
import meld
import model as M
import train
from conftest import ROOT

# One conversation of five turns, written out of order (2, 0, 4, 1, 3), a second dialogue of one
# turn, and a dev split whose dialogue 0 is another conversation.
TRAIN = [(0, 2, "Monica", "How are you?"), (0, 0, "Rachel", "Hi."), (0, 4, "Chandler", "Could this be any longer?"),
         (0, 1, "Ross", "Hello there."), (0, 3, "Joey", "Fine thanks."), (1, 0, "Phoebe", "Other dialogue.")]
DEV = [(0, 0, "Gunther", "Dev line one."), (0, 1, "Janice", "Oh. My. God.")]


def write_meld_csv(path, rows, emotions=("joy", "anger", "neutral")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(meld.MELD_COLUMNS)
        for n, (dialogue, index, speaker, text) in enumerate(rows):
            emotion = emotions[n % len(emotions)]
            sentiment = {"joy": "positive", "neutral": "neutral"}.get(emotion, "negative")
            writer.writerow([n + 1, text, speaker, emotion, sentiment, dialogue, index, 1, 1, "", ""])


@pytest.fixture
def conversation(tmp_path):
    write_meld_csv(tmp_path / "train_sent_emo.csv", TRAIN)
    write_meld_csv(tmp_path / "dev_sent_emo.csv", DEV)
    return tmp_path


def text_dataset(root, tokenizer, split="train", **config):
    return data.ClipDataset(root, split, data.DataConfig(modalities=("text",), **config), tokenizer)


def item(ds, clip_id):
    return ds[[r.id for r in ds.rows].index(clip_id)]


def decoded(tokenizer, sample, key=None):
    ids = sample["input_ids"] if key is None else [i for i, m in zip(sample["input_ids"], sample[key]) if m]
    return tokenizer.decode(ids)


def test_past_and_future_context_with_and_without_speakers(conversation, tokenizer):
    """The target (Monica, utterance 2) between its nearest neighbours in utterance-id order
    (the file lists the turns 2, 0, 4, 1, 3), marked by its segment and separators."""
    sample = item(text_dataset(conversation, tokenizer, context=(1, 1)), "train/dia0_utt2")
    assert decoded(tokenizer, sample) == "[CLS] ross : hello there. [SEP] monica : how are you? [SEP] " \
                                         "joey : fine thanks. [SEP]"
    assert decoded(tokenizer, sample, "target_mask") == "monica : how are you?"
    assert decoded(tokenizer, sample, "token_type_ids") == "monica : how are you? [SEP]"
    plain = item(text_dataset(conversation, tokenizer, context=(2, 2), speakers=False), "train/dia0_utt2")
    assert decoded(tokenizer, plain) == "[CLS] hi. hello there. [SEP] how are you? [SEP] fine thanks. " \
                                        "could this be any longer? [SEP]"
    past_only = item(text_dataset(conversation, tokenizer, context=(4, 0)), "train/dia0_utt2")
    assert decoded(tokenizer, past_only) == "[CLS] rachel : hi. ross : hello there. [SEP] monica : how are you? [SEP]"
    alone = item(text_dataset(conversation, tokenizer), "train/dia0_utt2")   # no context: as before context existed
    assert decoded(tokenizer, alone) == "[CLS] how are you? [SEP]" and set(alone["token_type_ids"]) == {0}
    assert alone["target_mask"] == [1] * len(alone["input_ids"])          # pooled over all of it, as mean pooling


def test_truncation_drops_the_farthest_utterances_first_and_never_cuts_the_target(conversation, tokenizer):
    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    target, near_past, near_future = "monica : how are you?", "ross : hello there.", "joey : fine thanks."
    fits_nearest = 2 + length(target) + 1 + length(near_past) + 1 + length(near_future)
    sample = item(text_dataset(conversation, tokenizer, context=(4, 4), max_text_tokens=fits_nearest),
                  "train/dia0_utt2")
    assert decoded(tokenizer, sample) == f"[CLS] {near_past} [SEP] {target} [SEP] {near_future} [SEP]"
    assert len(sample["input_ids"]) == fits_nearest
    one_short = item(text_dataset(conversation, tokenizer, context=(4, 4), max_text_tokens=fits_nearest - 1),
                     "train/dia0_utt2")   # the future side's nearest no longer fits: that side stops,
    assert decoded(tokenizer, one_short) == f"[CLS] rachel : hi. {near_past} [SEP] {target} [SEP]"  # the past goes on
    no_room = item(text_dataset(conversation, tokenizer, context=(4, 4), max_text_tokens=2 + length(target)),
                   "train/dia0_utt2")
    assert decoded(tokenizer, no_room) == f"[CLS] {target} [SEP]"   # context gone, the target whole
    too_long = item(text_dataset(conversation, tokenizer, context=(4, 4), max_text_tokens=5), "train/dia0_utt2")
    assert decoded(tokenizer, too_long) == "[CLS] monica : how [SEP]"   # only a target longer than the budget


def test_context_never_crosses_dialogues_or_splits(conversation, tokenizer):
    train_set = text_dataset(conversation, tokenizer, context=(3, 3))
    assert decoded(tokenizer, item(train_set, "train/dia1_utt0")) == "[CLS] phoebe : other dialogue. [SEP]"
    dev = text_dataset(conversation, tokenizer, "dev", context=(3, 3))
    assert decoded(tokenizer, item(dev, "dev/dia0_utt0")) == "[CLS] gunther : dev line one. [SEP] " \
                                                               "janice : oh. my. god. [SEP]"
    contexts = data.dialogue_context(train_set.rows, train_set.rows, 9, 9)
    for row, (past, future) in zip(train_set.rows, contexts):
        assert all(u.dialogue == row.dialogue and u.split == row.split for u in past + future)
        assert [u.index for u in past] == sorted((u.index for u in past), reverse=True)   # nearest first
        assert [u.index for u in future] == sorted(u.index for u in future)


def test_target_pooling_reads_exactly_the_targets_tokens(conversation, tokenizer, tiny_bert):
    """The pooled vector is the mean of the encoder's outputs at the target's positions: another
    context changes it only through attention; mean pooling averages the context in."""
    torch.manual_seed(0)
    encoder = M.TextEncoder(tiny_bert, pooling="target").eval()
    seen = {}
    encoder.model.register_forward_hook(lambda module, args, output: seen.update(hidden=output.last_hidden_state))
    ds = text_dataset(conversation, tokenizer, context=(1, 1))
    other = conversation / "other"
    other.mkdir()
    write_meld_csv(other / "train_sent_emo.csv", [(0, 1, "Ross", "Something else entirely, and longer.")
                                                   if row[1] == 1 else row for row in TRAIN])
    changed = text_dataset(other, tokenizer, context=(1, 1))
    vectors = []
    for dataset in (ds, changed):
        batch = data.collate([item(dataset, "train/dia0_utt2")], tasks=())
        with torch.no_grad():
            vector = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["target_mask"])
        target = batch["target_mask"][0].bool()
        assert decoded(tokenizer, dict(input_ids=batch["input_ids"][0].tolist(), m=target.tolist()), "m") == \
            "monica : how are you?"
        torch.testing.assert_close(vector[0], seen["hidden"][0, target].mean(0))
        everything = seen["hidden"][0, batch["attention_mask"][0].bool()].mean(0)
        assert not torch.allclose(vector[0], everything, atol=1e-4)
        vectors.append(vector[0])
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-5)   # the context acts, through attention


def test_length_grouped_batches_are_seeded_complete_and_similar():
    lengths = torch.randint(5, 200, (103,), generator=torch.Generator().manual_seed(0))
    labels = [0] * 103

    def epoch(seed, e, replicas=1, rank=0):
        sampler = loading.ClipSampler(labels, shuffle=True, seed=seed, lengths=lengths, batch_size=4,
                                   num_replicas=replicas, rank=rank)
        sampler.set_epoch(e)
        return [i for _, i, _ in sampler]

    first = epoch(0, 0)
    assert first == epoch(0, 0) and first != epoch(0, 1) and first != epoch(1, 0)
    assert sorted(first) == list(range(103))
    batches = [lengths[first[i:i + 4]] for i in range(0, 100, 4)]
    spread = np.mean([float(b.max() - b.min()) for b in batches])
    shuffled = torch.randperm(103, generator=torch.Generator().manual_seed(1)).tolist()
    random_spread = np.mean([float(lengths[shuffled[i:i + 4]].max() - lengths[shuffled[i:i + 4]].min())
                             for i in range(0, 100, 4)])
    assert spread < random_spread / 4, (spread, random_spread)
    ranks = [epoch(0, 0, 2, r) for r in range(2)]            # two ranks: disjoint, equal steps
    assert len(ranks[0]) == len(ranks[1]) and len(set(ranks[0] + ranks[1])) == 103


def test_flags_context_and_speakers_reach_the_data_config(tmp_path):
    args = train.parse_args(["--context", "3", "--no-speakers", "--modalities", "text", "--data", str(tmp_path)])
    assert args.context == [3, 0] and args.speakers is False and args.workers == 0
    args.data, args.dataset = str(tmp_path), "meld"
    _, config = train.configs_from_args(args, tmp_path)
    assert config.context == [3, 0] and config.speakers is False
    assert train.parse_args(["--context", "2,5"]).context == [2, 5]
    for bad in ("-1", "1,2,3", "x"):
        with pytest.raises(SystemExit):
            train.parse_args(["--context", bad])


def test_predict_dialogue_matches_the_dataset_path(conversation, tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--data", str(conversation), "--out", str(out), "--modalities", "text", "--text-model", tiny_bert,
                "--context", "2,2", "--batch-size", "2", "--accum-steps", "1", "--epochs", "1", "--min-epochs", "1",
                "--device", "cpu", "--seed", "3"])
    dialogue = tmp_path / "dialogue.csv"
    turns = sorted((row for row in TRAIN if row[0] == 0), key=lambda row: row[1])
    with open(dialogue, "w", newline="") as f:
        csv.writer(f).writerows([("Speaker", "Utterance")] + [(speaker, text) for _, _, speaker, text in turns])
    predicted = evaluate.main(["predict", "--checkpoint", str(out / "best.pt"), "--dialogue", str(dialogue),
                               "--json", "--device", "cpu"])
    model, checkpoint = evaluate.load_checkpoint_model(out / "best.pt", torch.device("cpu"))
    ds = evaluate.dataset_for(checkpoint, conversation, "train")
    reference = evaluate.predict(model, data.make_loader(ds, batch_size=3, train=False, workers=0),
                                 torch.device("cpu"))
    assert [row["text"] for row in predicted] == [text for *_, text in turns]
    for index, row in enumerate(predicted):
        expected = reference[f"train/dia0_utt{index}"][0]                # emotion, in the model's class order
        got = [row["emotion"][name] for name in meld.EMOTIONS]
        np.testing.assert_allclose(got, expected, atol=1e-5)
    capsys.readouterr()
    evaluate.main(["predict", "--checkpoint", str(out / "best.pt"), "--text", "Hi.", "--device", "cpu"])
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "context (2 utterances before, 2 after)" in warning and "--dialogue" in warning


def test_context_and_length_grouping_resume_exactly(conversation, tiny_bert, tmp_path):
    from test_train import assert_same_run, kill_inside_epoch, run_train
    rows = [(d, i, ("Ross", "Rachel", "Joey")[i % 3], f"Line {d} {i} " + "word " * (i * 3 % 11))
            for d in range(6) for i in range(4)]
    write_meld_csv(conversation / "train_sent_emo.csv", rows)
    argv = ["--data", str(conversation), "--modalities", "text", "--text-model", tiny_bert, "--context", "1,1",
            "--group-by-length", "--batch-size", "2", "--accum-steps", "1", "--epochs", "2", "--min-epochs", "2",
            "--device", "cpu", "--deterministic", "--save-every", "1"]
    reference = run_train(argv + ["--out", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = argv + ["--out", str(tmp_path / "killed")]
    kill_inside_epoch([sys.executable, str(ROOT / "train.py"), *killed], tmp_path / "killed", epoch=1, step=3)
    resumed = run_train(killed + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_run(tmp_path / "reference", tmp_path / "killed", epochs=2)
    assert json.loads((tmp_path / "killed" / "args.json").read_text())["group_by_length"] is True
