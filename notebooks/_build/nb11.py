"""Notebook 11: atlas-based segmentation (label propagation, fusion, template and atlas selection)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 11 · Atlas-based segmentation

Registration is also a way to **segment**. An *atlas* is an image whose
structures somebody has labelled. Register the atlas to a new, unlabelled
*target*, carry the labels along with the same field, and you have a
segmentation of the target: **label propagation**. One atlas makes its own
registration errors; several atlases make *different* errors, and letting them
vote (**label fusion**) can cancel some of them. Two selection questions come
with it, and the review of seed 002 (section 3.3.1, Wang and Zhang, MICCAI
2018) keeps them apart:

* **template selection**: which *one* labelled image should every target be
  registered to? One registration per target;
* **atlas selection**: which $k$ atlases, chosen *per target*, should be
  registered and fused? $k$ registrations per target.

Everything below uses `regedu.fusion`; the notebook writes no voting code of
its own.

**Learning goals.** After this notebook you can

1. propagate labels from an atlas to a target with a displacement field
   (nearest-neighbour warping) and score the result with Dice;
2. fuse propagated segmentations by majority voting, globally weighted voting
   and locally weighted voting, and *measure* whether fusion beats the best
   single atlas (it can only when the atlases err in different places; the
   verdict below is printed from the numbers);
3. tell template selection from atlas selection, and measure each against a
   choice made without looking.
"""),
code(PROFILE_CELL),
code(r"""
import itertools
import time

import numpy as np
import torch
import matplotlib.pyplot as plt
from IPython.display import display

from regedu import fusion, losses, metrics, viz
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
## 1. Atlases and targets

Our labelled atlases are subjects made from the MNI152 template
(`regedu.datasets.synth_subject`): each is the template under its own random
diffeomorphism, with its own bias field and noise, carrying the template's
labels through the same warp. Some atlases are deformed gently and some
strongly, so some lie closer to the population's centre than others. The
targets are more subjects whose labels we keep hidden, only to score the
results; several of them, because template selection is a choice made once
for all of them.
"""),
code(r"""
n_atlases, n_targets = 5, 3          # every atlas-target pair costs one registration
scale = shape[0] / 80                                 # deformations in voxels scale with the grid
base = dict(max_velocity=2.5 * scale, control=max(2, round(8 * scale)))
targets = [synth_subject(atlas_source, seed=1100 + j, **base) for j in range(n_targets)]
strength = [0.7, 1.6, 0.8, 1.8, 0.9]                      # gentle and strong warps, mixed
atlases = [synth_subject(atlas_source, seed=1200 + i, **dict(base, max_velocity=base["max_velocity"] * f))
           for i, f in enumerate(strength)]
atlas_images = [a["image"][0] for a in atlases]

fig = viz.plot_slices({"target 0": targets[0]["image"][0], **{f"atlas {i}": atlas_images[i] for i in range(3)}},
                      index=profile.slices)
display(fig)
"""),
md(r"""
## 2. Label propagation

Each atlas is registered to each target (atlas = moving, target = fixed) by
dense instance optimisation (local NCC + diffusion, coarse to fine, notebook
03), with few iterations at full resolution, where they are expensive. The
same field then warps the atlas's **labels** with nearest neighbour:
interpolating label numbers would invent labels that do not exist
(notebook 01).
"""),
code(r"""
ncc = losses.NCC(window=9)
iterations = (40, 30, 10) if profile.name == "ci" else (80, 40, 20)
propagated = [[None] * n_atlases for _ in targets]          # [target][atlas] label maps on the target
warped_images = [[None] * n_atlases for _ in targets]
single = np.zeros((n_targets, n_atlases))                   # Dice of each atlas alone, after registration
unregistered = np.zeros((n_targets, n_atlases))
start = time.perf_counter()
for j, t in enumerate(targets):
    for i, a in enumerate(atlases):
        result = instance_optimisation(a["image"][None], t["image"][None], similarity=ncc, weight=1.0,
                                       levels=(4, 2, 1), iterations=iterations, lr=0.1, progress=False)
        propagated[j][i] = warp(a["seg"][None], result.disp, mode="nearest")[0, 0]
        warped_images[j][i] = result.warped[0, 0]
        single[j, i] = metrics.dice(t["seg"][0], propagated[j][i], structures).mean
        unregistered[j, i] = metrics.dice(t["seg"][0], a["seg"][0], structures).mean
seconds_per_registration = (time.perf_counter() - start) / (n_targets * n_atlases)
np.set_printoptions(precision=3, suppress=True)
print(f"{n_targets * n_atlases} registrations, {seconds_per_registration:.1f} s each")
print("Dice of each atlas alone (rows: targets, columns: atlases), before registration:\n", unregistered)
print("after registration and propagation:\n", single)
print(f"mean over all pairs: {unregistered.mean():.3f} before -> {single.mean():.3f} after")
"""),
md(r"""
## 3. Label fusion

Three ways to let the atlases vote, all in `regedu.fusion`:

* **majority voting** (`fusion.majority_vote`): at every voxel, the label
  most atlases propose;
* **globally weighted voting** (`fusion.weighted_vote` with one weight per
  atlas): an atlas whose whole warped image resembles the target counts more.
  The weight is $\exp\big((s_i - \max_j s_j) / \tau\big)$ with $s_i$ the global
  NCC of warped atlas $i$ and target (`fusion.image_similarity`), and $\tau$ the
  spread (standard deviation) of the $s_i$ of this target, so that the weights
  do not depend on how similar all atlases happen to be;
* **locally weighted voting** (`fusion.locally_weighted_vote`, Artaechevarria
  et al., IEEE TMI 2009): the weight of atlas $i$ at voxel $x$ is the squared
  local correlation between the warped atlas and the target in a 5-voxel window
  around $x$ (the quantity inside local NCC, notebook 02). Correlation rather
  than squared difference: every subject has its own bias field and contrast,
  which a squared difference would mistake for misregistration.

Each is scored on every target, next to the single atlases: their mean (a
typical atlas) and the best one *in hindsight*, which nobody could pick
without the target's labels.
"""),
code(r"""
def global_weights(j):
    s = np.array([fusion.image_similarity(targets[j]["image"][0], w) for w in warped_images[j]])
    return np.exp((s - s.max()) / max(s.std(), 1e-6))


fused = {"majority": [], "globally weighted": [], "locally weighted": []}
for j, t in enumerate(targets):
    fused["majority"].append(fusion.majority_vote(propagated[j], label_ids=structures))
    fused["globally weighted"].append(fusion.weighted_vote(propagated[j], global_weights(j), label_ids=structures))
    fused["locally weighted"].append(fusion.locally_weighted_vote(propagated[j], warped_images[j], t["image"][0],
                                                                  window=5, label_ids=structures))
fused_dice = {name: np.array([metrics.dice(t["seg"][0], maps[j], structures).mean for j, t in enumerate(targets)])
              for name, maps in fused.items()}
rows = {"single atlas, mean": single.mean(1), "single atlas, best in hindsight": single.max(1), **fused_dice}
print(f"{'mean Dice over ' + str(n_targets) + ' targets':<34}" + "".join(f"target {j}  " for j in range(n_targets)) + " mean")
for name, values in rows.items():
    print(f"{name:<34}" + "".join(f"{v:8.3f}  " for v in values) + f"{values.mean():6.3f}")

best_method = max(fused_dice, key=lambda k: fused_dice[k].mean())
best_fused, best_single = fused_dice[best_method].mean(), single.max(1).mean()
print(f"\n-> the best fusion, {best_method} ({best_fused:.3f}), "
      f"{'beats' if best_fused > best_single else 'does NOT beat'} the best single atlas in hindsight ({best_single:.3f}) "
      f"by {best_fused - best_single:+.3f}, and {'beats' if best_fused > single.mean() else 'does NOT beat'} a typical "
      f"atlas ({single.mean():.3f}) by {best_fused - single.mean():+.3f}")
order = sorted(fused_dice, key=lambda k: -fused_dice[k].mean())
print("-> ranking of the fusions: " + " > ".join(f"{k} ({fused_dice[k].mean():.3f})" for k in order))
"""),
code(r"""
j = 0
best_atlas = int(np.argmax(single[j]))
keep = torch.tensor(structures)
scored = lambda m: torch.where(torch.isin(m, keep), m, 0)        # unscored labels count as background
right_single, right_fused = [scored(m) == scored(targets[j]["seg"][0]) for m in (propagated[j][best_atlas], fused[best_method][j])]
print(f"target {j}, whole volume: {int((right_fused & ~right_single).sum())} voxels repaired by {best_method} voting, "
      f"{int((right_single & ~right_fused).sum())} broken, against the best single atlas ({best_atlas})")
fig = viz.plot_fusion(targets[j]["image"][0], targets[j]["seg"][0], propagated[j][best_atlas], fused[best_method][j],
                      labels=structures, names=(f"best single atlas ({best_atlas})", best_method))
display(fig)
"""),
md(r"""
Target 0, one slice: its own labels, the best single atlas's labels and the
fused labels (both with the reference's outlines in white), and where the two
differ (green: the fusion is right and the single atlas wrong; red: the other
way round). The Dice in the titles are over the whole volume, and so are the
counts printed above the figure. Fusion repairs a voxel where the best atlas
slipped and enough of the others did not, and breaks one where the others
slipped the same way.
"""),
code(r"""
fig = viz.plot_dice({f"best single atlas ({best_atlas})": metrics.dice(targets[j]["seg"][0], propagated[j][best_atlas], structures),
                     **{name: metrics.dice(targets[j]["seg"][0], maps[j], structures) for name, maps in fused.items()}})
display(fig)
"""),
md(r"""
## 4. Template selection: one image for every target

Template-based propagation registers every target to **one** labelled image,
the template, and propagates its labels: one registration per target instead
of one per atlas and target. Which template? It is chosen **once, before any
target is seen**, from the labelled images we have: the classic choice is the
most representative one, the image most similar on average to all the others
(`fusion.select_template(atlas_images)`, the population's centre). The review
(Wang and Zhang) goes one step further: with a large library, choose a
template *per target* (`select_template(library, target=...)`), because the
template-target error is the easier term of their error bound to make small.

We measure the common template: its Dice on every target, against the
average candidate (a template picked without looking) and the best and worst
candidate in hindsight. The candidates are the atlases, whose propagated
labels we already have.
"""),
code(r"""
template = fusion.select_template(atlas_images)
chosen = template.selected[0]
per_template = single.mean(0)                      # mean Dice over targets of each candidate template
print(f"criterion: {template.criterion}")
print("scores:", np.round(template.scores, 4), "-> template", chosen)
print("mean Dice over the targets of each candidate template:", per_template)
rank = int(np.argsort(-per_template).tolist().index(chosen)) + 1
print(f"the selected template (atlas {chosen}): Dice {per_template[chosen]:.3f} "
      f"({'above' if per_template[chosen] > per_template.mean() else 'NOT above'} the average candidate, "
      f"{per_template.mean():.3f}; rank {rank} of {n_atlases}; best {per_template.max():.3f}, "
      f"worst {per_template.min():.3f})")
"""),
md(r"""
## 5. Atlas selection: $k$ atlases per target

Registering and fusing every atlas costs one registration per atlas and
target, and a bad atlas can outvote good ones. **Atlas selection** (Aljabar et
al., NeuroImage 2009) keeps, *for each target*, the $k$ atlases most similar to
it, and fuses only those. The similarity must be computable *without* the
target's labels and, to save the registrations of the others, *before*
registration: here the global NCC of each atlas image with the target in the
common (MNI) space, `fusion.select_atlases`. We compare with $k$ atlases chosen
at random (every possible choice, averaged), fused the same way (majority).
"""),
code(r"""
k = 3
selected_dice, random_dice, chosen_sets = [], [], []
for j, t in enumerate(targets):
    pick = fusion.select_atlases(t["image"][0], atlas_images, k)
    chosen_sets.append(pick.selected)
    selected_dice.append(metrics.dice(t["seg"][0], fusion.majority_vote([propagated[j][i] for i in pick.selected],
                                                                        label_ids=structures), structures).mean)
    random_dice.append(np.mean([metrics.dice(t["seg"][0], fusion.majority_vote([propagated[j][i] for i in c],
                                                                               label_ids=structures), structures).mean
                                for c in itertools.combinations(range(n_atlases), k)]))
    print(f"target {j}: selected atlases {pick.selected}, fused Dice {selected_dice[-1]:.3f}; "
          f"{k} random atlases {random_dice[-1]:.3f} on average; all {n_atlases} {fused_dice['majority'][j]:.3f}")
selected_dice, random_dice = np.array(selected_dice), np.array(random_dice)
print(f"-> over {n_targets} targets, the {k} selected atlases give {selected_dice.mean():.3f}, "
      f"{'above' if selected_dice.mean() > random_dice.mean() else 'NOT above'} {k} random ones "
      f"({random_dice.mean():.3f}), and {'above' if selected_dice.mean() > fused_dice['majority'].mean() else 'NOT above'} "
      f"all {n_atlases} ({fused_dice['majority'].mean():.3f}), with {k} registrations per target instead of {n_atlases}")

similarity = np.array([[fusion.image_similarity(t["image"][0], a) for a in atlas_images] for t in targets])
plt.figure(figsize=(5, 3.5))
for j in range(n_targets):
    plt.scatter(similarity[j], single[j], label=f"target {j}")
plt.xlabel("NCC with the target before registration"); plt.ylabel("Dice after propagation")
plt.legend(); plt.title("does similarity predict a good atlas?"); plt.show()
"""),
md(r"""
The two selections answer different questions. Template selection picks one
image, once, for a whole population, and pays one registration per target; it
can only be as good as one atlas. Atlas selection picks per target and fuses,
and pays $k$ registrations per target. The review's template selection sits
between them: one template per target, chosen from a library.

## Exercises

1. Change $\tau$ of the global weights to a tenth and to ten times the spread.
   Where do the results go, and which of the other two fusions does each end
   resemble?
2. Change the window of `fusion.locally_weighted_vote` from 5 to 3 and 9.
   What happens, and why?
3. Choose the template per target, `fusion.select_template(atlas_images,
   target=t["image"][0])`, as the review does. Is it the same as atlas selection
   with $k = 1$? Is it the best single atlas?
4. Replace instance optimisation by ANTs SyN (`regedu.classic.ants_syn`): do
   single atlases get better, and does fusion still add as much?

## Checks
"""),
code(r"""
assert single.mean() > unregistered.mean() + 0.02, \
    f"registration should improve the atlases' overlap with the targets: {unregistered.mean():.3f} -> {single.mean():.3f}"
for name, values in fused_dice.items():
    assert values.mean() > single.mean(), f"{name} voting should beat a typical single atlas: {values.mean():.3f} vs {single.mean():.3f}"
assert per_template[chosen] > per_template.mean(), \
    f"the most representative template should beat the average candidate: {per_template[chosen]:.3f} vs {per_template.mean():.3f}"
assert selected_dice.mean() > random_dice.mean(), \
    f"selecting atlases by similarity should beat a random choice on average: {selected_dice.mean():.3f} vs {random_dice.mean():.3f}"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("11_atlas_based_segmentation.ipynb", cells))
