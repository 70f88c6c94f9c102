"""The scoring pipeline's model stage, without Ray: each product's artifact loaded once (several
kept resident under a memory budget, the least recently used evicted first), then batches of
decoded rows (anomaly_core.scoring.rows) scored on the device, each product's rows by its model.
jobs.score's actor class wraps it.

Importing this module does not import torch (a job's driver imports it); the stage does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from anomaly_core import storage
from anomaly_core.config import ScoringConfig
from anomaly_core.scoring.rows import output_size, stacked


class ResidentModels:
    """The models of a model actor, by product: loaded on first use and kept while their weights
    fit `config.models_memory_mb` (one is always kept); the least recently used goes first.
    A batch's rows run through their product's model, one call per product in the batch (the
    input blocks hold one product each, so nearly always one). Each batch out counts the loads
    and evictions it caused (`model_loads`, `model_evictions` on its first row)."""

    def __init__(self, config: ScoringConfig, node: str = "") -> None:
        self.config, self.node = config, node
        self.budget = config.models_memory_mb * 2**20
        self.resident: OrderedDict[str, tuple[ModelStage, int]] = OrderedDict()
        self.lock = threading.Lock()  # batches in flight run on threads
        self.loads = self.evictions = 0

    def stage(self, product: str) -> tuple[ModelStage, int, int]:
        """The product's model, loaded (after evicting what no longer fits) if it is not
        resident; with the loads and evictions this took."""
        with self.lock:
            if product in self.resident:
                self.resident.move_to_end(product)
                return self.resident[product][0], 0, 0
            from anomaly_core.model.artifact import WEIGHTS_FILE

            uri = self.config.models[product][0]
            size = storage.size(storage.join(uri, WEIGHTS_FILE))
            evicted = 0
            while self.resident and sum(s for _, s in self.resident.values()) + size > self.budget:
                self.resident.popitem(last=False)
                evicted += 1
            stage = ModelStage(self.config, uri, self.node)
            self.resident[product] = (stage, size)
            self.loads, self.evictions = self.loads + 1, self.evictions + evicted
            return stage, 1, evicted

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        products = [str(p) for p in batch["product"]]
        groups: dict[str, list[int]] = {}
        for i, product in enumerate(products):
            groups.setdefault(product, []).append(i)
        columns: dict[str, list] = {}
        loads = evictions = 0
        for product, rows in groups.items():
            stage, loaded, evicted = self.stage(product)
            loads, evictions = loads + loaded, evictions + evicted
            part = {k: (stacked([v[i] for i in rows]) if k == "image" else
                        [v[i] for i in rows]) for k, v in batch.items()}
            for key, values in stage(part).items():
                column = columns.setdefault(key, [None] * n)
                for i, value in zip(rows, values):
                    column[i] = value
        out = {k: stacked(v) if k == "raw_map" else v for k, v in columns.items()}
        out["raw_score"] = np.asarray(out["raw_score"], dtype=np.float32)
        out["model_loads"] = np.array([loads] + [0] * (n - 1))
        out["model_evictions"] = np.array([evictions] + [0] * (n - 1))
        return out


class ModelStage:
    """Loads one artifact once, then runs its model on each batch of uint8 images.

    With more than one call in flight (threads) each thread has its own CUDA stream, so one
    batch's host-to-device copy overlaps another's compute. `node` names where it runs (a Ray
    node id) in every row it scores.
    """

    def __init__(self, config: ScoringConfig, uri: str, node: str = "") -> None:
        import torch

        from anomaly_core.detectors.tiling import map_size
        from anomaly_core.model.artifact import ModelArtifact
        from anomaly_core.scoring.scorer import Scorer

        self.node = node
        device = "cuda" if config.use_gpu else "cpu"
        if config.model_threads and not config.use_gpu:  # else Ray's OMP_NUM_THREADS (its CPUs)
            torch.set_num_threads(config.model_threads)
        artifact = ModelArtifact.load(uri, device=device)
        self.calibration, self.input_size = artifact.calibration, artifact.input_size
        self.map_size = map_size(artifact.detector)  # the stitched map's when tiled
        self.scorer = Scorer(artifact, device=device, precision=config.precision,
                             compile=config.compile)
        self.render_on_device, self.mask_size = config.render_on_device, config.mask_size
        self.heatmaps = config.heatmaps

    def __call__(self, batch: dict) -> dict:
        with self.scorer.streamed():  # this thread's copies, model and rendering on its stream
            return self._score(batch)

    def _score(self, batch: dict) -> dict:
        from anomaly_core.scoring.scorer import render_maps, wants_heatmap

        n = len(batch["uri"])
        out = {k: v for k, v in batch.items() if k not in ("image", "jpeg")}
        images = self.decode_on_device(batch, out)
        ok = [i for i, (e, s) in enumerate(zip(out["error"], batch["skipped"])) if not e and not s]
        scores = np.full(n, np.nan, dtype=np.float32)
        if self.render_on_device:  # packed mask and heatmap at output size, made on the device
            masks, heats = [b""] * n, [b""] * n
        else:
            maps = np.zeros((n, *self.map_size), dtype=np.float32)
        if ok:
            result = self.scorer(images[ok])
            scores[ok] = result.score.cpu().numpy()
            if self.render_on_device:
                sizes = [output_size(batch, i, self.mask_size) for i in ok]
                wanted = [wants_heatmap(self.heatmaps, s >= self.calibration.threshold)
                          for s in scores[ok]]
                rendered = render_maps(result.map, sizes, self.calibration, wanted, packed=True)
                for i, m, h in zip(ok, *rendered):
                    masks[i], heats[i] = m.tobytes(), b"" if h is None else h.tobytes()
            else:
                maps[ok] = result.map.cpu().numpy()
        if self.render_on_device:
            out.update(mask_bits=masks, heat_u8=heats)
        else:
            out["raw_map"] = maps
        out.update(raw_score=scores, model_node=[self.node] * n)
        return out

    def decode_on_device(self, batch: dict, out: dict):
        """The batch's images on the device at the model's input size: the JPEGs the decode
        tasks left (keep_jpeg) decoded there, images left at their decoded size
        (--resize-on-device) resized there; a JPEG that fails gets its row's `error` in `out`."""
        images = batch["image"]
        jpegs = [i for i, data in enumerate(batch.get("jpeg", [])) if len(data)]
        size = tuple(self.input_size)
        ragged = isinstance(images, list) or tuple(images.shape[-2:]) != size
        if not jpegs and not ragged:
            return images
        images = list(images) if ragged else self.scorer.to_device(np.ascontiguousarray(images))
        if jpegs:
            decoded = self.scorer.decode_jpegs([bytes(batch["jpeg"][i]) for i in jpegs], size)
            out["error"] = list(out["error"])
            for i, image in zip(jpegs, decoded):
                if isinstance(image, str):
                    out["error"][i] = f"{batch['uri'][i]}: {image}"
                else:
                    images[i] = image
        return self.scorer.resize(images, size) if ragged else images
