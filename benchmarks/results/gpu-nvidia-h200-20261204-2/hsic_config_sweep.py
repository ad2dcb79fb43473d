import os, sys, torch, triton
sys.path.insert(0, os.getcwd())
from ibkd.kernels import hsic as H
def exact_L(a, g):
    a = a.double(); d2 = torch.cdist(a, a).pow(2); d2.fill_diagonal_(0); return torch.exp(-g * d2)
torch.manual_seed(0)
n, dz = 2048, 256
res = {}
for dtype in (torch.bfloat16, torch.float32):
    x = (torch.randn(n, 768, device="cuda") / 768**0.5).to(dtype)
    z = (torch.randn(n, dz, device="cuda") / dz**0.5).to(dtype)
    g = torch.tensor([0.5, 0.5], device="cuda")
    el = exact_L(z, 0.5).sum(1)
    for base in H._STATS_CONFIGS:
      for st in (1, 2, 3):
        cfg = triton.Config(dict(base.kwargs), num_warps=base.num_warps, num_stages=st)
        H._stats_kernel.configs = [cfg]; H._stats_kernel.cache = {}
        try:
            errs = []
            for _ in range(3):
                got = H.hsic_stats(x, z, g, "rbf"); torch.cuda.synchronize()
                errs.append(float((got[2].double() - el).abs().max()))
            print(dtype, cfg.kwargs, "w", cfg.num_warps, "s", st, "rl max err", ["%.2e" % e for e in errs], flush=True)
        except Exception as e:
            print(dtype, cfg.kwargs, st, "ERR", type(e).__name__, str(e)[:100], flush=True)
