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
VV-Net paper: the atlas is the MNI152 template with a FreeSurfer label map,
and the subjects are (a) synthetic subjects, the template under random
diffeomorphisms and intensity changes, and (b) the anatomy of six Allen brain
donors (real inter-subject differences), both shipped offline with the course.

**Learning goals.** After this notebook you can

1. load the offline brain, its labels and the two kinds of subjects, and say what
   the 30 FreeSurfer structures of the VoxelMorph and VV-Net evaluations are;
2. train VoxelMorph (U-Net + spatial transformer) unsupervised, with local NCC
   and a diffusion regulariser, using `regedu.train.fit`;
3. measure a registration the way the papers do: Dice over named structures
   before and after, and folding (% of voxels with $\det J_\varphi \le 0$);
4. browse a 3D registration with the slice viewer at the paper's slices
   [80, 96, 112] (scaled to the grid of your profile);
5. add a **Dice loss on warped labels** (VoxelMorph's semi-supervised variant)
   and explain what it buys and what it costs.
"""),
code(PROFILE_CELL),
md(r"""
## 1. The atlas, the labels and the subjects

`mni_brain()` returns the template at the profile's grid (160x192x224 at 1 mm in
the `gpu` profile, 80x96x112 at 2 mm in `cpu`, 40x48x56 at 4 mm in `ci`),
oriented like FreeSurfer's conformed volumes, with a label map in FreeSurfer
numbers. Of the 30 structures of docs/conventions.md ("The 30 evaluation structures"), the offline brain has
every one except the ventral DC and the choroid plexus, which its sources do not
label; we score the rest.
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
atlas = datasets.mni_brain()
table = datasets.label_table()
labels = sorted(int(v) for v in table.loc[table["in_30"], "freesurfer"].unique())
names = {k: datasets.STRUCTURE_NAMES.get(k, str(k)) for k in labels}
print(f"atlas {atlas.name}: image {atlas.image.shape}, {atlas.spacing_mm:g} mm voxels")
print(f"{len(labels)} of the 30 structures are labelled:", ", ".join(names[k] for k in labels[:8]), "...")
fig = viz.plot_slices({"atlas": atlas.image[0]}, index=profile.slices)
fig
"""),
md(r"""
**Two kinds of subjects.** A *synthetic* subject is the atlas under a random
smooth diffeomorphism (a stationary velocity field integrated by scaling and
squaring, notebook 05), with a bias field, a gamma change and noise: the true
deformation is known, and the labels move with the image. A *donor* subject is
one of six Allen Human Brain Atlas donors: their own Desikan-Killiany label map,
affinely aligned to the template, with a T1-like image synthesised from it. Its
differences from the atlas are real anatomy, which no smooth warp of the atlas
produces. We also deform the donors randomly, so that every training pair is new.

The random deformations have the same physical size at every resolution
(`synth_subject`'s defaults: control points every 16 mm, velocities of about
6 mm), so the subjects of the `ci`, `cpu` and `gpu` profiles differ only in
voxel size.
"""),
code(r"""
donors = [datasets.donor_brain(d) for d in datasets.DONORS]
test_donors = donors[4:]                                # test on anatomy never seen in training
# The short training runs of the ci and cpu profiles use the 4 mm grid (section 2 says why).
train_spacing = profile.train_spacing_mm
atlas_train = datasets.mni_brain(train_spacing)
train_donors = [datasets.donor_brain(d, train_spacing) for d in datasets.DONORS[:4]]

