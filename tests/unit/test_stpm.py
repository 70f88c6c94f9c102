"""STPM: frozen ImageNet teacher, random student that alone trains, exact round trip, learning."""

import pytest
import torch
from torch.utils.data import Subset

from anomaly_core.detectors import build_detector
from anomaly_core.features import backbones
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.calibration import Calibration
from anomaly_core.training.evaluate import predict
from anomaly_core.training.fit import fit
from anomaly_core.training.metrics import image_auroc
from tests.helpers import TensorImages, mask_quality, synthetic_split

SIZE = 64
MOBILENET = dict(backbone="mobilenet_v2", weights="imagenet", image_size=SIZE)
N_FIT, N_HELD = 32, 8  # training images, and held-out normal images that calibrate
MIN_MASK_F1 = 0.2  # measured 0.297 (and 0 % of normal pixels marked)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def stpm():
    torch.manual_seed(0)
    return build_detector("stpm", **MOBILENET)


def test_teacher_has_imagenet_weights_and_the_student_the_same_architecture_at_random(stpm):
    imagenet = torch.load(backbones.offline_weights_path("mobilenet_v2"), weights_only=True)
    teacher, student = stpm.teacher.body.state_dict(), stpm.student.body.state_dict()
    assert teacher.keys() == student.keys()
    assert all(teacher[k].shape == student[k].shape for k in teacher)
    weights = [k for k in teacher if k.endswith(".weight")]
    assert all(torch.equal(teacher[k], imagenet[k]) for k in weights)
    assert not any(torch.equal(student[k], imagenet[k]) for k in weights)
    assert stpm.weight_source.startswith("imagenet") and stpm.student.weight_source == "random"


def test_teacher_is_frozen_in_eval_mode_and_only_the_student_is_optimised(stpm):
    stpm.train()
    assert not any(m.training for m in stpm.teacher.modules())
    assert all(m.training for m in stpm.student.modules())
    assert not any(p.requires_grad for p in stpm.teacher.parameters())
    assert all(p.requires_grad for p in stpm.student.parameters())
    (opt,) = stpm.optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.4
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in stpm.student.parameters()}


def test_a_step_changes_the_student_and_leaves_the_teacher_exactly_alone():
    torch.manual_seed(0)
    detector = build_detector("stpm", **MOBILENET)
    teacher, student = _clone(detector.teacher), _clone(detector.student)
    fit(detector, TensorImages(_images(4)), batch_size=4)
    # Every teacher tensor, BatchNorm running statistics included.
    assert all(torch.equal(v, teacher[k]) for k, v in detector.teacher.state_dict().items())
    changed = [not torch.equal(v, student[k]) for k, v in detector.student.state_dict().items()]
    assert sum(changed) > 0.9 * len(changed)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_map():
    detector = build_detector("stpm", **{**MOBILENET, "blur_sigma": 0.0}).eval()
    detector.student.load_state_dict(detector.teacher.state_dict())
    images = _images(2)
    assert detector.training_step(images).item() == pytest.approx(0.0, abs=1e-6)
    out = detector(images)
    assert out.map.shape == (2, SIZE, SIZE) and out.map.abs().max() < 1e-6


def test_map_combines_layers_by_product_or_sum_and_rejects_other_names():
    torch.manual_seed(0)
    product = build_detector("stpm", **MOBILENET, blur_sigma=0.0).eval()
    summed = build_detector("stpm", **MOBILENET, blur_sigma=0.0, map_reduction="sum").eval()
    summed.load_state_dict(product.state_dict())
    images = _images(2)
    # Each layer's map lies in [0, 2]: a product of three is at most 8, a sum at most 6.
    p, s = product(images).map, summed(images).map
    assert not torch.allclose(p, s) and p.min() >= 0 and s.max() <= 6
    with pytest.raises(ValueError, match="map_reduction='mean'"):
        build_detector("stpm", **MOBILENET, map_reduction="mean")


def test_artifact_round_trips_teacher_and_student_exactly(tmp_path):
    torch.manual_seed(0)
    detector = build_detector("stpm", **MOBILENET)
    fit(detector, TensorImages(_images(4)), batch_size=4)
    images = _images(3, seed=5)
    expected = detector.eval()(images)
    ModelArtifact(detector, Calibration(0.5, 0.5, 0.0, 1.0, "test")).save(str(tmp_path / "stpm"))
    loaded = ModelArtifact.load(str(tmp_path / "stpm")).detector
    # The loader builds a random teacher; the weights file must overwrite all of it.
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in detector.state_dict().items())
    assert loaded.config.weights == "imagenet" and loaded.weight_source == detector.weight_source
    out = loaded(images)
    assert torch.equal(out.score, expected.score) and torch.equal(out.map, expected.map)


@pytest.fixture(scope="module")
def wood(synthetic) -> tuple:
    return synthetic_split(synthetic("wood", SIZE, N_FIT + N_HELD, 12, 3), "wood", SIZE)


def test_stpm_learns_wood_at_its_defaults_and_its_masks_find_the_defects(wood):
    torch.manual_seed(0)
    detector = build_detector("stpm", **MOBILENET)
    losses: list[float] = []
    train, test = wood
    fit(detector, Subset(train, range(N_FIT)), batch_size=8, epochs=6,
        report=lambda m, *_: losses.append(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    pred = predict(detector, test)
    auroc = image_auroc(pred["labels"], pred["scores"])
    print(f"stpm wood image AUROC {auroc:.3f}")
    # Measured with this recipe over data and init seeds 0-9: min 0.80, mean 0.90 (0.92 here).
    assert auroc >= 0.7
    quality = mask_quality(detector, train, test, N_FIT, N_HELD)
    print(f"stpm wood masks {quality}")
    assert quality["f1"] >= MIN_MASK_F1 and quality["normal_marked"] <= 0.01
