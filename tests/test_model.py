import torch

from model import Net


def test_forward_gives_ten_logits_per_image():
    assert Net()(torch.zeros(5, 3, 32, 32)).shape == (5, 10)


def test_exchanged_weights_are_the_tutorial_cnn():
    shapes = {name: tuple(t.shape) for name, t in Net().state_dict().items()}
    assert shapes == {
        "conv1.weight": (6, 3, 5, 5), "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }
