"""Training: the one fit loop, prediction and calibration on a validation split, metrics."""
