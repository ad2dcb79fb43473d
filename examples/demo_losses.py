"""Demo of ibkd's fused losses: the IBKD objective on random "student" and "teacher" vectors.

    python examples/demo_losses.py [--batch 4096] [--backend auto]

Prints the backends, then the loss, its components and the forward+backward time for the chosen
backend next to the reference backend, and their largest gradient difference.
"""

import argparse
import time

import torch

import ibkd


def run(backend: str, student, teacher, inputs, dims):
    torch.manual_seed(1)  # the same P for every backend
    # a fixed beta: with beta="auto" each loss would calibrate its own beta on its first calls
    loss_fn = ibkd.IBKDLoss(*dims, beta=50.0, backend=backend)
    student = student.detach().requires_grad_()
    start = time.perf_counter()
    out = loss_fn(student, teacher, inputs)
    out["loss"].backward()
    return out, student.grad, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--student-dim", type=int, default=384)
    p.add_argument("--teacher-dim", type=int, default=768)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()

    for b in ibkd.backends():
        print(f"{b.name:10s} {'available' if b.available else 'unavailable: ' + b.reason}")
    torch.manual_seed(0)
    student = torch.randn(args.batch, args.student_dim)
    teacher = torch.randn(args.batch, args.teacher_dim)
    inputs = torch.randn(args.batch, args.student_dim)  # the student's input representation x
    dims = (args.student_dim, args.teacher_dim)
    fast, g_fast, t_fast = run(args.backend, student, teacher, inputs, dims)
    ref, g_ref, t_ref = run("reference", student, teacher, inputs, dims)
    for name, out, t in (("reference", ref, t_ref), (args.backend, fast, t_fast)):
        print(
            f"{name:10s} loss={out['loss'].item():.6f} infonce={out['infonce'].item():.6f} "
            f"hsic={out['hsic'].item():.6e} fwd+bwd {t * 1e3:.1f} ms"
        )
    print(f"max |grad difference| = {(g_fast - g_ref).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
