"""The one fit loop, gradient family: epochs, resume, best-epoch selection, precision options,
device choice per rank, randomness per rank, and what a checkpoint holds."""

import copy
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from anomaly_core.detectors import build_detector
from anomaly_core.detectors.base import AnomalyOutput, Detector, DetectorConfig
from anomaly_core.training.fit import (
    bind_device,
    fit,
    load_training_state,
    seed_for_rank,
    select_device,
    training_state,
)
from tests.helpers import TensorImages, free_port, random_images


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
    assert all(m["steps"] == 3 for m in history)  # ceil(10 images / batch 4)
    assert det.steps == 9 and history[-1]["loss"] < history[0]["loss"]


def _seeded_padim():
    torch.manual_seed(0)
    return build_detector("padim", backbone="resnet18", weights="random", image_size=16)


def test_an_epoch_batch_stream_of_uint8_images_replaces_the_dataset():
    # --input-pipeline ray-data: fit takes each epoch's (already sharded, shuffled) batches.
    images = (Images(8).x * 255).round().to(torch.uint8)
    asked: list[int] = []

    def batches(epoch: int):
        asked.append(epoch)
        return [{"image": images[i:i + 4]} for i in (4, 0)]

    det, history = _toy(), []
    fit(det, None, batch_size=4, epochs=2, batches=batches, report=lambda m, s: history.append(m))
    assert asked == [0, 1] and det.steps == 4 and [m["images"] for m in history] == [8, 8]
    # A memory detector observes the stream's floats exactly as the dataset's.
    floats = TensorImages(images.float() / 255)
    streamed, loaded = (_seeded_padim() for _ in range(2))
    fit(streamed, None, batches=lambda epoch: [{"image": images[:5]}, {"image": images[5:]}])
    fit(loaded, floats, batch_size=3)
    assert torch.allclose(streamed.mean, loaded.mean, atol=1e-6)
    assert torch.allclose(streamed.inv_covariance, loaded.inv_covariance, rtol=1e-4, atol=1e-4)


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


# ------------------------------------------------------------------ device per rank


def test_cpu_unless_a_gpu_is_asked_for():
    assert select_device(False, local_rank=3, visible="0,1", device_count=2) == torch.device("cpu")


def test_a_worker_given_its_own_gpu_uses_device_0_whatever_its_local_rank():
    # Ray masks all but the worker's GPU: CUDA_VISIBLE_DEVICES="3" is cuda:0 inside.
    for rank in (0, 2):
        assert select_device(True, rank, visible="3", device_count=1) == torch.device("cuda", 0)


def test_workers_sharing_the_nodes_gpus_take_one_each_by_local_rank():
    devices = [select_device(True, r, visible="0,1,2,3", device_count=4) for r in range(4)]
    assert devices == [torch.device("cuda", r) for r in range(4)]


def test_the_schedulers_gpu_id_decides_over_the_local_rank():
    # Ray's get_device(): the position of the worker's GPU id in CUDA_VISIBLE_DEVICES.
    assert select_device(True, 0, visible="0,1,2,3", device_count=4, gpu_ids=[2]) == torch.device(
        "cuda", 2
    )
    assert select_device(True, 0, visible="2,3", device_count=2, gpu_ids=["3"]) == torch.device(
        "cuda", 1
    )
    # Two GPUs per worker: local rank 1 owns GPUs 2 and 3, so its device is cuda:2, not cuda:1.
    assert select_device(True, 1, visible="0,1,2,3", device_count=4, gpu_ids=[2, 3]) == (
        torch.device("cuda", 2)
    )
    with pytest.raises(RuntimeError, match="given GPU 5 but CUDA_VISIBLE_DEVICES='0,1'"):
        select_device(True, 0, visible="0,1", device_count=2, gpu_ids=[5])


