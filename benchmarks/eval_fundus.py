"""Mean TRE (px at 256) of a fundus checkpoint on the held-out retina pairs notebook 04 uses in the cpu profile.

The network sees vessel contrast (``regedu.datasets.vessel_contrast``), as in training;
identity and ANTs affine (on the photographs) are printed beside it.

Usage: .venv/bin/python benchmarks/eval_fundus.py notebooks/checkpoints/fundus_unet_256.pt
"""
import sys

import numpy as np
import torch

from regedu import metrics
from regedu.classic import ants_affine
from regedu.datasets import FundusPairs, vessel_contrast
from regedu.train import load_model

torch.set_num_threads(1)
size, n_test = 256, 3  # cpu profile: n_test_pairs 10 // 3
model = load_model(sys.argv[1])
for i, c in enumerate("SPA"):
    ds = FundusPairs(n_test, size, categories=(c,), source="retina", seed=1000 + i)
    tre = {"identity": [], "ANTs affine": [], "U-Net": []}
    for k in range(len(ds)):
        it = ds[k]
        moving, fixed = it["moving"][None], it["fixed"][None]
        with torch.no_grad():
            fields = {"identity": torch.zeros(1, 2, size, size), "ANTs affine": ants_affine(moving, fixed),
                      "U-Net": model(vessel_contrast(moving), vessel_contrast(fixed)).disp}
        for name, disp in fields.items():
            tre[name].append(metrics.tre(it["fixed_points"], it["moving_points"], disp).mean().item())
    print(f"{c}: " + "   ".join(f"{name} {np.mean(v):6.2f} px" for name, v in tre.items()))
