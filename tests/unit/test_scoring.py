"""The scoring path's model and map stages: uint8 in, floats on the device, maps rendered at
each image's size; 16-bit networks within their documented tolerance of float32."""

import contextlib
import copy
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from anomaly_core.data.datasets import prepare_image
from anomaly_core.detectors import build_detector
from anomaly_core.features.backbones import batchnorm_folded
from anomaly_core.features.precision import resolve_precision
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.calibration import Calibration
from anomaly_core.scoring import scorer as scoring
from anomaly_core.scoring.scorer import Scorer, decode_png, encode_png, render_maps
from anomaly_core.training.fit import fit
from tests.helpers import TensorImages, random_images


def _calibration(**fields) -> Calibration:
    values = dict(threshold=1.0, pixel_threshold=2.0, min=0.0, max=2.0, method="test",
                  pixel_min=1.0, pixel_max=3.0)
    return Calibration(**{**values, **fields})


@pytest.fixture(scope="module")
def padim():
    torch.manual_seed(0)
    detector = build_detector("padim", backbone="resnet18", weights="random", image_size=64)
    fit(detector, TensorImages(random_images(8, 64)), batch_size=4)
    return ModelArtifact(detector, _calibration())


def _uint8_images(n: int, size: int = 64, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def test_uint8_images_score_exactly_as_the_float_images_of_training(padim):
    images = _uint8_images(4)
    out = Scorer(padim, precision="fp32", channels_last=False)(images)
    floats = torch.stack([prepare_image(im.transpose(1, 2, 0), (64, 64)) for im in images])
    with torch.no_grad():  # the Scorer runs the detector with its BatchNorms folded
        ref = batchnorm_folded(padim.detector.eval())(floats)
    assert torch.equal(out.score, ref.score) and torch.equal(out.map, ref.map)


def test_scorer_layout_and_folding_keep_scores_and_leave_the_artifact_alone(padim, tmp_path):
    """channels_last and folded BatchNorms (faster on CPU too) change only float rounding; the
    artifact's detector keeps its own layers, so it still saves and loads as it was."""
    keys = list(padim.detector.state_dict())
    images = _uint8_images(4)
    floats = torch.stack([prepare_image(im.transpose(1, 2, 0), (64, 64)) for im in images])
    with torch.no_grad():
        ref = padim.detector(floats)
    out = Scorer(padim, precision="fp32")(images)
    torch.testing.assert_close(out.score, ref.score, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.map, ref.map, rtol=1e-4, atol=1e-4 * ref.map.max().item())
    assert list(padim.detector.state_dict()) == keys
    padim.save(str(tmp_path / "model"))
    assert torch.equal(Scorer(ModelArtifact.load(str(tmp_path / "model")))(images).score, out.score)


def test_scorer_refuses_float_images_and_a_bad_precision(padim):
    with pytest.raises(TypeError, match="uint8"):
        Scorer(padim)(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="fp8"):
        Scorer(padim, precision="fp8")


def test_auto_precision_is_16_bits_on_a_gpu_only_for_detectors_measured_faster_there():
    from anomaly_core.detectors import detector_class

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for name, expected in [("padim", "fp16"), ("vit_knn", "fp16"), ("simplenet", "fp16"),
                           ("fastflow", "fp16"), ("patchcore", "fp32"), ("stpm", "fp32"),
                           ("autoencoder", "fp32")]:
        assert resolve_precision("auto", gpu, detector_class(name).gpu_precision) == expected
        assert resolve_precision("auto", cpu, detector_class(name).gpu_precision) == "fp32"
    assert resolve_precision("fp16", gpu, "fp32") == "fp16"  # asked for: as asked
    assert resolve_precision("bf16", cpu) == "bf16"


# Reduced precision against float32 on the same uint8 test images (capsule 96 px, mobilenet_v2
# ImageNet weights, 24 good + 24 defective, so that one swapped pair moves AUROC by 0.0017):
# Spearman rank correlation of the image scores and the image AUROC difference. Measured on CPU
# through the Scorer (channels_last, BatchNorms folded; seed 0; fastflow 3 epochs):
#              fp16 rho / AUROC diff      bf16 rho / AUROC diff
#   padim      1.0     / 0                0.99881 / 0.0035
#   patchcore  0.99957 / 0                0.99533 / 0.0087
#   fastflow   0.99967 / 0                0.99457 / 0.0069
# (stpm 15 epochs: fp16 0.99913 / 0.0052, bf16 0.99208.) With 16 + 16 images one swapped pair
# was 0.0039, and folding swapped one near-tie of fastflow's. The tolerance the README documents:
MIN_RANK_CORRELATION, MAX_AUROC_CHANGE = 0.999, 0.002


@pytest.mark.parametrize("name", ["padim", "patchcore", "fastflow"])
def test_fp16_networks_keep_scores_within_the_tolerance_of_float32(name, synthetic):
    from scipy.stats import spearmanr

    from anomaly_core.training.metrics import image_auroc
    from tests.helpers import synthetic_split

    train, test = synthetic_split(synthetic("capsule", 96, 40, 24, 6), "capsule", 96)
    torch.manual_seed(0)
    detector = build_detector(name, image_size=96, backbone="mobilenet_v2")
    fit(detector, Subset(train, range(32)), batch_size=8, epochs=3, seed=0)
    artifact = ModelArtifact(detector, _calibration())
    images = np.stack([(test[i]["image"] * 255).round().to(torch.uint8).numpy()
                       for i in range(len(test))])
    labels = np.array([int(test[i]["label"]) for i in range(len(test))])
    if name == "patchcore":  # the reference's nearest-neighbour products in float32 too
        detector.knn_dtype = "float32"
    exact = Scorer(artifact, precision="fp32")(images).score.numpy()
    detector.knn_dtype = "auto"  # fp16 products inside fp16, as the job runs them
    half = Scorer(artifact, precision="fp16")(images).score.numpy()
    assert spearmanr(exact, half)[0] >= MIN_RANK_CORRELATION
    assert abs(image_auroc(labels, exact) - image_auroc(labels, half)) <= MAX_AUROC_CHANGE


def test_bf16_nearest_neighbour_products_keep_patchcore_within_the_tolerance(synthetic):
    # knn_dtype "auto" takes bf16 products on CPUs with bf16 instructions, at fp32 precision;
    # "bfloat16" forces them here on any CPU (slowly where emulated).
    from scipy.stats import spearmanr

    from anomaly_core.training.metrics import image_auroc, pixel_auroc
    from tests.helpers import synthetic_split

    train, test = synthetic_split(synthetic("capsule", 96, 40, 24, 6), "capsule", 96)
    torch.manual_seed(0)
    detector = build_detector("patchcore", image_size=96, backbone="mobilenet_v2")
    fit(detector, Subset(train, range(32)), batch_size=8, seed=0)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])
    labels = np.array([int(test[i]["label"]) for i in range(len(test))])
    out, patch = {}, {}
    with torch.no_grad():
        emb = detector.embed(images)
        for products in ("float32", "bfloat16"):
            detector.knn_dtype = products
            out[products] = detector(images)
            patch[products] = detector.patch_scores(emb)[0]
    exact, low = out["float32"], out["bfloat16"]
    assert spearmanr(exact.score.numpy(), low.score.numpy())[0] >= MIN_RANK_CORRELATION
    assert abs(image_auroc(labels, exact.score.numpy()) - image_auroc(labels, low.score.numpy())) \
        <= MAX_AUROC_CHANGE
    assert abs(pixel_auroc(masks.numpy(), exact.map.numpy()) - pixel_auroc(masks.numpy(), low.map.numpy())) \
        <= MAX_AUROC_CHANGE
    # Exact distances for the patches whose nearest neighbour the bf16 products found, and
    # for the others the distance to a near-tie.
    same = torch.isclose(patch["bfloat16"], patch["float32"], rtol=1e-5).float().mean().item()
    assert same > 0.95, same
    assert (patch["bfloat16"] / patch["float32"]).max() < 1.01


