"""The one fit loop, gradient family: epochs, resume, best-epoch selection, precision options."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from anomaly_core.detectors.base import AnomalyOutput, Detector, DetectorConfig
from anomaly_core.fit import fit, steps_per_epoch


@dataclass
class ToyConfig(DetectorConfig):
    image_size: int = 16
    lr: float = 0.05


class Toy(Detector):
    """A one-layer reconstruction model: enough to exercise the loop."""

    name, family, Config = "toy", "gradient", ToyConfig

    def __init__(self, config: ToyConfig | None = None) -> None:
        super().__init__(config or ToyConfig())
        self.net = nn.Conv2d(3, 3, 3, padding=1)
        self.steps = 0

    def training_step(self, images):
        self.steps += 1
        return ((self.net(images) - images) ** 2).mean()

    def optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=self.config.lr, momentum=0.9)]

    def forward(self, images):
        err = ((self.net(images) - images) ** 2).mean(1)
        return AnomalyOutput(score=err.flatten(1).amax(1), map=err)


class Images(Dataset):
    def __init__(self, n: int = 10) -> None:
        self.x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def _toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def test_loss_decreases_and_steps_match_the_documented_count():
    det, history = _toy(), []
    fit(det, Images(10), batch_size=4, epochs=3, report=lambda m, s: history.append(m))
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert all(m["steps"] == steps_per_epoch(10, 4) == 3 for m in history)
    assert det.steps == 9 and history[-1]["loss"] < history[0]["loss"]
    assert steps_per_epoch(10, 4, world_size=2) == 2


def test_resuming_from_a_reported_state_ends_where_the_uninterrupted_run_ends():
    whole = _toy()
    fit(whole, Images(), batch_size=4, epochs=3)
    states = []
    first = _toy()
    # deepcopy: a checkpoint is serialized when reported, the live tensors move on
    fit(first, Images(), batch_size=4, epochs=3, report=lambda m, s: states.append(copy.deepcopy(s)))
    resumed = _toy()  # a fresh process after a crash: new model, state from epoch 0's checkpoint
    history = []
    fit(resumed, Images(), batch_size=4, epochs=3, resume=states[0],
        report=lambda m, s: history.append(m["epoch"]))
    assert history == [1, 2]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_best_validation_epoch_is_kept_not_the_last():
    det = _toy()
    scores = iter([0.6, 0.9, 0.7])
    snapshots = []

    def validate(d):
        snapshots.append({k: v.clone() for k, v in d.state_dict().items()})
        return {"objective": next(scores)}

    last = fit(det, Images(), batch_size=4, epochs=3, validate=validate)
    assert last["best_epoch"] == 1
    for k, v in det.state_dict().items():
        assert torch.equal(v, snapshots[1][k])


def test_without_an_objective_the_last_epoch_is_kept():
    det = _toy()
    last = fit(det, Images(), batch_size=4, epochs=2, validate=lambda d: {"val_loss": 1.0})
    assert last["best_epoch"] == 1


def test_bf16_autocast_and_channels_last_train():
    det = _toy()
    last = fit(det, Images(), batch_size=4, epochs=2, precision="bf16", channels_last=True)
    assert torch.isfinite(torch.tensor(last["loss"]))
    assert det.net.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="precision"):
        fit(_toy(), Images(), precision="fp8")


def test_empty_training_set_is_an_error():
    with pytest.raises(ValueError, match="empty training set"):
        fit(_toy(), Images(0))
