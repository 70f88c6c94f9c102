"""The scoring pipeline's model stage, without Ray: load the artifact once, then score batches of
decoded rows (anomaly_core.scoring.rows) on the device. jobs.score's actor class wraps it.

Importing this module does not import torch (a job's driver imports it); the stage does.
"""

from __future__ import annotations

import numpy as np

from anomaly_core.config import ScoringConfig
from anomaly_core.scoring.rows import output_size


class ModelStage:
    """Loads the artifact once, then runs the model on each batch of uint8 images.

    With more than one call in flight (threads) each thread has its own CUDA stream, so one
    batch's host-to-device copy overlaps another's compute. `node` names where it runs (a Ray
    node id) in every row it scores.
    """

    def __init__(self, config: ScoringConfig, node: str = "") -> None:
        import torch

        from anomaly_core.detectors.tiling import map_size
        from anomaly_core.model.artifact import ModelArtifact
        from anomaly_core.scoring.scorer import Scorer

        self.node = node
        device = "cuda" if config.use_gpu else "cpu"
        if config.model_threads and not config.use_gpu:  # else Ray's OMP_NUM_THREADS (its CPUs)
            torch.set_num_threads(config.model_threads)
        artifact = ModelArtifact.load(config.model_uri, device=device)
        self.calibration, self.input_size = artifact.calibration, artifact.input_size
        self.map_size = map_size(artifact.detector)  # the stitched map's when tiled
        self.scorer = Scorer(artifact, device=device, precision=config.precision,
                             compile=config.compile)
        self.render_on_device, self.mask_size = config.render_on_device, config.mask_size

    def __call__(self, batch: dict) -> dict:
        with self.scorer.streamed():  # this thread's copies, model and rendering on its stream
            return self._score(batch)

    def _score(self, batch: dict) -> dict:
        from anomaly_core.scoring.scorer import render_maps

        n = len(batch["uri"])
        out = {k: v for k, v in batch.items() if k not in ("image", "jpeg")}
        images = self.decode_on_device(batch, out)
        ok = [i for i, (e, s) in enumerate(zip(out["error"], batch["skipped"])) if not e and not s]
        scores = np.full(n, np.nan, dtype=np.float32)
        if self.render_on_device:  # mask and heatmap at output size, uint8, made on the device
            masks, heats = [b""] * n, [b""] * n
        else:
            maps = np.zeros((n, *self.map_size), dtype=np.float32)
        if ok:
            result = self.scorer(images[ok])
            scores[ok] = result.score.cpu().numpy()
            if self.render_on_device:
                sizes = [output_size(batch, i, self.mask_size) for i in ok]
                for i, m, h in zip(ok, *render_maps(result.map, sizes, self.calibration)):
                    masks[i], heats[i] = m.tobytes(), h.tobytes()
            else:
                maps[ok] = result.map.cpu().numpy()
        if self.render_on_device:
            out.update(mask_u8=masks, heat_u8=heats)
        else:
            out["raw_map"] = maps
        out.update(raw_score=scores, model_node=[self.node] * n)
        return out

    def decode_on_device(self, batch: dict, out: dict):
        """The batch's images on the device, the JPEGs the decode tasks left (keep_jpeg)
        decoded there; a JPEG that fails gets its row's `error` in `out`."""
        images = batch["image"]
        jpegs = [i for i, data in enumerate(batch.get("jpeg", [])) if len(data)]
        if not jpegs:
            return images
        images = self.scorer.to_device(np.ascontiguousarray(images))
        decoded = self.scorer.decode_jpegs([bytes(batch["jpeg"][i]) for i in jpegs],
                                           self.input_size)
        out["error"] = list(out["error"])
        for i, image in zip(jpegs, decoded):
            if isinstance(image, str):
                out["error"][i] = f"{batch['uri'][i]}: {image}"
            else:
                images[i] = image
        return images
