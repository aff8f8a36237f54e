"""Notebook 05: supervised vs unsupervised, diffeomorphic."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 05 · Supervised vs unsupervised, and diffeomorphic fields

Two ways to train a registration network:

* **supervised** (RegNet, Sokooti et al. 2017): generate pairs by warping an
  image with a *synthetic* displacement field (random, smooth) and train the
  network to predict that field: loss $\|u_\theta(M, F) - u^*\|^2$. Exact labels
  for free, but the network only learns the kinds of motion the generator makes;
* **unsupervised** (VoxelMorph, notebook 04): no field needed, the loss is
  similarity of $F$ and $M\circ\varphi$ plus a regulariser. Works on real pairs whose
  true motion nobody knows.

And a way to make the predicted transformation invertible: predict a
**stationary velocity field** $v$ and integrate it, $\varphi = \exp(v)$, by scaling
and squaring (SVF-Net, VoxelMorph-diff; notebook 02, section 4).

**Learning goals.** After this notebook you can

1. train the same U-Net supervised (on known fields) and unsupervised (on images)
   and compare them fairly on held-out pairs;
2. add velocity-field integration to a network and measure folding;
3. read a table of accuracy (TRE), folding and training time, and say what each
   approach costs.
"""),
code(PROFILE_CELL),
code(r"""
import time
import numpy as np
import torch
import matplotlib.pyplot as plt

from regedu import losses, metrics, nets, viz
from regedu.datasets import FundusPairs, vessel_contrast
from regedu.train import fit

# Half notebook 04's image size: three networks train in this notebook, on a CPU too.
size = profile.fundus_size // 2
steps = 1000
small = dict(encoder=(8, 16, 16, 16), decoder=(16, 16, 16, 16, 16, 8, 8))


def new_unet(integrate_steps=0):
    # Notebook 04's recipe: a half-width U-Net on a 32x32 grid (nets.Rescaled), fields upsampled back.
    torch.manual_seed(0)
    unet = nets.create("unet", spatial_dims=2, integrate_steps=integrate_steps, **small)
    return nets.Rescaled(unet, size // 32)
"""),
md(r"""
## 1. Pairs with known fields

`FundusPairs` makes pairs of procedural retinas with an exact ground-truth field
(a camera motion plus, for category A, an elastic deformation), and control
points. The same pairs serve both trainings: the supervised one reads `disp`,
the unsupervised one ignores it. Test pairs come from the real retina.

As in notebook 04, the networks see **vessel contrast** (the illumination,
which belongs to the camera, removed) and work on a coarse grid (here 32x32,
through `nets.Rescaled`), where the same motions span a fraction of the pixels
(the grid's factor fewer): that is what lets them learn in a short run of cheap
steps.
"""),
code(r"""
# A generator makes pairs for free: 256 different ones (given only a handful, a supervised network may learn
# those few fields by heart rather than what carries over to new pairs: try it with 8).
train_pairs = FundusPairs(256, size, categories=("S", "A"), source="procedural", seed=0, cache=True,
                          contrast="vessels")
test_pairs = FundusPairs(6, size, categories=("S", "A"), source="retina", seed=500, cache=True)
# Held-out pairs of the generator itself (other seeds): where a supervised network is judged on what it learned.
generator_pairs = FundusPairs(6, size, categories=("S", "A"), source="procedural", seed=700, cache=True,
                              contrast="vessels")
item = train_pairs[1]
display(viz.plot_grid(item["disp"][None], item["fixed"][0]))
"""),
md(r"""
RegNet's own generator is another: random points displaced, smoothed with a
Gaussian, at several scales, each bounded (`regedu.datasets.regnet_field`;
notebook 15 trains with it). It makes local bumps, not the rotation, shift and
zoom of a fundus camera, which `FundusPairs` draws (with an elastic deformation
for category A): a supervised network learns the motions of its generator, so
the generator has to match the motions the network will meet.
"""),
code(r"""
from regedu.datasets import regnet_field

u = regnet_field((size, size), ((size / 8, size / 32), (size / 16, size / 64)), seed=0)   # (sigma, max) px
print(f"RegNet field: longest vector {float(u.norm(dim=1).max()):.2f} px; "
      f"this FundusPairs pair's: {float(item['disp'].norm(dim=0).max()):.2f} px")
display(viz.plot_grid(u, item["fixed"][0]))
"""),
md(r"""
## 2. Supervised training (RegNet style)

The loss compares fields, not images: the `"field"` term of `regedu.losses`
(`field_mse`, the mean squared difference $\|u_\theta(M, F) - u^*\|^2$) reads the
true field that every pair carries (`batch["disp"]`). Everything else is the
training of notebook 04: `fit` loops over `regedu.train.train_step`, which
registers the batch, adds the weighted loss terms, backpropagates and steps
the optimiser (read it: it is one screen). Only the term changes.
"""),
code(r"""
models, seconds, curves = {}, {}, {}
models["supervised"] = new_unet()
start = time.perf_counter()
history = fit(models["supervised"], train_pairs, losses={"field": 1.0}, steps=steps, lr=1e-3, batch_size=4,
              seed=0, progress=False)                    # the field is the label
seconds["supervised"] = time.perf_counter() - start
curves["supervised"] = history["train"]["loss"]
"""),
md(r"""
## 3. Unsupervised training, with and without integration

Same architecture, same pairs, same number of steps; the loss is local NCC +
diffusion. The diffeomorphic variant only adds `integrate_steps=7`: the network's
output is read as a velocity $v$ and integrated (7 squarings).
"""),
code(r"""
for name, steps_int in [("unsupervised", 0), ("unsupervised + SVF", 7)]:
    models[name] = new_unet(integrate_steps=steps_int)
    start = time.perf_counter()
    history = fit(models[name], train_pairs, losses={"ncc": 1.0, "diffusion": 1.0}, steps=steps, lr=1e-3,
                  batch_size=4, seed=0, grad_clip=1.0, progress=False)
    seconds[name] = time.perf_counter() - start
    curves[name] = history["train"]["loss"]

fig, ax = plt.subplots(1, 3, figsize=(14, 3.2), layout="constrained")
loss_names = {"supervised": "field MSE (px²)", "unsupervised": "-NCC + diffusion", "unsupervised + SVF": "-NCC + diffusion"}
for a, (name, c) in zip(ax, curves.items()):
    a.plot(c); a.set_title(name); a.set_xlabel("step"); a.set_ylabel(f"training loss: {loss_names[name]}")
plt.show()
"""),
md(r"""
## 4. Compare on held-out pairs

TRE on the control points, the field error against the true field, and folding
(% of pixels with $\det J \le 0$).
"""),
code(r"""
rows = {}
for name in ["identity"] + list(models):
    tre, epe, fold = [], [], []
    for i in range(len(test_pairs)):
        p = test_pairs[i]
        if name == "identity":
            disp = torch.zeros(1, 2, size, size)
        else:
            with torch.no_grad():
                disp = models[name].eval()(vessel_contrast(p["moving"][None]), vessel_contrast(p["fixed"][None])).disp
        tre.append(metrics.tre(p["fixed_points"], p["moving_points"], disp).mean().item())
        epe.append((disp[0] - p["disp"]).norm(dim=0)[p["fixed_mask"][0]].mean().item())
        fold.append(metrics.folding_stats(disp)["percent_folding"])
    generator_epe = []
    for i in range(len(generator_pairs)):
        p = generator_pairs[i]
        with torch.no_grad():
            disp = torch.zeros(1, 2, size, size) if name == "identity" else models[name](p["moving"][None], p["fixed"][None]).disp
        generator_epe.append((disp[0] - p["disp"]).norm(dim=0)[p["fixed_mask"][0]].mean().item())
    rows[name] = {"TRE (px)": np.mean(tre), "field error (px)": np.mean(epe),
                  "field error, generator (px)": np.mean(generator_epe), "% folding": np.mean(fold),
                  "training (s)": seconds.get(name, 0.0)}
import pandas as pd
table = pd.DataFrame(rows).T.round(3)
table
"""),
code(r"""
p = test_pairs[0]
fig, ax = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
for a, name in zip(ax, models):
    with torch.no_grad():
        d = models[name](vessel_contrast(p["moving"][None]), vessel_contrast(p["fixed"][None])).disp
    det = metrics.jacobian_determinant(d)[0]
    im = a.imshow(det, cmap="coolwarm", vmin=0, vmax=2); a.contour(det <= 0, levels=[0.5], colors="yellow")
    a.set_title(f"{name}: det J"); a.axis("off")
fig.colorbar(im, ax=ax, shrink=0.8, label="det J (<= 0, yellow: folding)")
plt.show()
"""),
md(r"""
Does the SVF model's Jacobian, positive almost everywhere on the test pairs (the
first line printed below; a check holds its folding under 0.1 %), show what
integration does? Only if the plain network folds on the same pairs: the diffusion term also keeps a field
smooth (the first line printed below compares the two). What integration adds is
a *guarantee*: however large the velocity, $\exp(v)$ does not fold in exact
arithmetic (on a grid, interpolating each squaring can fold a few voxels,
notebook 02), while a displacement predicted directly folds once
it is large enough. The next cell stretches each unsupervised network's output on
a test pair (the plain network's displacement; the SVF network's velocity, then
integrated by scaling and squaring with one more squaring per doubling, so that
each small step stays as small as in the network) until its longest vector
reaches a given length, and measures folding.
"""),
code(r"""
import math

from regedu.spatial import integrate_velocity

plain_fold, svf_fold = rows["unsupervised"]["% folding"], rows["unsupervised + SVF"]["% folding"]
print(f"on the test pairs as predicted: {plain_fold:.2f} % folding without integration, {svf_fold:.2f} % with it"
      + (": the regulariser alone keeps the plain field folding-free here" if plain_fold == 0 else ""))
p = test_pairs[0]
lengths = [size / 16, size / 8, size / 4, size / 2]   # longest vector after stretching, pixels
stretched = {}
for name in ("unsupervised", "unsupervised + SVF"):
    with torch.no_grad():
        out = models[name](vessel_contrast(p["moving"][None]), vessel_contrast(p["fixed"][None]))
        # What the network integrates (its velocity), or its displacement when it integrates nothing.
        field = out.velocity if out.velocity is not None else out.disp
        n_int = models[name].model.integrate_steps
        stretched[name] = []
        for length in lengths:
            stretch = float(length / field.norm(dim=1).max())
            v = field * stretch
            # One more squaring per doubling keeps each small step as small as the network's own:
            # the same exp(v), without the discretisation error of larger steps.
            n = n_int + max(0, math.ceil(math.log2(stretch))) if n_int else 0
            u = integrate_velocity(v, n) if n_int else v
            stretched[name].append((metrics.folding_stats(u)["percent_folding"],
                                    metrics.jacobian_determinant(u).min().item()))
print("longest vector (px):        " + "  ".join(f"{length:>15.0f}" for length in lengths))
for name, values in stretched.items():
    print(f"{name:<27}" + "  ".join(f"{f:6.3f} % (min {j:+.2f})" for f, j in values))
cost = seconds["unsupervised + SVF"] / seconds["unsupervised"]
print(f"% folding (min det J) after stretching. Training with integration took {cost:.2f}x the time without it.")
free = [length for length, (f, _) in zip(lengths, stretched["unsupervised + SVF"]) if f < 0.1]
print(f"exp(v) folds under 0.1 % of the pixels up to a longest vector of {max(free, default=0):.0f} px "
      f"(at most {max((f for f, _ in stretched['unsupervised + SVF'] if f < 0.1), default=0):.3f} % there)"
      + ("" if len(free) == len(lengths) else
         f"; beyond, the interpolation of each squaring folds {stretched['unsupervised + SVF'][-1][0]:.2f} % "
         f"at {lengths[-1]:.0f} px, where the plain field folds {stretched['unsupervised'][-1][0]:.2f} %"))
"""),
md(r"""
What to look for: the supervised network learns the field directly, so it
needs the generator's motions to resemble the test motions; the unsupervised
ones learn from the images and can be fine-tuned on real pairs. Stretched, the
SVF model folds far less than the plain one (below 0.1 % of the pixels up to
the length printed above, against the plain one's percentages printed there), for the training time printed above. Each network against identity, from the table (a supervised
network is judged first on held-out pairs of its own generator, then on the real
retina it never saw):
"""),
code(r"""
base = rows["identity"]
for name in models:
    r = rows[name]
    print(f"{name:<19} field error on generator pairs {base['field error, generator (px)']:.2f} -> "
          f"{r['field error, generator (px)']:.2f} px ({100 * (r['field error, generator (px)'] / base['field error, generator (px)'] - 1):+.0f} %); "
          f"TRE on the real retina {base['TRE (px)']:.2f} -> {r['TRE (px)']:.2f} px ({100 * (r['TRE (px)'] / base['TRE (px)'] - 1):+.0f} %)")
transfers = rows["supervised"]["TRE (px)"] < base["TRE (px)"]
print(f"The supervised network {'does' if transfers else 'does not'} lower the TRE on the real retina; "
      f"the unsupervised one reaches {rows['unsupervised']['TRE (px)']:.2f} px there.")
"""),
md(r"""
## Exercises

1. Train the supervised model on category S only and test on A: what happens to
   the field error?
2. Add a `"dice"` or `"mse"` term to the unsupervised loss; does TRE change?
3. Use `integrate_steps=3`: how much does the SVF model fold then, as predicted and
   stretched (section 4 measured it with 7)?
4. Combine both: supervised pre-training, then unsupervised fine-tuning, or one run with
   `losses={"field": 1.0, "ncc": 1.0, "diffusion": 1.0}`.

## Checks
"""),
code(r"""
k = max(steps // 5, 1)
for name, c in curves.items():
    assert np.mean(c[-k:]) < np.mean(c[:k]), f"{name}: the training loss should fall ({np.mean(c[:k]):.4f} -> {np.mean(c[-k:]):.4f})"
assert rows["unsupervised + SVF"]["% folding"] < 0.1, f"section 4 says the SVF model barely folds on the test pairs: {table}"
# Integration must make the difference: the stretched plain field folds, exp(stretched velocity) does not
# up to a quarter of the image, and at half the image (where the interpolation of the squarings shows)
# it folds at most a tenth as much.
assert max(f for f, _ in stretched["unsupervised"]) > 1.0, f"the plain network's stretched field should fold: {stretched}"
assert all(f < 0.1 for f, _ in stretched["unsupervised + SVF"][:-1]), \
    f"the SVF network's transformation should not fold up to a quarter of the image: {stretched}"
assert all(fs <= 0.1 * fp for (fs, _), (fp, _) in zip(stretched["unsupervised + SVF"], stretched["unsupervised"])), \
    f"the SVF network should fold at most a tenth as much as the plain one at every stretch: {stretched}"
# Every profile: each network learned what it was trained on, by a margin against identity.
MARGIN = 0.9
assert rows["supervised"]["field error, generator (px)"] < MARGIN * rows["identity"]["field error, generator (px)"], \
    f"supervised: the field error on held-out generator pairs should be below {MARGIN:g} x identity's: {table}"
for name in ("unsupervised", "unsupervised + SVF"):
    assert rows[name]["TRE (px)"] < MARGIN * rows["identity"]["TRE (px)"], f"{name}: TRE on the real retina should be below {MARGIN:g} x identity's: {table}"
assert all(s > 0 for s in seconds.values()), "every training must be timed"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("05_supervised_vs_unsupervised.ipynb", cells))