def test_batches_from_two_threads_get_their_own_results(padim):
    # The model actor runs two batches at once (--batches-in-flight); neither may see the other's.
    scorer, batches = Scorer(padim, precision="fp32"), [_uint8_images(3, seed=s) for s in (1, 2)]
    expected = [scorer(b).score for b in batches]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = scorer(batches[i]).score

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in (0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_callers_read_results_only_after_the_scoring_stream_made_them(padim):
    # Found on an H200: without the hand-over between the scorer's stream and the caller's,
    # .cpu() read scores before they were written (fp32 PatchCore image AUROC 0.20, not 0.78).
    batches = [_uint8_images(32, seed=s) for s in range(4)]
    expected = [Scorer(padim, precision="fp32")(b).score for b in batches]
    gpu = Scorer(copy.deepcopy(padim), device="cuda", precision="fp32")
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(i: int) -> None:  # thread 1 as the model actor does: all of it on its own stream
        with gpu.streamed() if i else contextlib.nullcontext():
            for b in batches[i::2] * 3:
                got[i].append(gpu(b).score.cpu())

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for k, score in enumerate(got[i]):
            torch.testing.assert_close(score, expected[i + 2 * (k % 2)], rtol=1e-2, atol=1e-2)


def test_render_maps_thresholds_and_windows_at_each_images_size():
    cal = _calibration()  # pixel threshold 2, window [1, 3]
    maps = torch.tensor([[1.0, 2.0], [3.0, 5.0]])[None].repeat(2, 1, 1)
    (mask_a, mask_b), (heat_a, heat_b) = render_maps(maps, [(2, 2), (6, 4)], cal)
    assert mask_a.dtype == heat_a.dtype == np.uint8
    assert mask_a.tolist() == [[0, 255], [255, 255]]
    # threshold -> 128 (0.5 of 255, rounded), window's low end -> 0, at and above its top -> 255
    assert heat_a.tolist() == [[0, 128], [255, 255]]
    # another size: the bilinear resize of the same map, thresholded there
    assert mask_b.shape == heat_b.shape == (6, 4)
    resized = F.interpolate(maps[:1, None], size=(6, 4), mode="bilinear", align_corners=False)[0, 0]
    assert np.array_equal(mask_b, (resized >= 2.0).numpy().astype(np.uint8) * 255)


def test_mask_and_heatmap_pngs_are_lossless():
    g = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(g.integers(0, 256, (8, 8)), 32, 0), 32, 1).astype(np.uint8)
    noise = g.integers(0, 256, (100, 70)).astype(np.uint8)
    for pixels in (smooth, noise, np.zeros((5, 3), np.uint8), (smooth > 128).astype(np.uint8) * 255):
        assert np.array_equal(decode_png(encode_png(pixels)), pixels)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 64), (37, 129), (300, 8)])