n_train = profile.n_train_pairs
train_pairs = torch.utils.data.ConcatDataset([
    datasets.BrainPairs(n_train // 2, atlas=atlas_train, seed=0, cache=True),
    datasets.BrainPairs(n_train - n_train // 2, atlas=atlas_train, subjects=train_donors, seed=1, cache=True)])


def test_set(n):
    # Held-out pairs (other seeds, other donors), tagged by dataset for the tables.
    synthetic = datasets.BrainPairs(n, atlas=atlas, seed=100, )
    donor = datasets.BrainPairs(n, atlas=atlas, subjects=test_donors, seed=101, )
    pairs = []
    for name, source in (("synthetic", synthetic), ("donors", donor)):
        for i in range(n):
            item = dict(source[i])
            item["meta"] = {**item["meta"], "dataset": name, "id": f"{name}-{i}"}
            pairs.append(item)
    return pairs


test_pairs = test_set(max(1, profile.n_test_pairs // 2))
print(f"{len(train_pairs)} training pairs, {len(test_pairs)} test pairs "
      f"({', '.join(sorted({p['meta']['dataset'] for p in test_pairs}))})")
first = test_pairs[0]
fig = viz.plot_slices({"atlas (fixed)": first["fixed"][0], "subject (moving)": first["moving"][0]},
                      index=profile.slices)
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

**Budget.** On two CPU cores a VoxelMorph step takes of the order of a second (printed below) even at
4 mm, and a network needs hundreds to thousands of steps before its Dice
clearly leaves the identity's, so a few dozen steps from scratch are too few to
expect a measurable change. So the `ci` and `cpu` profiles **fine-tune**: they start from the
VoxelMorph the project trained with its own command (`checkpoints/brain_unet_4mm.pt`,
2000 steps of NCC + diffusion + a Dice loss on synthetic subjects of the
template; section 3 prints the command) and continue it for a few dozen steps,
at the paper's learning rate $10^{-4}$, on this notebook's training pairs
(which add the donors) with this section's objective. They train on the 4 mm
grid (the checkpoint's; an eighth of a 2 mm grid's voxels), and in the
`cpu` profile the network is evaluated on the 2 mm test pairs through
`nets.Rescaled(model, 2)`, which averages both images down by 2 and upsamples
the field back. The `gpu` profile trains a new network on the full grid for
the profile's steps.
"""),
code(r"""
full_size = profile.paper_scale
steps = profile.steps_3d if full_size else {"ci": 25, "cpu": 50}[profile.name]
lr = 1e-4
unsupervised = {"ncc": 1.0, "diffusion": 1.0}
grid = checkpoints.choose_factor(train_spacing, atlas.spacing_mm)   # 2 in cpu: trained at 4 mm, used at 2 mm


checkpoint = Path("checkpoints/brain_unet_4mm.pt")


def train_voxelmorph(objective):
    torch.manual_seed(0)
    net = nets.create("unet", spatial_dims=3) if full_size else checkpoints.load_model(checkpoint).train()
    start = time.perf_counter()
    history = train.fit(net, train_pairs, losses=objective, steps=steps, lr=lr, labels=labels, grad_clip=1.0,
                        progress=False)
    seconds = time.perf_counter() - start
    print(f"VoxelMorph ({'new' if full_size else 'fine-tuned from ' + checkpoint.name}): "
          f"{sum(p.numel() for p in net.parameters()):,} parameters; {steps} steps at {train_spacing:g} mm, "
          f"lr {lr:g}, losses {objective}: {seconds:.0f} s ({seconds / steps:.2f} s per step)")
    return (nets.Rescaled(net, grid) if grid > 1 else net), history


model, history = train_voxelmorph(unsupervised)
k = max(1, steps // 5)
for term in ("ncc", "diffusion"):
    values = np.asarray(history["train"][term])
    trend = "fell" if values[-k:].mean() < values[:k].mean() else "rose"
    print(f"{term}: mean of the first {k} steps {values[:k].mean():.4f}, of the last {k} {values[-k:].mean():.4f} ({trend})")
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

**The network trained longer.** The project's VoxelMorph was trained for 2000
steps at 4 mm by its own command, `regedu train` (the command is printed below
and kept next to the file with its measured time, `checkpoints/brain_unet_4mm.txt`),
on synthetic subjects only, with NCC + diffusion + a Dice
loss on the warped labels (section 5 explains that term). The "pre-trained"
row is that checkpoint unchanged; in the `ci` and `cpu` profiles the other
rows are it, fine-tuned. On a finer grid it runs through `nets.Rescaled`: both images are averaged down
to 4 mm, the network predicts there, and its field is upsampled back (brain
deformations between subjects are smooth, and this is what VoxelMorph's own
diffeomorphic model does inside).

## 3. Dice over structures, before and after

`regedu.evaluate.evaluate` registers every test pair, warps the subject's labels
with nearest neighbour and computes Dice per structure against the atlas labels,
plus the folding statistics of the field and the seconds per pair. "identity"
(no registration) gives the Dice *before*.
"""),
code(r"""
factor = checkpoints.choose_factor(4, atlas.spacing_mm)   # the checkpoint's 4 mm: 1 in ci, 2 in cpu, 4 in gpu
pretrained = checkpoints.load_model(checkpoint, factor=factor)
print(checkpoints.checkpoint_note(checkpoint))
print(f"runs at 4 mm on this {atlas.spacing_mm:g} mm grid (factor {factor})" if factor > 1 else "")
"""),
code(r"""
model.eval()
results = evaluate.compare({"identity": evaluate.identity, "VoxelMorph": model,
                            "VoxelMorph (pre-trained)": pretrained}, test_pairs,
                           labels=names, progress=False)
evaluate.summary(results, metrics=("dice", "percent_folding", "seconds"), by="dataset")
"""),
code(r"""
dice = {ev.name: ev.dice.to_numpy(float) for ev in results}
fig = viz.plot_dice(dice, labels=labels)
fig
"""),
md(r"""
**What did the short run do?** A few dozen steps from scratch are too few to
expect a network to leave the identity's Dice; the 2000 steps of the pre-trained row are what
moves it. In the `ci` and `cpu` profiles the "VoxelMorph" row is that network
after a few dozen more steps on this notebook's pairs: the checks at the end
hold it to beating the identity by a stated margin, and print whether the extra
steps helped or cost the checkpoint anything.

With enough training, Dice rises most on the synthetic subjects, where a smooth
warp of the atlas *is* the right answer. On the donors it rises less: their structures differ in shape and
topology from the atlas, the donors' label maps have no ventricles, CSF or
cerebellum at all (those bars are left out; checked at the end), and the cortex of a different brain cannot be mapped
voxel for voxel by a smooth field. This is why the papers' Dice scores are in the
0.6 to 0.75 range, not 0.95.

## 4. Looking at a registration in 3D

The viewer shows three orthogonal slices with a slider each, at the VV-Net
paper's Figure 4 slices [80, 96, 112] of a 160x192x224 volume, scaled to this
grid (`profile.slices`). Each row has a menu: try "labels" (warped labels filled,
atlas outlines in white), "grid", "difference" and "jacobian".
"""),
code(r"""
pair = test_pairs[0]
moving, fixed = pair["moving"][None], pair["fixed"][None]
with torch.no_grad():
    out = pretrained(moving, fixed)
warped_seg = warp(pair["moving_seg"][None], out.disp, mode="nearest")[0, 0]
viewer = viz.SliceViewer(fixed[0, 0], moving[0, 0], out.warped[0, 0], disp=out.disp,
                         fixed_labels=pair["fixed_seg"][0], warped_labels=warped_seg,
                         rows=["fixed", "warped", "labels", "jacobian"], index=profile.slices)
viewer
"""),
code(r"""
folding = metrics.folding_stats(out.disp)
print(f"% of voxels with det J <= 0: {folding['percent_folding']:.3f}   SDlogJ: {folding['sdlogj']:.3f}")
fig = viz.plot_jacobian(out.disp, axis=2, index=profile.slices[2])
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
results.append(evaluate.evaluate(model_semi, test_pairs, labels=names, name="VoxelMorph + Dice loss",
                                 progress=False))
table_all = evaluate.summary(results, metrics=("dice", "percent_folding"), by="dataset")
table_all
"""),
code(r"""
mean_dice = {ev.name: float(np.nanmean(ev.dice.to_numpy(float))) for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
for name in mean_dice:
    print(f"{name:<26} mean Dice {mean_dice[name]:.3f}   % det J <= 0: {folds[name]:.3f}")
gain = mean_dice["VoxelMorph + Dice loss"] - mean_dice["VoxelMorph"]
print(f"Here the Dice loss {'raised' if gain > 0 else 'did not raise'} the held-out mean Dice ({gain:+.3f}).")
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
means are printed at the end); the `gpu` profile, which trains both
from scratch for the profile's steps, gives a fair comparison.

## Exercises

1. Set the diffusion weight to 0 and to 5 in `unsupervised` and retrain. How do
   Dice and % det J <= 0 move? Which would you report?
2. Train with `integrate_steps=7` (`nets.create("unet", ..., integrate_steps=7)`):
   the diffeomorphic VoxelMorph. What happens to folding?
3. Evaluate only on the donors (`[p for p in test_pairs if p["meta"]["dataset"] == "donors"]`)
   and find the three structures with the lowest Dice. Why those?
4. Raise the Dice weight to 5. Does the image similarity (NCC) of the warped
   image get better or worse? Explain with the two loss terms.

## Checks
"""),
code(r"""
def similarity(model):
    # Mean local NCC (lower is better) of the atlas and each held-out subject warped by the model.
    with torch.no_grad():
        return float(np.mean([float(losses.ncc_local(p["fixed"][None], model(p["moving"][None], p["fixed"][None]).warped))
                              for p in test_pairs]))


ncc = {"identity": float(np.mean([float(losses.ncc_local(p["fixed"][None], p["moving"][None])) for p in test_pairs])),
       "VoxelMorph": similarity(model), "VoxelMorph + Dice loss": similarity(model_semi)}
print("held-out local NCC (lower is better):", {k: round(v, 4) for k, v in ncc.items()})
print("mean Dice:", {k: round(v, 4) for k, v in mean_dice.items()})
synthetic_dice = {ev.name: float(np.nanmean(ev.dice.to_numpy(float)[[p["meta"]["dataset"] == "synthetic" for p in test_pairs]]))
                  for ev in results}
print("mean Dice on the synthetic subjects:", {k: round(v, 4) for k, v in synthetic_dice.items()})
donor_dice = {ev.name: float(np.nanmean(ev.dice.to_numpy(float)[[p["meta"]["dataset"] == "donors" for p in test_pairs]]))
              for ev in results}
# Every profile: the networks trained in this notebook (fine-tuned in ci and cpu, new in gpu) beat identity
# by a margin, and the pre-trained network clearly, most on its own training distribution.
MARGIN, PRE_ALL, PRE_SYN = 0.03, 0.05, 0.12
change = mean_dice["VoxelMorph"] - mean_dice["VoxelMorph (pre-trained)"]
print(f"the {steps} steps of this notebook changed the mean Dice of the network they started from by {change:+.4f}"
      if not full_size else "")
assert ncc["VoxelMorph"] < ncc["identity"], f"the trained network should make held-out pairs more similar than no registration: {ncc}"
assert mean_dice["VoxelMorph"] > mean_dice["identity"] + MARGIN, f"VoxelMorph should beat identity by more than {MARGIN} Dice: {mean_dice}"
assert mean_dice["VoxelMorph + Dice loss"] > mean_dice["identity"] + MARGIN, f"the semi-supervised model should beat identity by more than {MARGIN} Dice: {mean_dice}"
assert mean_dice["VoxelMorph (pre-trained)"] > mean_dice["identity"] + PRE_ALL, f"the pre-trained VoxelMorph should raise the mean Dice by more than {PRE_ALL}: {mean_dice}"
assert synthetic_dice["VoxelMorph (pre-trained)"] > synthetic_dice["identity"] + PRE_SYN, f"on the synthetic subjects (its training distribution) the pre-trained VoxelMorph should raise Dice by more than {PRE_SYN}: {synthetic_dice}"
assert all(f < 1.0 for f in folds.values()), f"folding should stay below 1% of the voxels: {folds}"
# Section 3's reading: the pre-trained network gains most on synthetic subjects, less on the donors.
gains = {k: d["VoxelMorph (pre-trained)"] - d["identity"] for k, d in (("synthetic", synthetic_dice), ("donors", donor_dice))}
assert gains["synthetic"] > gains["donors"], f"Dice should rise more on the synthetic subjects than on the donors: {gains}"
assert set(names) <= set(datasets.STRUCTURE_NAMES), "every scored structure should be one of the 30 named ones"
pre_state = checkpoints.load_checkpoint(checkpoint)
assert pre_state["step"] == 2000 and "dice" in pre_state["train_config"]["losses"], \
    "the prose describes the pre-trained network as 2000 steps with a Dice loss"
assert len(datasets.DONORS) == 6, "the prose speaks of six donors"
missing = {k for k, n in datasets.STRUCTURE_NAMES.items() if any(w in n for w in ("ventricle", "CSF", "cerebellum"))}
assert missing and not any(set(np.unique(d.seg)) & missing for d in donors), "the donors should have no ventricles, CSF or cerebellum"
assert tuple(out.disp.shape) == (1, 3, *atlas.image.shape[1:]), f"the field should be (1, 3, D, H, W), got {tuple(out.disp.shape)}"
print("all checks passed")
print(f"peak memory of this kernel: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""),
]

if __name__ == "__main__":
    print(write("06_voxelmorph_3d.ipynb", cells))
