"""The torch.library custom ops (ibkd::infonce, ibkd::infonce_backward, ibkd::hsic_stats,
ibkd::hsic_stats_backward) pass torch.library.opcheck for every fused CPU backend, and a small model
plus the IBKD loss compiles with torch.compile(fullgraph=True) and matches eager."""

from __future__ import annotations

import pytest
import torch

import ibkd
from helpers import ALL_BACKENDS, backend_ready, fused_backend, unit_rows  # noqa: F401  (fixture)
from ibkd import ops
from ibkd.functional import hsic, infonce

f64 = torch.float64


def opcheck(op, args):
    # test_schema, test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction, fuse_grad", [(0, False), (1, False), (2, False), (1, True), (2, True)])
def test_opcheck_infonce(fused_backend, dtype, symmetric, reduction, fuse_grad):
    g = torch.Generator().manual_seed(0)
    b, n = 3, (3 if symmetric else 5)
    q = unit_rows(g, b, 4, dtype).requires_grad_()
    k = unit_rows(g, n, 4, dtype).requires_grad_()
    inv_temp = torch.tensor(2.5, dtype=dtype, requires_grad=True)
    opcheck(ops.infonce_op, (q, k, inv_temp, symmetric, reduction, fuse_grad, fused_backend))
    opcheck(ops.infonce_op, (q, k.detach(), inv_temp, symmetric, reduction, fuse_grad, fused_backend, False))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_infonce_backward(fused_backend, dtype, symmetric):
    g = torch.Generator().manual_seed(1)
    b, n = 3, (3 if symmetric else 6)
    q, k = unit_rows(g, b, 5, dtype), unit_rows(g, n, 5, dtype)
    inv_temp = torch.tensor(3.0, dtype=dtype)
    _, lse, *_ = ops.infonce_op(q, k, inv_temp, symmetric, 0, False, fused_backend)
    grad_rows = torch.rand(b, generator=g, dtype=f64).to(dtype)
    opcheck(ops.infonce_backward_op, (grad_rows, q, k, inv_temp, lse, symmetric, fused_backend))
    opcheck(ops.infonce_backward_op, (grad_rows, q, k, inv_temp, lse, symmetric, fused_backend, False))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_opcheck_hsic_stats(fused_backend, dtype, kernel):
    g = torch.Generator().manual_seed(2)
    x = unit_rows(g, 6, 3, dtype).requires_grad_()
    z = unit_rows(g, 6, 2, dtype).requires_grad_()
    gammas = torch.tensor([0.7, 1.3], dtype=dtype)
    opcheck(ops.hsic_stats_op, (x, z, gammas, kernel, fused_backend))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_opcheck_hsic_stats_backward(fused_backend, dtype, kernel):
    g = torch.Generator().manual_seed(3)
    n = 5
    x, z = unit_rows(g, n, 3, dtype), unit_rows(g, n, 4, dtype)
    gammas = torch.tensor([0.7, 1.3], dtype=dtype)
    g_sums = torch.randn(3, generator=g, dtype=f64).to(dtype)
    g_rk = torch.randn(n, generator=g, dtype=f64).to(dtype)
    g_rl = torch.randn(n, generator=g, dtype=f64).to(dtype)
    opcheck(ops.hsic_stats_backward_op, (g_sums, g_rk, g_rl, x, z, gammas, kernel, fused_backend))
    for need_x, need_z in ((False, True), (True, False)):
        opcheck(ops.hsic_stats_backward_op, (g_sums, g_rk, g_rl, x, z, gammas, kernel, fused_backend, need_x, need_z))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_with_frozen_keys(fused_backend, dtype, reduction, symmetric):
    # keys without requires_grad (a teacher's vectors) get no dK computed; the queries' and the
    # temperature's gradients are the same as when the keys take one too
    g = torch.Generator().manual_seed(5)
    q, k = unit_rows(g, 6, 4, dtype), unit_rows(g, 6, 4, dtype)
    grads = []
    for key_grad in (True, False):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_(key_grad)
        t = torch.tensor(0.3, dtype=dtype, requires_grad=True)
        loss = infonce(qq, kk, temperature=t, symmetric=symmetric, reduction=reduction, backend=fused_backend)
        (loss if reduction != "none" else loss.sum()).backward()
        grads.append((qq.grad, kk.grad, t.grad))
    assert grads[1][1] is None
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1][2], grads[0][2], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("which", ["x", "z"])
def test_hsic_gradient_of_one_input_only(fused_backend, dtype, which):
    # an input without requires_grad (x is often data) gets no gradient computed; the other one's is the
    # same as when both are asked for
    g = torch.Generator().manual_seed(4)
    x, z = unit_rows(g, 9, 5, dtype), unit_rows(g, 9, 3, dtype)
    both = [x.clone().requires_grad_(), z.clone().requires_grad_()]
    hsic(*both, gamma=0.8, backend=fused_backend).backward()
    one = [x.clone(), z.clone()]
    k = 0 if which == "x" else 1
    one[k].requires_grad_()
    hsic(*one, gamma=0.8, backend=fused_backend).backward()
    assert one[1 - k].grad is None
    torch.testing.assert_close(one[k].grad, both[k].grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------- torch.compile


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 6)
    x, teacher = torch.randn(7, 8), torch.randn(7, 10)
    return model, x, teacher


def grads_of(step, model, loss_params, x, teacher):
    params = list(model.parameters()) + list(loss_params)
    for p in params:
        p.grad = None
    loss = step(x, teacher)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiled_functional_step_matches_eager(backend):
    """Linear student + projection + InfoNCE + β·HSIC through ibkd.functional, fullgraph."""
    with backend_ready(backend):
        model, x, teacher = model_and_data()
        projection = torch.nn.Linear(6, 10)

        def step(x, teacher):
            student = model(x)
            contrastive = infonce(projection(student), teacher, temperature=0.5, backend=backend)
            return contrastive + 0.3 * hsic(x, student, gamma="median", backend=backend)

        eager = grads_of(step, model, projection.parameters(), x, teacher)
        compiled = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), model, projection.parameters(), x, teacher)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        for c, e in zip(compiled[1], eager[1]):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_ibkd_loss_matches_eager(compile_backend):
    """Linear student + IBKDLoss (projection, InfoNCE, HSIC), fullgraph, through the fused custom ops."""
    backend = "dense"
    with backend_ready(backend):
        model, x, teacher = model_and_data(1)
        loss_fn = ibkd.IBKDLoss(6, 10, temperature=0.5, beta=0.3, backend=backend)

        def step(x, teacher):
            return loss_fn(model(x), teacher, x)["loss"]

        eager = grads_of(step, model, loss_fn.parameters(), x, teacher)
        compiled_step = torch.compile(step, fullgraph=True, backend=compile_backend)
        compiled = grads_of(compiled_step, model, loss_fn.parameters(), x, teacher)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        for c, e in zip(compiled[1], eager[1]):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
