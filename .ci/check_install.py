"""Checks of an installed ibkd, run by .ci/packaging from a folder outside the checkout.

    python check_install.py ext CHECKOUT    # the sdist built with its C++ extension
    python check_install.py pure CHECKOUT   # the sdist installed with IBKD_SKIP_EXT=1 (plus triton)
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU here: the triton backend runs in Triton's interpreter

import torch  # noqa: E402

import ibkd  # noqa: E402
from ibkd.functional import hsic, infonce  # noqa: E402

mode, checkout = sys.argv[1], Path(sys.argv[2]).resolve()
where = Path(ibkd.__file__).resolve()
assert checkout not in where.parents, f"ibkd imported from the checkout ({where}), not from the installed copy"
print(f"ibkd {ibkd.__version__} from {where.parent}")
backends = {b.name: b for b in ibkd.backends()}
for b in backends.values():
    print(f"  backend {b.name:10s} available={b.available} {b.reason or ''}")
assert backends["reference"].available
has_ext = any(p.name.startswith("_C.") for p in where.parent.iterdir())
if mode == "ext":
    assert has_ext and backends["cpu"].available, "the cpu backend (compiled ibkd._C) is not available"
    fused = "cpu"
else:
    assert not has_ext and not backends["cpu"].available, "IBKD_SKIP_EXT=1 still installed ibkd._C"
    assert backends["cpu"].reason, "an unavailable backend must say why"
    assert backends["triton"].available, backends["triton"].reason
    fused = "triton"

torch.manual_seed(0)
q = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
k = torch.randn(45, 24, dtype=torch.float64)
x, z = torch.randn(37, 24, dtype=torch.float64), torch.randn(37, 8, dtype=torch.float64)
for name, fn in (("infonce", lambda b: infonce(q, k, temperature=0.1, backend=b)),
                 ("hsic", lambda b: hsic(x, z, gamma=0.5, backend=b))):
    got, want = fn(fused), fn("reference")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    print(f"  {name}: {fused} {got.item():.12f} == reference {want.item():.12f}")
g_fused, = torch.autograd.grad(infonce(q, k, temperature=0.1, backend=fused), q)
g_ref, = torch.autograd.grad(infonce(q, k, temperature=0.1, backend="reference"), q)
torch.testing.assert_close(g_fused, g_ref, rtol=1e-9, atol=1e-12)

configs = sorted(p.name for p in (where.parent / "configs").glob("*.yaml"))
assert "main-minilm-2layer.yaml" in configs, f"shipped configs missing: {configs}"
assert (where.parent / "kernels" / "infonce.py").is_file()

ibkd_cmd = str(Path(sys.executable).parent / "ibkd")  # the console script of this venv
out = subprocess.run([ibkd_cmd, "distill", "--help"], capture_output=True, text=True)
assert out.returncode == 0 and "--config" in out.stdout, out.stderr
# flags generated from TrainConfig, with their defaults; cache-teacher lists only its own
assert "--learning_rate X" in out.stdout and "(default: 0.0001; also --lr)" in " ".join(out.stdout.split()), out.stdout
out = subprocess.run([ibkd_cmd, "cache-teacher", "--help"], capture_output=True, text=True)
assert out.returncode == 0 and "--teacher_batch_size" in out.stdout and "--learning_rate" not in out.stdout, out.stdout
# a refusal needs no extra: one line, exit 2
out = subprocess.run([sys.executable, "-m", "ibkd", "distill", "--max-steps", "0"], capture_output=True, text=True)
assert out.returncode == 2 and out.stderr.strip() == "ibkd: error: max_steps must be a positive integer, got 0", out.stderr
# without the [train] extra: one line naming it, no traceback
out = subprocess.run([ibkd_cmd, "distill", "--config", "main-minilm-2layer"], capture_output=True, text=True)
err = out.stderr.strip()
assert out.returncode == 2 and len(err.splitlines()) == 1 and "[train]" in err, err
print(f"  ibkd distill --help: ok; without [train]: {err}")
print(f"check_install {mode}: ok")
