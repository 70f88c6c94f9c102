"""What detectors are built from: pretrained backbones, nearest neighbours and coresets, precision."""
