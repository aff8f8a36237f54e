"""Notebook 11: atlas-based segmentation (label propagation, fusion, template selection)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 11 · Atlas-based segmentation

Registration is also a way to **segment**. An *atlas* is an image whose
structures somebody has labelled. Register the atlas to a new, unlabelled
*target*, carry the labels along with the same field, and you have a
segmentation of the target: **label propagation**. One atlas makes its own
registration errors; several atlases make *different* errors, and letting them
vote (**label fusion**) cancels many of them. Which atlases to use is the last
question: **template selection**.

**Learning goals.** After this notebook you can

1. propagate labels from an atlas to a target with a displacement field
   (nearest-neighbour warping) and score the result with Dice;
2. fuse several propagated segmentations by majority voting and by locally
   weighted voting, and show that fusion beats the single best atlas;
3. select atlases by image similarity to the target and compare with a random choice.
"""),
code(PROFILE_CELL),
code(r"""
import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt

from regedu import losses, metrics, viz
from regedu.classic import instance_optimisation
from regedu.datasets import label_table, mni_brain, synth_subject
from regedu.spatial import warp

atlas_source = mni_brain()
shape = atlas_source.image.shape[1:]
table = label_table()
thirty = table[table["in_30"]].drop_duplicates("freesurfer")
structures = sorted(int(k) for k in thirty["freesurfer"] if (atlas_source.seg == int(k)).any())
print(f"volumes {shape}, {len(structures)} structures")
"""),
md(r"""
## 1. Atlases and a target

Our labelled atlases are subjects made from the MNI152 template
(`regedu.datasets.synth_subject`): each is the template under its own random
diffeomorphism, with its own bias field and noise, carrying the template's
labels through the same warp. Some atlases are deformed gently and some
strongly, so some are closer to the target's anatomy than others. The target is one
more subject whose labels we keep hidden, only to score the result.
"""),
code(r"""
n_atlases = 5 if profile.name == "ci" else 8
scale = shape[0] / 80                                 # deformations in voxels scale with the grid
base = dict(max_velocity=2.5 * scale, control=max(2, round(8 * scale)))
target = synth_subject(atlas_source, seed=1100, **base)
strength = [0.7, 1.6, 0.8, 1.8, 0.9, 1.7, 0.75, 1.5][:n_atlases]       # gentle and strong warps, mixed
atlases = [synth_subject(atlas_source, seed=1200 + i, **dict(base, max_velocity=base["max_velocity"] * f))
           for i, f in enumerate(strength)]
target_image, target_seg = target["image"][None], target["seg"][0]

viz.plot_slices({"target": target_image[0, 0], **{f"atlas {i}": a["image"][0] for i, a in enumerate(atlases[:3])}},
                index=profile.slices)
"""),
md(r"""
## 2. Label propagation

Each atlas is registered to the target (atlas = moving, target = fixed) by
dense instance optimisation (local NCC + diffusion, coarse to fine, notebook
03), with few iterations at full resolution, where they are expensive. The same field then warps the atlas's **labels** with nearest neighbour:
interpolating label numbers would invent labels that do not exist (notebook 01).
"""),
code(r"""
ncc = losses.NCC(window=9)
iterations = (40, 30, 10) if profile.name == "ci" else (80, 40, 20)
propagated, warped_images, single_dice, unregistered_dice, seconds = [], [], [], [], []
for i, a in enumerate(atlases):
    start = time.perf_counter()
    result = instance_optimisation(a["image"][None], target_image, similarity=ncc, weight=1.0,
                                   levels=(4, 2, 1), iterations=iterations, lr=0.1, progress=False)
    seconds.append(time.perf_counter() - start)
    labels_on_target = warp(a["seg"][None], result.disp, mode="nearest")[0, 0]
    propagated.append(labels_on_target)
    warped_images.append(result.warped[0, 0])
    single_dice.append(metrics.dice(target_seg, labels_on_target, structures).mean)
    before = metrics.dice(target_seg, a["seg"][0], structures).mean
    unregistered_dice.append(before)
    print(f"atlas {i}: Dice {before:.3f} before registration -> {single_dice[-1]:.3f} propagated "
          f"({seconds[-1]:.1f} s)")
best_single = int(np.argmax(single_dice))
print(f"best single atlas: {best_single} (Dice {single_dice[best_single]:.3f})")
"""),
md(r"""
## 3. Label fusion

**Majority voting**: at every voxel, the label most atlases propose.

**Locally weighted voting** (Artaechevarria et al., IEEE TMI 2009): an atlas
whose warped *image* looks like the target *around this voxel* is probably
registered well there, so its vote counts more. The weight of atlas $i$ at
voxel $x$ is the squared local correlation $cc_i(x)$ between the warped atlas
and the target in a 5-voxel window around $x$ (the quantity inside local NCC,
notebook 02). Correlation rather than squared difference: every subject has
its own bias field and contrast, which a squared difference would mistake
for misregistration.
"""),
code(r"""
def fuse(segmentations, weights=None):
    # segmentations: (n, *spatial) label maps; weights: (n, *spatial) or None (one vote each).
    stack = torch.stack(list(segmentations))
    weights = torch.ones(stack.shape) if weights is None else weights
    candidates = torch.tensor([0] + structures)
    votes = torch.stack([(weights * (stack == k)).sum(0) for k in candidates])
    return candidates[votes.argmax(0)]


def local_weights(warped, target, window=5):
    def box(x):
        return F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    a = torch.stack(list(warped))[:, None]                                  # (n, 1, *spatial)
    t = target.expand_as(a)
    mean_a, mean_t = box(a), box(t)
    cov = box(a * t) - mean_a * mean_t
    var_a, var_t = box(a * a) - mean_a ** 2, box(t * t) - mean_t ** 2
    return (cov ** 2 / (var_a * var_t + 1e-5))[:, 0] + 1e-3                # cc in [0, 1]; no zero weights


majority = fuse(propagated)
weighted = fuse(propagated, local_weights(warped_images, target_image[0, 0]))
dice_majority = metrics.dice(target_seg, majority, structures)
dice_weighted = metrics.dice(target_seg, weighted, structures)
print(f"single atlases: mean Dice {np.mean(single_dice):.3f}, best {single_dice[best_single]:.3f}")
print(f"majority voting of {n_atlases}: {dice_majority.mean:.3f}")
print(f"locally weighted voting:   {dice_weighted.mean:.3f}")
best_fused = max(dice_majority.mean, dice_weighted.mean)
verdict = "beats" if best_fused > single_dice[best_single] else "does NOT beat"
print(f"-> fusion of all {n_atlases} atlases {verdict} the best single atlas "
      f"({best_fused:.3f} vs {single_dice[best_single]:.3f})")
"""),
code(r"""
results = {"best single atlas": metrics.dice(target_seg, propagated[best_single], structures),
           "majority": dice_majority, "weighted": dice_weighted}
viz.plot_dice(results)
"""),
md(r"""
Where do the gains come from? Look at the target's labels, the best single
atlas and the fused result side by side: fusion repairs the borders where one
atlas's registration slipped.
"""),
code(r"""
viz.SliceViewer(target_image, fixed_labels=target_seg, warped_labels=weighted, index=profile.slices,
                rows=["labels", "fixed"])
"""),
md(r"""
## 4. Template selection

Registering and fusing every atlas costs time, and a bad atlas can outvote good
ones. **Selection** keeps the $k$ atlases most similar to the target. The
similarity must be computable *without* the target's labels: here the global
NCC between each atlas image and the target before registration (cheap:
no registration needed). We compare with choosing $k$ atlases at random
(every possible choice, averaged).
"""),
code(r"""
k = 3
similarity = [-float(losses.ncc_global(target_image, a["image"][None])) for a in atlases]
ranked = list(np.argsort(similarity)[::-1])
selected = ranked[:k]
dice_selected = metrics.dice(target_seg, fuse([propagated[i] for i in selected]), structures).mean
random_choices = [metrics.dice(target_seg, fuse([propagated[i] for i in c]), structures).mean
                  for c in itertools.combinations(range(n_atlases), k)]
print("atlases ranked by similarity to the target:", ranked)
print(f"fusion of the {k} most similar atlases {selected}: Dice {dice_selected:.3f}")
print(f"fusion of {k} random atlases: Dice {np.mean(random_choices):.3f} on average "
      f"(from {min(random_choices):.3f} to {max(random_choices):.3f}, {len(random_choices)} choices)")
print(f"selected atlases {'beat' if dice_selected > np.mean(random_choices) else 'do NOT beat'} a random choice, "
      f"and their fusion {'beats' if dice_selected > single_dice[best_single] else 'does NOT beat'} the best single atlas")

plt.figure(figsize=(5, 3.5))
plt.scatter(similarity, single_dice)
for i, (s, d) in enumerate(zip(similarity, single_dice)):
    plt.annotate(str(i), (s, d))
plt.xlabel("NCC with the target before registration"); plt.ylabel("Dice after propagation")
plt.title("does similarity predict a good atlas?"); plt.show()
"""),
md(r"""
## Exercises

1. Fuse with weights from *global* similarity only (one weight per atlas,
   `exp(NCC)`): between majority and local weighting, where does it land?
2. Change the window of `local_weights` from 5 to 3 and 9. What happens, and why?
3. Replace instance optimisation by ANTs SyN (`regedu.classic.ants_syn`): do
   single atlases get better, and does fusion still add as much?
4. With $k = 1$, template selection is "pick the most similar atlas". Is it the
   best single atlas? What does that say about NCC before registration as a predictor?

## Checks
"""),
code(r"""
assert np.mean(single_dice) > np.mean(unregistered_dice), \
    f"registration should improve the atlases' overlap with the target: {np.mean(single_dice):.3f} vs {np.mean(unregistered_dice):.3f}"
assert max(best_fused, dice_selected) > single_dice[best_single], \
    f"fusion should beat the best single atlas: fused {best_fused:.3f}, selected {dice_selected:.3f}, single {single_dice[best_single]:.3f}"
assert dice_weighted.mean > np.mean(single_dice) and dice_majority.mean > np.mean(single_dice), \
    "both fusions should beat a typical single atlas"
assert dice_selected >= np.mean(random_choices), \
    f"selecting by similarity should beat a random choice on average: {dice_selected:.3f} vs {np.mean(random_choices):.3f}"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("11_atlas_based_segmentation.ipynb", cells))
