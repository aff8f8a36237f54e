"""Notebook 06: VoxelMorph in 3D, atlas-based brain registration."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 06 · VoxelMorph in 3D: atlas-to-subject brain registration

Notebook 04 trained a U-Net with a spatial transformer on 2D fundus pairs. The
same recipe, in 3D, is **VoxelMorph** (Balakrishnan et al., *VoxelMorph: A
Learning Framework for Deformable Medical Image Registration*, IEEE TMI 2019):
a U-Net reads the moving and the fixed volume, predicts one displacement vector
per voxel, and a spatial transformer warps the moving volume. It is the
"VoxelMorph" row of the VV-Net paper's Table 2 (seed 000), the baseline VV-Net
is built to beat.

Here every subject is registered to one **atlas** (the fixed image), as in the
VV-Net paper: the atlas is the MNI152 template with a FreeSurfer label map.
The subjects differ from it the way real scans do: by **pose** (position,
rotation and head size), by **anatomy** (the template or one of six Allen
brain donors' own parcellations, under a smooth deformation) and by
**intensity** (bias field, gamma, noise). As the paper does before learning,
each subject is first **pre-aligned to the atlas with ANTs affine** and its
intensities normalised; the network learns what the affine cannot.

**Learning goals.** After this notebook you can

1. load the offline brain, its labels and realistic subjects, prepare them as
   the paper does (`datasets.preprocess`), and say what the 30 FreeSurfer
   structures of the VoxelMorph and VV-Net evaluations are;
2. train VoxelMorph (U-Net + spatial transformer) unsupervised, with local NCC
   and a diffusion regulariser, using `regedu.train.fit`;
3. measure a registration the way the papers do: Dice over named structures
   before and after, and folding (% of voxels with $\det J_\varphi \le 0$),
   on anatomy the network trained on and on anatomy it never saw;
4. browse a 3D registration with the slice viewer at the paper's slices
   [80, 96, 112] (scaled to this grid);
5. add a **Dice loss on warped labels** (VoxelMorph's semi-supervised variant)
   and explain what it buys and what it costs.
"""),
code(PROFILE_CELL),
md(r"""
## 1. The atlas, the labels and the subjects

`mni_brain(spacing)` returns the template on a grid of that voxel size
(160x192x224 at 1 mm, 80x96x112 at 2 mm, 40x48x56 at 4 mm), oriented like
FreeSurfer's conformed volumes, with a label map in FreeSurfer numbers. This
notebook works on the **4 mm grid in every profile**, the grid its trained
VoxelMorph knows (read from the checkpoint below), as notebook 10 does;
notebook 09 trains at full resolution. Of the 30 structures of
docs/conventions.md ("The 30 evaluation structures"), the template labels
every one except the ventral DC and the choroid plexus, which its sources do
not label; `atlas.structures()` lists the ones we score.
"""),
code(r"""
import resource
import time
from pathlib import Path

import numpy as np
import torch
import matplotlib.pyplot as plt

from regedu import checkpoints, datasets, evaluate, losses, metrics, nets, train, viz
from regedu.spatial import warp

torch.manual_seed(0)
checkpoint = Path("checkpoints/brain_unet_4mm_ncc_lr5e-4_s0.pt")
pre_state = checkpoints.load_checkpoint(checkpoint)
pre_recipe = checkpoints.training_recipe(pre_state)
spacing = pre_recipe["spacing"][0]
atlas = datasets.mni_brain(int(spacing))
shape = atlas.image.shape[1:]
slices = tuple(n // 2 for n in shape)   # the paper's [80, 96, 112] of 160x192x224, scaled to this grid
structures = atlas.structures()
labels = list(structures)
print(f"atlas {atlas.name}: image {atlas.image.shape}, {atlas.spacing_mm:g} mm voxels; slices {slices}")
print(f"{len(structures)} of the 30 structures are labelled:", ", ".join(list(structures.values())[:8]), "...")
fig = viz.plot_slices({"atlas": atlas.image[0]}, index=slices)
fig
"""),
md(r"""
**Realistic subjects.** `datasets.realistic_subject` builds a subject in the
order a real scan differs from an atlas: the anatomy of a real brain (the
template or an Allen donor, completed with the structures a donor's map
lacks), a smooth random deformation, a random pose (rotations up to 12° per
axis, head size 0.9-1.1, shifts up to 12 mm) and intensity changes.
`datasets.RealisticPairs` serves them as atlas pairs, **pre-aligned** with
`datasets.preprocess` (ANTs affine to the atlas, then intensities divided by
a high percentile), and keeps each prepared pair on disk the first time.

The anatomy is split (`datasets.anatomy_split()`): the template and four
donors may be trained on; two donors are **held out**, so we can test on
brains no network ever saw. Our test sets use the seeds of notebook 10's
(nothing trains or chooses anything on them): new subjects of the training
brains ("in-distribution") and subjects of the held-out donors ("held-out").
Each is built twice: prepared as the paper does, and as scanned (normalised
only, the atlas-sized middle of the field of view), the "before registration"
baseline.
"""),
code(r"""
print("anatomy:", datasets.anatomy_split())
n_test = max(1, profile.n_test_pairs // 2)
sizes = {name: n_test for name in datasets.COURSE_TEST_SETS}   # notebook 10's test sets, the first pairs


def test_set(prealign):
    sets = datasets.course_test_sets(sizes, spacing_mm=spacing, prealign=prealign)
    return [pair for pairs in sets.values() for pair in pairs]


start = time.perf_counter()
test_pairs, scanned_pairs = test_set("ants"), test_set(None)
print(f"{len(test_pairs)} test pairs ready in {time.perf_counter() - start:.0f} s; ANTs' affine took "
      f"{np.mean([p['meta']['seconds'] for p in test_pairs]):.1f} s per subject when it was computed")
k = next(i for i, p in enumerate(test_pairs) if p["meta"]["dataset"] == "held-out")
before_k = metrics.dice(atlas.seg, scanned_pairs[k]["moving_seg"][0].numpy(), labels).mean
after_k = metrics.dice(atlas.seg, test_pairs[k]["moving_seg"][0].numpy(), labels).mean
print(f"{test_pairs[k]['meta']['id']}: mean Dice with the atlas {before_k:.3f} as scanned, "
      f"{after_k:.3f} after the affine pre-alignment")
fig = viz.plot_slices({"atlas (fixed)": atlas.image[0], "subject as scanned": scanned_pairs[k]["moving"][0],
                       "subject pre-aligned (moving)": test_pairs[k]["moving"][0]}, index=slices)
fig
"""),
md(r"""
## 2. VoxelMorph

The model is `regedu.nets.VoxelMorph` (registry name `"unet"`): the pair is
concatenated (2 channels), a U-Net with four poolings and skip connections maps
it to 16 features per voxel, a 3x3x3 convolution (started near zero, so training
starts from "no motion") gives the 3-channel displacement $u$, and the spatial
transformer warps the moving image: $\hat M(x) = M(x + u(x))$.

The unsupervised loss is

$$\mathcal{L} = -\mathrm{NCC}_{9^3}(F, M \circ \varphi) + \lambda\, \frac{1}{N}\sum_x \lVert \nabla u(x) \rVert^2,$$

local normalised cross-correlation in 9x9x9 windows (robust to the bias field and
gamma change) plus the diffusion regulariser (notebook 02).

**Budget.** The next cell prints what a VoxelMorph step costs at 4 mm on this
machine, how many steps the checkpoint below was trained for (from its recipe),
its validation Dice along the way, and what fraction of its steps this
notebook's few dozen are. From scratch, so small a fraction of that budget
would show us little. So the `ci` and `cpu` profiles
**fine-tune**: they start from the VoxelMorph the project trained with its own
command, `regedu train`, on pre-aligned realistic subjects of the training
brains (`checkpoints/brain_unet_4mm_ncc_lr5e-4_s0.pt`; its recipe is printed
from the file below) and continue it for a few dozen steps, with its own loss
(the weights are read from the checkpoint), at the paper's learning rate
$10^{-4}$, on the first of its own training subjects. The `gpu` profile
trains a new network from scratch for the profile's steps.
"""),
code(r"""
from_scratch = profile.paper_scale
steps = profile.steps_3d if from_scratch else {"ci": 25, "cpu": 50}[profile.name]
lr = 1e-4
unsupervised = pre_recipe["losses"]
# The first subjects of the checkpoint's own training set (RealisticPairs(256, anatomy="train", seed=0)).
train_pairs = datasets.RealisticPairs(profile.n_train_pairs, anatomy="train", seed=0, spacing_mm=spacing)
prepared = train_pairs.build()   # pre-aligned once, then read from the pool: outside the training time below
print(f"{len(train_pairs)} training pairs of {', '.join(train_pairs.names)}, ready in {prepared:.0f} s")
print("the checkpoint's recipe:", {k: v for k, v in pre_recipe.items() if k != "validation_dice"})
val = pre_state["history"]["val"]
print("its validation Dice (subjects of the training brains):",
      ", ".join(f"{d:.3f} at step {s}" for s, d in zip(val["step"], val["dice"])))
print(f"this notebook's {steps} steps are {steps / pre_recipe['steps']:.1%} of the checkpoint's {pre_recipe['steps']}")


def train_voxelmorph(objective):
    torch.manual_seed(0)
    net = nets.create("unet", spatial_dims=3) if from_scratch else checkpoints.load_model(pre_state).train()
    start = time.perf_counter()
    history = train.fit(net, train_pairs, losses=objective, steps=steps, lr=lr, labels=labels, grad_clip=1.0,
                        progress=False)
    seconds = time.perf_counter() - start
    print(f"VoxelMorph ({'new' if from_scratch else 'fine-tuned from ' + checkpoint.name}): "
          f"{sum(p.numel() for p in net.parameters()):,} parameters; {steps} steps at {spacing:g} mm, "
          f"lr {lr:g}, losses {objective}: {seconds:.0f} s ({seconds / steps:.2f} s per step)")
    return net, history


model, history = train_voxelmorph(unsupervised)
k_steps = max(1, steps // 5)
for term in unsupervised:
    values = np.asarray(history["train"][term])
    trend = "fell" if values[-k_steps:].mean() < values[:k_steps].mean() else "rose"
    print(f"{term}: mean of the first {k_steps} steps {values[:k_steps].mean():.4f}, "
          f"of the last {k_steps} {values[-k_steps:].mean():.4f} ({trend})")
fig = viz.plot_history(history, smooth=5)
fig
"""),
md(r"""
The NCC term is better when more negative; the diffusion term grows with every
voxel the network moves, and the balance between the two is $\lambda$. A new
network starts at the identity (diffusion zero); a fine-tuned one starts where
its checkpoint left off, so over a few dozen steps either term may move a
little either way (the lines above say which way each moved here): the loss of
single pairs is noisy, and what counts is the held-out evaluation below.

**The network trained longer.** The "pre-trained" row below is the checkpoint
unchanged: its command and measured time are printed next, and kept beside
the file (`checkpoints/brain_unet_4mm_ncc_lr5e-4_s0.txt`).

## 3. Dice over structures, before and after

`regedu.evaluate.evaluate` registers every test pair, warps the subject's labels
with nearest neighbour and computes Dice per structure against the atlas labels,
plus the folding statistics of the field and the seconds per pair. Two
baselines: **before registration** (the subject as scanned) and **Affine**
(the pre-aligned subject, not moved further: `evaluate.identity` on the
prepared pairs). Every network row starts from the affine.
"""),
code(r"""
print(checkpoints.checkpoint_note(checkpoint, pre_state))
pretrained = checkpoints.load_model(pre_state).eval()
model.eval()
before = evaluate.evaluate(evaluate.identity, scanned_pairs, labels=structures, name="before registration",
                           progress=False)
results = [before] + evaluate.compare({"Affine": evaluate.identity, "VoxelMorph": model,
                                       "VoxelMorph (pre-trained)": pretrained}, test_pairs,
                                      labels=structures, progress=False)
evaluate.summary(results, metrics=("dice", "percent_folding", "seconds"), by="dataset")
"""),
code(r"""
dice = {ev.name: ev.dice.to_numpy(float) for ev in results}
fig = viz.plot_dice(dice, labels=labels)
fig
"""),
code(r"""
by_set = {ds: {ev.name: ev.mean_dice(ds) for ev in results} for ds in sizes}
for ds, d in by_set.items():
    print(f"{ds}: before {d['before registration']:.3f} -> Affine {d['Affine']:.3f} -> pre-trained VoxelMorph "
          f"{d['VoxelMorph (pre-trained)']:.3f} ({d['VoxelMorph (pre-trained)'] - d['Affine']:+.3f} over the affine)")
"""),
md(r"""
**What the rows say.** The pre-alignment adds more Dice than the network
does after it (the lines above print both; a check at the end holds it):
pose and head size are most of what separates a scan from the atlas. The
pre-trained network then adds to the affine on both sets: on held-out
anatomy too, so it learned something about brains, not only about its five
training brains (the checks at the end hold it to a margin on each set).
After registration Dice is lower on the held-out donors, for the affine and
every network: their anatomy is further from the template's.

In the `ci` and `cpu` profiles the "VoxelMorph" row is the pre-trained
network after a few dozen more steps on this notebook's pairs: the checks at
the end hold it to beating the affine by a stated margin (the checkpoint
alone already does, so that check keeps its margin, it does not test the
fine-tuning), hold the extra steps to costing the checkpoint at most a stated
amount of Dice, and print whether they helped. Structures differ in
shape and topology from one brain to the next, and the cortex of a different
brain cannot be mapped voxel for voxel by a smooth field: this is why the
papers' Dice scores are in the 0.6 to 0.75 range, not 0.95.

## 4. Looking at a registration in 3D

The viewer shows three orthogonal slices with a slider each, at the VV-Net
paper's Figure 4 slices [80, 96, 112] of a 160x192x224 volume, scaled to this
grid. Each row has a menu: try "labels" (warped labels filled, atlas outlines
in white), "grid", "difference" and "jacobian".
"""),
code(r"""
pair = test_pairs[k]
moving, fixed = pair["moving"][None], pair["fixed"][None]
with torch.no_grad():
    out = pretrained(moving, fixed)
warped_seg = warp(pair["moving_seg"][None], out.disp, mode="nearest")[0, 0]
viewer = viz.SliceViewer(fixed[0, 0], moving[0, 0], out.warped[0, 0], disp=out.disp,
                         fixed_labels=pair["fixed_seg"][0], warped_labels=warped_seg,
                         rows=["fixed", "warped", "labels", "jacobian"], index=slices)
viewer
"""),
code(r"""
folding = metrics.folding_stats(out.disp)
print(f"{pair['meta']['id']}: % of voxels with det J <= 0: {folding['percent_folding']:.3f}   "
      f"SDlogJ: {folding['sdlogj']:.3f}")
fig = viz.plot_jacobian(out.disp, axis=2, index=slices[2])
fig
"""),
md(r"""
## 5. Semi-supervised: a Dice loss on warped labels

VoxelMorph's second paper adds an auxiliary term when training labels exist:
warp the *one-hot* moving labels with linear interpolation (differentiable) and
penalise $1 - \mathrm{Dice}$ against the fixed labels,

$$\mathcal{L}_{\text{semi}} = \mathcal{L} + \gamma \, \bigl(1 - \mathrm{Dice}(s_F, s_M \circ \varphi)\bigr).$$

Labels are needed only for **training**: at test time the network still sees the
two images alone. `fit` adds the term when the batches carry `moving_seg` and
`fixed_seg`, which our pairs do.
"""),
code(r"""
model_semi, history_semi = train_voxelmorph({**unsupervised, "dice": 1.0})
model_semi.eval()
results.append(evaluate.evaluate(model_semi, test_pairs, labels=structures, name="VoxelMorph + Dice loss",
                                 progress=False))
table_all = evaluate.summary(results, metrics=("dice", "percent_folding"), by="dataset")
table_all
"""),
code(r"""
mean_dice = {ev.name: ev.mean_dice() for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
for name in mean_dice:
    print(f"{name:<26} mean Dice {mean_dice[name]:.3f}   % det J <= 0: {folds[name]:.3f}")
gain = mean_dice["VoxelMorph + Dice loss"] - mean_dice["VoxelMorph"]
print(f"Here the Dice loss {'raised' if gain > 0 else 'did not raise'} the mean Dice over the test pairs ({gain:+.3f}).")
fig = viz.plot_dice({ev.name: ev.dice.to_numpy(float) for ev in results}, labels=labels)
fig
"""),
md(r"""
With the Dice term the network is told *where the structures are*, not just
which intensities match; in VoxelMorph's paper (TMI 2019) training with it
raised the Dice of held-out subjects. The cost: labels for
the training subjects (expensive in practice), and a network that may learn to
move label boundaries at the expense of smoothness, so watch the folding column.
In a few dozen fine-tuning steps the difference can go either way (both
means are printed above); the `gpu` profile, which trains both
from scratch for the profile's steps, gives a fairer comparison, and
notebook 10 compares the two variants at equal budgets.

## Exercises

1. Set the diffusion weight to 0 and to 5 in `unsupervised` and retrain. How do
   Dice and % det J <= 0 move? Which would you report?
2. Train with `integrate_steps=7` (`nets.create("unet", ..., integrate_steps=7)`):
   the diffeomorphic VoxelMorph. What happens to folding?
3. Evaluate only on held-out anatomy
   (`[p for p in test_pairs if p["meta"]["dataset"] == "held-out"]`) and find
   the three structures with the lowest Dice. Why those?
4. Raise the Dice weight to 5. Does the image similarity (NCC) of the warped
   image get better or worse? Explain with the two loss terms.
5. Build the test pairs with `prealign="regedu"` (regedu's own affine,
   `classic.affine_register`) instead of ANTs. Does the affine row change?

## Checks
"""),
code(r"""
def similarity(model):
    # Mean local NCC (lower is better) of the atlas and each test subject warped by the model.
    with torch.no_grad():
        return float(np.mean([float(losses.ncc_local(p["fixed"][None], model(p["moving"][None], p["fixed"][None]).warped))
                              for p in test_pairs]))


ncc = {"Affine": float(np.mean([float(losses.ncc_local(p["fixed"][None], p["moving"][None])) for p in test_pairs])),
       "VoxelMorph": similarity(model), "VoxelMorph + Dice loss": similarity(model_semi)}
print("test local NCC (lower is better):", {k: round(v, 4) for k, v in ncc.items()})
print("mean Dice:", {k: round(v, 4) for k, v in mean_dice.items()})
# Every profile: the preprocessing raises Dice, and the pre-trained network adds Dice to the affine on
# held-out anatomy as well as on its training brains. The networks of this notebook beat the affine by a
# margin: new in gpu, that tests their training; fine-tuned in ci and cpu, they keep the checkpoint's margin
# (the checkpoint alone passes), and a separate check bounds what the fine-tuning may cost the checkpoint.
PREALIGN, MARGIN, PRE_EACH, FINE_TUNE_COST = 0.05, 0.03, 0.02, 0.01
changes = {name: mean_dice[name] - mean_dice["VoxelMorph (pre-trained)"] for name in ("VoxelMorph", "VoxelMorph + Dice loss")}
if not from_scratch:
    print(f"the {steps} steps of this notebook changed the mean Dice of the network they started from by "
          + ", ".join(f"{v:+.4f} ({name})" for name, v in changes.items()))
    assert all(v > -FINE_TUNE_COST for v in changes.values()), \
        f"fine-tuning should not cost the checkpoint more than {FINE_TUNE_COST} Dice: {changes}"
for ds, d in by_set.items():
    assert d["Affine"] > d["before registration"] + PREALIGN, f"{ds}: the affine pre-alignment should raise Dice by more than {PREALIGN}: {d}"
    assert d["VoxelMorph (pre-trained)"] > d["Affine"] + PRE_EACH, f"{ds}: the pre-trained VoxelMorph should add more than {PRE_EACH} Dice to the affine: {d}"
assert ncc["VoxelMorph"] < ncc["Affine"], f"the trained network should make test pairs more similar than the affine alone: {ncc}"
assert mean_dice["VoxelMorph"] > mean_dice["Affine"] + MARGIN, f"VoxelMorph should beat the affine by more than {MARGIN} Dice: {mean_dice}"
assert mean_dice["VoxelMorph + Dice loss"] > mean_dice["Affine"] + MARGIN, f"the semi-supervised model should beat the affine by more than {MARGIN} Dice: {mean_dice}"
assert all(f < 1.0 for f in folds.values()), f"folding should stay below 1% of the voxels: {folds}"
registered = [m for m in by_set["held-out"] if m != "before registration"]
assert all(by_set["held-out"][m] < by_set["in-distribution"][m] for m in registered), \
    f"section 3 says Dice after registration is lower on the held-out donors: {by_set}"
for ds, d in by_set.items():
    assert d["Affine"] - d["before registration"] > d["VoxelMorph (pre-trained)"] - d["Affine"], \
        f"{ds}: section 3 says the pre-alignment adds more Dice than the network after it: {d}"
unlabelled = [datasets.STRUCTURE_NAMES[k] for k in datasets.FREESURFER_30 if k not in structures]
assert all("ventral DC" in n or "choroid plexus" in n for n in unlabelled), f"section 1 names what the template lacks: {unlabelled}"
assert (pre_recipe["steps"], pre_recipe["data"], pre_recipe["model"]) == (3000, "subjects", "unet"), pre_recipe
assert not set(datasets.anatomy_split()["held_out"]) & set(train_pairs.names), "no held-out brain in training"
assert tuple(out.disp.shape) == (1, 3, *shape), f"the field should be (1, 3, D, H, W), got {tuple(out.disp.shape)}"
print("all checks passed")
print(f"peak memory of this kernel: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""),
]

if __name__ == "__main__":
    print(write("06_voxelmorph_3d.ipynb", cells))
