"""Tests for --video-init kinetics:PATH checkpoint layouts (pretrained.load_kinetics_checkpoint): the
wrappers and key prefixes of PySlowFast, pytorchvideo hub, Lightning, DDP and torch.compile files
load the same weights as the bare state dict; Caffe2 pickles, unreadable files, pickled objects
and other architectures are refused in one line naming the file, never loaded with
weights_only=False. Small random state dicts (the tiny depths), written here.

    python -m pytest tests/test_checkpoint_formats.py
"""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import pretrained
import slowfast

DEPTHS = slowfast.VIDEO_PRESETS["tiny"]["depths"]


class Canary:
    """Unpickling this creates the directory `path`: proof that something unpickled unsafely."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(autouse=True)
def weights_only_loads(monkeypatch):
    """Every torch.load call's weights_only; none may be False."""
    calls, load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    yield calls
    assert all(w is True for w in calls), calls


@pytest.fixture(scope="module")
def own_state():
    torch.manual_seed(0)
    return slowfast.SlowFast("tiny").state_dict()


@pytest.fixture(scope="module")
def pytorchvideo_state(own_state):
    """Random pytorchvideo-named tensors for our tiny depths, with a 400-class head left over."""
    g = torch.Generator().manual_seed(1)
    key_map = pretrained.slowfast_key_map(DEPTHS)
    state = {key_map[k][0]: torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 7
             for k, v in own_state.items()}
    state["blocks.6.proj.weight"] = torch.randn(400, 8, generator=g)
    state["blocks.6.proj.bias"] = torch.randn(400, generator=g)
    return state


@pytest.fixture(scope="module")
def pyslowfast_state(own_state, pytorchvideo_state):
    key_map = pretrained.slowfast_key_map(DEPTHS)
    state = {key_map[k][1]: pytorchvideo_state[key_map[k][0]] for k in own_state}
    state["head.projection.weight"] = pytorchvideo_state["blocks.6.proj.weight"]
    state["head.projection.bias"] = pytorchvideo_state["blocks.6.proj.bias"]
    return state


def load(path, own_state):
    return pretrained.load_kinetics_checkpoint(str(path), DEPTHS, own_state)


def prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def lightning(state):
    return {"state_dict": state, "epoch": 12, "global_step": 4800,
            "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1, "arch": "slowfast"},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
            "lr_schedulers": [], "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}":
                                               {"best_model_score": torch.tensor(0.7)}}}


LAYOUTS = {   # name -> (pytorchvideo state, PySlowFast state) -> checkpoint
    "pytorchvideo bare": lambda ptv, psf: ptv,
    "pyslowfast bare": lambda ptv, psf: psf,
    "pytorchvideo hub": lambda ptv, psf: {"model_state": ptv},
    "pyslowfast": lambda ptv, psf: {
        "epoch": 196, "model_state": psf, "cfg": "MODEL:\n  ARCH: slowfast\n",
        "optimizer_state": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                            "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}},
    "lightning": lambda ptv, psf: lightning(prefixed("model.", ptv)),
    "lightning ddp": lambda ptv, psf: lightning(prefixed("model.module.", psf)),
    "ddp": lambda ptv, psf: prefixed("module.", ptv),
    "ddp in model_state": lambda ptv, psf: {"epoch": 3, "model_state": prefixed("module.", psf)},
    "torch.compile": lambda ptv, psf: prefixed("_orig_mod.", ptv),
    "model, ddp and torch.compile": lambda ptv, psf: {"model": prefixed("module._orig_mod.", psf)},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_the_bare_state_dict_weights(layout, own_state, pytorchvideo_state,
                                                  pyslowfast_state, tmp_path):
    torch.save(pytorchvideo_state, tmp_path / "bare.pyth")
    expected = load(tmp_path / "bare.pyth", own_state)
    path = tmp_path / "checkpoint.pyth"
    torch.save(LAYOUTS[layout](pytorchvideo_state, pyslowfast_state), path)
    loaded = load(path, own_state)
    assert loaded.keys() == expected.keys() == own_state.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    # the weights are the checkpoint's, not our random init
    assert torch.equal(loaded["slow.conv1.weight"],
                       pytorchvideo_state["blocks.0.multipathway_blocks.0.conv.weight"])


def test_safetensors_file_loads_the_same_weights(own_state, pytorchvideo_state, tmp_path):
    import safetensors.torch
    torch.save(pytorchvideo_state, tmp_path / "bare.pyth")
    safetensors.torch.save_file(prefixed("module.", pytorchvideo_state), tmp_path / "slowfast.safetensors")
    expected, loaded = load(tmp_path / "bare.pyth", own_state), load(tmp_path / "slowfast.safetensors", own_state)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_prefix_is_stripped_only_when_every_key_has_it():
    t = torch.zeros(1)
    assert pretrained.unwrap_state_dict({"model.blocks.0.w": t, "model.head.w": t}).keys() == {"blocks.0.w", "head.w"}
    assert pretrained.unwrap_state_dict({"model.blocks.0.w": t, "blocks.1.w": t}).keys() == {"model.blocks.0.w",
                                                                                          "blocks.1.w"}
    assert pretrained.unwrap_state_dict({"module.model.x": t, "module.model.y": t, "epoch": 3}).keys() == {"x", "y"}
    assert pretrained.unwrap_state_dict({"epoch": 3, "model_state": {}}) == {}


def assert_one_line_error(error, path, *words):
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"--video-init kinetics:{path}: "), message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
def test_caffe2_pickle_is_refused_without_unpickling(protocol, own_state, tmp_path,
                                                     weights_only_loads):
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    executed = tmp_path / "executed"
    blobs = {"conv1_w": np.ones((8, 3, 1, 7, 7), np.float32), "res2_0_branch2a_bn_s": np.ones(8)}
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs, "model_iter": 196000, "canary": Canary(executed)}, f,
                    protocol=protocol)
    with pytest.raises(ValueError) as error, warnings.catch_warnings():
        warnings.simplefilter("error")                  # torch's pickle-protocol warning is not printed
        load(path, own_state)
    message = assert_one_line_error(error, path, "Caffe2", "not supported", ".pyth")
    assert "weights_only=False" not in message
    assert weights_only_loads == [True]
    assert not executed.exists()


