import os

import pytest
import torch

from job import load_global_model
from model import Net


def test_forward_gives_ten_logits_per_image():
    assert Net()(torch.zeros(5, 3, 32, 32)).shape == (5, 10)


def test_exchanged_weights_are_the_tutorial_cnn():
    shapes = {name: tuple(t.shape) for name, t in Net().state_dict().items()}
    assert shapes == {
        "conv1.weight": (6, 3, 5, 5),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5),
        "conv2.bias": (16,),
        "fc1.weight": (120, 400),
        "fc1.bias": (120,),
        "fc2.weight": (84, 120),
        "fc2.bias": (84,),
        "fc3.weight": (10, 84),
        "fc3.bias": (10,),
    }


def test_global_model_checkpoint_round_trips(tmp_path):
    net = Net()
    torch.save({"model": net.state_dict(), "meta_props": {}}, tmp_path / "FL_global_model.pt")
    loaded = load_global_model(str(tmp_path / "FL_global_model.pt"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))


class _NotATensor:
    pass


def test_checkpoint_with_objects_is_refused(tmp_path):
    torch.save({"model": _NotATensor()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="more than tensors"):
        load_global_model(str(tmp_path / "bad.pt"))


def test_a_plain_state_dict_loads_too(tmp_path):
    net = Net()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    loaded = load_global_model(str(tmp_path / "plain.pt"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    for _ in range(50):  # torch.load fails on garbage in many ways; each must be the one clear error
        (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
        with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
            load_global_model(str(tmp_path / "noise.pt"))


def test_a_seed_fixes_the_initial_weights_and_leaves_the_global_generator_alone():
    def weights(net):
        return torch.cat([t.flatten() for t in net.state_dict().values()])

    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(weights(Net(seed=3)), weights(Net(seed=3)))
    assert not torch.equal(weights(Net(seed=3)), weights(Net(seed=4)))
    assert torch.equal(torch.rand(3), expected_next)
