"""Time per redraw of the regedu.viz viewers (goal: under 100 ms).

A redraw is what one control change costs in the kernel: recompute, render
the changed panels to RGB, encode them and hand the bytes to the widgets
(the websocket transfer and the browser's paint are not included; the
browser test shows them to be quick on the loopback address).

    .venv/bin/python benchmarks/bench_viz.py [--repeats 15]

Uses voxelmorph's test scan (160x192x224) from ../shared/data when present,
else a synthetic volume of that size.
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from regedu import viz
from regedu.spatial import random_field, resize_field, warp

SCAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "test_scan.npz"


def _volume():
    if SCAN.exists():
        d = np.load(SCAN)
        return d["vol"].astype(np.float32), d["seg"].astype(np.int64), "test_scan.npz"
    z, y, x = np.mgrid[0:160, 0:192, 0:224].astype(np.float32)
    vol = np.sin(z / 9) * np.cos(y / 11) + np.sin(x / 7)
    return vol, (vol > 0.5).astype(np.int64) + (vol > 1.2), "synthetic"


def _time(fn, values, repeats):
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(values[i % len(values)])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), max(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rows = []

    vol, seg, source = _volume()
    disp = resize_field(random_field((40, 48, 56), 1.0, 16, seed=0), vol.shape)
    moving = warp(torch.from_numpy(vol)[None, None], -disp)[0, 0].numpy()
    warped_seg = warp(torch.from_numpy(seg)[None, None], disp)[0, 0].numpy()
    for fmt in ("jpeg", "png"):
        for crosshair in (True, False):
            v = viz.SliceViewer(vol, moving, vol, disp=disp, fixed_labels=seg, warped_labels=warped_seg,
                                crosshair=crosshair, image_format=fmt)
            v.widget  # noqa: B018 (builds the widgets, first draw)
            for layers in (["fixed", "moving", "warped"], ["difference", "checkerboard", "labels"],
                           ["grid", "jacobian", "warped"]):
                for r, layer in enumerate(layers):
                    v.set_layer(r, layer)
                for axis in range(3):
                    n = vol.shape[axis]
                    values = [n // 2 + d for d in (-6, -3, 3, 6, -1, 1)]
                    med, worst = _time(lambda val: v.set_index(axis, val), values, args.repeats)
                    rows.append((f"3D {vol.shape} ({source})", f"axis {axis} slider",
                                 "+".join(layers), f"{fmt}, crosshair {'on' if crosshair else 'off'}",
                                 9 if crosshair else 3, med, worst))

    for fmt in ("jpeg", "png"):
        p = viz.DeformationPlayground(size=256, image_format=fmt)
        p.widget  # noqa: B018
        controls = {"amplitude": [4.0, 8.0, 12.0, 16.0], "smoothness": [3.0, 6.0, 9.0, 12.0],
                    "weight": [0.1, 1.0, 10.0, 100.0], "interpolation": ["nearest", "bilinear"]}
        for name, values in controls.items():
            med, worst = _time(lambda val: p.update(**{name: val}), values, args.repeats)
            rows.append(("2D 256x256 (retina)", f"{name} slider", "warped+grid+jacobian", fmt, 3,
                         med, worst))

    head = ("viewer", "control", "layers", "encoding", "panels", "median ms", "max ms")
    widths = [max(len(str(r[i])) if not isinstance(r[i], float) else 9 for r in rows + [head])
              for i in range(len(head))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {args.repeats} redraws each")
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        cells = [str(c) if not isinstance(c, float) else f"{c:.1f}" for c in r]
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
