"""Networks trained with several seeds against Affine and SyN, on pairs no choice ever saw.

Each checkpoint (a VoxelMorph U-Net or a VV-Net trained by ``regedu train``;
its recipe is read from the file) registers every test pair in one forward
pass; the pairs are the paper's preparation of realistic subjects
(``regedu.datasets.RealisticPairs``: ANTs affine pre-alignment to the MNI
atlas, intensity normalisation), and, when it is in the cache or the mirror,
voxelmorph's test scan. Dice is the mean over the FreeSurfer structures of
the 30 that the atlas has, labels warped with nearest neighbour.

The test sets use seeds that no training, validation, notebook or setting
ever used (held-out anatomy 50000, training anatomy 60000), so nothing was
chosen on them. The output, a JSON file, holds every per-pair Dice, folding
and time, and each checkpoint's recipe and training time, so that every
mean, spread across seeds and paired comparison can be recomputed from it:
notebook 10 reads ``benchmarks/results/seeds_ncc.json`` and draws its
conclusions from it.

Example (the run reported in benchmarks/README.md)::

    OMP_NUM_THREADS=1 REGEDU_MIRROR=../shared/data python benchmarks/eval_seeds.py \\
        --model VoxelMorph=/work/jobs/seeds/unet_ncc_lr5e-4_s{0,1,2}.pt \\
        --model VV-Net=/work/jobs/seeds/vvnet_ncc_lr5e-4_s{0,1,2}.pt \\
        --held-out 24 --in-distribution 8 --out benchmarks/results/seeds_ncc.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from regedu._files import write_atomic  # noqa: E402
from regedu.checkpoints import load_checkpoint, load_model, training_recipe  # noqa: E402
from regedu.classic import SYN_SETTINGS, ants_syn  # noqa: E402
from regedu.datasets import RealisticPairs, atlas_pair, mni_brain, vxm_subject  # noqa: E402
from regedu.evaluate import evaluate, identity  # noqa: E402

SPLITS = {"held-out": ("held_out", 50_000), "in-distribution": ("train", 60_000)}


def test_sets(n_held: int, n_in: int, spacing: float, atlas) -> dict:
    sets = {}
    for name, n in (("held-out", n_held), ("in-distribution", n_in)):
        anatomy, seed = SPLITS[name]
        if n:
            data = RealisticPairs(n, anatomy=anatomy, seed=seed, spacing_mm=spacing)
            sets[name] = [data[i] for i in range(n)]
    scan = vxm_subject(int(spacing))
    if scan is not None:
        sets["real scan"] = [atlas_pair(scan, atlas, meta=dict(id="vxm test scan"))]
    return sets


def scores(method, pairs, structures, name) -> dict:
    ev = evaluate(method, pairs, labels=structures, name=name, progress=False)
    return dict(dice=[float(np.nanmean(row)) for row in ev.dice.to_numpy(float)],
                folding=[float(r["percent_folding"]) for r in ev.records],
                seconds=[float(r["seconds"]) for r in ev.records])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", nargs="+", required=True, metavar="NAME=CKPT [CKPT ...]",
                    help="a model's name and its checkpoints (one per seed); repeat per model")
    ap.add_argument("--held-out", type=int, default=24, help="pairs of held-out anatomy")
    ap.add_argument("--in-distribution", type=int, default=8, help="pairs of training anatomy (new subjects)")
    ap.add_argument("--spacing", type=float, default=4.0)
    ap.add_argument("--no-syn", action="store_true", help="skip SyN (about 13 s a pair at 4 mm)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file (refuses to overwrite one)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        ap.error(f"--out: {args.out} exists; pass --overwrite to replace it")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    groups, checkpoints = {}, {}
    for spec in args.model:
        if "=" not in spec[0]:
            ap.error(f"--model: expected NAME=CKPT [CKPT ...], got {' '.join(spec)}")
        name, first = spec[0].split("=", 1)
        paths = [Path(first), *map(Path, spec[1:])]
        groups[name] = []
        for p in paths:
            state = load_checkpoint(p)
            key = f"{name} s{state['train_config']['seed']}"
            groups[name].append(key)
            # None for runs trained before checkpoints kept their time.
            checkpoints[key] = dict(path=p.name, recipe=training_recipe(state), model=load_model(state).eval(),
                                    train_seconds=state.get("seconds"))

    start = time.perf_counter()
    atlas = mni_brain(int(args.spacing))
    structures = atlas.structures()
    sets = test_sets(args.held_out, args.in_distribution, args.spacing, atlas)
    print({s: len(p) for s, p in sets.items()}, f"pairs ready in {time.perf_counter() - start:.0f} s", flush=True)

    methods = {"Affine": identity}
    if not args.no_syn:
        settings = SYN_SETTINGS[int(args.spacing)]
        methods["SyN"] = lambda m, f: ants_syn(m, f, spacing=args.spacing, **settings)
    methods.update({k: c["model"] for k, c in checkpoints.items()})
    results = dict(command="python benchmarks/eval_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads(), spacing_mm=args.spacing,
                   structures=len(structures), sets={s: len(p) for s, p in sets.items()},
                   split_seeds={s: SPLITS[s][1] for s in sets if s in SPLITS},
                   pair_ids={s: [str(p["meta"].get("id", i)) for i, p in enumerate(ps)] for s, ps in sets.items()},
                   groups=groups, checkpoints={k: dict(path=c["path"], recipe=c["recipe"], train_seconds=c["train_seconds"])
                                                for k, c in checkpoints.items()},
                   scores={})
    for m, f in methods.items():
        results["scores"][m] = {s: scores(f, pairs, structures, m) for s, pairs in sets.items()}
        print(m, {s: round(float(np.mean(v["dice"])), 4) for s, v in results["scores"][m].items()}, flush=True)
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
