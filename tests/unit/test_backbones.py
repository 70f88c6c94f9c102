"""Backbones: layer names per family, and every way of getting weights, offline."""

import os
import shutil

import pytest
import torch

from anomaly_core import storage
from anomaly_core.errors import WeightsUnavailableError
from anomaly_core.features import backbones
from anomaly_core.features.backbones import FeatureExtractor


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with nothing in it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize(
    "name, channels",
    [
        ("resnet18", [64, 128, 256]),
        ("resnet50", [256, 512, 1024]),
        ("wide_resnet50_2", [256, 512, 1024]),
        ("mobilenet_v2", [24, 32, 96]),
        ("timm:resnet18", [64, 128, 256]),
    ],
)
def test_layer1_to_layer3_have_strides_4_8_16(name, channels):
    extractor = FeatureExtractor(name, ["layer1", "layer2", "layer3"], "random")
    assert extractor.channels == channels and extractor.strides == [4, 8, 16]
    feats = extractor(torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4]


def test_mobilenet_layer2_and_layer3_are_features_6_and_13():
    extractor = FeatureExtractor("mobilenet_v2", ["layer2", "layer3"], "imagenet").eval()
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(backbones.offline_weights_path("mobilenet_v2"), weights_only=True))
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    normalized = (x - extractor.mean) / extractor.std
    with torch.no_grad():
        layer2, layer3 = extractor(x)
        assert torch.allclose(layer2, model.features[:7](normalized), atol=1e-5)
        assert torch.allclose(layer3, model.features[:14](normalized), atol=1e-5)


def test_building_an_extractor_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    extractor = FeatureExtractor("mobilenet_v2", ["layer2"], "imagenet")
    state = torch.load(backbones.offline_weights_path("mobilenet_v2"), weights_only=True)
    running = extractor.body.state_dict()["features.1.conv.0.1.running_mean"]
    assert torch.equal(running, state["features.1.conv.0.1.running_mean"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_batchnorm_folding_keeps_the_features_and_leaves_the_extractor_alone(name):
    torch.manual_seed(0)
    extractor = FeatureExtractor(name, ["layer1", "layer2", "layer3"], "random")
    for bn in (m for m in extractor.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # statistics and affine terms far from the identity, so folding has work to do
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    extractor.eval()
    keys = list(extractor.state_dict())
    folded = extractor.batchnorm_folded()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    assert list(extractor.state_dict()) == keys and not folded.training
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(extractor(images), folded(images)):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert extractor.train().batchnorm_folded() is extractor  # batch statistics: nothing to fold


def test_batchnorm_folding_of_a_detector_copies_only_its_extractors():
    from anomaly_core.detectors import build_detector

    detector = build_detector("stpm", backbone="resnet18", weights="random", image_size=64).eval()
    view = backbones.batchnorm_folded(detector)
    assert view is not detector and view.teacher is not detector.teacher
    assert view.student.body is not detector.student.body
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in view.modules())
    # everything else is shared: moving the view moves the detector's own buffers with it
    assert view.teacher._buffers is detector.teacher._buffers
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).eval()
    assert backbones.batchnorm_folded(plain) is plain  # only FeatureExtractors are folded


def test_imagenet_mobilenet_loads_from_the_offline_package_with_real_weights(empty_hub):
    extractor = FeatureExtractor("mobilenet_v2", ["layer2"], "imagenet")
    assert backbones.OFFLINE_FILE in extractor.weight_source
    state = torch.load(backbones.offline_weights_path("mobilenet_v2"), weights_only=True)
    loaded = extractor.body.state_dict()["features.0.0.weight"]
    assert torch.equal(loaded, state["features.0.0.weight"])


def test_imagenet_prefers_the_hub_cache(empty_hub):
    empty_hub.mkdir(parents=True)
    shutil.copy(backbones.offline_weights_path("mobilenet_v2"), empty_hub / backbones.OFFLINE_FILE)
    extractor = FeatureExtractor("mobilenet_v2", ["layer2"], "imagenet")
    assert str(empty_hub) in extractor.weight_source


def test_corrupt_cached_file_fails_its_hash_check(empty_hub):
    empty_hub.mkdir(parents=True)
    (empty_hub / backbones.OFFLINE_FILE).write_bytes(b"not the weights")
    with pytest.raises(WeightsUnavailableError, match="sha256 does not match"):
        FeatureExtractor("mobilenet_v2", ["layer2"], "imagenet")


def test_imagenet_without_cache_or_hub_says_how_to_preseed(empty_hub):
    with pytest.raises(WeightsUnavailableError) as err:
        FeatureExtractor("wide_resnet50_2", ["layer2"], "imagenet")
    message = str(err.value)
    assert "wide_resnet50_2-" in message and str(empty_hub) in message and "weights=" in message
    assert not backbones.imagenet_weights_available("wide_resnet50_2")
    assert backbones.imagenet_weights_available("mobilenet_v2")


def test_state_dict_file_local_and_s3_loads_exactly(tmp_path, s3_bucket, s3_endpoint):
    torch.manual_seed(3)
    source = FeatureExtractor("resnet18", ["layer1"], "random")
    import torchvision

    full = torchvision.models.resnet18()
    full.load_state_dict(source.body.state_dict(), strict=False)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    uri = f"{s3_bucket}/weights/r18.pth"
    storage.write_bytes(uri, path.read_bytes())
    x = torch.rand(1, 3, 32, 32)
    for weights in (str(path), uri):
        loaded = FeatureExtractor("resnet18", ["layer1"], weights)
        assert torch.equal(loaded(x)[0], source(x)[0]) and loaded.weight_source == weights


def test_wrong_state_dict_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsUnavailableError, match="other.pth"):
        FeatureExtractor("resnet18", ["layer1"], str(path))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsUnavailableError, match="junk.pth"):
        FeatureExtractor("resnet18", ["layer1"], str(tmp_path / "junk.pth"))


def test_timm_loads_a_local_file_through_pretrained_cfg_overlay(tmp_path):
    import timm

    torch.manual_seed(4)
    model = timm.create_model("resnet18")
    torch.save(model.state_dict(), tmp_path / "timm_r18.pth")
    loaded = FeatureExtractor("timm:resnet18", ["layer2"], str(tmp_path / "timm_r18.pth"))
    assert torch.equal(loaded.body.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])


def test_timm_imagenet_offline_fails_clearly():
    with pytest.raises(WeightsUnavailableError, match="timm weights for resnet18"):
        FeatureExtractor("timm:resnet18", ["layer2"], "imagenet")


def test_vit_random_has_the_published_shape():
    vit = backbones.ViTExtractor(weights="random")
    cls, patches = vit(torch.rand(1, 3, 224, 224))
    assert cls.shape == (1, 768) and patches.shape == (1, 768, 14, 14)


def test_vit_imagenet_offline_fails_clearly():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(WeightsUnavailableError, match="Pre-seed"):
        backbones.ViTExtractor(weights="imagenet")


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        FeatureExtractor("vgg_tiny", ["layer1"], "random")
