"""ibkd.losses objectives: beta="auto", the baselines, stage 2, the projection start, state as safetensors."""

from __future__ import annotations

import logging

import pytest
import torch

import ibkd
from ibkd.functional import hsic, infonce
from ibkd.losses import IBKDLoss, SupervisedIBKDLoss, load_loss_state, save_loss_state


def batch(seed, b=12, ds=8, dt=8, dx=6, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, ds, generator=g).requires_grad_()
    t = torch.randn(b, dt, generator=g)
    x = torch.randn(b, dx, generator=g) + offset
    return s, t, x


def grad_at(term, at):
    (g,) = torch.autograd.grad(term, at, retain_graph=True)
    return g.norm().item()


# ------------------------------------------------------------------------------------------ auto β


def test_auto_beta_hits_the_target_ratio_and_freezes(caplog):
    loss_fn = IBKDLoss(8, 8, beta="auto", beta_target_ratio=0.5, beta_calibration_steps=3, backend="reference")
    nce_norms, hsic_norms = [], []
    with caplog.at_level(logging.INFO, logger="ibkd.losses"):
        for seed in range(3):
            s, t, x = batch(seed)
            out = loss_fn(s, t, x)
            projected = loss_fn.projection(s)
            nce_norms.append(grad_at(infonce(projected, t, temperature=1.0), s))
            hsic_norms.append(grad_at(hsic(torch.nn.functional.normalize(x, dim=-1),
                                           torch.nn.functional.normalize(s, dim=-1), gamma=1.0), s))
            out["loss"].backward()
    expected = 0.5 * sum(nce_norms) / sum(hsic_norms)
    assert loss_fn.beta.frozen and loss_fn.beta.current() == pytest.approx(expected, rel=1e-4)
    assert "beta frozen at" in caplog.text
    # frozen: more calls do not move it, and the loss is exactly infonce + beta * hsic
    s, t, x = batch(7)
    out = loss_fn(s, t, x)
    assert loss_fn.beta.current() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(out["loss"].detach(), out["infonce"] + out["beta"].float() * out["hsic"])
    # at the frozen beta the weighted HSIC gradient is near the target fraction of the InfoNCE gradient
    tracked = IBKDLoss(8, 8, beta=loss_fn.beta.current(), track_grad_norms=True, backend="reference")
    tracked.load_state_dict(loss_fn.state_dict(), strict=False)
    out = tracked(*batch(0))
    assert out["grad_norm_hsic"] / out["grad_norm_infonce"] == pytest.approx(0.5, rel=0.5)


def test_auto_beta_state_survives_a_state_dict_round_trip():
    loss_fn = IBKDLoss(8, 8, beta_calibration_steps=2, backend="reference")
    for seed in range(2):
        loss_fn(*batch(seed))["loss"].backward()
    fresh = IBKDLoss(8, 8, beta_calibration_steps=2, backend="reference")
    assert not fresh.beta.frozen
    fresh.load_state_dict(loss_fn.state_dict())
    assert fresh.beta.frozen and fresh.beta.current() == loss_fn.beta.current()


def test_auto_beta_does_not_calibrate_in_eval_or_without_grad():
    loss_fn = IBKDLoss(8, 8, beta_calibration_steps=1, backend="reference")
    loss_fn.eval()
    loss_fn(*batch(0))
    assert not loss_fn.beta.frozen and int(loss_fn.beta.calibrated_steps) == 0
    loss_fn.train()
    with torch.no_grad():
        loss_fn(*batch(0))
    assert int(loss_fn.beta.calibrated_steps) == 0
    loss_fn(*batch(0))
    assert loss_fn.beta.frozen and loss_fn.beta.current() > 0


def test_a_number_means_exactly_that_beta():
    loss_fn = IBKDLoss(8, 8, beta=3.0, backend="reference")
    for seed in range(3):
        out = loss_fn(*batch(seed))
        assert float(out["beta"]) == 3.0
    assert loss_fn.beta.frozen and not loss_fn.beta.auto
    # even after loading the state of a loss that calibrated another beta
    calibrated = IBKDLoss(8, 8, beta_calibration_steps=1, backend="reference")
    calibrated(*batch(0))
    loss_fn.load_state_dict(calibrated.state_dict())
    assert loss_fn.beta.current() == 3.0 and calibrated.beta.current() != 3.0


def test_auto_beta_on_stage_two():
    loss_fn = SupervisedIBKDLoss(8, beta_calibration_steps=2, projection_dim=4, backend="reference")
    for seed in range(2):
        a, p, x = batch(seed)
        loss_fn(a, p.requires_grad_(), x)["loss"].backward()
    assert loss_fn.beta.frozen and loss_fn.beta.current() > 0


# ------------------------------------------------------------------------------------------ options


def test_hsic_inputs_are_normalised_by_default():
    s, t, x = batch(1, offset=40.0)
    loss_fn = IBKDLoss(8, 8, beta=2.0, gamma=0.5, backend="reference")
    out = loss_fn(s, t, x)
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(out["hsic"], hsic(unit(x, dim=-1), unit(s, dim=-1), gamma=0.5).detach())
    raw = IBKDLoss(8, 8, beta=2.0, gamma=0.5, normalize_hsic_inputs=False, backend="reference")(s, t, x)
    torch.testing.assert_close(raw["hsic"], hsic(x, s, gamma=0.5).detach())