def test_caffe2_pickle_refused_by_the_model(tmp_path):
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.ones((8, 3, 1, 7, 7), np.float32)}}, f)
    with pytest.raises(ValueError) as error:
        slowfast.SlowFast("r50", init=f"kinetics:{path}")
    assert_one_line_error(error, path, "Caffe2")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_file_is_one_line(damage, own_state, pytorchvideo_state, tmp_path):
    path = tmp_path / "checkpoint.pyth"
    torch.save({"model_state": pytorchvideo_state}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a checkpoint\n" * 100,
                      "empty": b""}[damage])
    with pytest.raises(ValueError) as error:
        load(path, own_state)
    message = assert_one_line_error(error, path, "weights_only=True")
    assert "Caffe2" not in message


def test_pickled_object_is_refused_and_never_run(own_state, pytorchvideo_state, tmp_path):
    path, executed = tmp_path / "checkpoint.pyth", tmp_path / "executed"
    torch.save({"model_state": pytorchvideo_state, "args": Canary(executed)}, path)
    with pytest.raises(ValueError) as error:
        load(path, own_state)
    message = assert_one_line_error(error, path, "UnpicklingError", "mkdir")
    assert "weights_only=False" not in message
    assert not executed.exists()


def test_other_architecture_is_one_line(own_state, pyslowfast_state, tmp_path):
    path = tmp_path / "checkpoint.pyth"
    torch.save({"model_state": own_state}, path)              # our names: not a checkpoint's
    with pytest.raises(ValueError) as error:
        load(path, own_state)
    required = [k for k in pretrained.slowfast_key_map(DEPTHS) if not k.endswith("num_batches_tracked")]
    assert_one_line_error(error, path, "not a SlowFast-R50 state dict", f"{len(required)} missing keys",
                          f"{len(own_state)} unexpected keys", "slow.conv1.weight")

    fusion = pyslowfast_state["s1_fuse.conv_f2s.weight"]     # 4x16: temporal kernel 5, not 7
    torch.save({"model_state": {**pyslowfast_state, "s1_fuse.conv_f2s.weight": fusion[:, :, :5]}}, path)
    with pytest.raises(ValueError) as error:
        load(path, own_state)
    assert_one_line_error(error, path, "1 of another shape", "s1_fuse.conv_f2s.weight")

    torch.save({"epoch": 3, "optimizer_state": {}}, path)
    with pytest.raises(ValueError) as error:
        load(path, own_state)
    assert_one_line_error(error, path, "no state dict", "epoch")


def test_missing_file(own_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "nowhere.pyth", own_state)