def test_visible_devices_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert select_device(True, 0, device_count=2, gpu_ids=[7]) == torch.device("cuda", 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert select_device(True, 0, device_count=8, gpu_ids=[6]) == torch.device("cuda", 6)


def test_more_local_ranks_than_devices_is_an_error_naming_both():
    with pytest.raises(RuntimeError, match="local rank 4 .* sees 4 CUDA devices"):
        select_device(True, 4, visible="0,1,2,3", device_count=4)


def test_asking_for_a_gpu_without_one_names_cuda_visible_devices(monkeypatch):
    with pytest.raises(RuntimeError, match="no CUDA device .*CUDA_VISIBLE_DEVICES=''"):
        select_device(True, 0, visible="", device_count=0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if torch.cuda.device_count() == 0:  # this machine's own count
        with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=<unset>"):
            select_device(True, 0)


def test_bind_device_sets_the_current_cuda_device_and_leaves_the_cpu_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert bind_device("cpu") == torch.device("cpu") and calls == []
    assert bind_device(torch.device("cuda", 2)) == torch.device("cuda", 2)
    assert calls == [torch.device("cuda", 2)]


# ------------------------------------------------------------------ randomness per rank


def test_seed_for_rank_differs_between_ranks_and_repeats_for_the_same_rank():
    def draws(rank: int, epoch: int = 0) -> tuple:
        seed_for_rank(7, rank, epoch)
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    assert draws(0) == draws(0)
    for a, b in zip(draws(0), draws(1)):
        assert a != b
    assert draws(0, epoch=1)[0] != draws(0)[0]


TINY_SIMPLENET = dict(backbone="resnet18", weights="random", image_size=64)


class NoiseImages(Dataset):
    """Images drawn from the loading process's torch RNG: a stand-in for random augmentation."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.rand(3, 16, 16)}


def _record_inputs(detector: Detector, seen: list) -> None:
    step = detector.training_step

    def recording(images):
        seen.append((images.clone(), torch.get_rng_state()))
        return step(images)

    detector.training_step = recording


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # as train_worker does: random inits agree across ranks
        detector = build_detector("simplenet", **TINY_SIMPLENET)
        built = {k: v.clone() for k, v in detector.state_dict().items()}
        seed_for_rank(0, rank)
        images = random_images(2, 64)
        drawn = [loss.item() for loss in detector.margin_losses(images)]
        seen: list = []
        _record_inputs(detector, seen)
        # The same RNG state on both ranks going in: what differs inside is fit's doing.
        torch.manual_seed(0)
        fit(detector, TensorImages(random_images(4, 64)), batch_size=2, epochs=1)
        torch.manual_seed(0)
        toy, loaded = Toy(), []
        _record_inputs(toy, loaded)
        fit(toy, NoiseImages(), batch_size=2, loader_workers=1)
        torch.save({
            "built": built, "drawn": drawn, "steps": len(seen), "rng_at_step": seen[0][1],
            "params": {k: p.detach() for k, p in detector.named_parameters()},
            "loaded": loaded[0][0],
        }, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_share_initial_weights_draw_different_noise_and_stay_identical_under_ddp(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_rank_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    # The same seed before building: every randomly initialised part agrees (backbone included).
    assert r0["built"].keys() == r1["built"].keys()
    assert all(torch.equal(v, r1["built"][k]) for k, v in r0["built"].items())
    # After seed_for_rank the clean term agrees and the noised one (its Gaussian noise) does not.
    assert r0["drawn"][0] == pytest.approx(r1["drawn"][0], abs=1e-6)
    assert r0["drawn"][1] != r1["drawn"][1]
    # Inside fit too: each rank's training step starts from another RNG state ...
    assert r0["steps"] == r1["steps"] == 1
    assert not torch.equal(r0["rng_at_step"], r1["rng_at_step"])
    # ... and DataLoader workers draw other numbers on each rank.
    assert not torch.equal(r0["loaded"], r1["loaded"])
    # DDP averaged the different gradients: one step later the weights still agree, and moved.
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert not torch.equal(r0["params"]["adaptor.weight"], r0["built"]["adaptor.weight"])


# ------------------------------------------------------------------ what a checkpoint holds

GRADIENT_CASES = [
    ("autoencoder", {}),
    ("autoencoder", {"transfer_learning": True}),
    ("fastflow", {}),
    ("fastflow", {"train_backbone": False}),
    ("stpm", {}),
    ("simplenet", {"backbone": "resnet18"}),
    ("simplenet", {"backbone": "resnet18", "batchnorm": True}),
]


def _build(name: str, options: dict) -> Detector:
    torch.manual_seed(0)
    return build_detector(name, weights="random", image_size=64, **options)


@pytest.mark.parametrize(("name", "options"), GRADIENT_CASES)
def test_training_state_holds_what_training_changes_and_nothing_frozen(name, options):
    detector = _build(name, options)
    state, full = training_state(detector), detector.state_dict()
    params = dict(detector.named_parameters())
    assert {k for k, p in params.items() if p.requires_grad} <= state.keys()
    assert all(params[k].requires_grad for k in state if k in params)
    frozen = [n for n, m in detector.named_modules() if any(m is f for f in detector.frozen)]
    for key in full.keys() - state.keys():
        assert key in params or any(key.startswith(f"{f}.") for f in frozen), key
    # Per detector: the frozen part is out, the trained part (with its statistics) is in.
    tops = {k.split(".")[0] for k in state}
    if name == "stpm":
        assert tops == {"student"} and "student.body.bn1.running_mean" in state
    elif name == "simplenet":
        assert tops == {"adaptor", "discriminator"}
        assert ("discriminator.1.running_var" in state) == options.get("batchnorm", False)
    elif name == "fastflow":
        backbone = options.get("train_backbone", True)
        assert ("backbone.body.conv1.weight" in state) == backbone
        assert not any("running_mean" in k for k in state)  # its BatchNorms stay ImageNet's
        assert any(k.startswith("flows.") and k.endswith("permutation") for k in state)
    elif options.get("transfer_learning"):
        assert tops == {"decoder"}
    else:
        assert state.keys() == full.keys()  # from scratch: everything trains
    if frozen:
        assert len(state) < len(full)


@pytest.mark.parametrize(("name", "options"), [GRADIENT_CASES[i] for i in (1, 2, 4, 6)])
def test_a_training_state_restores_a_rebuilt_detector_exactly(name, options):
    trained = _build(name, options)
    fit(trained, TensorImages(random_images(2, 64)), batch_size=2)
    rebuilt = _build(name, options)  # the frozen parts come from building again
    untrained = {k: v.clone() for k, v in rebuilt.state_dict().items()}
    load_training_state(rebuilt, copy.deepcopy(training_state(trained)))
    full = trained.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in rebuilt.state_dict().items())
    assert any(not torch.equal(v, untrained[k]) for k, v in full.items())  # training moved it


def test_loading_a_state_that_lacks_or_adds_entries_is_an_error():
    detector = _build("stpm", {})
    state = training_state(detector)
    missing = {k: v for k, v in state.items() if k != "student.body.conv1.weight"}
    with pytest.raises(ValueError, match=r"missing trainable entries \['student.body.conv1.weight'\]"):
        load_training_state(detector, missing)
    with pytest.raises(ValueError, match=r"unknown entries \['extra.weight'\]"):
        load_training_state(detector, {**state, "extra.weight": torch.zeros(1)})
    # A full state_dict (an older checkpoint) still loads: every entry is used.
    load_training_state(detector, detector.state_dict())


def test_a_resumed_simplenet_draws_the_same_noise_and_ends_where_the_uninterrupted_run_ends():
    options = {"backbone": "resnet18", "batchnorm": True, "noise_std": 0.3}
    data = TensorImages(random_images(4, 64))
    whole = _build("simplenet", options)
    fit(whole, data, batch_size=2, epochs=3, seed=5)
    states = []
    first = _build("simplenet", options)
    fit(first, data, batch_size=2, epochs=3, seed=5,
        report=lambda m, s: states.append(copy.deepcopy(s)))
    assert not any(k.startswith("backbone.") for k in states[0]["detector"])
    resumed = _build("simplenet", options)
    untrained = {k: v.clone() for k, v in resumed.state_dict().items()}
    torch.rand(100)  # what a restarted process drew before fit must not matter
    fit(resumed, data, batch_size=2, epochs=3, seed=5, resume=states[0])
    final = resumed.state_dict()
    for k, v in whole.state_dict().items():
        assert torch.allclose(v, final[k], atol=1e-6), k
    assert not torch.equal(final["adaptor.weight"], untrained["adaptor.weight"])
