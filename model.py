"""The CIFAR-10 CNN from the PyTorch tutorial; its state_dict is what sites and server exchange."""

import pickle

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, seed: int | None = None):
        """`seed` fixes the initial weights; None draws them from torch's global generator."""
        super().__init__()
        self.seed = seed  # NVFlare's job config records it, so the server builds the same initial global model
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_global_model(path: str) -> Net:
    """A `Net` from a checkpoint of NVFlare's PyTorch persistor ({"model": state dict, ...}) or from a plain
    state dict, loaded without running any pickled code. ValueError says what is wrong with any other file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if blocked:  # the pickle names a class or function, which a checkpoint of tensors never does
            raise ValueError(f"{path} holds more than tensors, refusing to load it ({blocked})") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint") from None
    except OSError as e:
        raise ValueError(f"{path} can't be read ({e.strerror})") from None
    except Exception:  # on arbitrary bytes, torch.load fails with errors of many kinds
        raise ValueError(f"{path} is not a PyTorch checkpoint") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    net = Net()
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} does not hold the weights of this example's Net ({first})") from None
    return net