def test_one_bit_mask_pngs_are_lossless_and_read_back_as_0_and_255(shape):
    import io

    from PIL import Image

    from anomaly_core.scoring.scorer import encode_mask_png

    mask = np.random.default_rng(shape[0]).random(shape) > 0.7
    data = encode_mask_png(mask.astype(np.uint8) * 255)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "1" and image.size == shape[::-1]
    assert np.array_equal(np.asarray(image), mask)  # any PNG reader: the defect pixels
    assert np.array_equal(decode_png(data), mask.astype(np.uint8) * 255)
    assert np.array_equal(decode_png(encode_mask_png(mask)), decode_png(data))  # bool in too


@pytest.mark.parametrize("scale, most", [(2.3, 0.8), (4.0, 1.2)])
def test_one_bit_mask_png_is_no_larger_than_the_eight_bit_one(scale, most):
    # Measured at 512 px: a sparse mask (2.4 % defect) 0.73x the bytes of the 8-bit PNG, one
    # of 46 % defect 1.13x; at 2,048 px 0.69x and 1.12x.
    from anomaly_core.scoring.scorer import encode_mask_png

    raw = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3 if scale < 3 else 2))
    (mask,), _ = render_maps(raw * scale, [(512, 512)], _calibration())
    assert 0 < mask.mean() < 255
    assert len(encode_mask_png(mask)) < most * len(encode_png(mask))


