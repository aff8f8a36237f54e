"""Notebook 13: trustworthy evaluation (inverse consistency, lambda on validation, surface
distances, FLE/FRE/TRE, label leakage, paired statistics)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 13 · Trustworthy evaluation

A registration paper's table is only as good as the way its numbers were made.
This notebook measures seven ways an evaluation can mislead, each on small 2D
brain pairs (or on simulated fiducials), so that every effect is a number you
compute here, not a claim you take on trust:

1. a field's inverse is not its negative;
2. registering a to b and b to a separately need not give inverse maps, and an
   inverse-consistency loss (ICON) is a fix, and you can measure whether it costs accuracy;
3. the regularisation weight $\lambda$ must be chosen on **validation** pairs:
   choosing it on the test pairs inflates the score you report;
4. Dice hides outliers that surface distances (HD95, ASD) expose;
5. the fiducial registration error (FRE) a system reports does not predict the
   target registration error (TRE) you care about;
6. training or optimising with Dice on the labels you then score with Dice
   inflates Dice (label leakage);
7. "A beats B" needs a paired test, and "not clearly different" has a precise meaning.

**Learning goals.** After this notebook you can

1. invert a displacement field and measure the inverse-consistency error (ICE);
2. add an inverse-consistency term to a registration and measure whether it costs accuracy;
3. select hyper-parameters on validation data and estimate the optimism of
   selecting on test data;
4. report HD95 and ASD beside Dice, and FLE, FRE and TRE for point-based registration;
5. keep the labels you evaluate with out of the objective, and compare two
   methods with a paired bootstrap interval and a Wilcoxon test.
"""),
code(PROFILE_CELL),
code(r"""
import time

import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt
from scipy.ndimage import binary_erosion, distance_transform_edt

from regedu import fiducials, losses, metrics
from regedu.classic import instance_optimisation
from regedu.datasets import BrainPairs, brain_slice, mni_brain
from regedu.evaluate import dice_per_pair, evaluate, identity, summary
from regedu.spatial import integrate_velocity, invert_field, random_field, warp
from regedu.stats import paired_test

started = time.perf_counter()
# 4 mm in ci, else 2 mm: in 2D, 1 mm (the gpu profile's grid) would cost 4x, and we expect it to teach nothing more.
atlas = mni_brain(4 if profile.name == "ci" else 2)
spacing = atlas.spacing_mm
template = brain_slice(atlas)             # its middle coronal slice: 2D keeps every experiment cheap
shape = template["image"].shape[1:]
grid = shape[0] / 40                      # sizes in pixels below scale with the grid (1 at 4 mm)
small = profile.name == "ci"
n_val, n_test = (6, 8) if small else (12, 16)
iterations = (60, 40) if small else (100, 60)

# Subject-to-subject pairs: both images are the template under its own random diffeomorphism,
# bias field and noise, each carrying the template's labels through the same warp.
pairs = BrainPairs(n_val + n_test, atlas=atlas, mode="subject", ndim=2, seed=1300, cache=True)
items = [pairs[i] for i in range(len(pairs))]
moving = torch.stack([p["moving"] for p in items])
fixed = torch.stack([p["fixed"] for p in items])
moving_seg = torch.stack([p["moving_seg"] for p in items])
fixed_seg = torch.stack([p["fixed_seg"] for p in items])
structures = metrics.labels_present(fixed_seg, moving_seg)
val, test = np.arange(n_val), np.arange(n_val, n_val + n_test)
ncc = losses.NCC(window=7)


def register(moving, fixed, weight, **options):
    # Dense instance optimisation (notebook 03), coarse to fine. A batch of pairs is optimised at
    # once: Adam scales every voxel's step on its own, so pairs in a batch do not interact
    # unless a term couples them (the inverse-consistency term of section 2 does, on purpose).
    options.setdefault("similarity", ncc)
    return instance_optimisation(moving, fixed, weight=weight, levels=(2, 1), iterations=iterations,
                                 lr=0.1, progress=False, **options)


def pair_dice(fixed_seg, moving_seg, disp, labels=structures):
    # Mean Dice over `labels` of each pair: moving labels warped with nearest neighbour.
    return dice_per_pair(fixed_seg, moving_seg, disp, labels)


print(f"{len(items)} pairs of {tuple(shape)} slices at {spacing:g} mm ({n_val} validation, {n_test} test), "
      f"{len(structures)} structures")
"""),
md(r"""
## 1. Inverting a field

A displacement $u$ defines $\varphi(x) = x + u(x)$. Its inverse $\varphi^{-1}$ has a
displacement $v$ with $v(x) + u(x + v(x)) = 0$: **not** $v = -u$, because $u$ is
read at the displaced point $x + v(x)$, not at $x$. The negative is the inverse
only for a translation. `regedu.spatial.invert_field` solves the equation by
fixed-point iteration, and `regedu.metrics.inverse_consistency_error` measures
how far $\varphi_u \circ \varphi_v$ and $\varphi_v \circ \varphi_u$ are from the
identity (the inverse-consistency error, ICE, in mm here).

The field: a smooth random velocity, tapered to zero at the image border (so
that the inverse exists on the whole image) and integrated by scaling and
squaring (notebook 05): a diffeomorphism $u$ that makes a subject,
$\text{subject}(x) = \text{template}(x + u(x))$. Its inverse should carry the
subject's labels back onto the template's.
"""),
code(r"""
taper = torch.outer(torch.sin(torch.linspace(0, np.pi, shape[0])), torch.sin(torch.linspace(0, np.pi, shape[1])))
u = integrate_velocity(random_field(shape, 2.0 * grid, points=5, cubic=True, seed=0) * taper)
template_seg = torch.as_tensor(template["seg"])[None, None]
subject_seg = warp(template_seg, u, mode="nearest")
inverses = {"-u (naive)": -u, "invert_field(u)": invert_field(u)}
ice_inverse, dice_back = {}, {}
for name, v in inverses.items():
    ice_inverse[name] = metrics.inverse_consistency_error(u, v, spacing=spacing)["ice_mean"]
    back = warp(subject_seg, v, mode="nearest")[0, 0]
    dice_back[name] = metrics.dice(template_seg[0, 0], back, structures).mean
    print(f"{name:>16}: ICE {ice_inverse[name]:.3f} mm, Dice of the labels carried back {dice_back[name]:.3f}")
print(f"largest displacement {float(u.norm(dim=1).max()) * spacing:.1f} mm; the numerical inverse has "
      f"{ice_inverse['-u (naive)'] / ice_inverse['invert_field(u)']:.0f}x lower ICE than -u and carries the "
      f"labels back {'better' if dice_back['invert_field(u)'] > dice_back['-u (naive)'] else 'NOT better'}")

maps = {name: metrics.inverse_consistency_map(u, v, spacing=spacing)[0] for name, v in inverses.items()}
top = float(max(m.max() for m in maps.values()))
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
im = axes[0].imshow(u[0].norm(dim=0) * spacing, cmap="viridis")
fig.colorbar(im, ax=axes[0], label="|u| (mm)")
axes[0].set_title("the field's length")
for ax, (name, m) in zip(axes[1:], maps.items()):
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=top)
    fig.colorbar(im, ax=ax, label="|phi_u o phi_v (x) - x| (mm)")
    ax.set_title(f"ICE map, v = {name}")
for ax in axes:
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 2. Inverse consistency and symmetric registration

Register a to b and, separately, b to a: nothing makes the two maps inverse to
each other, and a pipeline that uses both (a template built from both
directions, an atlas mapped to a subject and back) inherits the mismatch.
ICON (Greer et al., ICCV 2021) registers both ways and adds the penalty
$\|\varphi_{ab}\circ\varphi_{ba} - \mathrm{id}\|^2$ (`regedu.losses.inverse_consistency`;
GradICON, Tian et al. CVPR 2023, penalises its gradient instead).

We run instance optimisation on the test pairs both ways round, in one batch
(moving $= [a, b]$, fixed $= [b, a]$), with and without the ICON term. The
regulariser closes over the batch, so the term couples each pair's two
directions. Both runs use $\lambda = 1$ for the diffusion term (section 3 shows how to choose
$\lambda$ honestly). We report ICE and, since a penalty can buy consistency by
giving up accuracy, Dice in both directions.
"""),
code(r"""
a, b = moving[test], fixed[test]
a_seg, b_seg = moving_seg[test], fixed_seg[test]
n = len(test)
lam_icon, icon_weight = 1.0, 1.0


def diffusion_and_icon(u):
    # The first half of the batch registers a to b, the second half b to a.
    return lam_icon * losses.diffusion(u) + icon_weight * losses.inverse_consistency(u[:n], u[n:])


both = {"without ICON": register(torch.cat([a, b]), torch.cat([b, a]), lam_icon).disp,
        "with ICON": register(torch.cat([a, b]), torch.cat([b, a]), 1.0, regulariser=diffusion_and_icon).disp}
ice_pairs, dice_pairs, folding = {}, {}, {}
for name, d in both.items():
    ice_pairs[name] = np.array([metrics.inverse_consistency_error(d[i:i + 1], d[n + i:n + i + 1],
                                                                 spacing=spacing)["ice_mean"] for i in range(n)])
    dice_pairs[name] = (pair_dice(b_seg, a_seg, d[:n]) + pair_dice(a_seg, b_seg, d[n:])) / 2
    folding[name] = metrics.folding_stats(d)["percent_folding"]
    print(f"{name:>12}: ICE {ice_pairs[name].mean():.3f} mm, Dice (both ways) {dice_pairs[name].mean():.3f}, "
          f"{folding[name]:.2f} % folding")
ice_ratio = ice_pairs["without ICON"].mean() / ice_pairs["with ICON"].mean()
dice_change = dice_pairs["with ICON"].mean() - dice_pairs["without ICON"].mean()
print(f"-> the ICON term {'lowers' if ice_ratio > 1 else 'does NOT lower'} ICE ({ice_ratio:.1f}x) and "
      f"{'raises' if dice_change > 0 else 'lowers'} mean Dice by {abs(dice_change):.3f}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
maps = {name: metrics.inverse_consistency_map(d[:1], d[n:n + 1], spacing=spacing)[0] for name, d in both.items()}
top = float(max(m.max() for m in maps.values()))
for ax, (name, m) in zip(axes, maps.items()):
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=top)
    fig.colorbar(im, ax=ax, label="ICE (mm)")
    ax.set_title(f"test pair 0, {name}")
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 3. Choose $\lambda$ on validation pairs, report on test pairs

The diffusion weight $\lambda$ trades similarity for smoothness, and the best
value depends on the data. We sweep it, score every pair at every value, and
pick $\lambda$ by the mean Dice of the **validation** pairs; the test pairs are
touched once, to report the chosen value. Picking on the test pairs instead
reports the maximum of several noisy scores, which is biased upwards (the
winner's curse). How much? Split all pairs at random many times into a set to
choose on and a fresh set, and compare the chosen $\lambda$'s score on both.
"""),
code(r"""
lambdas = [0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0]
scores = np.zeros((len(items), len(lambdas)))            # Dice of every pair at every lambda
fields, folding_lambda = {}, []
for j, lam in enumerate(lambdas):
    fields[lam] = register(moving, fixed, lam).disp
    scores[:, j] = pair_dice(fixed_seg, moving_seg, fields[lam])
    folding_lambda.append(metrics.folding_stats(fields[lam])["percent_folding"])
val_curve, test_curve = scores[val].mean(0), scores[test].mean(0)
j_val, j_test = int(np.argmax(val_curve)), int(np.argmax(test_curve))
lam_val = lambdas[j_val]
print(f"chosen on validation: lambda = {lam_val:g}; its test Dice {test_curve[j_val]:.3f} (the honest report)")
print(f"chosen on test:       lambda = {lambdas[j_test]:g}; its test Dice {test_curve[j_test]:.3f} "
      f"({test_curve[j_test] - test_curve[j_val]:+.4f})")

print("% of pixels folded (det J <= 0) at each lambda: "
      + ", ".join(f"{lam:g}: {f:.2f}" for lam, f in zip(lambdas, folding_lambda)))

rng = np.random.default_rng(0)
j_fixed = lambdas.index(1.0)                             # a value fixed in advance: no choice made on the data
gap_chosen, gap_fixed = [], []
for _ in range(2000):
    order = rng.permutation(len(items))
    choose_on, fresh = order[:n_test], order[n_test:]
    j = int(np.argmax(scores[choose_on].mean(0)))
    gap_chosen.append(scores[choose_on, j].mean() - scores[fresh, j].mean())
    gap_fixed.append(scores[choose_on, j_fixed].mean() - scores[fresh, j_fixed].mean())
optimism, optimism_fixed = float(np.mean(gap_chosen)), float(np.mean(gap_fixed))
print(f"over 2000 random splits, the Dice of the chosen lambda on the pairs it was chosen on exceeds its Dice "
      f"on fresh pairs by {optimism:+.4f} on average; for lambda = 1 fixed in advance the gap is {optimism_fixed:+.4f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].semilogx(lambdas, val_curve, "o-", label=f"validation ({n_val} pairs)")
axes[0].semilogx(lambdas, test_curve, "s-", label=f"test ({n_test} pairs)")
axes[0].axvline(lam_val, color="C0", ls=":", label=f"chosen on validation ({lam_val:g})")
axes[0].axvline(lambdas[j_test], color="C1", ls="--", label=f"chosen on test ({lambdas[j_test]:g})")
axes[0].set_xlabel("diffusion weight lambda"); axes[0].set_ylabel("mean Dice"); axes[0].legend(fontsize=8)
bins = np.linspace(min(gap_chosen + gap_fixed), max(gap_chosen + gap_fixed), 40)
axes[1].hist(gap_fixed, bins, alpha=0.6, label="lambda fixed in advance")
axes[1].hist(gap_chosen, bins, alpha=0.6, label="lambda chosen on the same pairs")
axes[1].axvline(0, color="k", lw=0.8)
axes[1].set_xlabel("Dice on the pairs used to choose - Dice on fresh pairs"); axes[1].set_ylabel("splits")
axes[1].legend(fontsize=8)
plt.tight_layout(); plt.show()
"""),
md(r"""
## 4. Surface distances beside Dice

Dice counts overlapping voxels, so a few wrong voxels far from where they belong
barely move it. The 95th-percentile Hausdorff distance (HD95) and the average
symmetric surface distance (ASD) measure *how far* the boundaries are apart
(`regedu.metrics.hausdorff95`, `average_surface_distance`); `evaluate(...,
surface=True)` adds both to every record, in mm with the spacing given.
"""),
code(r"""
test_pairs = [items[i] for i in test]


def chosen_method(moving_image, fixed_image):
    # evaluate calls the method once per pair. The sweep has already registered every pair at
    # lam_val, so the method returns that field instead of optimising the same pair again.
    i = next(i for i in test if torch.equal(moving[i], moving_image[0]) and torch.equal(fixed[i], fixed_image[0]))
    return fields[lam_val][i:i + 1]


evaluations = [evaluate(m, test_pairs, labels=structures, name=name, spacing=spacing, surface=True, progress=False)
               for name, m in [("identity", identity), (f"instance optimisation, lambda = {lam_val:g}", chosen_method)]]
summary(evaluations, metrics=("dice", "hd95", "asd", "percent_folding"), by=None)
"""),
md(r"""
Now a single local failure: on one test pair, the good field plus a narrow
bump that drags a far-away structure's labels into the wrong place (the kind of
spike an optimiser or a network can make where the images give no guidance).
"""),
code(r"""
i_pair = test[0]
good = fields[lam_val][i_pair:i_pair + 1]
warped_good = warp(moving_seg[i_pair:i_pair + 1], good, mode="nearest")[0, 0]
k = 4 if 4 in structures else structures[0]              # the left lateral ventricle
wm = 2 if 2 in structures else structures[-1]            # the left cerebral white matter, large: the spike lands in it
# A white-matter pixel p `reach` pixels from the ventricle, and the ventricle's pixel q nearest to it;
# the bump makes p look where q looks in the moving image, so the ventricle's label appears at p.
reach = round(8 * grid)
labels_good = warped_good.numpy()
distance, nearest = distance_transform_edt(labels_good != k, return_indices=True)
candidates = np.argwhere((labels_good == wm) & (np.abs(distance - reach) < 0.5))
p = candidates[len(candidates) // 2]
q = nearest[:, p[0], p[1]]
jump = (q + good[0, :, q[0], q[1]].numpy()) - (p + good[0, :, p[0], p[1]].numpy())
yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
sigma = 1.5 * grid
bump = torch.tensor(jump[:, None, None] * np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * sigma ** 2)),
                    dtype=torch.float32)[None]
warped_bad = warp(moving_seg[i_pair:i_pair + 1], good + bump, mode="nearest")[0, 0]
truth = fixed_seg[i_pair, 0]

rows = {}
for name, w in [("good field", warped_good), ("good field + one spike", warped_bad)]:
    dsc = metrics.dice(truth, w, structures)
    hd = metrics.hausdorff95(truth, w, structures, spacing=spacing)
    asd = metrics.average_surface_distance(truth, w, structures, spacing=spacing)
    rows[name] = {"mean Dice": dsc.mean, f"Dice of {k}": dsc.as_dict()[k], f"Dice of {wm}": dsc.as_dict()[wm],
                  "mean HD95 (mm)": hd.mean,
                  f"HD95 of {k} (mm)": hd.as_dict()[k], "mean ASD (mm)": asd.mean, f"ASD of {k} (mm)": asd.as_dict()[k]}
outlier = pd.DataFrame(rows).T
change = outlier.iloc[1] - outlier.iloc[0]
print(f"the spike moves {int((warped_bad != warped_good).sum())} of {warped_good.numel()} pixels' labels: "
      f"mean Dice changes by {change['mean Dice']:+.4f}, the Dice of structure {wm}, where it lands, by "
      f"{change[f'Dice of {wm}']:+.4f}, the HD95 of structure {k} by "
      f"{change[f'HD95 of {k} (mm)']:+.1f} mm (from {outlier.iloc[0][f'HD95 of {k} (mm)']:.1f} mm)")
display(outlier.round(3))

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
for ax, (name, w) in zip(axes, [("good field", warped_good), ("with the spike", warped_bad)]):
    code_map = (truth == k).int() + 2 * (w == k).int()
    im = ax.imshow(code_map, cmap=plt.get_cmap("viridis", 4), vmin=-0.5, vmax=3.5)
    bar = fig.colorbar(im, ax=ax, ticks=[0, 1, 2, 3])
    bar.ax.set_yticklabels(["neither", "fixed only", "warped only", "both"])
    ax.set_title(f"structure {k}, {name}")
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 5. FLE, FRE and TRE

Point-based registration fits a rigid transform to $N$ *fiducials* (markers,
landmarks) located in both images (`regedu.fiducials`). Three errors
(Fitzpatrick, West and Maurer, IEEE TMI 1998):

* **FLE**, the fiducial localisation error: the noise of locating a fiducial;
* **FRE**, the fiducial registration error: the RMS residual at the fiducials
  after the fit, what the software reports;
* **TRE**, the target registration error: the error at a point *not* used in
  the fit, what matters (here the centres of deep structures, in mm).

Theory: $\langle FRE^2\rangle = (1 - 2/N)\langle FLE^2\rangle$ in 3D
(`expected_fre`), TRE shrinks with more and more widely spread fiducials
(`expected_tre`), and in one registration FRE and TRE are uncorrelated
(Fitzpatrick, IEEE TMI 2009). We check all three by simulation: markers on
the scalp of the 3D template, localised with FLE = 2 mm.
"""),
code(r"""
head = atlas.seg > 0
scalp = np.argwhere(head & ~binary_erosion(head)) * spacing         # surface points, mm
names = {17: "L hippocampus", 53: "R hippocampus", 10: "L thalamus"}
targets = np.array([np.argwhere(atlas.seg == s).mean(0) * spacing for s in names])


def spread_out(points, count, start):
    # Farthest-point sampling: each new marker as far as possible from those chosen so far.
    chosen = [start]
    distance = np.linalg.norm(points - points[start], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return points[chosen]


fle, trials = 2.0, (2000 if small else 10000)
markers = spread_out(scalp, 16, start=0)
counts = [4, 6, 8, 12, 16]
sims = {c: fiducials.simulate(markers[:c], targets, fle, trials=trials, seed=c) for c in counts}
table = pd.DataFrame({c: {"RMS FRE (sim)": np.sqrt((s.fre ** 2).mean()), "FRE (formula)": s.expected_fre,
                          "RMS TRE (sim)": np.sqrt((s.tre ** 2).mean()),
                          "TRE (formula)": np.sqrt((s.expected_tre ** 2).mean())} for c, s in sims.items()}).T
table.index.name = "fiducials"
display(table.round(3))

six = sims[6]
correlation = six.correlation()
print(f"6 fiducials: correlation of FRE and TRE across {trials} registrations: "
      + ", ".join(f"{names[s]} {r:+.3f}" for s, r in zip(names, correlation)))
# The same number of markers, all on one side of the head (within 50 mm of one of them).
near = scalp[np.linalg.norm(scalp - markers[0], axis=1) < 50]
clustered = fiducials.simulate(spread_out(near, 6, start=0), targets, fle, trials=trials, seed=6)


def rms(x):
    return float(np.sqrt((x ** 2).mean()))


print(f"6 fiducials spread around the head: RMS FRE {rms(six.fre):.2f} mm, RMS TRE {rms(six.tre):.2f} mm")
print(f"6 fiducials on one side:            RMS FRE {rms(clustered.fre):.2f} mm, RMS TRE {rms(clustered.tre):.2f} mm "
      f"({rms(clustered.tre) / rms(six.tre):.1f}x the TRE at {rms(clustered.fre) / rms(six.fre):.2f}x the FRE)")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].plot(counts, table["RMS FRE (sim)"], "o", color="C0", label="FRE, simulated")
axes[0].plot(counts, table["FRE (formula)"], "-", color="C0", label="FRE, sqrt(1 - 2/N) FLE")
axes[0].plot(counts, table["RMS TRE (sim)"], "s", color="C1", label="TRE, simulated")
axes[0].plot(counts, table["TRE (formula)"], "-", color="C1", label="TRE, expected_tre")
axes[0].axhline(fle, color="k", ls=":", label="FLE")
axes[0].set_xlabel("number of fiducials N"); axes[0].set_ylabel("RMS error (mm)"); axes[0].legend(fontsize=8)
axes[1].scatter(six.fre, six.tre[:, 0], s=3, alpha=0.4)
axes[1].set_xlabel("FRE of one registration (mm)"); axes[1].set_ylabel(f"TRE at the {names[17]} (mm)")
axes[1].set_title(f"6 fiducials, r = {correlation[0]:+.3f}")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 6. Label leakage

Semi-supervised registration (VoxelMorph's Dice loss, notebook 06) uses labels
in the objective. Scored with Dice on the *same* labels, it is graded on what
it was told: on those structures the score measures, besides how well it
aligns anatomy, how well it fitted the answers, so it overstates the first. We split the structures in two: half go into the loss
(local NCC + soft Dice on their one-hot maps), the other half are kept out, and
we score both halves, for the image-only registration of section 3 and for the
one that saw labels.
"""),
code(r"""
in_loss, held_out = structures[::2], structures[1::2]


def with_labels(image, seg):
    # The image as channel 0, the one-hot maps of the loss's structures behind it (warped linearly).
    return torch.cat([image, losses.one_hot(seg, in_loss)], 1)


def ncc_and_dice(fixed, warped):
    return ncc(fixed[:, :1], warped[:, :1]) + losses.soft_dice(fixed[:, 1:], warped[:, 1:])


leak_fields = {"image only (NCC)": fields[lam_val][test],
               "NCC + Dice on half the labels": register(with_labels(moving[test], moving_seg[test]),
                                                        with_labels(fixed[test], fixed_seg[test]), lam_val,
                                                        similarity=ncc_and_dice).disp}
leak = pd.DataFrame({name: {"Dice, structures in the loss": pair_dice(fixed_seg[test], moving_seg[test], d, in_loss).mean(),
                            "Dice, structures kept out": pair_dice(fixed_seg[test], moving_seg[test], d, held_out).mean()}
                     for name, d in leak_fields.items()}).T
gain = leak.iloc[1] - leak.iloc[0]
print(f"with labels in the loss, Dice rises by {gain.iloc[0]:+.3f} on the structures in the loss and by "
      f"{gain.iloc[1]:+.3f} on those kept out: scoring the former would overstate the gain "
      f"{gain.iloc[0] / max(gain.iloc[1], 1e-3):.0f}x" if gain.iloc[1] > 0 else
      f"with labels in the loss, Dice changes by {gain.iloc[0]:+.3f} on the structures in the loss and by "
      f"{gain.iloc[1]:+.3f} on those kept out")
leak.round(3)
"""),
md(r"""
## 7. Is the difference real? A paired comparison

Two methods scored on the same pairs differ pair by pair, and the pairs
themselves can differ more than the methods do (the two spreads printed below
say which is larger here). The question is therefore whether the *per-pair differences*
sit consistently on one side of zero.
`regedu.stats.paired_test` gives a bootstrap 95 % confidence interval of the mean
difference and the Wilcoxon signed-rank test, and writes the verdict from them:
"beats" only when the interval excludes 0 *and* the Wilcoxon p-value is below 0.05.

**"Do not differ clearly"** does not mean "equal": it means that these pairs
cannot tell. The interval is the useful part: differences outside it are
implausible given the data, differences inside it (0 included) are not ruled out.
More pairs narrow it.
"""),
code(r"""
dice_identity = evaluations[0].table()["dice_mean"].to_numpy()
dice_chosen = evaluations[1].table()["dice_mean"].to_numpy()
comparisons = {
    "registration vs none (Dice)": paired_test(dice_identity, dice_chosen, names=("identity", "registration"),
                                               metric="Dice"),
    "ICON vs not (ICE)": paired_test(ice_pairs["without ICON"], ice_pairs["with ICON"],
                                     names=("without ICON", "with ICON"), metric="mm ICE", higher_is_better=False),
    "ICON vs not (Dice)": paired_test(dice_pairs["without ICON"], dice_pairs["with ICON"],
                                      names=("without ICON", "with ICON"), metric="Dice"),
}
icon_gain = dice_pairs["with ICON"] - dice_pairs["without ICON"]
print(f"Dice without ICON varies across the {n} test pairs with std {dice_pairs['without ICON'].std():.3f}; "
      f"the per-pair difference ICON - not has mean {icon_gain.mean():+.3f} and std {icon_gain.std():.3f}: the pairs "
      + ("differ more than the methods do." if dice_pairs['without ICON'].std() > icon_gain.std()
         else "differ less than the methods do."))
for name, result in comparisons.items():
    print(f"{name}: {result.summary()}")

fig, axes = plt.subplots(1, len(comparisons), figsize=(13, 3.6))
for ax, (name, result), diffs in zip(axes, comparisons.items(),
                                     [dice_chosen - dice_identity, ice_pairs["with ICON"] - ice_pairs["without ICON"],
                                      icon_gain]):
    ax.plot(np.zeros(len(diffs)) + np.linspace(-0.1, 0.1, len(diffs)), diffs, "o", alpha=0.7, label="pairs")
    boot = result.bootstrap
    ax.errorbar([0.4], [boot.mean_difference], yerr=[[boot.mean_difference - boot.ci_low],
                                                      [boot.ci_high - boot.mean_difference]],
                fmt="s", color="C3", capsize=5, label="mean, 95 % CI")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(-0.5, 0.9); ax.set_xticks([])
    ax.set_title(name, fontsize=10); ax.set_ylabel(f"{boot.names[1]} - {boot.names[0]} ({boot.metric})"); ax.set_xlabel(f"{boot.n} test pairs")
axes[0].legend(fontsize=8)
plt.tight_layout(); plt.show()
print(f"notebook run time {time.perf_counter() - started:.0f} s")
"""),
md(r"""
## Exercises

1. Raise `icon_weight` in section 2 to 10 and lower it to 0.1. Plot ICE and Dice
   against the weight: does consistency ever cost accuracy, and from which weight?
2. Replace the ICON term by GradICON (`kind="gradicon"`). Compare ICE and Dice.
3. In section 3, shrink the set you choose on to 3 pairs. What happens to the
   optimism, and why?
4. In section 5, move the targets farther from the fiducials' centroid. Which
   error grows, FRE or TRE?
5. In section 7, if "ICON vs not (Dice)" is not clear, how many test pairs
   would make it clear, if the mean difference stayed the same? (Hint: the interval narrows like $1/\sqrt{n}$.)

## Checks
"""),
code(r"""
# 1. Inverting a field
assert ice_inverse["-u (naive)"] > 0.05 * spacing, \
    f"the field should be strong enough for -u to fail as an inverse: ICE {ice_inverse['-u (naive)']:.3f} mm"
assert ice_inverse["invert_field(u)"] < 0.2 * ice_inverse["-u (naive)"], \
    f"invert_field should beat -u by 5x in ICE: {ice_inverse}"
# 2. ICON
assert ice_pairs["with ICON"].mean() < 0.5 * ice_pairs["without ICON"].mean(), \
    f"the ICON term should halve ICE at least: {ice_pairs['with ICON'].mean():.3f} vs {ice_pairs['without ICON'].mean():.3f} mm"
assert dice_pairs["without ICON"].mean() > pair_dice(b_seg, a_seg, torch.zeros_like(both["with ICON"][:n])).mean(), \
    "the registrations should beat no registration"
# 3. lambda on validation
assert val_curve.max() - val_curve.min() > 0.01, f"lambda should matter: validation Dice {val_curve.round(3)}"
assert optimism > 0 and optimism > optimism_fixed, \
    f"choosing on the scored pairs should look optimistic: {optimism:+.4f} vs {optimism_fixed:+.4f} for a fixed lambda"
# 4. Dice vs HD95
assert abs(change["mean Dice"]) < 0.01, f"the spike should barely move mean Dice: {change['mean Dice']:+.4f}"
assert change[f"HD95 of {k} (mm)"] > 0.5 * outlier.iloc[0][f"HD95 of {k} (mm)"], \
    f"HD95 should expose the spike: {outlier[f'HD95 of {k} (mm)'].round(1).tolist()} mm"
# 5. FLE, FRE, TRE
assert np.allclose(table["RMS FRE (sim)"], table["FRE (formula)"], rtol=0.05), "FRE should follow sqrt(1 - 2/N) FLE"
assert np.allclose(table["RMS TRE (sim)"], table["TRE (formula)"], rtol=0.1), "TRE should follow expected_tre"
assert np.all(np.diff(table["RMS FRE (sim)"]) > 0) and np.all(np.diff(table["RMS TRE (sim)"]) < 0), \
    "more fiducials: FRE should rise toward FLE while TRE falls"
assert np.all(np.abs(correlation) < 0.1), f"FRE should not predict TRE: correlations {correlation.round(3)}"
assert rms(clustered.tre) > 1.5 * rms(six.tre) and abs(rms(clustered.fre) / rms(six.fre) - 1) < 0.1, \
    "markers on one side should leave FRE as it is and raise TRE"
# 6. label leakage
assert gain.iloc[0] > gain.iloc[1] + 0.05, \
    f"Dice on the structures in the loss should gain much more than on those kept out: {gain.round(3).to_dict()}"
# 7. paired comparison
ice_result = comparisons["ICON vs not (ICE)"]
assert ice_result.bootstrap.ci_high < 0 and ice_result.wilcoxon_p < 0.05, \
    f"ICON should lower ICE clearly: {ice_result.summary()}"
reg_result = comparisons["registration vs none (Dice)"]
assert reg_result.bootstrap.ci_low > 0 and reg_result.wilcoxon_p < 0.05, \
    f"registration should beat no registration clearly: {reg_result.summary()}"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("13_trustworthy_evaluation.ipynb", cells))
