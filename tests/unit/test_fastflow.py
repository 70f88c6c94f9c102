"""FastFlow: coupling steps are bijections with the right log-determinant; training behaviour."""

import pytest
import torch

from anomaly_core.detectors import build_detector
from anomaly_core.detectors.fastflow import AffineCoupling

TINY = dict(backbone="resnet18", weights="random", image_size=64)


def _step(channels: int, kernel_size: int = 3, seed: int = 0) -> AffineCoupling:
    """A coupling step with random, far-from-identity weights (a fresh one is near identity)."""
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(channels, generator=generator)
    step = AffineCoupling(channels, kernel_size, 1.0, 2.0, permutation)  # hidden ratio 1, clamp 2
    with torch.no_grad():
        for p in step.subnet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
        step.global_scale.add_(torch.randn(step.global_scale.shape, generator=generator))
        step.global_offset.copy_(torch.randn(step.global_offset.shape, generator=generator))
    return step


@pytest.mark.parametrize("channels,kernel_size", [(4, 3), (5, 1), (24, 3)])
def test_coupling_step_inverts_its_forward_to_1e_4(channels, kernel_size):
    step = _step(channels, kernel_size)
    x = torch.randn(3, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, _ = step(x)
        back = step.inverse(y)
    assert (y - x).abs().max() > 0.1  # the step is far from the identity
    assert (back - x).abs().max() < 1e-4


@pytest.mark.parametrize("channels", [4, 5])
def test_coupling_log_determinant_equals_numerical_jacobian(channels):
    step = _step(channels).double()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, channels, 3, 3, dtype=torch.float64, generator=generator)
    _, logdet = step(x)
    for i in range(len(x)):  # per sample: the batch items do not interact
        jac = torch.autograd.functional.jacobian(lambda v: step(v)[0], x[i : i + 1])
        n = x[i].numel()
        # log|det|: the sign is the permutation's parity, which a density does not see.
        sign, expected = torch.linalg.slogdet(jac.reshape(n, n))
        assert sign.item() != 0.0
        assert abs(logdet[i].item() - expected.item()) < 1e-8
    assert abs(logdet[0].item()) > 0.5  # not the identity's zero


def test_detector_flows_invert_on_real_feature_shapes():
    torch.manual_seed(0)
    detector = build_detector("fastflow", **TINY)
    with torch.no_grad():
        for flow in detector.flows:  # moved off the near-identity start, as training does
            for step in flow.steps:
                for p in step.subnet.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        raw = detector.backbone(torch.rand(2, 3, 64, 64))
        features = [norm(f) for norm, f in zip(detector.norms, raw)]
        for flow, x in zip(detector.flows, features):
            z, _ = flow(x)
            assert (z - x).abs().max() > 1.0 and (flow.inverse(z) - x).abs().max() < 1e-4
    assert len(detector.flows[0].steps) == 8


def test_permutations_and_layernorms_are_saved_and_seeded():
    a = build_detector("fastflow", **TINY)
    keys = a.state_dict().keys()
    assert "flows.0.steps.0.permutation" in keys and "norms.2.weight" in keys
    b = build_detector("fastflow", **TINY)
    c = build_detector("fastflow", **TINY, seed=1)
    perm = "flows.1.steps.3.permutation"
    assert torch.equal(a.state_dict()[perm], b.state_dict()[perm])
    assert not torch.equal(a.state_dict()[perm], c.state_dict()[perm])


def test_subnet_kernels_are_3x3_for_resnet18_and_alternate_otherwise():
    def kernels(**fields):
        detector = build_detector("fastflow", **{**TINY, "flow_steps": 4, **fields})
        return [step.subnet[0].kernel_size[0] for step in detector.flows[0].steps]

    assert kernels() == [3, 3, 3, 3]
    assert kernels(backbone="mobilenet_v2") == [3, 1, 3, 1]
    assert kernels(conv3x3_only=False) == [3, 1, 3, 1]


def test_fine_tuned_backbone_trains_at_the_lower_rate_with_imagenet_batchnorm_statistics():
    torch.manual_seed(0)
    detector = build_detector("fastflow", **TINY)
    assert detector.config.train_backbone and detector.config.backbone_lr < detector.config.lr
    (opt,) = detector.optimizers()
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(rates[id(p)] == detector.config.backbone_lr for p in detector.backbone.parameters())
    assert all(rates[id(p)] == detector.config.lr for p in detector.flows.parameters())
    assert all(rates[id(p)] == detector.config.lr for p in detector.norms.parameters())
    bn = dict(detector.backbone.named_buffers())
    before = {k: v.clone() for k, v in bn.items() if "running" in k}
    detector.train()
    detector.training_step(torch.rand(2, 3, 64, 64)).backward()
    grads = [p.grad for p in detector.backbone.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # BatchNorm stays in eval mode: small per-worker batches must not move ImageNet's statistics.
    assert not detector.backbone.training and all(torch.equal(bn[k], v) for k, v in before.items())


def test_frozen_backbone_gets_no_optimizer_and_no_gradient():
    torch.manual_seed(0)
    detector = build_detector("fastflow", **TINY, train_backbone=False)
    (opt,) = detector.optimizers()
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in detector.backbone.parameters()}
    trainable = [*detector.flows.parameters(), *detector.norms.parameters()]
    assert optimized == {id(p) for p in trainable}
    detector.train()
    assert not detector.backbone.training and detector.flows.training
    detector.training_step(torch.rand(2, 3, 64, 64)).backward()
    assert all(not p.requires_grad and p.grad is None for p in detector.backbone.parameters())


def test_map_is_at_input_size_and_a_wrong_size_is_refused():
    detector = build_detector("fastflow", **TINY).eval()
    out = detector(torch.rand(2, 3, 64, 64))
    assert out.map.shape == (2, 64, 64) and out.score.shape == (2,)
    assert (out.map <= 0).all() and (out.map >= -1).all()
    with pytest.raises(ValueError, match="image_size"):
        detector(torch.rand(1, 3, 96, 96))


# Quality at the defaults (fine-tuned backbone) is tested in tests/unit/test_defaults_learn.py.
