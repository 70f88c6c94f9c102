"""Visual anomaly detection: detectors, data, metrics and artifacts. PyTorch only, no Ray."""

__version__ = "0.1.0"
