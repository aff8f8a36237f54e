"""Speed against the classics: ANTs SyN vs a trained VoxelMorph U-Net on the CPU.

Same run, same pairs, at 80x96x112 (2 mm) and 160x192x224 (1 mm): seconds per
3D pair and mean Dice over the FreeSurfer structures the offline brain has.

Pairs (offline, no download): the fixed image is the MNI152 template
(:func:`regedu.datasets.brain.mni_brain`), the moving one a synthetic subject
(:func:`~regedu.datasets.brain.synth_subject`) drawn from a held-out seed. The
deformation has the same physical scale at every resolution (synth_subject's
defaults: control points every 16 mm, velocity scale 6 mm), so one seed gives
the same subject at every size: the pairs at 80x96x112 and 160x192x224 are the same subjects.

Two steps::

    # 1. train a VoxelMorph U-Net (NCC + diffusion + Dice) on synthetic subjects:
    #    the command in notebooks/checkpoints/brain_unet_4mm.txt
    # 2. time and score SyN and the network on the same pairs
    python benchmarks/bench_classic.py run --checkpoint notebooks/checkpoints/brain_unet_4mm.pt \\
        --pairs 3 --out benchmarks/results/bench_classic

The network is trained at ``--train-spacing`` mm (4). On a larger grid it runs on the
images block-averaged to its training grid and its field is upsampled back
("VoxelMorph"); the same U-Net run directly at full size is timed too
("U-Net full-size forward", timing only: its weights were not trained at that
scale, so its Dice would mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from regedu import checkpoints, classic, evaluate as E, nets
from regedu.datasets import FREESURFER_NAMES, brain

EVAL_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47,
               49, 50, 51, 52, 53, 54, 60, 63)
SIZES_MM = (2, 1)


def _labels(template) -> dict:
    present = set(np.unique(template.seg).tolist())
    return {k: FREESURFER_NAMES.get(k, str(k)) for k in EVAL_LABELS if k in present}


def _subject(template, seed: int) -> dict:
    """A synthetic subject (synth_subject's defaults: the same physical deformation at any spacing)."""
    s = brain.synth_subject(template, seed)
    return {"moving": s["image"], "fixed": torch.from_numpy(template.image).float(),
            "moving_seg": s["seg"], "fixed_seg": torch.from_numpy(template.seg)[None],
            "meta": {"id": f"seed{seed}", "dataset": "x".join(map(str, template.seg.shape))}}


class _Rescaled(nn.Module):
    """``nets.Rescaled`` with the factor that brings each input size to the training grid."""

    def __init__(self, model, train_shape):
        super().__init__()
        self.model, self.train_shape = model, tuple(train_shape)

    def forward(self, moving, fixed):
        return nets.Rescaled(self.model, moving.shape[2] // self.train_shape[0])(moving, fixed).disp


class FullSize(nn.Module):
    """The U-Net applied directly at the input size (timing only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, moving, fixed):
        return self.model(moving, fixed).disp


def syn(moving, fixed):
    """ANTs SyN with antspyx's defaults, in mm (1 mm at 160x192x224)."""
    return classic.ants_syn(moving, fixed, spacing=160 / moving.shape[2])


def cmd_run(args):
    torch.set_num_threads(args.threads)
    model = checkpoints.load_model(args.checkpoint)
    train_shape = brain.BRAIN_SHAPES[args.train_spacing]
    pairs, labels = [], {}
    for mm in args.sizes:
        template = brain.mni_brain(mm)
        labels.update(_labels(template))
        pairs += [_subject(template, 10_000 + i) for i in range(args.pairs)]
    methods = {"Identity": E.identity, "ANTs SyN": syn,
               "VoxelMorph": _Rescaled(model, train_shape), "U-Net full-size": FullSize(model)}
    evaluations = []
    for name, method in methods.items():
        ev = E.evaluate(method, pairs, labels=labels, name=name,
                        warmup=isinstance(method, nn.Module), progress=False)
        evaluations.append(ev)
        for r in ev.records:
            print(f"{r['dataset']} {name:16s} {r['pair']}: dice {r['dice_mean']:.3f} "
                  f"(before {r['dice_before']:.3f}) folding {r['percent_folding']:.3f}% "
                  f"{r['seconds']:.2f} s", flush=True)
    scored = E.summary(evaluations[:3], ["dice", "seconds", "percent_folding"], by="dataset")
    timed = E.summary(evaluations[3:], ["seconds"], by="dataset")
    seconds = {ev.name: ev.table().groupby("dataset")["seconds"].mean() for ev in evaluations}
    ratio = {size: {"syn_over_voxelmorph": seconds["ANTs SyN"][size] / seconds["VoxelMorph"][size],
                    "syn_over_fullsize_unet": seconds["ANTs SyN"][size] / seconds["U-Net full-size"][size]}
             for size in seconds["ANTs SyN"].index}
    env = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default (all)"),
           "load_average_after": os.getloadavg(), "checkpoint": str(args.checkpoint),
           "train_shape": train_shape, "labels": len(labels), "pairs_per_size": args.pairs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [r for ev in evaluations for r in ev.records]
    with open(f"{out}.json", "w") as fh:
        json.dump({"records": records, "speed_ratio": ratio, "env": env}, fh, indent=1, default=float)
    md = (scored.to_markdown() + "\nU-Net run directly at full size (timing only):\n\n"
          + timed.to_markdown() + "\nSyN seconds / learned seconds: "
          + json.dumps(ratio, default=float) + "\n\nenv: " + json.dumps(env, default=str) + "\n")
    Path(f"{out}.md").write_text(md)
    print(md)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--checkpoint", default="notebooks/checkpoints/brain_unet_4mm.pt")
    r.add_argument("--train-spacing", type=int, default=4)
    r.add_argument("--sizes", type=int, nargs="+", default=list(SIZES_MM),
                   help="spacings in mm: 2 -> 80x96x112, 1 -> 160x192x224")
    r.add_argument("--pairs", type=int, default=3)
    r.add_argument("--threads", type=int, default=torch.get_num_threads())
    r.add_argument("--out", default="benchmarks/results/bench_classic")
    args = p.parse_args()
    {"run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main()