@pytest.mark.parametrize("size", [(30, 40), (7, 13), (2100, 2001)])
def test_packed_masks_are_the_masks_bits_and_encode_to_the_same_png(size):
    from anomaly_core.scoring.scorer import encode_mask_png

    raw = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4)) * 4
    (mask,), _ = render_maps(raw, [size], _calibration())
    (bits,), _ = render_maps(raw, [size], _calibration(), packed=True)
    assert bits.shape == (size[0], -(-size[1] // 8)) and bits.dtype == np.uint8
    assert np.array_equal(bits, np.packbits(mask > 0, axis=1))
    assert encode_mask_png(bits, width=size[1]) == encode_mask_png(mask)


def test_packing_in_tensor_operations_as_on_a_gpu_gives_numpys_bits():
    from anomaly_core.scoring.scorer import _packed_by_tensors

    mask = torch.rand(3, 37, 45, generator=torch.Generator().manual_seed(5)) > 0.5
    assert torch.equal(_packed_by_tensors(mask),
                       torch.from_numpy(np.packbits(mask.numpy(), axis=-1)))


def test_render_maps_skips_the_heatmaps_not_asked_for():
    cal = _calibration()
    raw = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(3)) * 4
    sizes = [(30, 40), (30, 40), (2100, 2000), (16, 16)]
    masks, heats = render_maps(raw, sizes, cal)
    some_masks, some_heats = render_maps(raw, sizes, cal, [False, True, False, True])
    assert some_heats[0] is None and some_heats[2] is None
    assert np.array_equal(some_heats[1], heats[1]) and np.array_equal(some_heats[3], heats[3])
    assert all(np.array_equal(a, b) for a, b in zip(masks, some_masks))


@pytest.mark.parametrize("heatmaps, expected", [("all", [True, True]), ("anomalous", [False, True]),
                                                ("none", [False, False])])
def test_rows_carry_a_heatmap_only_where_asked(heatmaps, expected):
    from anomaly_core.scoring.rows import make_rows
    from anomaly_core.scoring.schema import FILE_SCHEMA, score_table

    cal, run, raw, base = _three_rows()
    batch = {**base, "raw_map": raw.numpy()}
    rows = make_rows(batch, run, cal, None, heatmaps)
    table = score_table(rows)
    assert table.num_rows == 3 and table.schema == FILE_SCHEMA  # rows and schema unchanged
    assert [r["heatmap_png"] is not None for r in rows[:2]] == expected
    assert all(r["mask_png"] for r in rows[:2]) and table.column("heatmap_png")[2].as_py() is None
    with pytest.raises(ValueError, match="heatmaps='some'"):
        make_rows(batch, run, cal, None, "some")


def test_render_maps_of_a_mixed_batch_equal_each_map_rendered_alone(monkeypatch):
    # Same-size maps are rendered as one batch (in chunks of GROUP_PIXELS); strip-sized outputs
    # alone, a strip at a time.
    cal = _calibration()
    raw = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(1)) * 4
    sizes = [(30, 40), (16, 16), (30, 40), (2100, 2000), (8, 8), (30, 40), (30, 40), (30, 40)]
    monkeypatch.setattr(scoring, "GROUP_PIXELS", 2 * 30 * 40)  # the four 30 x 40: two chunks
    masks, heats = render_maps(raw, sizes, cal)
    for i, size in enumerate(sizes):
        (mask,), (heat,) = render_maps(raw[i:i + 1], [size], cal)
        assert masks[i].shape == heats[i].shape == size
        assert np.array_equal(masks[i], mask) and np.array_equal(heats[i], heat), size


