"""Job entry points: --help works as a module, and bad flags or inputs fail before any Ray work."""

import subprocess
import sys

import pytest

from jobs import score, train


@pytest.mark.parametrize("job", ["train", "score", "demo"])
def test_help_runs_as_a_module(job):
    out = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage: python -m jobs." in out.stdout


def test_train_rejects_an_unknown_detector_option_before_ray(tmp_path):
    with pytest.raises(ValueError, match="padim has no option"):
        train.main(["--data", str(tmp_path), "--output", str(tmp_path / "m"), "--set", "flow_steps=4"])


def test_train_rejects_a_malformed_set_flag(tmp_path):
    with pytest.raises(SystemExit, match="key=value"):
        train.main(["--data", str(tmp_path), "--output", str(tmp_path / "m"), "--set", "image_size"])


def test_score_with_a_missing_model_names_it(tmp_path):
    from anomaly_core.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="nothing/model.json"):
        score.main(["--model", str(tmp_path / "nothing"), "--input", str(tmp_path),
                    "--output", str(tmp_path / "out")])
