"""Realistic subjects: Dice before registration, after the paper's preprocessing, and SyN after it.

For each subject (``regedu.datasets.realistic_subject``: pose, real anatomy,
smooth deformation, intensity) registered to the MNI template, mean Dice over
the 26 FreeSurfer structures of the 30 that the template has:

- ``before``: the subject as scanned (the atlas-sized middle of its field of view);
- ``affine_ants`` / ``affine_regedu``: after ``regedu.datasets.preprocess``
  (normalisation + affine pre-alignment with ANTs, or with regedu's own
  ``classic.affine_register``), with the registration's seconds;
- ``syn``: ``classic.ants_syn`` on the ANTs-pre-aligned pair, with folding.

SyN's settings were chosen on training anatomy only (``--select``): antspyx's
default (mutual information, 40-20-0 iterations) at 2 mm; at 4 mm that default
never iterates at the finest level and MI gains little, so local CC (radius 2)
with 40-20-10.

``--donors`` reproduces the diagnosis of issue 16: ANTs affine on the six
``donor_brain`` s (already aligned), against the template and against a
template image made of the donors' structures only.

Examples::

    python benchmarks/eval_prealign.py --spacing 2 --anatomy held_out --seeds 1000,1001,1002 --vxm
    python benchmarks/eval_prealign.py --spacing 4 --anatomy train --seeds 10,11 --select
    python benchmarks/eval_prealign.py --spacing 2 --donors
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from regedu import classic  # noqa: E402
from regedu.datasets import (DONORS, anatomy, anatomy_split, donor_brain, mni_brain,  # noqa: E402
                             preprocess, realistic_subject, vxm_subject)
from regedu.datasets.brain import _donor_image  # noqa: E402
from regedu.metrics import dice, folding_stats  # noqa: E402
from regedu.spatial import warp  # noqa: E402

CANDIDATES = {"mi100": dict(reg_iterations=(100, 70, 50)),
              "cc40": dict(syn_metric="CC", reg_iterations=(40, 20, 10)),
              "cc40_total1": dict(syn_metric="CC", reg_iterations=(40, 20, 10), total_sigma=1),
              "mi100_total1": dict(reg_iterations=(100, 70, 50), total_sigma=1),
              "default": {}}


def _print(row):
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def evaluate_pair(moving, moving_seg, atlas, labels, spacing, syn_settings) -> dict:
    score = lambda seg: dice(atlas.seg, np.asarray(seg).reshape(atlas.seg.shape), labels).mean  # noqa: E731
    m = moving.shape[-1] - atlas.seg.shape[-1]
    crop = tuple(slice(m // 2, m // 2 + n) for n in atlas.seg.shape)
    row = dict(before=score(moving_seg.reshape(moving.shape[-3:])[crop]))
    pre = None
    for method in ("ants", "regedu"):
        p = preprocess(moving, atlas.image, moving_seg=moving_seg, spacing_mm=spacing, method=method)
        row[f"affine_{method}"], row[f"affine_{method}_s"] = score(p.seg[0].numpy()), p.seconds
        pre = p if method == "ants" else pre
    fixed = torch.from_numpy(atlas.image)[None]
    for tag, kw in syn_settings.items():
        start = time.perf_counter()
        u = classic.ants_syn(pre.image[None], fixed, spacing=spacing, **kw)
        row[f"{tag}_s"] = time.perf_counter() - start
        row[tag] = score(warp(pre.seg[None], u)[0, 0].numpy())
        row[f"{tag}_folding_pct"] = folding_stats(u)["percent_folding"]
    return row


def donors(spacing):
    """ANTs affine on the (already aligned) donors: against the template, and a donor-like template."""
    atlas = mni_brain(spacing)
    labels = list(atlas.structures())
    p = atlas.parcels.copy()
    p[np.isin(p, (103, 105))] = 101
    p[p == 104] = 102
    p[np.isin(p, (83, 106, 107, 108, 109, 110, 111))] = 0  # what the donor maps lack
    fixed = {"template": torch.from_numpy(atlas.image)[None],
             "donor-like template": torch.from_numpy(_donor_image(p, np.random.default_rng(0))[None])[None]}
    rows = []
    for d in DONORS:
        b = donor_brain(d, spacing)
        shared = [k for k in labels if (b.seg == k).any()]
        for name, f in fixed.items():
            u = classic.ants_affine(torch.from_numpy(b.image)[None], f, spacing=spacing)
            A = classic.displacement_to_affine(u)
            seg = warp(torch.from_numpy(b.seg)[None, None], u)[0, 0].numpy()
            row = dict(donor=d, fixed=name, structures=len(shared), before=dice(atlas.seg, b.seg, shared).mean,
                       after=dice(atlas.seg, seg, shared).mean, scale_inferior_superior=float(A[1, 1]))
            rows.append(row)
            _print(row)
    for name in fixed:
        sel = [r for r in rows if r["fixed"] == name]
        print(f"MEAN {name}: before {np.mean([r['before'] for r in sel]):.3f} after "
              f"{np.mean([r['after'] for r in sel]):.3f} (6 donors, {spacing} mm)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spacing", type=int, default=2, choices=(2, 4))
    ap.add_argument("--anatomy", default="held_out", help="held_out, train, or comma-separated names")
    ap.add_argument("--seeds", default="1000,1001,1002")
    ap.add_argument("--vxm", action="store_true", help="also the voxelmorph test scan (held-out real subject)")
    ap.add_argument("--select", action="store_true", help="compare SyN candidates (training anatomy only)")
    ap.add_argument("--donors", action="store_true", help="the donor/affine diagnosis instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.donors:
        return donors(args.spacing)
    names = anatomy_split().get(args.anatomy) or tuple(args.anatomy.split(","))
    if args.select and set(names) & set(anatomy_split()["held_out"]):
        ap.error("--select chooses settings: use training anatomy only (--anatomy train)")
    syn = CANDIDATES if args.select else {"syn": classic.SYN_SETTINGS[args.spacing]}
    atlas = mni_brain(args.spacing)
    labels = list(atlas.structures())
    print(f"# {args.spacing} mm, {len(labels)} structures, anatomy {names}, seeds {args.seeds}, SyN {syn}",
          flush=True)
    rows = []
    for name in names:
        brain = anatomy(name, args.spacing)
        for seed in (int(s) for s in args.seeds.split(",")):
            s = realistic_subject(brain, seed)
            rows.append(dict(pair=f"{name}/seed{seed}", **evaluate_pair(s["image"], s["seg"], atlas, labels,
                                                                        args.spacing, syn)))
            _print(rows[-1])
    keys = ["before", "affine_ants", "affine_regedu", *syn]
    print(f"MEAN over {len(rows)} pairs:", {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys},
          "| min gain affine_ants - before:", round(min(r["affine_ants"] - r["before"] for r in rows), 4),
          "| min gain SyN - affine_ants:", {k: round(min(r[k] - r["affine_ants"] for r in rows), 4) for k in syn},
          flush=True)
    if args.vxm:
        v = vxm_subject(args.spacing, missing="raise")
        seg = np.where(np.isin(v.seg, labels), v.seg, 0)
        _print(dict(pair="vxm_test_scan", **evaluate_pair(torch.from_numpy(v.image), torch.from_numpy(seg)[None],
                                                          atlas, labels, args.spacing, syn)))


if __name__ == "__main__":
    main()
