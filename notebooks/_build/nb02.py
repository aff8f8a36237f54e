"""Notebook 02: similarity and regularity."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 02 · Similarity and regularity

A registration method is judged by two questions: *do the images now look
alike?* (similarity) and *is the transformation plausible?* (regularity).
Unsupervised networks such as VoxelMorph are trained on exactly this sum,

$$\mathcal{L}(F, M, u) = \mathcal{L}_{\text{sim}}\big(F,\; M \circ \varphi\big) + \lambda\, \mathcal{L}_{\text{reg}}(u),$$

so before training anything we study both terms on their own.

**Learning goals.** After this notebook you can

1. compute MSE, local NCC and mutual information (MI) and say which stays
   trustworthy when the two images differ in brightness or contrast;
2. explain the diffusion regulariser and read the trade-off that its weight
   $\lambda$ controls (image match vs. smooth, plausible field);
3. compute Dice on **label maps**, and explain why Dice on raw images means nothing;
4. read a Jacobian-determinant map, spot folding ($\det J \le 0$), and remove it
   by integrating a velocity field (scaling and squaring) instead of using the
   displacement directly.
"""),
code(PROFILE_CELL),
code(r"""
import numpy as np
import torch
import matplotlib.pyplot as plt
import ipywidgets as widgets

from regedu import losses, metrics, spatial, viz
from regedu.classic import instance_optimisation
from regedu.datasets import retina_green
from regedu.spatial import warp, integrate_velocity

size = profile.fundus_size
retina, fov = retina_green(size)                 # green channel in [0, 1], fundus mask
image = torch.from_numpy(retina)[None, None]      # (1, 1, H, W)
fov_t = torch.from_numpy(fov)
"""),
md(r"""
## 1. Three similarity measures

All regedu losses are *lower is better*.

* **MSE**, the mean squared difference $\frac1N\sum_x (F(x) - W(x))^2$, with
  $W = M \circ \varphi$. Simple and fast, but it assumes the same intensity
  for the same tissue in both images.
* **Local NCC** (VoxelMorph's default): in a small window around each pixel,
  the squared correlation coefficient of $F$ and $W$, averaged and negated
  ($-1$ is perfect). It ignores a change of brightness and contrast (even an
  inversion) as long as it is smooth across the window.
* **MI**, mutual information: how much knowing $F(x)$ tells you about $W(x)$,
  computed from their joint histogram. It only asks that the intensity mapping
  be consistent, so it works across modalities (e.g. MRI to CT).

Experiment: the moving image is the fixed image itself (true shift 0) after an
intensity change. We slide it sideways and plot each measure against the
shift. A good measure has its minimum at 0.
"""),
code(r"""
changes = {
    "same intensities": image,
    "darker, low contrast: 0.5 F + 0.4": 0.5 * image + 0.4,
    "inverted: 1 - F": 1 - image,
}
shifts = np.arange(-12, 13)
measures = {
    "MSE": lambda f, w: losses.mse(f, w),
    "local NCC": lambda f, w: losses.ncc_local(f, w, window=9),
    "MI": lambda f, w: losses.mutual_information(f, w.clamp(0, 1), bins=32),
}
curves = {}
for change, moving in changes.items():
    for name, measure in measures.items():
        values = []
        for s in shifts:
            u = torch.zeros(1, 2, size, size)
            u[:, 1] = float(s)                      # slide along columns
            values.append(measure(image, warp(moving, u)).item())
        curves[change, name] = np.array(values)

optimum = {key: int(shifts[np.argmin(v)]) for key, v in curves.items()}
fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
for a, name in zip(ax, measures):
    for change in changes:
        v = curves[change, name]
        a.plot(shifts, (v - v.min()) / (np.ptp(v) + 1e-12), label=change)
    a.axvline(0, c="k", ls=":"); a.set_title(f"{name} (rescaled to [0, 1])"); a.set_xlabel("shift (px)")
    a.set_ylabel(f"{name}, rescaled (lower is better)")
ax[0].legend(fontsize=8)
plt.show()
print("shift at the minimum:")
for (change, name), s in optimum.items():
    print(f"  {name:9s} | {change:36s} | {s:+d} px")
"""),
md(r"""
With the same intensities all three agree. Under the mild change (darker, lower
contrast) the MSE minimum stays at or next to 0 on this image, but its value there
is far from zero: "small MSE means aligned" no longer holds, and the valley is
shallower. Under the inversion, a stand-in for a different modality, the MSE
minimum runs away to the end of the search range: MSE now rewards *misalignment*.
Local NCC and MI keep their minimum at 0 in every case. This is why FIRE
photographs taken with different illumination (notebook 04) are registered with
NCC, and why multi-modal registration uses MI.

## 2. Regularity: the diffusion regulariser

Similarity alone is a poorly posed objective: a dense field has two unknowns
per pixel, and many fields make the images look alike, including wild ones
that tear and fold the image, or that chase the noise. The **diffusion
regulariser** penalises the spatial gradient of the displacement,

$$\mathcal{L}_{\text{reg}}(u) = \frac{1}{N}\sum_x \|\nabla u(x)\|^2,$$

which is zero for any translation and grows with every wrinkle. Its weight
$\lambda$ sets the trade-off.

We make a pair with a *known* answer: the fixed image is the retina warped by a
smooth random field $u^*$, both images get independent noise, and we register
them by optimising the field directly (`regedu.classic.instance_optimisation`,
the classical iterative method that a network will later replace by one forward
pass) for several values of $\lambda$. Because we know $u^*$ we can measure the
**field error** $\|u - u^*\|$, which a real application never sees.
"""),
code(r"""
u_true = spatial.random_field((size, size), 1.0, points=8, cubic=True, seed=1)   # control points size/7 apart
u_true *= (size / 10) / u_true.norm(dim=1).max()      # the largest displacement: size / 10 pixels
noise = torch.Generator().manual_seed(0)
fixed = warp(image, u_true) + 0.03 * torch.randn(image.shape, generator=noise)   # F = M o phi*
moving = image + 0.03 * torch.randn(image.shape, generator=noise)


def field_error(u):
    return (u - u_true).norm(dim=1)[0][fov_t].mean().item()


weights = [0.0, 1e-3, 1e-2, 1e-1, 1.0]
runs = {}
for w in weights:
    runs[w] = instance_optimisation(moving, fixed, weight=w, levels=(4, 2, 1), iterations=(60, 60, 30),
                                    lr=0.2, progress=False)
table = {w: {"MSE": losses.mse(fixed, r.warped).item(), "diffusion": losses.diffusion(r.disp).item(),
             "% folding": metrics.folding_stats(r.disp)["percent_folding"], "field error (px)": field_error(r.disp),
             "seconds": r.seconds} for w, r in runs.items()}
identity_error = field_error(torch.zeros_like(u_true))
print(f"identity (no registration): field error {identity_error:.2f} px")
print(f"{'lambda':>8s} " + " ".join(f"{k:>17s}" for k in next(iter(table.values()))))
for w, row in table.items():
    print(f"{w:8.0e} " + " ".join(f"{v:17.4f}" for v in row.values()))
raw_error = table[0.0]["field error (px)"]
print(f"lambda = 0: field error {raw_error:.2f} px, {raw_error / identity_error - 1:+.0%} against doing nothing")
"""),
code(r"""
fig, ax = plt.subplots(1, 3, figsize=(14, 3.4))
lam = [max(w, 1e-4) for w in weights]            # lambda = 0 drawn at 1e-4 on the log axis
for a, key in zip(ax, ["MSE", "diffusion", "field error (px)"]):
    a.semilogx(lam, [table[w][key] for w in weights], "o-"); a.set_title(key); a.set_xlabel("λ (0 drawn at 1e-4)")
    a.set_ylabel(key)
ax[2].axhline(identity_error, c="k", ls=":", label="identity"); ax[2].legend()
plt.show()


def show_lambda(lam):
    r = runs[lam]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    maps = [((fixed - r.warped)[0, 0], dict(cmap="coolwarm", vmin=-0.3, vmax=0.3), "F - warped", "intensity difference"),
            (metrics.jacobian_determinant(r.disp)[0], dict(cmap="coolwarm", vmin=0, vmax=2),
             "det J (yellow: folds)", "det J (<= 0: folding)"),
            ((r.disp - u_true).norm(dim=1)[0], dict(vmin=0, vmax=size / 20), "field error |u - u*|", "pixels")]
    for a, (value, style, title, unit) in zip(ax, maps):
        fig.colorbar(a.imshow(value, **style), ax=a, shrink=0.8, label=unit)
        a.set_title(title); a.axis("off")
    ax[1].contour(maps[1][0] <= 0, levels=[0.5], colors="yellow")
    fig.suptitle(f"λ = {lam:g}: MSE {table[lam]['MSE']:.4f}, folding {table[lam]['% folding']:.2f} %, "
                 f"field error {table[lam]['field error (px)']:.2f} px")
    return fig


# Like ipywidgets.interact, but a static view (nbconvert, a web viewer) still gets the figure.
viz.InteractiveFigure(show_lambda, lam=widgets.SelectionSlider(options=weights, value=1e-2, description="λ"))
"""),
md(r"""
Read the three curves from left to right. With $\lambda = 0$ the field wrinkles
and folds to chase noise, and the field error stays close to that of *doing
nothing* (the last line printed under the table).
A moderate $\lambda$ gives the smallest error. With a large $\lambda$ the field is
so stiff that it cannot follow the true motion: the images match worse (MSE up)
and the error climbs back towards identity. The diffusion term (the field's
roughness) falls steadily as $\lambda$ grows: the field gets smoother. The checks at
the end of the notebook test each of these sentences on the table above. In a real problem there is no $u^*$, so $\lambda$ is
tuned on labels or landmarks of a validation set.

The playground below (from `regedu.viz`) shows the same trade-off on a random
field: raise the amplitude until the Jacobian turns yellow, then raise λ.
"""),
code(r"""
viz.DeformationPlayground(retina, amplitude=size / 12, smoothness=size / 13)
"""),
md(r"""
## 3. Dice: on label maps, never on images

Similarity measures compare intensities; **Dice** measures how well
*structures* overlap. For a label $\ell$ with region $A$ in the fixed label map
and $B$ in the warped moving label map,

$$\text{Dice}_\ell = \frac{2\,|A \cap B|}{|A| + |B|} \in [0, 1].$$

It needs **label maps** (segmentations), warped with nearest neighbour
(notebook 01). We make a toy 3-class map from the retina and reuse the
registration above.
"""),
code(r"""
from skimage import filters

smooth = filters.gaussian(retina, sigma=2)
q1, q2 = np.quantile(smooth[fov], [0.3, 0.9])
labels_moving = torch.from_numpy(np.where(fov, 1 + (smooth > q1) + (smooth > q2), 0).astype(np.int64))[None, None]
labels_fixed = warp(labels_moving, u_true)                     # the true fixed segmentation
best = min(weights, key=lambda w: table[w]["field error (px)"])
registered = runs[best].disp

dice_before = metrics.dice(labels_fixed, labels_moving, [1, 2, 3])
dice_after = metrics.dice(labels_fixed, warp(labels_moving, registered), [1, 2, 3])
print(f"labels, before registration: mean Dice {dice_before.mean:.3f}  per label {np.round(dice_before.per_label, 3)}")
print(f"labels, after  registration: mean Dice {dice_after.mean:.3f}  per label {np.round(dice_after.per_label, 3)}")
"""),
md(r"""
Now the mistake: treat the *images* as label maps. Quantised to 8 bits, every
grey level becomes a "structure", and Dice asks whether exactly the same grey
level sits at exactly the same pixel. Noise, interpolation and any intensity
change make that rare, however good the registration is: we also score the
**true** field $u^*$, a perfect registration. The opposite shortcut, Dice of
the image's non-zero region, is close to 1 with or without registration,
because the field of view covers most of the image (the cell prints how much).
"""),
code(r"""
def as_grey_levels(x):
    return (x.clamp(0, 1) * 255).round().long()


grey = range(1, 256)
warped_best = runs[best].warped
image_dice_before = metrics.dice(as_grey_levels(fixed), as_grey_levels(moving), grey).mean
image_dice_after = metrics.dice(as_grey_levels(fixed), as_grey_levels(warped_best), grey).mean
image_dice_truth = metrics.dice(as_grey_levels(fixed), as_grey_levels(warp(moving, u_true)), grey).mean
image_dice_itself = metrics.dice(as_grey_levels(fixed), as_grey_levels(fixed), grey).mean
label_dice_truth = metrics.dice(labels_fixed, warp(labels_moving, u_true), [1, 2, 3]).mean
nonzero_before = metrics.dice((fixed > 0.05).long(), (moving > 0.05).long(), [1]).mean
nonzero_after = metrics.dice((fixed > 0.05).long(), (warped_best > 0.05).long(), [1]).mean
coverage = (fixed > 0.05).float().mean().item()
print(f"'Dice' of grey levels: before {image_dice_before:.3f}, after {image_dice_after:.3f}, "
      f"true field {image_dice_truth:.3f}, image with itself {image_dice_itself:.3f}")
print(f"label Dice of the same registrations: after {dice_after.mean:.3f}, true field {label_dice_truth:.3f}")
print(f"'Dice' of non-zero region: before {nonzero_before:.3f}, after {nonzero_after:.3f} "
      f"(the non-zero region covers {coverage:.0%} of the image)")
print(f"Grey-level 'Dice' {'rises' if image_dice_after > image_dice_before else 'does not rise'} with the registration "
      f"({image_dice_before:.3f} -> {image_dice_after:.3f}, x{image_dice_after / image_dice_before:.0f}), but the perfect "
      f"registration scores {image_dice_truth:.3f}, {'below' if image_dice_truth < image_dice_after else 'above'} "
      f"the registration's, where its label Dice is {label_dice_truth:.3f}.")
"""),
md(r"""
Grey-level "Dice" does react to the registration (the last line printed says by
how much), but not to its quality: whether two pixels hold exactly the same grey
level is decided by the noise, so even the perfect registration scores far below 1,
and a registered field can score more than the truth (the last line says whether
it does here). A value tells you nothing about how good a registration is, and a
low one is no sign of failure. Keep this in mind for notebook 04, where a
survey reports a Dice of about 0.001 on fundus photographs.

## 4. Jacobian determinant and folding

The Jacobian $J = \partial\varphi/\partial x = I + \nabla u$ tells how a tiny square
around $x$ is deformed: $\det J > 1$ expands, $0 < \det J < 1$ shrinks, and
$\det J \le 0$ means the square was flipped inside out: **folding**. A folded
transformation maps two places to the same point, which no anatomy does.

A large, local displacement: push a disc of tissue 2.5 times its own radius
sideways. Neighbouring pixels that are not pushed are overtaken, and the
field folds.
"""),
code(r"""
rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
radius = size / 16
bump = torch.exp(-((rows - size / 2) ** 2 + (cols - size / 2) ** 2) / (2 * radius ** 2))
big = torch.zeros(1, 2, size, size)
big[0, 1] = 2.5 * radius * bump                    # up to 2.5 radii along the columns

# The same motion as a stationary velocity field: integrate it (scaling and squaring).
smooth_motion = integrate_velocity(big, steps=7)

fold_direct = metrics.folding_stats(big)["percent_folding"]
fold_svf = metrics.folding_stats(smooth_motion)["percent_folding"]
det_direct = metrics.jacobian_determinant(big)[0]
print(f"displacement used directly: {fold_direct:.2f} % folded pixels, min det J {det_direct.min():.2f}")
print(f"velocity integrated:        {fold_svf:.2f} % folded pixels, min det J {metrics.jacobian_determinant(smooth_motion).min():.2f}")
print(f"largest displacement: direct {big.abs().max():.1f} px, integrated {smooth_motion.abs().max():.1f} px")

fig, ax = plt.subplots(2, 3, figsize=(13, 8), layout="constrained")
for row, (name, u) in enumerate([("displacement u", big), ("exp(v), v = u", smooth_motion)]):
    det = metrics.jacobian_determinant(u)[0]
    ax[row, 0].imshow(warp(image, u)[0, 0], cmap="gray"); ax[row, 0].set_title(f"{name}: warped")
    phi = u[0] + torch.stack([rows, cols])
    for k in range(0, size, max(size // 32, 1)):
        ax[row, 1].plot(phi[1, k], phi[0, k], "k", lw=0.5); ax[row, 1].plot(phi[1, :, k], phi[0, :, k], "k", lw=0.5)
    ax[row, 1].set_xlim(size / 4, 3 * size / 4); ax[row, 1].set_ylim(3 * size / 4, size / 4); ax[row, 1].set_title("grid (centre)")
    ax[row, 1].set_xlabel("column (px)"); ax[row, 1].set_ylabel("row (px)")
    im = ax[row, 2].imshow(det, cmap="coolwarm", vmin=0, vmax=2); ax[row, 2].contour(det <= 0, levels=[0.5], colors="yellow")
    ax[row, 2].set_title("det J (yellow contour: det <= 0)")
    fig.colorbar(im, ax=ax[row, 2], shrink=0.8, label="det J (<= 0: folding)")
    for a in (ax[row, 0], ax[row, 2]): a.axis("off")
plt.show()
"""),
md(r"""
Why does integration help? Scaling and squaring divides the velocity by
$2^7 = 128$, so each tiny step is far from folding, then composes the step with
itself seven times: $\varphi = \exp(v) = (\varphi_{1/128})^{128}$. A composition
of invertible maps is invertible, so the result cannot fold (up to
discretisation). The motion is the same kind, a disc pushed sideways, but it is
carried along smoothly instead of overtaking its neighbours. Diffeomorphic
networks (VoxelMorph-diff, SVF-Net; notebook 05) predict $v$ and integrate it
with `regedu.spatial.integrate_velocity`.

## Exercises

1. Repeat the shift experiment with `losses.ncc_global`. Why does it fail on the
   inverted image while local NCC does not? (Hint: it is not squared.)
2. Add `losses.bending_energy` as a regulariser in `instance_optimisation`
   (`regulariser=losses.BendingEnergy()`): which λ gives the smallest field error now?
3. Lower `steps` in `integrate_velocity` from 7 to 0, 1, 2, 3. When does folding appear?
4. Compute Dice on the toy labels with bilinear warping of float labels (rounded).
   Is it better or worse than nearest neighbour?

## Checks
"""),
code(r"""
for change in changes:
    for name in ("local NCC", "MI"):
        assert optimum[change, name] == 0, f"{name} should keep its optimum at 0 under '{change}', got {optimum[change, name]}"
assert optimum["same intensities", "MSE"] == 0, "MSE should find the optimum when intensities agree"
assert abs(optimum["inverted: 1 - F", "MSE"]) == shifts.max(), f"under inversion MSE's optimum should run to the end of the range: {optimum}"
mild, same = curves["darker, low contrast: 0.5 F + 0.4", "MSE"], curves["same intensities", "MSE"]
assert abs(optimum["darker, low contrast: 0.5 F + 0.4", "MSE"]) <= 1, f"the mild change: MSE's optimum at or next to 0: {optimum}"
assert mild.min() > 100 * same.min() + 1e-3, "under an intensity change MSE should stay far from 0 at the optimum"
assert np.ptp(mild) < np.ptp(same), f"the mild change should make MSE's valley shallower: {np.ptp(mild):.4f} vs {np.ptp(same):.4f}"
diff = [table[w]["diffusion"] for w in weights]
assert all(a > b for a, b in zip(diff, diff[1:])), f"the field must get smoother as lambda grows: {diff}"
err = {w: table[w]["field error (px)"] for w in weights}
assert err[best] < 0.75 * identity_error, f"the best lambda should clearly beat identity: {err[best]:.2f} vs {identity_error:.2f} px"
assert err[best] < err[0.0] and err[best] < err[weights[-1]], f"field error should be smallest in between: {err}"
assert 0.9 * identity_error < err[0.0] < 1.2 * identity_error, f"with lambda = 0 the field error should stay close to identity's: {err[0.0]:.2f} vs {identity_error:.2f} px"
assert table[0.0]["% folding"] > 1.0 and table[best]["% folding"] < table[0.0]["% folding"] / 10, "regularisation should remove folding"
assert table[weights[-1]]["MSE"] > table[best]["MSE"], "a very stiff field should match the images worse"
assert dice_after.mean > dice_before.mean + 0.05, f"registration should raise label Dice: {dice_before.mean:.3f} -> {dice_after.mean:.3f}"
assert image_dice_itself == 1.0, "an image compared with itself has grey-level Dice 1"
assert image_dice_after > image_dice_before, f"grey-level Dice should rise with alignment: {image_dice_before:.3f} -> {image_dice_after:.3f}"
assert label_dice_truth > 0.99 and image_dice_truth < 0.5, \
    f"the perfect registration: label Dice ~1 ({label_dice_truth:.3f}) but grey-level Dice far below 1 ({image_dice_truth:.3f})"
assert nonzero_before > 0.85 and nonzero_after > 0.85 and coverage > 0.5, \
    f"non-zero-region Dice should be high with or without registration ({nonzero_before:.3f}, {nonzero_after:.3f})"
assert fold_direct > 0.1 and fold_svf == 0.0, f"direct field should fold ({fold_direct:.2f} %) and the integrated one not ({fold_svf:.2f} %)"
assert smooth_motion.abs().max() > 0.5 * big.abs().max(), "the integrated motion should be of the same size"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("02_similarity_and_regularity.ipynb", cells))
