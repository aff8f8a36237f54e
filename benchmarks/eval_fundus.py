"""Mean TRE (px at 256) of a fundus checkpoint on the held-out retina pairs notebook 04 uses in the cpu profile.

The network sees vessel contrast (``regedu.datasets.vessel_contrast``), as in training.
Rows: identity; ANTs affine on the photographs; the global similarity search
(``regedu.classic.similarity_search``) alone, then refined by ANTs affine and by the U-Net;
and the U-Net alone.

Usage: .venv/bin/python benchmarks/eval_fundus.py notebooks/checkpoints/fundus_unet_256.pt [pairs per category]
"""
import sys
import time

import numpy as np
import torch

from regedu import metrics
from regedu.classic import ants_affine, similarity_search
from regedu.datasets import FundusPairs, vessel_contrast
from regedu.spatial import compose, warp
from regedu.checkpoints import load_model

torch.set_num_threads(1)
size = 256
n_test = int(sys.argv[2]) if len(sys.argv) > 2 else 3  # cpu profile: n_test_pairs 10 // 3
model = load_model(sys.argv[1])
seconds = {}
for i, c in enumerate("SPA"):
    ds = FundusPairs(n_test, size, categories=(c,), source="retina", seed=1000 + i)
    tre = {}
    for k in range(len(ds)):
        it = ds[k]
        moving, fixed = it["moving"][None], it["fixed"][None]
        vm, vf = vessel_contrast(moving), vessel_contrast(fixed)
        fields = {"identity": lambda: torch.zeros(1, 2, size, size),
                  "ANTs affine": lambda: ants_affine(moving, fixed),
                  "U-Net": lambda: model(vm, vf).disp}
        t0 = time.perf_counter()
        search = similarity_search(vm, vf)
        t_search = time.perf_counter() - t0
        fields["search"] = lambda: search
        fields["search + ANTs affine"] = lambda: compose(search, ants_affine(warp(moving, search), fixed))
        fields["search + U-Net"] = lambda: compose(search, model(warp(vm, search), vf).disp)
        for name, make in fields.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                disp = make()
            seconds.setdefault(name, []).append(time.perf_counter() - t0
                                                + (t_search if name.startswith("search") else 0))
            tre.setdefault(name, []).append(metrics.tre(it["fixed_points"], it["moving_points"], disp).mean().item())
    print(f"{c}: " + "   ".join(f"{name} {np.mean(v):6.2f}" for name, v in tre.items()), flush=True)
print("seconds per pair: " + "   ".join(f"{name} {np.mean(v):.2f}" for name, v in seconds.items()))
