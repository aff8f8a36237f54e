"""Notebook 03: classical registration."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 03 · Classical registration: optimise one pair at a time

Before networks, registration was an **optimisation problem solved anew for every
pair**: choose a family of transformations, a similarity measure and a
regulariser, then search for the parameters that make $M \circ \varphi$ look like
$F$. Learning-based methods (notebooks 04 onward) replace this search by one
forward pass of a trained network, so we need the classical methods both to
understand what the network learns and as baselines to beat.

**Learning goals.** After this notebook you can

1. write an **affine** registration as gradient descent on six numbers, using the
   differentiable warp of notebook 01, and check that it recovers a known affine;
2. run **dense instance optimisation** (a free displacement per pixel, diffusion
   regularised, coarse to fine) and **ANTs SyN**, the classical state of the art;
3. measure registration accuracy with the **target registration error (TRE)** on
   control points, and put accuracy and time of every method in one table.
"""),
code(PROFILE_CELL),
code(r"""
import time
import numpy as np
import torch
import matplotlib.pyplot as plt

from regedu import losses, metrics, viz
from regedu.classic import ants_missing, ants_syn, instance_optimisation, similarity_search
from regedu.datasets import make_fire_pair, retina_green, vessel_contrast
from regedu.evaluate import compare, identity, summary
from regedu.spatial import affine_to_displacement, compose, gaussian_blur, warp

size = profile.fundus_size
retina, fov = retina_green(size)
"""),
md(r"""
## 1. Affine registration by optimisation

An affine map in 2D has six parameters: a $2\times2$ matrix $A$ (rotation, scale,
shear) and a translation $t$. A fixed pixel $x$ is looked up in the moving image at

$$\varphi(x) = A\,(x - c) + c + t,$$

with $c$ the image centre (rotating about the centre keeps the parameters
independent). `regedu.spatial.affine_to_displacement` turns $[A \mid t]$ into the
displacement $u(x) = \varphi(x) - x$ that `warp` uses.

We build a moving image with a **known** answer: rotate by 6°, scale by 1.05
along one axis and 0.97 along the other, shear a little and shift, so that $M(\varphi^*(x)) = F(x)$.
"""),
code(r"""
theta = np.deg2rad(6.0)
A_true = torch.tensor([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], dtype=torch.float32)
A_true = A_true @ torch.tensor([[1.05, 0.03], [0.0, 0.97]])
t_true = torch.tensor([0.03, -0.02]) * size                    # (rows, cols) in pixels
M_true = torch.cat([A_true, t_true[:, None]], 1)[None]          # (1, 2, 3): [A | t]

fixed = torch.from_numpy(retina)[None, None]
# The inverse map makes the moving image: then M(phi*(x)) = F(x).
A_inv = torch.linalg.inv(A_true)
M_inv = torch.cat([A_inv, (-A_inv @ t_true)[:, None]], 1)[None]
moving = warp(fixed, affine_to_displacement(M_inv, (size, size), center="image"))
display(viz.plot_pair(fixed, moving))
"""),
md(r"""
The optimiser adjusts $A$ and $t$ by gradient descent on the MSE, through the
differentiable warp. Two practical details, both classical:

* **coarse to fine**: first on blurred images, whose similarity changes smoothly
  over a wide range of parameters, then on sharper ones (a wider basin of attraction);
* **parameter scaling**: one pixel of translation and one unit of the matrix are
  very different amounts of motion, so the translation is optimised in units of
  the image size.
"""),
code(r"""
def affine_register(moving, fixed, *, similarity=losses.mse, sigmas=(4, 2, 0), steps=100, lr=0.01):
    # Returns [A | t] (1, 2, 3) such that warp(moving, affine_to_displacement(...)) ~ fixed.
    n = fixed.shape[-1]
    A = torch.eye(2, requires_grad=True)
    t = torch.zeros(2, requires_grad=True)                    # in units of the image size
    optimiser = torch.optim.Adam([A, t], lr=lr)
    for sigma in [s * n / 256 for s in sigmas]:
        f, m = (gaussian_blur(x, sigma) if sigma > 0 else x for x in (fixed, moving))
        for _ in range(steps):
            matrix = torch.cat([A, (t * n)[:, None]], 1)[None]
            loss = similarity(f, warp(m, affine_to_displacement(matrix, (n, n), center="image")))
            optimiser.zero_grad(); loss.backward(); optimiser.step()
    return torch.cat([A, (t * n)[:, None]], 1)[None].detach()


start = time.perf_counter()
M_found = affine_register(moving, fixed, steps=60 if profile.name == "ci" else 100)
affine_seconds = time.perf_counter() - start
matrix_error = (M_found[0, :, :2] - A_true).abs().max().item()
translation_error = (M_found[0, :, 2] - t_true).abs().max().item()
print("true  [A | t]:\n", M_true[0].numpy().round(3))
print("found [A | t]:\n", M_found[0].numpy().round(3))
print(f"max matrix error {matrix_error:.4f}, max translation error {translation_error:.2f} px, {affine_seconds:.1f} s")
"""),
md(r"""
## 2. A fundus pair with control points

Now a realistic pair: two photographs of the same retina, category **S** of the
FIRE dataset (large overlap, small motion, different illumination), made by
`regedu.datasets.make_fire_pair` from the real retina image. Each pair carries 10
**control points**: positions of the same anatomical spot in both images. The
**TRE** of a method is the distance between where it maps a fixed point
($p + u(p)$) and where that point truly is in the moving image; a
method's score on a pair is the mean over its 10 points. Here TRE is in pixels
of our images (FIRE reports it at 2912×2912: multiply by
$2911/(\text{size}-1)$).

Our methods compare **vessel contrast**, not the photographs:
`regedu.datasets.vessel_contrast` subtracts each photograph's local mean inside
its field of view. The illumination (vignetting, the optic disc's halo) and the
black aperture belong to the camera and sit at the same place in both
photographs, so on the photographs any similarity is pulled towards "no
motion" (notebook 04 measures this). The similarity is local NCC (notebook 02).
"""),
code(r"""
n_pairs = 2
pairs = []
for i in range(n_pairs):
    p = make_fire_pair("S", size=size, seed=300 + i)
    pairs.append(dict(moving=p.moving, fixed=p.fixed, moving_points=p.moving_points, fixed_points=p.fixed_points,
                      meta=dict(id=f"S{i}", category="S")))
first = make_fire_pair("S", size=size, seed=300)
display(viz.plot_landmarks(first.fixed[0], first.moving[0], first.fixed_points, first.moving_points))
"""),
md(r"""
The methods, each a function `(moving, fixed) -> displacement`:

* **identity**: no registration, the TRE to beat;
* **affine (ours)**: section 1, with NCC, on vessel contrast;
* **dense**: `instance_optimisation` from the identity: a free displacement per
  pixel, NCC + diffusion, on three levels (1/4, 1/2, full size);
* **affine + dense**: the same, started from our affine: the classical pipeline
  (rigid/affine first, deformable next);
* **ANTs SyN** with its default parameters, on the photographs: symmetric
  diffeomorphic normalisation, an affine stage and then a deformable one
  (Avants et al. 2008), the classical reference in VoxelMorph's and VV-Net's
  papers.
"""),
code(r"""
ncc = losses.NCC(window=9)


def affine_ours(moving, fixed):
    matrix = affine_register(vessel_contrast(moving), vessel_contrast(fixed), similarity=ncc,
                             steps=60 if profile.name == "ci" else 100, lr=0.01)
    return affine_to_displacement(matrix, fixed.shape[2:], center="image")


def dense(moving, fixed, init=None):
    return instance_optimisation(vessel_contrast(moving), vessel_contrast(fixed), similarity=ncc, weight=1.0,
                                 levels=(4, 2, 1), iterations=(80, 60, 40), lr=0.1, init=init, progress=False).disp


def affine_then_dense(moving, fixed):
    return dense(moving, fixed, init=affine_ours(moving, fixed))


def ants_syn_method(moving, fixed):
    return ants_syn(moving, fixed)


methods = {"identity": identity, "affine (ours)": affine_ours, "dense": dense,
           "affine + dense": affine_then_dense}
if ants_missing():
    print(ants_missing())
else:
    methods["ANTs SyN"] = ants_syn_method
evaluations = compare(methods, pairs, progress=False)
table = summary(evaluations, metrics=("tre", "percent_folding", "seconds"), by=None, digits=2)
table
"""),
code(r"""
tre = {ev.name: float(np.mean([r["tre_mean"] for r in ev.records])) for ev in evaluations}
seconds = {ev.name: float(np.mean([r["seconds"] for r in ev.records])) for ev in evaluations}
plt.figure(figsize=(6, 4))
for name in methods:
    plt.scatter(max(seconds[name], 1e-3), tre[name], s=60, label=name)
plt.xscale("log"); plt.xlabel("seconds per pair (log)"); plt.ylabel("mean TRE (px)"); plt.legend()
plt.title(f"accuracy vs time, {n_pairs} S pairs at {size} px"); plt.show()

if "ANTs SyN" in methods:
    syn = ants_syn(first.moving[None], first.fixed[None])
    display(viz.plot_overlay(first.fixed[0], first.moving[0], warp(first.moving[None], syn)[0, 0]))
"""),
code(r"""
# The reading of the table, printed from it (the checks below test the same sentences).
def share(name):
    return tre[name] / tre["identity"]


refine = tre["affine + dense"] - tre["affine (ours)"]
print(f"identity: mean TRE {tre['identity']:.2f} px, the camera motion at {size} px")
print(f"affine (ours): {tre['affine (ours)']:.2f} px, {share('affine (ours)'):.0%} of identity's")
print(f"dense from the identity: {tre['dense']:.2f} px, {share('dense'):.0%} of identity's, "
      f"{tre['dense'] / tre['affine (ours)']:.0f}x the affine's")
print(f"affine + dense: {tre['affine + dense']:.2f} px, {abs(refine):.2f} px "
      f"{'worse' if refine > 0 else 'better'} than the affine alone")
if "ANTs SyN" in tre:
    removed = (tre["identity"] - tre["ANTs SyN"]) / (tre["identity"] - tre["affine (ours)"])
    print(f"ANTs SyN (defaults): {tre['ANTs SyN']:.2f} px, {share('ANTs SyN'):.0%} of identity's; "
          + (f"it removes {removed:.0%} as much TRE as our affine" if removed > 0 else "it does not lower the TRE at all"))
print(f"optimisation time per pair: {min(v for k, v in seconds.items() if k != 'identity'):.1f} s to "
      f"{max(seconds.values()):.1f} s")
"""),
md(r"""
Read the table with the lines printed under it. Category S pairs differ by a
global motion of the camera (a rotation, a small scale change and a shift), so
**our affine** on vessel contrast removes nearly all of it (under a fifth of the
identity's TRE). **Dense** optimisation from the identity lowers the TRE but
stops short of the affine's answer: its similarity only sees motions of a few
pixels at each level, so how far short it stops should depend on the image size
(at 256 pixels, the `cpu` profile, the same motions are twice as many pixels as
at 128; run both profiles to see). After the affine there is nothing elastic left to correct, and the free
field moves the result by less than a pixel either way. Whether the deformable
stage earns its keep on elastic motion is exercise 4's question (category A).

**ANTs SyN** with its default parameters removes less than half as much of the
motion as our affine on these pairs, if any (its line above; a check holds it),
while on brain MRI it is the reference. On the photographs
the illumination and the black surround of the field of view weigh heavily in its
default similarity (mutual information on sampled points). Classical tools need tuning per application (masks, metric, sampling,
iterations), and that tuning is part of the per-pair cost too (exercise 5).

Every one of these methods runs an optimisation *per pair* (its time is the last
line printed above). A network (notebook 04) pays that cost once, during training,
and then registers a pair in one forward pass; notebook 04 times it.

## 3. A large motion: local methods stay put, a global search finds it

FIRE's category **P** pairs overlap little: the camera moved by a large part of
the image (the identity's TRE, printed below as a fraction of the image side).
Every method above is **local**: it follows the similarity's
gradient from where it starts, and the pyramid's coarsest level (1/4 of the
size) only widens the reach by that factor. When the vessels of the two
images do not overlap at the start, the gradient has nothing to follow.

A **global search** does not follow gradients: `regedu.classic.similarity_search`
tries a grid of rotations and scales (its defaults: -16° to 16° in 2° steps,
scales 0.92 to 1.08 in 4 % steps) and, for each of them, every translation at
once: the normalised cross-correlation of the two
vessel-contrast images for all shifts is a handful of FFTs. Its best candidate
is the starting point of a local refinement, and the total field is
`compose(search, refinement)` (notebook 01's composition). Notebook 04 puts a
trained network in the refinement's place.
"""),
code(r"""
p_pairs = []
for i in range(2):
    p = make_fire_pair("P", size=size, seed=400 + i)
    p_pairs.append(dict(moving=p.moving, fixed=p.fixed, moving_points=p.moving_points, fixed_points=p.fixed_points,
                        meta=dict(id=f"P{i}", category="P")))


def search(moving, fixed):
    return similarity_search(vessel_contrast(moving), vessel_contrast(fixed))


def search_then_dense(moving, fixed):
    start = search(moving, fixed)
    return compose(start, dense(warp(moving, start), fixed))


p_methods = {"identity": identity, "dense": dense, "search": search, "search + dense": search_then_dense}
p_evaluations = compare(p_methods, p_pairs, progress=False)
p_tre = {ev.name: float(np.mean([r["tre_mean"] for r in ev.records])) for ev in p_evaluations}
p_seconds = {ev.name: float(np.mean([r["seconds"] for r in ev.records])) for ev in p_evaluations}
for name in p_methods:
    print(f"{name:15s} mean TRE {p_tre[name]:6.2f} px ({p_tre[name] / p_tre['identity']:.0%} of identity's), "
          f"{p_seconds[name]:.1f} s per pair")
print(f"the identity's TRE is {p_tre['identity'] / size:.0%} of the image side ({size} px)")
refined = p_tre["search + dense"] - p_tre["search"]
print(f"the dense refinement after the search: {abs(refined):.2f} px {'better' if refined < 0 else 'worse'} "
      f"than the search alone")
p_first = p_pairs[0]
display(viz.plot_overlay(p_first["fixed"][0], p_first["moving"][0],
                         warp(p_first["moving"][None], search_then_dense(p_first["moving"][None], p_first["fixed"][None]))[0, 0]))
"""),
md(r"""

## Exercises

1. Replace `losses.mse` by `ncc` in `affine_register` for section 1. Same answer?
   Then invert the moving image's contrast (`1 - moving`) and try both again.
2. In `affine_then_dense`, set `levels=(1,)` (no pyramid): what happens to TRE?
   And in section 3, give `dense` a coarser first level (`levels=(8, 4, 2, 1)`):
   does it reach the P pairs' motion without the search?
3. The "dense" row starts from the identity. Give it a coarser first level,
   `levels=(8, 4, 2, 1)` with `iterations=(80, 80, 60, 40)`: does it get closer to
   the affine? Explain with the size of the motion (the identity row of the table).
4. Try a category `"A"` pair (elastic change and lesions). Which method gains the
   most over affine?
5. Tune ANTs: `ants_syn(moving, fixed, aff_metric="GC", syn_metric="CC")`, or pass
   more iterations (`reg_iterations=(100, 70, 50)`). How close to "affine + dense"
   can you get, and at what time?

## Checks
"""),
code(r"""
assert matrix_error < 0.02 and translation_error < 1.0, f"affine optimisation should recover the known affine: {matrix_error:.4f}, {translation_error:.2f} px"
assert tre["affine (ours)"] < 0.2 * tre["identity"], f"affine on vessel contrast should remove most of a camera motion: {tre}"
assert tre["dense"] < tre["identity"], f"dense instance optimisation should lower the TRE: {tre}"
assert tre["dense"] > tre["affine (ours)"], f"from the identity, dense optimisation should not reach what the affine finds: {tre}"
assert tre["affine + dense"] < 0.2 * tre["identity"] and abs(refine) < 1.0, \
    f"dense refinement should keep the affine's result (within a pixel): {tre}"
if "ANTs SyN" in tre:
    assert tre["affine + dense"] < tre["ANTs SyN"], f"our tuned pipeline should beat ANTs' defaults on these pairs: {tre}"
    assert tre["ANTs SyN"] > 2 * tre["affine (ours)"] + 0.5, f"ANTs' defaults should remove far less than our affine: {tre}"
    assert tre["identity"] - tre["ANTs SyN"] < 0.5 * (tre["identity"] - tre["affine (ours)"]), \
        f"ANTs' defaults should remove less than half as much TRE as our affine: {tre}"
assert min(v for k, v in seconds.items() if k != "identity") > 0.1, f"every optimisation should take seconds per pair: {seconds}"
assert all(s > 0 for s in seconds.values()), "every method must be timed"
assert p_tre["identity"] > 0.15 * size, f"category P should move by a large part of the image: {p_tre['identity']:.1f} px of {size}"
assert p_tre["dense"] > 0.8 * p_tre["identity"], f"a local method should stay near the start on P pairs: {p_tre}"
assert p_tre["search"] < 0.1 * p_tre["identity"] and p_tre["search + dense"] < 0.1 * p_tre["identity"], \
    f"the global search should find the P pairs' motion: {p_tre}"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("03_classical_registration.ipynb", cells))