def test_projection_starts_at_identity_when_dims_match():
    assert torch.equal(IBKDLoss(8, 8).projection.weight, torch.eye(8))
    assert torch.count_nonzero(IBKDLoss(8, 8).projection.bias) == 0
    assert not torch.equal(IBKDLoss(8, 8, projection_init="random").projection.weight, torch.eye(8))
    assert IBKDLoss(8, 12).projection.weight.shape == (12, 8)  # other dims: default init


def test_baselines():
    s, t, x = batch(2)
    mse = IBKDLoss(8, 8, method="mse")
    out = mse(s, t)
    assert set(out) == {"loss", "mse", "beta"}
    torch.testing.assert_close(out["loss"], torch.nn.functional.mse_loss(s, t))  # identity P
    contrastive = IBKDLoss(8, 8, method="contrastive", beta="auto")
    out = contrastive(s, t)  # no inputs needed: no HSIC term
    assert not contrastive.uses_inputs and float(out["beta"]) == 0.0
    torch.testing.assert_close(out["loss"], infonce(s, t, temperature=1.0))
    none = IBKDLoss(8, 8, method="none")
    out = none(s, t)
    assert out["loss"].item() == 0.0
    out["loss"].backward()  # connected to the graph, zero gradient
    with pytest.raises(ValueError, match="projection_dim"):
        IBKDLoss(8, 8, method="mse", projection_dim=4)


def test_supervised_loss_equals_its_terms():
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(5, 8, generator=g) for _ in range(3))
    x = torch.randn(5, 6, generator=g)
    loss_fn = SupervisedIBKDLoss(8, beta=0.3, gamma=0.1, projection_dim=None, normalize_hsic_inputs=False,
                                 backend="reference")
    out = loss_fn(a, p, x, negatives=[n])
    torch.testing.assert_close(out["infonce"], infonce(a, torch.cat([p, n]), temperature=0.05))
    torch.testing.assert_close(out["hsic"], hsic(x, a, gamma=0.1))
    torch.testing.assert_close(out["loss"], out["infonce"] + 0.3 * out["hsic"])
    with pytest.raises(ValueError, match="positive must have 5 rows"):
        loss_fn(a, p[:3], x)
    with pytest.raises(ValueError, match=r"negatives\[0\] must have 8 columns"):
        loss_fn(a, p, x, negatives=[n[:, :4]])


def test_input_errors_name_the_argument():
    loss_fn = IBKDLoss(8, 8, beta=1.0)
    s, t, x = batch(4)
    with pytest.raises(ValueError, match="student must have 8 columns"):
        loss_fn(s[:, :4], t, x)
    with pytest.raises(ValueError, match="at least as many rows"):
        loss_fn(s, t[:3], x)
    with pytest.raises(ValueError, match="inputs must have 12 rows"):
        loss_fn(s, t, x[:5])
    with pytest.raises(ValueError, match="inputs"):
        loss_fn(s, t)
    with pytest.raises(ValueError, match="gather_across_devices"):
        IBKDLoss(8, 8, gather_across_devices="yes")


# ------------------------------------------------------------------------------------------ state files


def test_state_is_saved_as_safetensors_and_round_trips(tmp_path):
    loss_fn = IBKDLoss(8, 12, beta_calibration_steps=1)
    loss_fn(*batch(5, dt=12))["loss"].backward()
    path = save_loss_state(loss_fn, tmp_path)
    assert path.name == "ibkd_projection.safetensors"
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(loss_fn.state_dict())
    fresh = IBKDLoss(8, 12)
    load_loss_state(fresh, tmp_path)
    assert torch.equal(fresh.projection.weight, loss_fn.projection.weight)
    assert fresh.beta.frozen and fresh.beta.current() == loss_fn.beta.current()


def test_legacy_pt_state_still_loads(tmp_path):
    old = IBKDLoss(8, 12, beta=1.0)
    # what earlier releases wrote: the projection only, pickled
    torch.save({k: v for k, v in old.state_dict().items() if not k.startswith("beta.")}, tmp_path / "ibkd_projection.pt")
    fresh = IBKDLoss(8, 12, beta=1.0)
    load_loss_state(fresh, tmp_path)
    assert torch.equal(fresh.projection.weight, old.projection.weight)


def test_corrupt_or_mismatching_state_is_one_clear_error(tmp_path):
    path = save_loss_state(IBKDLoss(8, 12), tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="p.safetensors: cannot read"):
        load_loss_state(IBKDLoss(8, 12), path)
    other = save_loss_state(IBKDLoss(8, 16), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="q.safetensors: does not match IBKDLoss"):
        load_loss_state(IBKDLoss(8, 12), other)
    with pytest.raises(ValueError, match="missing.safetensors: no such file"):
        load_loss_state(IBKDLoss(8, 12), tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no ibkd_projection.safetensors"):
        load_loss_state(IBKDLoss(8, 12), tmp_path / "empty")


def test_top_level_exports():
    assert ibkd.SupervisedIBKDLoss is SupervisedIBKDLoss and ibkd.IBKDLoss is IBKDLoss
