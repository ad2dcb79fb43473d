"""``torch.library`` custom ops through which every fused backend runs.

Each op takes the backend's name as a string argument and looks the backend up in the registry, so
the ops are the same for ``cpu``, ``triton`` and ``cuda``. Fake (meta) kernels give
``torch.compile`` the output shapes, and registered autograd formulas make the ops differentiable
without graph breaks.

Ops (namespace ``ibkd``):

* ``infonce(q, k, inv_temp, symmetric, reduction, fuse_grad, backend, need_k) -> (loss, lse, dq, dk, dinv)``
  ``reduction``: 0 none (loss is (B,)), 1 mean, 2 sum (0-dim). With ``fuse_grad`` (only for mean/sum)
  the gradients of the loss are computed in the forward pass and the backward merely scales them;
  otherwise ``dq, dk, dinv`` are empty and the backward recomputes through ``infonce_backward``.
* ``infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric, backend, need_k) -> (dq, dk, dinv)``
  ``need_k`` False (the keys take no gradient: a frozen teacher's vectors): ``dk`` is empty (0,) and
  not computed
* ``hsic_stats(x, z, gammas, kernel, backend) -> (sums, rowsum_k, rowsum_l)``
* ``hsic_stats_backward(g_sums, g_rk, g_rl, x, z, gammas, kernel, backend, need_x, need_z) -> (dx, dz)``
  a gradient autograd does not need (``need_*`` False) comes back empty (0,) and its work is skipped
"""

from __future__ import annotations

import torch

from .backend.base import accumulation_dtype, get_backend

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


# ------------------------------------------------------------------------------------- InfoNCE


