"""Mean TRE (px at 256) of a fundus checkpoint on the held-out retina pairs notebook 04 uses in the cpu profile.

Usage: .venv/bin/python benchmarks/eval_fundus.py notebooks/checkpoints/fundus_unet_256.pt
"""
import sys, numpy as np, torch
from regedu.datasets import FundusPairs
from regedu.train import load_model
from regedu import metrics
torch.set_num_threads(1)
size, n_test = 256, 3  # cpu profile: n_test_pairs 10 // 3
model = load_model(sys.argv[1]); model.eval()
for i, c in enumerate("SPA"):
    ds = FundusPairs(n_test, size, categories=(c,), source="retina", seed=1000 + i)
    ident, net = [], []
    for k in range(len(ds)):
        it = ds[k]
        zero = torch.zeros(1, 2, size, size)
        with torch.no_grad():
            d = model(it["moving"][None], it["fixed"][None]).disp
        ident.append(metrics.tre(it["fixed_points"], it["moving_points"], zero).mean().item())
        net.append(metrics.tre(it["fixed_points"], it["moving_points"], d).mean().item())
    print(f"{c}: identity {np.mean(ident):6.2f} px   U-Net {np.mean(net):6.2f} px")
