"""Pre-seeding weights for an air-gapped cluster: store once in a bucket, load from there."""

import torch

from anomaly_core.features.backbones import FeatureExtractor
from anomaly_core.features.weights import main


def test_download_to_a_bucket_then_jobs_load_from_it(s3_bucket, s3_endpoint, capsys):
    main(["download", "--backbone", "mobilenet_v2", "--to", f"{s3_bucket}/weights",
          "--s3-endpoint", s3_endpoint])
    uri = f"{s3_bucket}/weights/mobilenet_v2-b0353104.pth"
    assert f"weights={uri}" in capsys.readouterr().out
    from_bucket = FeatureExtractor("mobilenet_v2", ["layer2"], uri).eval()
    reference = FeatureExtractor("mobilenet_v2", ["layer2"], "imagenet").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_bucket(x)[0], reference(x)[0])


def test_unknown_backbone_is_refused(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="unknown backbone"):
        main(["download", "--backbone", "vgg", "--to", str(tmp_path)])
