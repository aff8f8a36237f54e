"""Notebook 10: evaluation like a paper (Affine, SyN, VoxelMorph, VV-Net; the VV-Net paper's Table 2)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 10 · Evaluation like a paper

Papers on learned registration end with the same table: the classical methods
(an affine registration, ANTs SyN) against the networks (VoxelMorph, the
paper's own), on the same test pairs, with the mean Dice over anatomical
structures and its standard deviation. The VV-Net paper's Table 2 is one. This
notebook builds that table on the course's offline brains, with the two
columns papers too often leave out: **folding** (% of voxels with
$\det J \le 0$) and **seconds per pair**.

**Learning goals.** After this notebook you can

1. evaluate four very different methods with *one* protocol (`regedu.evaluate`):
   same pairs, same labels, nearest-neighbour label warping, same statistics;
2. read "mean Dice (std)" correctly: over which structures and pairs it is taken,
   and why the std is large;
3. put accuracy, regularity and speed side by side, per structure and per method;
4. compare your table with a paper's, and say honestly what the ordering does
   and does not show.
"""),
code(PROFILE_CELL),
code(r"""
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt

from regedu import nets, viz
from regedu.checkpoints import checkpoint_note, choose_factor, load_model
from regedu.classic import ants_affine, ants_missing, ants_syn
from regedu.datasets import BrainPairs, label_table, mni_brain
from regedu.evaluate import compare, summary
from regedu.spatial import warp
from regedu.train import fit

torch.manual_seed(0)
atlas = mni_brain()
shape = atlas.image.shape[1:]
print(f"brain volumes {shape} at {atlas.spacing_mm:g} mm")
"""),
md(r"""
## 1. The test set and the structures

As in VV-Net and VoxelMorph, every subject is registered **to one atlas**: the
moving image is a subject, the fixed image is the MNI152 template with its
label map. Subjects are synthetic: the template under a random diffeomorphism,
with a bias field, a gamma change and noise (`regedu.datasets.BrainPairs`), so
their labels are exact. Training and test subjects come from different seeds:
no test subject is ever seen in training.

Dice is computed over the structures of the papers' list of 30 (docs/conventions.md, "The 30 evaluation structures")
that the offline label map has (ventral DC and choroid plexus have no source
there), with background excluded.
"""),
code(r"""
table = label_table()
thirty = table[table["in_30"]].drop_duplicates("freesurfer")
# One row per FreeSurfer structure: name it by freesurfer_name (a row's own name is its DK parcel's).
structures = {int(r.freesurfer): r.freesurfer_name.replace("Left-", "L ").replace("Right-", "R ")
              for r in thirty.sort_values("freesurfer").itertuples()}
structures = {k: v for k, v in structures.items() if (atlas.seg == k).any()}
print(f"{len(structures)} structures:", ", ".join(structures.values()))

n_test = {"ci": 3, "cpu": 4}.get(profile.name, profile.n_test_pairs)   # SyN costs ~10 s a pair at 2 mm on 2 cores
test_data = BrainPairs(n_test, atlas=atlas, seed=1010)
test_pairs = []
for i in range(n_test):
    pair = dict(test_data[i])
    pair["meta"] = dict(pair["meta"], id=f"subject {i}", dataset="offline brain")
    test_pairs.append(pair)
train_data = BrainPairs(profile.n_train_pairs, atlas=atlas, seed=10, cache=True)
print(f"{len(train_data)} training subjects, {n_test} test subjects")
"""),
md(r"""
## 2. The two networks

VoxelMorph (the U-Net of Balakrishnan et al.) and VV-Net (three V-Nets, built in
notebook 08) are trained the same way here: unsupervised, local NCC + diffusion
regulariser, Adam, one pair per step, on the same training subjects. (The
paper trains VV-Net with MSE; NCC is more robust to the intensity changes of
our synthetic subjects, and both networks get the same loss, which is what a
fair comparison needs.)

**Honest note on training time.** 3D training on a CPU is slow. In the `ci`
and `cpu` profiles both networks are the ones the project trained with its own
command, `regedu train`, at 4 mm for a few thousand steps (VoxelMorph) and a
thousand (VV-Net), loaded from `checkpoints/` (the commands are printed below
and kept next to the files), with NCC + diffusion + a Dice loss on the training
labels, deep supervision for VV-Net. On the 2 mm grid of the `cpu` profile they
run at 4 mm inside `nets.Rescaled` (inputs averaged down, field upsampled). The
`gpu` profile trains the paper's widths at full resolution for the profile's
steps at $10^{-4}$, with the same loss.
"""),
code(r"""
spacing = atlas.spacing_mm
steps = profile.steps_3d
loss_weights = {"ncc": 1.0, "diffusion": 1.0, "dice": 1.0}


def trained(name):
    checkpoint = Path(f"checkpoints/brain_{name}_4mm.pt")
    if profile.name != "gpu":
        print(checkpoint_note(checkpoint))
        return load_model(checkpoint, factor=choose_factor(4, spacing)), None
    model = nets.create(name, spatial_dims=3)
    start = time.perf_counter()
    history = fit(model, train_data, losses=loss_weights, steps=steps, lr=1e-4, labels=list(structures),
                  seed=0, progress=False)
    print(f"{name}: trained {steps} steps in {time.perf_counter() - start:.0f} s, "
          f"loss {history['train']['loss'][0]:.3f} -> {np.mean(history['train']['loss'][-5:]):.3f}")
    return model.eval(), history


voxelmorph, vxm_history = trained("unet")
vvnet, vv_history = trained("vvnet")
for name, model in [("VoxelMorph", voxelmorph), ("VV-Net", vvnet)]:
    print(f"{name:>10}: {sum(p.numel() for p in model.parameters()):,} parameters")
"""),
md(r"""
## 3. Four methods, one protocol

`regedu.evaluate.compare` registers every test pair with every method, warps
the subject's labels with nearest neighbour, and records Dice per structure,
folding and the wall-clock time of the registration alone. The classical
methods are ANTs (`antspyx`): **Affine** (12 parameters) and **SyN**
(affine, then symmetric diffeomorphic normalisation). The networks run one
forward pass each.
"""),
code(r"""
syn_iterations = (100, 70, 50) if profile.name == "gpu" else (40, 20, 0)   # antspyx's default below gpu


def affine(moving, fixed):
    return ants_affine(moving, fixed, spacing=atlas.spacing_mm)


def syn(moving, fixed):
    return ants_syn(moving, fixed, spacing=atlas.spacing_mm, reg_iterations=syn_iterations)


methods = {"Affine": affine, "SyN": syn, "VoxelMorph": voxelmorph, "VV-Net": vvnet}
if ants_missing():
    print(ants_missing())
    methods = {k: v for k, v in methods.items() if k not in ("Affine", "SyN")}
evaluations = compare(methods, test_pairs, labels=structures, warmup=False, progress=False)
ours = summary(evaluations, metrics=("dice", "dice_before", "percent_folding", "seconds"), by=None)
ours
"""),
md(r"""
"Dice" is the mean (std) over every (test subject, structure) value, as the
papers report it; "Dice before" is the overlap of the unregistered labels.

## 4. Beside the paper's Table 2

The VV-Net paper (Table 2) reports mean Dice (std) over the same kind of
structure list on four real datasets, each subject registered to one atlas
after ANTs affine pre-alignment:
"""),
code(r"""
paper = pd.DataFrame(
    {"ADNI": ["0.486 (0.202)", "0.601 (0.224)", "0.720 (0.169)", "0.733 (0.163)"],
     "ABIDE": ["0.590", "0.592", "0.677", "0.685"],
     "OASIS": ["0.574", "0.601", "0.674", "0.678"],
     "ADHD200": ["0.581", "0.589", "0.715", "0.727"]},
    index=pd.Index(["Affine", "SyN", "VoxelMorph", "VV-Net"], name="method"))
side_by_side = paper.copy()
side_by_side[f"ours ({profile.name}, offline brain)"] = ours.frame["Dice"]
side_by_side
"""),
md(r"""
What the numbers say is written from the numbers themselves (the sentence
below is generated, so it can never claim an ordering the table does not show):
"""),
code(r"""
dice_mean = ours.mean["Dice"]
order = list(dice_mean.sort_values(ascending=False).index)
paper_order = [m for m in ["VV-Net", "VoxelMorph", "SyN", "Affine"] if m in methods]
before = float(ours.mean["Dice before"].mean())
pooled_std = float(ours.std["Dice"].mean())


def pairwise(a, b):
    gap = dice_mean[a] - dice_mean[b]
    if abs(gap) < 0.01:
        return f"{a} and {b} are tied ({dice_mean[a]:.3f} vs {dice_mean[b]:.3f})"
    better, worse = (a, b) if gap > 0 else (b, a)
    return f"{better} beats {worse} by {abs(gap):.3f}"


lines = [f"Our ordering by mean Dice: {' > '.join(f'{m} ({dice_mean[m]:.3f})' for m in order)}; "
         f"before registration {before:.3f}.",
         f"The paper's ordering of these methods: {' > '.join(paper_order)}. "
         + ("Ours is the same." if order == paper_order else "Ours differs."),
         "; ".join(pairwise(a, b) for a, b in zip(paper_order, paper_order[1:])) + ".",
         f"The std over structures is about {pooled_std:.2f}: differences smaller than that between "
         f"methods, on {n_test} test subjects, are not evidence of a real ranking."]
print("\n".join(lines))
"""),
md(r"""
**How to read the comparison honestly.**

* *The data are not the paper's.* Our subjects are the template under smooth
  random warps: the right answer is a diffeomorphism, which should favour SyN (whose
  model is exactly that) over affine registration. The paper's subjects are real
  people, affinely pre-aligned, where anatomy differs in ways no smooth warp of
  one brain captures; there SyN gains less over affine.
* *The networks were trained on this kind of subject.* The checkpoints saw
  thousands of synthetic subjects drawn the same way as the test subjects
  (other seeds), with a Dice loss on their labels: a learned method's home
  ground. SyN knows nothing in advance and optimises each pair from scratch.
* *Training budgets differ by orders of magnitude.* The paper trains each
  network for many thousands of steps on a 16 GB GPU at 160x192x224; ours had
  a few thousand steps on two CPU cores at 4 mm. The VV-Net/VoxelMorph gap in
  the paper (0.004 to 0.013 Dice) is far below what such runs can resolve.
* *What the table does show, whatever the ordering:* the cost. SyN spends seconds
  (minutes at full resolution) per pair; a network's forward pass is a
  fraction of that, after a training cost paid once. And the folding column:
  SyN is diffeomorphic by construction, an unconstrained network is not.

## 5. Per structure (the paper's Figure 3)
"""),
code(r"""
per_structure = {ev.name: ev.dice.to_numpy(dtype=float) for ev in evaluations}
viz.plot_dice(per_structure, labels=list(structures), names=structures)
"""),
md(r"""
Small structures (pallidum, amygdala, the third and fourth ventricles) have the
lowest Dice and the largest spread for every method: one voxel of error is a
large fraction of a small structure, the more so at 2 or 4 mm. Large ones
(white matter, cortex, cerebellum) sit near the top.

## 6. Slices (the paper's Figure 4)

The paper shows the three orthogonal slices at [80, 96, 112] of its
160x192x224 volumes; `profile.slices` scales them to our grid. Rows: the fixed
atlas, the moving subject, and the subject warped by each method.
"""),
code(r"""
pair = test_pairs[0]
moving, fixed = pair["moving"][None], pair["fixed"][None]
warped = {"fixed (atlas)": fixed[0, 0], "moving": moving[0, 0]}
for name, method in methods.items():
    with torch.no_grad():
        out = method(moving, fixed)
    disp = out.disp if hasattr(out, "disp") else out
    warped[name] = warp(moving, disp.detach())[0, 0]
viz.plot_slices(warped, index=profile.slices)
"""),
md(r"""
Explore one registration in 3D: drag the sliders (one per axis) and pick a
layer per row (difference, labels, grid, Jacobian). Sliders need a live kernel.
"""),
code(r"""
with torch.no_grad():
    out = vvnet(moving, fixed)
viz.SliceViewer(fixed, moving, out.warped, disp=out.disp, fixed_labels=pair["fixed_seg"][0],
                warped_labels=warp(pair["moving_seg"][None], out.disp)[0, 0], index=profile.slices,
                rows=["fixed", "warped", "labels"])
"""),
md(r"""
## 7. On OASIS, when it has been fetched

The same protocol runs on real data. With neurite-oasis 3D in the cache
(`regedu fetch neurite-oasis-3d`, 6.6 GB, OASIS data-use terms), the cell
below evaluates the four methods subject-to-atlas on a few OASIS subjects
resampled to this profile's grid. Without it, the cell says so and skips.
"""),
code(r"""
from regedu.datasets import NeuriteOASIS, is_cached, resize_image, resize_labels

if is_cached("neurite-oasis-3d"):
    oasis = NeuriteOASIS(ndim=3)
    keys = oasis.subjects[: n_test + 1]

    lut = oasis.labels.dropna(subset=["freesurfer"])
    to_freesurfer = np.zeros(int(oasis.labels["label"].max()) + 1, np.int64)
    to_freesurfer[lut["label"].to_numpy(int)] = lut["freesurfer"].to_numpy(int)   # seg35 numbers -> FreeSurfer

    def load(key):
        s = oasis.load(key)
        seg = to_freesurfer[resize_labels(s["seg"], shape)]
        return dict(image=resize_image(s["image"][0], shape)[None], seg=seg, name=key)

    oasis_atlas, oasis_subjects = load(keys[0]), [load(k) for k in keys[1:]]
    oasis_pairs = [dict(moving=torch.from_numpy(s["image"]), fixed=torch.from_numpy(oasis_atlas["image"]),
                        moving_seg=torch.from_numpy(s["seg"])[None], fixed_seg=torch.from_numpy(oasis_atlas["seg"])[None],
                        meta=dict(id=s["name"], dataset="OASIS")) for s in oasis_subjects]
    oasis_labels = [k for k in structures if (oasis_atlas["seg"] == k).any()]
    oasis_labels = {k: structures[k] for k in oasis_labels}
    oasis_evaluations = compare(methods, oasis_pairs, labels=oasis_labels, progress=False)
    display(summary(oasis_evaluations, metrics=("dice", "dice_before", "percent_folding", "seconds"), by=None))
    print("Note: the networks were trained on the offline brain, not on OASIS.")
else:
    print("OASIS is not in the cache: skipped. Fetch it with `regedu fetch neurite-oasis-3d` to evaluate on it.")
"""),
md(r"""
## Exercises

1. Change `dice_over="pairs"` in `summary`: the std becomes the spread of
   per-subject means. Why is it so much smaller, and which one does the paper report?
2. Resume the VoxelMorph checkpoint for 4 times more steps (the command in
   `checkpoints/brain_unet_4mm.txt` with a larger `--steps`, and `--resume`).
   Which row of the table moves, and does the ordering of VoxelMorph and VV-Net
   stay stable?
3. Run SyN with `syn_metric="CC"` (VoxelMorph's baseline). Better Dice? At what cost in seconds?
4. Add a fifth method: VoxelMorph refined by instance optimisation
   (`regedu.classic.instance_optimisation(..., init=voxelmorph(m, f).disp)`).

## Checks
"""),
code(r"""
rows = {ev.name: ev.table() for ev in evaluations}
assert all(len(t) == n_test for t in rows.values()), "every method must register every test pair"
assert set(ours.mean.index) == set(methods), ours.mean.index
assert np.isfinite(ours.mean.to_numpy(dtype=float)).all(), "every cell of the table should be a number"
assert abs(before - float(np.mean([r["dice_before"] for r in rows["VV-Net"].to_dict("records")]))) < 1e-9, \
    "every method must be scored on the same pairs (same Dice before registration)"
if profile.name != "ci" and "SyN" in methods:
    # At 4 mm with ci's short schedule (40, 20, 0) SyN loses Dice here (measured 0.649 vs 0.667).
    assert dice_mean["SyN"] > before, f"SyN should improve Dice over no registration: {dice_mean['SyN']:.3f} vs {before:.3f}"
for name in ("VoxelMorph", "VV-Net"):
    assert dice_mean[name] > before + 0.02, f"{name} (trained) should improve Dice by more than 0.02: {dice_mean[name]:.3f} vs {before:.3f}"
if "SyN" in methods:
    assert ours.mean.loc["SyN", "% det J <= 0"] < 0.1, "SyN's fields should not fold"
assert all(k in " ".join(lines) for k in order), "the generated sentence must name every method"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("10_evaluation_like_a_paper.ipynb", cells))
