"""Every bad input is rejected with the right exception type and a message that names the argument;
odd-but-valid inputs (non-contiguous views, NaN with check_finite=False) just work."""

from __future__ import annotations

import math
import re

import pytest
import torch

import ibkd
from helpers import any_backend, unit_rows  # noqa: F401  (any_backend is a fixture)
from ibkd.functional import hsic, infonce

f32 = torch.float32


def rows(n, d, dtype=f32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(n * 100 + d), dtype=torch.float64).to(dtype)


def raises(exc, *words):
    """pytest.raises whose message must contain every word (the argument's name, at least)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


# --------------------------------------------------------------------------------- InfoNCE shapes


@pytest.mark.parametrize("bad", [torch.randn(4), torch.randn(2, 3, 4), torch.tensor(1.0)])
def test_infonce_rejects_non_2d_query_and_key(bad):
    with raises(ValueError, "query", "2-D"):
        infonce(bad, rows(4, 3))
    with raises(ValueError, "key", "2-D"):
        infonce(rows(4, 4), bad)


def test_infonce_rejects_non_tensors():
    with raises(TypeError, "query", "Tensor"):
        infonce([[1.0, 2.0]], rows(1, 2))
    with raises(TypeError, "key", "Tensor"):
        infonce(rows(1, 2), None)


def test_infonce_rejects_mismatched_feature_dims():
    with raises(ValueError, "query", "key", "D", "3", "5"):
        infonce(rows(4, 3), rows(4, 5))


def test_infonce_rejects_fewer_keys_than_queries():
    with raises(ValueError, "key", "N=3", "B=4"):
        infonce(rows(4, 3), rows(3, 3))


def test_symmetric_needs_as_many_keys_as_queries():
    with raises(ValueError, "symmetric", "B=4", "N=6"):
        infonce(rows(4, 3), rows(6, 3), symmetric=True)


@pytest.mark.parametrize("which", ["query", "key"])
def test_infonce_rejects_empty_batch_and_zero_columns(which):
    args = {"query": rows(2, 3), "key": rows(2, 3)}
    args[which] = torch.empty(0, 3)
    with raises(ValueError, which, "row"):
        infonce(args["query"], args["key"])
    args = {"query": rows(2, 3), "key": rows(2, 3)}
    args[which] = torch.empty(2, 0)
    with raises(ValueError, which, "column"):
        infonce(args["query"], args["key"])


# ------------------------------------------------------------------------------ InfoNCE options


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan, math.inf, -math.inf])
def test_infonce_rejects_bad_temperature_values(value):
    with raises(ValueError, "temperature"):
        infonce(rows(2, 3), rows(2, 3), temperature=value)
    with raises(ValueError, "temperature"):
        infonce(rows(2, 3), rows(2, 3), temperature=torch.tensor(value))


@pytest.mark.parametrize("value", ["0.1", None, [0.1], True, 1j])
def test_infonce_rejects_temperature_of_wrong_type(value):
    with raises(TypeError, "temperature"):
        infonce(rows(2, 3), rows(2, 3), temperature=value)


@pytest.mark.parametrize("value", [1e-40, 1e39])
def test_infonce_rejects_temperature_out_of_the_accumulation_range(value):
    # 1/1e-40 and 1e39 overflow float32, the accumulation dtype of float32/bf16/fp16 inputs
    with raises(ValueError, "temperature", "float32", "1/temperature"):
        infonce(rows(2, 3), rows(2, 3), temperature=value)
    with raises(ValueError, "temperature", "float32"):
        infonce(rows(2, 3, torch.bfloat16), rows(2, 3, torch.bfloat16), temperature=value)
    assert torch.isfinite(infonce(rows(2, 3, torch.float64), rows(2, 3, torch.float64), temperature=value))


def test_infonce_rejects_bad_temperature_tensors():
    with raises(ValueError, "temperature", "0-dim"):
        infonce(rows(2, 3), rows(2, 3), temperature=torch.tensor([0.1]))
    with raises(TypeError, "temperature"):
        infonce(rows(2, 3), rows(2, 3), temperature=torch.tensor(1))


@pytest.mark.parametrize("value", ["avg", "Mean", None, 1])
def test_infonce_rejects_unknown_reduction(value):
    with raises(ValueError, "reduction", "mean"):
        infonce(rows(2, 3), rows(2, 3), reduction=value)


# ------------------------------------------------------------------------------------ HSIC shapes


@pytest.mark.parametrize("bad", [torch.randn(4), torch.randn(4, 3, 2)])
def test_hsic_rejects_non_2d_inputs(bad):
    with raises(ValueError, "x", "2-D"):
        hsic(bad, rows(4, 3))
    with raises(ValueError, "z", "2-D"):
        hsic(rows(4, 3), bad)


def test_hsic_rejects_mismatched_row_counts():
    with raises(ValueError, "x", "z", "n", "4", "5"):
        hsic(rows(4, 3), rows(5, 3))


@pytest.mark.parametrize("n", [0, 1])
def test_hsic_needs_at_least_two_rows(n):
    with raises(ValueError, "x", "2 row"):
        hsic(torch.randn(n, 3), rows(2, 3))
    with raises(ValueError, "z", "2 row"):
        hsic(rows(2, 3), torch.randn(n, 3))


def test_hsic_rejects_zero_columns():
    with raises(ValueError, "x", "column"):
        hsic(torch.empty(3, 0), rows(3, 2))
    with raises(ValueError, "z", "column"):
        hsic(rows(3, 2), torch.empty(3, 0))


# ---------------------------------------------------------------------------------- HSIC options


@pytest.mark.parametrize("name", ["gamma", "gamma_z"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_hsic_rejects_bad_gamma_values(name, value, kernel):
    with raises(ValueError, name):
        hsic(rows(3, 2), rows(3, 2), kernel=kernel, **{name: value})
    with raises(ValueError, name):
        hsic(rows(3, 2), rows(3, 2), kernel=kernel, **{name: torch.tensor(value)})


@pytest.mark.parametrize("name", ["gamma", "gamma_z"])
@pytest.mark.parametrize("value", [[1.0], True, torch.tensor(1)])
def test_hsic_rejects_gamma_of_wrong_type(name, value):
    with raises(TypeError, name):
        hsic(rows(3, 2), rows(3, 2), **{name: value})


@pytest.mark.parametrize("name", ["gamma", "gamma_z"])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("value", ["mean", "Median", "auto", ""])
def test_hsic_rejects_gamma_strings_other_than_median(name, kernel, value):
    with raises(ValueError, name, "median"):
        hsic(rows(3, 2), rows(3, 2), kernel=kernel, **{name: value})


@pytest.mark.parametrize("value", ["gaussian", "RBF", "", None])
def test_hsic_rejects_unknown_kernel(value):
    with raises(ValueError, "kernel", "rbf"):
        hsic(rows(3, 2), rows(3, 2), kernel=value)


# ------------------------------------------------------------------------------ both: backends


@pytest.mark.parametrize("value", ["nope", "CPU", ""])
def test_unknown_backend_name(value):
    with raises(ValueError, "backend", "reference", repr(value)):
        infonce(rows(2, 3), rows(2, 3), backend=value)
    with raises(ValueError, "backend", "reference", repr(value)):
        hsic(rows(2, 3), rows(2, 3), backend=value)


def test_backend_must_be_a_string():
    with raises(TypeError, "backend"):
        infonce(rows(2, 3), rows(2, 3), backend=None)
    with raises(TypeError, "backend"):
        hsic(rows(2, 3), rows(2, 3), backend=1)


# ---------------------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize(
    "bad", [torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int32),
            torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.complex64)],
    ids=["int64", "int32", "bool", "complex64"],
)
def test_non_floating_dtypes_are_rejected(bad):
    good = rows(2, 3)
    with raises(TypeError, "query", "float", str(bad.dtype)):
        infonce(bad, good)
    with raises(TypeError, "key", "float", str(bad.dtype)):
        infonce(good, bad)
    with raises(TypeError, "x", "float", str(bad.dtype)):
        hsic(bad, good)
    with raises(TypeError, "z", "float", str(bad.dtype)):
        hsic(good, bad)


def test_inputs_on_different_devices_are_rejected():
    # The "meta" device stands in for a second device: no data, but a distinct torch.device.
    cpu, meta = rows(2, 3), torch.empty(2, 3, device="meta")
    with raises(ValueError, "query", "key", "device", "meta"):
        infonce(cpu, meta)
    with raises(ValueError, "query", "key", "device", "meta"):
        infonce(meta, cpu)
    with raises(ValueError, "x", "z", "device", "meta"):
        hsic(cpu, meta)


# -------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_rejected(poison):
    bad = rows(3, 2).clone()
    bad[1, 0] = poison
    good = rows(3, 2)
    with raises(ValueError, "query", "NaN or Inf", "check_finite"):
        infonce(bad, good)
    with raises(ValueError, "key", "NaN or Inf"):
        infonce(good, bad)
    with raises(ValueError, "x", "NaN or Inf", "check_finite"):
        hsic(bad, good)
    with raises(ValueError, "z", "NaN or Inf"):
        hsic(good, bad)


def test_check_finite_false_skips_the_check(any_backend):
    bad = rows(3, 2, torch.float64).clone()
    bad[1, 0] = math.nan
    good = rows(3, 2, torch.float64)
    # No error: the NaN propagates into the result instead.
    assert torch.isnan(infonce(bad, good, check_finite=False, backend=any_backend))
    assert torch.isnan(hsic(bad, good, check_finite=False, backend=any_backend))


# ------------------------------------------------------------------------ non-contiguous inputs


def layouts(b: int, d: int, g: torch.Generator):
    """Pairs (name, tensor) of one logical (b, d) matrix stored in different non-contiguous ways."""
    base = unit_rows(g, b, d)
    transposed = base.T.contiguous().T  # column-major storage
    wide = torch.zeros(b, 2 * d, dtype=base.dtype)
    wide[:, ::2] = base  # column stride 2
    tall = torch.zeros(2 * b, d, dtype=base.dtype)
    tall[::2] = base  # row stride 2
    expanded = unit_rows(g, b, 1).expand(b, d)  # column stride 0 (all columns equal)
    return base, {
        "transposed": transposed,
        "column_strided": wide[:, ::2],
        "row_strided": tall[::2],
        "expanded": expanded,
    }


@pytest.mark.parametrize("layout", ["transposed", "column_strided", "row_strided", "expanded"])
@pytest.mark.parametrize("loss", ["infonce", "infonce_symmetric", "hsic", "hsic_normalized_linear"])
def test_non_contiguous_inputs_match_contiguous(any_backend, layout, loss):
    g = torch.Generator().manual_seed(7)
    q_base, q_views = layouts(5, 6, g)
    k_base, k_views = layouts(5, 6, g)
    q_view, k_view = q_views[layout], k_views["transposed" if layout == "expanded" else layout]
    if layout == "expanded":
        q_base = q_view.contiguous()
    else:
        assert not q_view.is_contiguous()
    k_base = k_view.contiguous()

    def run(a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        if loss == "infonce":
            value = infonce(a, b, temperature=0.3, backend=any_backend)
        elif loss == "infonce_symmetric":
            value = infonce(a, b, temperature=0.3, symmetric=True, reduction="none", backend=any_backend).sum()
        elif loss == "hsic":
            value = hsic(a, b, gamma=0.8, backend=any_backend)
        else:
            value = hsic(a, b, kernel="linear", normalized=True, backend=any_backend)
        return (value, *torch.autograd.grad(value, (a, b)))

    for got, expected in zip(run(q_view, k_view), run(q_base, k_base)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
