"""Seconds per realistic subject (anatomy in memory) and per pre-aligned pair of a pool; reload cost.

    python benchmarks/time_subjects.py [N]     # N pooled pairs at 4 mm (default 10)
"""
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from regedu.datasets import TRAIN_ANATOMY, RealisticPairs, anatomy, realistic_subject  # noqa: E402

torch.set_num_threads(1)
for spacing in (4, 2):
    brains = [anatomy(n, spacing) for n in TRAIN_ANATOMY]
    realistic_subject(brains[0], 0)  # warm-up
    start = time.perf_counter()
    for k in range(10):
        realistic_subject(brains[k % len(brains)], k)
    print(f"{spacing} mm: realistic_subject {(time.perf_counter() - start) / 10:.3f} s per subject "
          f"(10 subjects, anatomy in memory)", flush=True)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
with tempfile.TemporaryDirectory() as tmp:
    pairs = RealisticPairs(n, anatomy="train", spacing_mm=4, seed=0, pool_dir=tmp)
    build = pairs.build()
    start = time.perf_counter()
    items = [pairs[i] for i in range(n)]
    load = time.perf_counter() - start
    registration = np.mean([it["meta"]["seconds"] for it in items])
    size = sum(f.stat().st_size for f in Path(tmp).rglob("*.npz")) / 2 ** 20
    print(f"4 mm pool of {n} pre-aligned (ANTs) pairs: build {build:.1f} s ({build / n:.2f} s per pair; "
          f"registration {registration:.2f} s per pair), reload {load / n * 1000:.0f} ms per pair, "
          f"{size:.1f} MiB", flush=True)