def test_render_maps_averages_when_shrinking_so_a_lone_hot_pixel_is_not_the_whole_mask():
    amap = torch.zeros(1, 64, 64)
    amap[0, 10, 10] = 100.0
    cal = _calibration(pixel_threshold=20.0, pixel_min=0.0, pixel_max=40.0)
    (mask,), (heat,) = render_maps(amap, [(8, 8)], cal)
    # An antialiased 8x shrink spreads the pixel over its block (about 100/64 there): no mask.
    assert mask.max() == 0 and heat.max() > 0


def test_old_artifacts_without_a_pixel_window_render_with_the_image_window():
    cal = _calibration(pixel_min=None, pixel_max=None)  # image window [0, 2], pixel threshold 2
    _, (heat,) = render_maps(torch.tensor([[[0.0, 2.0]]]), [(1, 2)], cal)
    assert heat.tolist() == [[0, 128]]


def _three_rows():
    """(calibrations, run, raw maps, batch columns) of three rows as the model stage hands them
    on: a normal image (score 0.5 of threshold 1) of 30 x 40, an anomalous one of 16 x 16, and
    an error row."""
    from anomaly_core.scoring.runs import RunAttempt, RunModel

    cal = {"padim": _calibration()}
    model = RunModel(product="padim", version="v", model_version="v", detector="padim", uri="/m")
    run = RunAttempt(run_id="r", output="/tmp/out", day="2026-11-30", source="/in",
                     incremental=False, created_at="now", models=(model,), attempt="a")
    raw = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 4
    base = {"uri": ["a", "b", "c"], "etag": ["e1", "e2", "e3"], "error": ["", "", "broken"],
            "size_bytes": [1, 2, 3], "width": [40, 16, -1], "height": [30, 16, -1],
            "skipped": np.array([False, False, False]), "raw_score": np.array([0.5, 1.5, np.nan]),
            "product": ["padim"] * 3}
    return cal, run, raw, base


def test_rows_from_maps_rendered_in_the_actor_equal_rows_rendered_in_the_row_task():
    from anomaly_core.scoring.rows import make_rows

    cal, run, raw, base = _three_rows()
    from_maps = make_rows({**base, "raw_map": raw.numpy()}, run, cal, None)
    masks, heats = render_maps(raw[:2], [(30, 40), (16, 16)], cal["padim"])
    masks, _ = render_maps(raw[:2], [(30, 40), (16, 16)], cal["padim"], packed=True)
    rendered = {**base, "mask_bits": [m.tobytes() for m in masks] + [b""],
                "heat_u8": [h.tobytes() for h in heats] + [b""]}
    from_actor = make_rows(rendered, run, cal, None)
    strip = ("scored_at",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in from_maps] == \
        [{k: v for k, v in r.items() if k not in strip} for r in from_actor]
    assert from_maps[2]["error"] == "broken" and "mask_png" not in from_maps[2]  # null column
    assert [r["is_anomalous"] for r in from_maps[:2]] == [False, True]


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92, **save)
    return buffer.getvalue()


def _photo(h: int = 90, w: int = 120) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 2, y * 2, (x + y)], -1).clip(0, 255).astype(np.uint8)


