"""The loss modules: InfoNCELoss, HSICLoss and IBKDLoss against ibkd.functional, their parameters,
gradients and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

import ibkd
from helpers import any_backend, unit_rows  # noqa: F401  (fixture)
from ibkd.functional import hsic, infonce
from ibkd.losses import STAGE1_DEFAULTS, STAGE2_DEFAULTS


def data(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [unit_rows(g, *shape, dtype=torch.float32) for shape in shapes]


# ------------------------------------------------------------------------------------ InfoNCELoss


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_loss_equals_functional(any_backend, symmetric, normalize, reduction):
    q, k = data(0, (5, 4), (5, 4))
    module = ibkd.InfoNCELoss(0.2, normalize=normalize, symmetric=symmetric, reduction=reduction, backend=any_backend)
    expected = infonce(q, k, temperature=0.2, normalize=normalize, symmetric=symmetric, reduction=reduction)
    torch.testing.assert_close(module(q, k), expected, rtol=1e-5, atol=1e-6)


def test_fixed_temperature_is_a_buffer_not_a_parameter():
    module = ibkd.InfoNCELoss(0.07)
    assert list(module.parameters()) == []
    assert module.temperature.item() == pytest.approx(0.07)
    assert "log_temperature" not in module.state_dict()  # a constant, not state


def test_learnable_temperature_gets_a_gradient(any_backend):
    q, k = data(1, (6, 5), (9, 5))
    module = ibkd.InfoNCELoss(0.3, learnable_temperature=True, backend=any_backend)
    assert [name for name, _ in module.named_parameters()] == ["log_temperature"]
    q.requires_grad_()
    module(q, k).backward()
    grad = module.log_temperature.grad
    assert grad is not None and torch.isfinite(grad) and grad.item() != 0.0

    # d loss / d log τ = τ · d loss / d τ, τ = exp(log τ)
    tau = torch.tensor(0.3, requires_grad=True)
    infonce(q.detach(), k, temperature=tau).backward()
    torch.testing.assert_close(grad, tau.grad * 0.3, rtol=1e-4, atol=1e-7)
    assert q.grad is not None


def test_learnable_temperature_trains():
    q, k = data(2, (8, 4), (8, 4))
    k = q + 0.01 * k  # near-perfect positives: a lower temperature lowers the loss
    module = ibkd.InfoNCELoss(1.0, learnable_temperature=True)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    before = module(q, k).item()
    for _ in range(5):
        opt.zero_grad()
        module(q, k).backward()
        opt.step()
    assert module.temperature.item() < 1.0 and module(q, k).item() < before


@pytest.mark.parametrize("value", [0.0, -1.0, "0.1", None])
def test_infonce_loss_rejects_bad_temperature(value):
    with pytest.raises(ValueError, match="temperature"):
        ibkd.InfoNCELoss(value)


# --------------------------------------------------------------------------------------- HSICLoss


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("gammas", [(1.0, None), (0.5, 2.0), ("median", None), (0.3, "median")])
def test_hsic_loss_equals_functional(any_backend, kernel, normalized, gammas):
    x, z = data(3, (9, 4), (9, 3))
    gamma, gamma_z = gammas
    module = ibkd.HSICLoss(gamma, gamma_z, kernel=kernel, normalized=normalized, backend=any_backend)
    expected = hsic(x, z, gamma=gamma, gamma_z=gamma_z, kernel=kernel, normalized=normalized)
    torch.testing.assert_close(module(x, z), expected, rtol=1e-5, atol=1e-7)


def test_hsic_loss_gradients_flow_to_both_inputs(any_backend):
    x, z = data(4, (7, 3), (7, 2))
    x.requires_grad_(), z.requires_grad_()
    ibkd.HSICLoss(0.8, backend=any_backend)(x, z).backward()
    assert x.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_hsic_loss_bad_options_fail_at_call_with_the_argument_named():
    x, z = data(5, (4, 2), (4, 2))
    with pytest.raises(ValueError, match="kernel"):
        ibkd.HSICLoss(kernel="poly")(x, z)
    with pytest.raises(ValueError, match="gamma"):
        ibkd.HSICLoss(gamma=-1.0)(x, z)


# --------------------------------------------------------------------------------------- IBKDLoss


def test_ibkd_loss_is_infonce_plus_beta_hsic(any_backend):
    student, teacher, inputs = data(6, (6, 5), (6, 8), (6, 12))
    loss_fn = ibkd.IBKDLoss(5, 8, temperature=0.5, beta=0.7, gamma=0.9, normalize_hsic_inputs=False,
                            projection_init="random", backend=any_backend)
    out = loss_fn(student, teacher, inputs)
    assert set(out) == {"loss", "infonce", "hsic", "beta"} and float(out["beta"]) == pytest.approx(0.7)
    assert isinstance(loss_fn.projection, torch.nn.Linear) and loss_fn.projection.out_features == 8
    assert isinstance(loss_fn.teacher_projection, torch.nn.Identity)

    expected_infonce = infonce(loss_fn.projection(student), teacher, temperature=0.5)
    expected_hsic = hsic(inputs, student, gamma=0.9)  # HSIC of the input and the (unprojected) student
    torch.testing.assert_close(out["infonce"], expected_infonce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["hsic"], expected_hsic, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], out["infonce"] + 0.7 * out["hsic"], rtol=1e-6, atol=1e-7)
    assert not out["infonce"].requires_grad and not out["hsic"].requires_grad  # logging copies
    assert out["loss"].requires_grad  # through the projection


def test_ibkd_loss_backward_reaches_student_and_projection(any_backend):
    student, teacher, inputs = data(7, (6, 5), (9, 8), (6, 4))  # 3 extra teacher rows: hard negatives
    student.requires_grad_()
    loss_fn = ibkd.IBKDLoss(5, 8, beta=0.5, normalize_hsic_inputs=False, backend=any_backend)
    loss_fn(student, teacher, inputs)["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.projection.parameters())

    # the HSIC term contributes to the student's gradient
    student2 = student.detach().clone().requires_grad_()
    loss_fn.zero_grad()
    contrastive_only = ibkd.IBKDLoss(5, 8, beta=0.0, backend=any_backend)
    contrastive_only.load_state_dict(loss_fn.state_dict())
    contrastive_only(student2, teacher, inputs)["loss"].backward()
    assert not torch.allclose(student2.grad, student.grad)


def test_ibkd_loss_without_projection_needs_equal_dims(any_backend):
    student, teacher = data(8, (5, 6), (5, 6))
    loss_fn = ibkd.IBKDLoss(6, 6, projection=False, beta=0.0, backend=any_backend)
    assert isinstance(loss_fn.projection, torch.nn.Identity) and list(loss_fn.parameters()) == []
    out = loss_fn(student, teacher)
    torch.testing.assert_close(out["loss"], infonce(student, teacher, temperature=1.0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="student_dim"):
        ibkd.IBKDLoss(6, 8, projection=False)
    with pytest.raises(ValueError, match="teacher must have 6 columns"):
        loss_fn(student, data(9, (5, 4))[0])  # wrong teacher width at call time


def test_ibkd_loss_projection_dim_projects_the_teacher_too(any_backend):
    student, teacher, inputs = data(10, (6, 5), (6, 8), (6, 3))
    loss_fn = ibkd.IBKDLoss(5, 8, projection_dim=4, temperature=0.05, beta=1.0, gamma=0.1, normalize_hsic_inputs=False,
                            backend=any_backend)
    assert loss_fn.projection.out_features == 4
    assert isinstance(loss_fn.teacher_projection, torch.nn.Linear)
    assert (loss_fn.teacher_projection.in_features, loss_fn.teacher_projection.out_features) == (8, 4)
    out = loss_fn(student, teacher, inputs)
    expected = infonce(loss_fn.projection(student), loss_fn.teacher_projection(teacher), temperature=0.05)
    torch.testing.assert_close(out["infonce"], expected.detach(), rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in loss_fn.teacher_projection.parameters())


def test_ibkd_loss_beta_zero_skips_hsic(any_backend):
    student, teacher = data(11, (4, 3), (4, 3))
    loss_fn = ibkd.IBKDLoss(3, 3, beta=0.0, backend=any_backend)
    out = loss_fn(student, teacher)  # no inputs needed
    assert out["hsic"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["infonce"], rtol=0, atol=0)


def test_ibkd_loss_needs_inputs_when_beta_positive():
    student, teacher = data(12, (4, 3), (4, 3))
    with pytest.raises(ValueError, match="inputs"):
        ibkd.IBKDLoss(3, 3, beta=0.2)(student, teacher)


def test_ibkd_loss_casts_teacher_to_the_student_dtype():
    student, inputs = data(13, (4, 3), (4, 2))
    teacher = data(14, (4, 6))[0].double()
    out = ibkd.IBKDLoss(3, 6)(student, teacher, inputs)
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(student_dim=0, teacher_dim=4), "student_dim"),
        (dict(student_dim=4, teacher_dim=-1), "teacher_dim"),
        (dict(student_dim=4.0, teacher_dim=4), "student_dim"),
        (dict(student_dim=4, teacher_dim=4, beta=-0.1), "beta"),
        (dict(student_dim=4, teacher_dim=4, beta="automatic"), "beta"),
        (dict(student_dim=4, teacher_dim=4, beta=float("nan")), "beta"),
        (dict(student_dim=4, teacher_dim=4, beta_target_ratio=0), "beta_target_ratio"),
        (dict(student_dim=4, teacher_dim=4, beta_calibration_steps=0), "beta_calibration_steps"),
        (dict(student_dim=4, teacher_dim=4, method="kd"), "method"),
        (dict(student_dim=4, teacher_dim=4, projection_init="zeros"), "projection_init"),
        (dict(student_dim=4, teacher_dim=4, normalize_hsic_inputs="yes"), "normalize_hsic_inputs"),
        (dict(student_dim=4, teacher_dim=4, temperature=0.0), "temperature"),
    ],
)
def test_ibkd_loss_constructor_errors_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ibkd.IBKDLoss(**kwargs)


def test_auto_beta_aims_at_each_stages_own_ratio():
    # stage 1: the ratio of the dev-best fixed β at the reproduction's 300 steps; stage 2: the 0.2-0.8 middle
    from ibkd.distill.config import TrainConfig

    assert ibkd.IBKDLoss(8, 8).beta.target_ratio == STAGE1_DEFAULTS["beta_target_ratio"] == 0.07
    assert ibkd.losses.SupervisedIBKDLoss(8).beta.target_ratio == STAGE2_DEFAULTS["beta_target_ratio"] == 0.5
    # the CLI resolves the same per-stage defaults, and a number given is that number
    assert TrainConfig.from_dict({}).stage_defaults()["beta_target_ratio"] == 0.07
    assert TrainConfig.from_dict({"stage": "finetune"}).stage_defaults()["beta_target_ratio"] == 0.5
    assert TrainConfig.from_dict({"beta_target_ratio": 0.2}).stage_defaults()["beta_target_ratio"] == 0.2


def test_stage_defaults_build():
    s1 = ibkd.IBKDLoss(384, 768, **STAGE1_DEFAULTS)
    assert s1.beta.auto and s1.projection.out_features == 768
    s2 = ibkd.IBKDLoss(384, 768, **STAGE2_DEFAULTS)
    assert s2.beta.auto and s2.projection.out_features == 128 and s2.teacher_projection.out_features == 128
    paper = ibkd.IBKDLoss(384, 768, **ibkd.losses.PAPER_STAGE1)
    assert not paper.beta.auto and paper.beta.current() == 0.2
    # the library's defaults are the stage-1 defaults
    plain = ibkd.IBKDLoss(384, 384)
    assert plain.beta.auto and plain.infonce.temperature.item() == pytest.approx(1.0) and plain.hsic.gamma == 1.0
    assert plain.normalize_hsic_inputs and torch.equal(plain.projection.weight, torch.eye(384))