@torch.library.custom_op("ibkd::infonce", mutates_args=())
def infonce_op(
    q: torch.Tensor,
    k: torch.Tensor,
    inv_temp: torch.Tensor,
    symmetric: bool,
    reduction: int,
    fuse_grad: bool,
    backend: str,
    need_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = get_backend(backend)
    b = q.shape[0]
    if fuse_grad:
        weight = 1.0 / b if reduction == 1 else 1.0
        row_loss, lse, dq, dk, dinv = impl.infonce_forward_backward(q, k, inv_temp, symmetric, weight, need_k=need_k)
        if not need_k:
            dk = _empty(k)
    else:
        row_loss, lse = impl.infonce_forward(q, k, inv_temp, symmetric)
        dq, dk, dinv = _empty(q), _empty(k), _empty(inv_temp)
    if reduction == 1:
        loss = row_loss.mean()
    elif reduction == 2:
        loss = row_loss.sum()
    else:
        loss = row_loss
    return loss, lse, dq, dk, dinv


@infonce_op.register_fake
def _(q, k, inv_temp, symmetric, reduction, fuse_grad, backend, need_k=True):
    acc = accumulation_dtype(q.dtype)
    b = q.shape[0]
    loss = q.new_empty((b,) if reduction == 0 else (), dtype=acc)
    lse = q.new_empty((2 * b,) if symmetric else (b,), dtype=acc)
    if fuse_grad:
        dk = torch.empty_like(k) if need_k else k.new_empty((0,))
        return loss, lse, torch.empty_like(q), dk, inv_temp.new_empty((), dtype=acc)
    return loss, lse, q.new_empty((0,)), k.new_empty((0,)), inv_temp.new_empty((0,))


@torch.library.custom_op("ibkd::infonce_backward", mutates_args=())
def infonce_backward_op(
    grad_rows: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    symmetric: bool,
    backend: str,
    need_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dinv = get_backend(backend).infonce_backward(
        grad_rows.contiguous(), q, k, inv_temp, lse, symmetric, need_k=need_k
    )
    return dq, (dk if need_k else _empty(k)), dinv


@infonce_backward_op.register_fake
def _(grad_rows, q, k, inv_temp, lse, symmetric, backend, need_k=True):
    dk = torch.empty_like(k) if need_k else k.new_empty((0,))
    return torch.empty_like(q), dk, inv_temp.new_empty((), dtype=accumulation_dtype(q.dtype))


def _infonce_setup_context(ctx, inputs, output):
    q, k, inv_temp, symmetric, reduction, fuse_grad, backend, need_k = inputs
    _, lse, dq, dk, dinv = output
    ctx.symmetric, ctx.reduction, ctx.fuse_grad, ctx.backend = symmetric, reduction, fuse_grad, backend
    ctx.need_k = need_k  # dk was computed (fuse_grad) / may be asked for
    if fuse_grad:
        ctx.save_for_backward(dq, dk, dinv)
    else:
        ctx.save_for_backward(q, k, inv_temp, lse)
    ctx.temp_dtype = inv_temp.dtype


def _infonce_backward(ctx, grad_loss, _g_lse, _g_dq, _g_dk, _g_dinv):
    if ctx.fuse_grad:
        dq, dk, dinv = ctx.saved_tensors
        g = grad_loss.to(dinv.dtype)
        dk_out = dk * g.to(dk.dtype) if ctx.need_k else None
        return dq * g.to(dq.dtype), dk_out, (dinv * g).to(ctx.temp_dtype), None, None, None, None, None
    q, k, inv_temp, lse = ctx.saved_tensors
    b = q.shape[0]
    acc = accumulation_dtype(q.dtype)
    if ctx.reduction == 0:
        grad_rows = grad_loss.to(acc)
    elif ctx.reduction == 1:
        grad_rows = (grad_loss.to(acc) / b).expand(b)
    else:
        grad_rows = grad_loss.to(acc).expand(b)
    need_k = ctx.need_k and ctx.needs_input_grad[1]
    dq, dk, dinv = infonce_backward_op(grad_rows.contiguous(), q, k, inv_temp, lse, ctx.symmetric, ctx.backend, need_k)
    return dq, (dk if need_k else None), dinv.to(ctx.temp_dtype), None, None, None, None, None


infonce_op.register_autograd(_infonce_backward, setup_context=_infonce_setup_context)


# ---------------------------------------------------------------------------------------- HSIC


@torch.library.custom_op("ibkd::hsic_stats", mutates_args=())
def hsic_stats_op(
    x: torch.Tensor, z: torch.Tensor, gammas: torch.Tensor, kernel: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sums, rk, rl = get_backend(backend).hsic_stats(x, z, gammas, kernel)
    return sums, rk, rl


@hsic_stats_op.register_fake
def _(x, z, gammas, kernel, backend):
    acc = accumulation_dtype(x.dtype)
    n = x.shape[0]
    return x.new_empty((3,), dtype=acc), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


@torch.library.custom_op("ibkd::hsic_stats_backward", mutates_args=())
def hsic_stats_backward_op(
    grad_sums: torch.Tensor,
    grad_rowsum_k: torch.Tensor,
    grad_rowsum_l: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    gammas: torch.Tensor,
    kernel: str,
    backend: str,
    need_x: bool = True,
    need_z: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dz = get_backend(backend).hsic_stats_backward(
        grad_sums.contiguous(), grad_rowsum_k.contiguous(), grad_rowsum_l.contiguous(), x, z, gammas, kernel,
        need_x=need_x, need_z=need_z,
    )
    # an unneeded gradient is empty: a backend may have computed it anyway (custom ops return tensors)
    return (dx if need_x else _empty(x)), (dz if need_z else _empty(z))


@hsic_stats_backward_op.register_fake
def _(grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel, backend, need_x=True, need_z=True):
    return (torch.empty_like(x) if need_x else _empty(x)), (torch.empty_like(z) if need_z else _empty(z))


def _hsic_setup_context(ctx, inputs, output):
    x, z, gammas, kernel, backend = inputs
    ctx.kernel, ctx.backend = kernel, backend
    ctx.save_for_backward(x, z, gammas)


def _hsic_backward(ctx, g_sums, g_rk, g_rl):
    x, z, gammas = ctx.saved_tensors
    acc = accumulation_dtype(x.dtype)
    n = x.shape[0]
    g_sums = x.new_zeros((3,), dtype=acc) if g_sums is None else g_sums.to(acc)
    g_rk = x.new_zeros((n,), dtype=acc) if g_rk is None else g_rk.to(acc)
    g_rl = x.new_zeros((n,), dtype=acc) if g_rl is None else g_rl.to(acc)
    need_x, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dz = hsic_stats_backward_op(g_sums, g_rk, g_rl, x, z, gammas, ctx.kernel, ctx.backend, need_x, need_z)
    return (dx if need_x else None), (dz if need_z else None), None, None, None


hsic_stats_op.register_autograd(_hsic_backward, setup_context=_hsic_setup_context)