def test_plain_jpegs_are_left_for_the_device_and_others_decoded_on_cpu(tmp_path):
    from anomaly_core.data.decode import read_image

    files = {"plain.jpg": _jpeg(_photo()), "progressive.jpg": _jpeg(_photo(), progressive=True),
             "gray.jpg": _jpeg(_photo()[..., 0])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    plain = read_image(str(tmp_path / "plain.jpg"), (32, 32), keep_jpeg=True)
    assert plain["jpeg"] == files["plain.jpg"] and plain["image"] is None
    assert (plain["height"], plain["width"]) == (90, 120) and plain["error"] is None
    gray = read_image(str(tmp_path / "gray.jpg"), (32, 32), keep_jpeg=True)
    assert gray["jpeg"] is not None  # grayscale decodes to RGB on either decoder
    progressive = read_image(str(tmp_path / "progressive.jpg"), (32, 32), keep_jpeg=True)
    assert progressive["jpeg"] is None and progressive["image"].shape == (3, 32, 32)
    assert read_image(str(tmp_path / "plain.jpg"), (32, 32))["jpeg"] is None  # not asked


def test_device_jpeg_decoding_matches_the_cpu_decoder_and_names_a_corrupt_file(padim):
    from anomaly_core.data.datasets import resize_image
    from anomaly_core.data.decode import decode_image

    good = _jpeg(_photo())
    decoded = Scorer(padim).decode_jpegs([good, good[: len(good) // 3]], (64, 64))
    assert isinstance(decoded[1], str) and "corrupt" in decoded[1]
    cpu = resize_image(decode_image(good), (64, 64)).int()
    assert decoded[0].dtype == torch.uint8 and decoded[0].shape == (3, 64, 64)
    # libjpeg against torchvision's decoder, PIL's antialiased bilinear against torch's
    assert (decoded[0].int() - cpu).abs().float().mean() <= 1.0


def test_images_resized_on_the_device_score_as_those_resized_by_the_decode_tasks(padim,
                                                                                   tmp_path):
    # --resize-on-device: the decode tasks ship images at their decoded size (two sizes here,
    # so a ragged column) and the model stage resizes them on its device.
    from PIL import Image

    from anomaly_core.config import ScoringConfig
    from anomaly_core.scoring.model_stage import ResidentModels
    from anomaly_core.scoring.rows import read_images

    model = str(tmp_path / "model")
    padim.save(model)
    uris = []
    for i, side in enumerate((96, 96, 150, 64)):
        photo = Image.fromarray(_photo()).resize((side, side), Image.Resampling.BICUBIC)
        photo.save(tmp_path / f"{i}.png")
        uris.append(str(tmp_path / f"{i}.png"))
    batch = {"uri": uris, "etag": [""] * 4, "prev_etag": [""] * 4, "product": ["p"] * 4}
    config = ScoringConfig(models={"p": (model, (64, 64))}, resize_on_device=True)
    scores = {}
    for resize in (True, False):
        decoded = read_images(batch, config.input_sizes, 10**9, resize=resize)
        if not resize:
            assert [tuple(im.shape) for im in decoded["image"]] == [
                (3, 96, 96), (3, 96, 96), (3, 150, 150), (3, 64, 64)]
        scores[resize] = ResidentModels(config)(decoded)["raw_score"]
    # torch's antialiased bilinear against Pillow's: within a grey level, so nearly the scores
    np.testing.assert_allclose(scores[False], scores[True], rtol=0.02)
    assert not np.array_equal(scores[True][:1], scores[True][2:3])


def test_a_large_jpeg_decodes_reduced_but_its_row_keeps_the_images_own_size(tmp_path):
    import io

    from PIL import Image

    from anomaly_core.data.decode import read_image

    path = tmp_path / "big.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    row = read_image(str(path), (128, 128))
    assert row["error"] is None and row["image"].shape == (3, 128, 128)
    assert (row["height"], row["width"]) == (1200, 1600)  # the mask and heatmap's size


def test_the_decode_stage_reads_decodes_and_resizes_without_importing_torch(tmp_path):
    # The score job's decode tasks run anomaly_core.scoring.rows.read_images; importing torch
    # there cost 5 s a worker on 2 cores before the first image of a run was decoded.
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(_photo()).save(tmp_path / "a.png")
    code = f"""
import sys
from anomaly_core.scoring.rows import read_images
out = read_images({{"uri": [{str(tmp_path / "a.png")!r}], "etag": [None], "prev_etag": [None],
                   "product": ["p"]}}, {{"p": (32, 48)}}, 10**8, None)
assert out["image"].shape == (1, 3, 32, 48) and out["error"] == [""], out["error"]
print("torch" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
