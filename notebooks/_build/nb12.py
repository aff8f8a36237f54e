"""Notebook 12: homework, checked by regedu.exercises.

One script writes both versions, so they never drift:

- ``12_homework.ipynb``: the student version (stubs that raise
  NotImplementedError; every check reports "not done yet"; runs in CI);
- ``solutions/12_homework_solved.ipynb``: the same notebook with the solutions
  filled in; its last cell asserts that every check passed (also run in CI).
"""
from _nb import NOTEBOOKS, PROFILE_CELL, code, md, write


def build(solved: bool):
    def answer(student: str, solution: str):
        return code(solution if solved else student)

    title = "12 · Homework" + (" (solved)" if solved else "")
    banner = ("**This is the solved version**, for instructors and for checking your work "
              "afterwards. The student version is `notebooks/12_homework.ipynb`."
              if solved else
              "Solutions are in `notebooks/solutions/12_homework_solved.ipynb`: try first!")
    return [
md(rf"""
# {title}

Nine exercises on what the course taught, each checked automatically by
`regedu.exercises`. A check compares your function with regedu's own on a
known case and on random inputs, and tells you **which input failed, what was
expected, what you returned, and a hint**. Run a check as often as you like.

{banner}

**Learning goals.** After this homework you can

1. write the core of registration yourself: Dice, local NCC, the Jacobian
   determinant, the composition of two fields and the target registration error;
2. analyse registration accuracy on fundus pairs by category (S, P, A);
3. run a regularisation sweep and read the trade-off it shows;
4. change a registration network and check that it still keeps the contract
   and learns;
5. cut a map of tokens into a transformer's windows and fit a statistical
   deformation model.

**How it works.** Each exercise has a function with a `raise
NotImplementedError` line: replace it with your code. Until then its check
says *not done yet* and the notebook still runs from top to bottom. Use
PyTorch operations; do **not** call the regedu function you are
re-implementing (that is what the check compares you with): the check
watches for it, however it is imported, and fails such an answer with a
message that names the function. The helpers an exercise suggests
(`warp`, `warp_points`) are allowed.
"""),
code(PROFILE_CELL),
code(r"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import matplotlib.pyplot as plt

from regedu import exercises, losses, metrics, nets, viz
from regedu.classic import instance_optimisation
from regedu.datasets import BrainPairs, make_fire_pair, mni_brain
from regedu.spatial import warp, warp_points

exercises.reset()
"""),
md(r"""
## Exercise 0 (warm-up) · Dice per structure

$$\text{Dice}_k(A, B) = \frac{2\,|A_k \cap B_k|}{|A_k| + |B_k|}$$

for each label $k$ of `labels` (background 0 is never a structure). A label
present in neither map has no overlap to measure: return `NaN` for it.
`a` and `b` are integer numpy arrays of the same shape (any shape); return a
numpy array with one value per label, in the order of `labels`.
"""),
answer(r"""
def dice(a, b, labels):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def dice(a, b, labels):
    out = []
    for k in labels:
        in_a, in_b = a == k, b == k
        total = in_a.sum() + in_b.sum()
        out.append(2 * (in_a & in_b).sum() / total if total else np.nan)
    return np.array(out, dtype=float)
"""),
code(r"""
exercises.check("dice", dice);
"""),
md(r"""
## Exercise 1 · Local normalised cross-correlation

VoxelMorph's similarity. Around every voxel take a window of $9$ voxels per
axis ($n = 9^{\text{ndim}}$ voxels, zero padding at the border) and compute,
with sums $S$ over the window,

$$\text{cross} = S_{fw} - \frac{S_f S_w}{n}, \quad
\text{var}_f = S_{ff} - \frac{S_f^2}{n}, \quad
\text{var}_w = S_{ww} - \frac{S_w^2}{n}, \quad
cc = \frac{\text{cross}^2}{\text{var}_f\,\text{var}_w + 10^{-5}}.$$

Return $-\text{mean}(cc)$ as a scalar tensor (a loss: $-1$ is a perfect
match). `fixed` and `warped` are `(B, 1, *spatial)`, 2D **or** 3D.

*Hint:* a sum over a window is a convolution with a box of ones
(`F.conv2d` / `F.conv3d` with `padding=window // 2`).
"""),
answer(r"""
def local_ncc(fixed, warped, window=9):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def local_ncc(fixed, warped, window=9):
    nd = fixed.dim() - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    box = torch.ones(1, 1, *[window] * nd, dtype=fixed.dtype)
    n = window ** nd

    def S(x):
        return conv(x, box, padding=window // 2)

    S_f, S_w = S(fixed), S(warped)
    cross = S(fixed * warped) - S_f * S_w / n
    var_f = S(fixed * fixed) - S_f ** 2 / n
    var_w = S(warped * warped) - S_w ** 2 / n
    return -(cross ** 2 / (var_f * var_w + 1e-5)).mean()
"""),
code(r"""
exercises.check("ncc", local_ncc);
"""),
md(r"""
## Exercise 2 · The Jacobian determinant

For $\varphi(x) = x + u(x)$ the Jacobian is $J = I + \nabla u$, with
$J_{ij} = \delta_{ij} + \partial u_i / \partial x_j$ (channel $i$ of `disp`
moves along axis $i$). Compute $\det J$ at every voxel, with central
differences inside and one-sided differences at the border (that is what
`torch.gradient` does). `disp` is `(B, ndim, *spatial)`, 2D or 3D; return
`(B, *spatial)`. Folding is where $\det J \le 0$.
"""),
answer(r"""
def jacobian_determinant(disp):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def jacobian_determinant(disp):
    nd = disp.shape[1]
    grads = torch.gradient(disp, dim=tuple(range(2, 2 + nd)))   # grads[j][:, i] = d u_i / d x_j
    J = torch.stack(grads, dim=2)                                # (B, i, j, *spatial)
    J = J + torch.eye(nd).view(1, nd, nd, *[1] * nd)
    J = J.movedim((1, 2), (-2, -1))                              # (B, *spatial, i, j)
    return torch.linalg.det(J)
"""),
code(r"""
exercises.check("jacobian", jacobian_determinant);
"""),
md(r"""
## Exercise 3 · Composition of two fields

A cascade warps by $\varphi_1$ first, then by $\varphi_2$:
`warp(warp(m, u1), u2)`. Because warping pulls, the single field that does
both is

$$u(x) = u_2(x) + u_1\big(x + u_2(x)\big),$$

`compose(u1, u2)`. Read $u_1$ between voxels with bilinear interpolation
(`warp` on the field itself) and, outside the image, **extend the field at the
border** (a displacement does not drop to zero there).
"""),
answer(r"""
def compose(u1, u2):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def compose(u1, u2):
    return u2 + warp(u1, u2, mode="bilinear", padding="border")
"""),
code(r"""
exercises.check("compose", compose);
"""),
md(r"""
## Exercise 4 · Target registration error on fundus pairs

A fixed control point $p$ lands at $p + u(p)$ in the moving image; its TRE
is the distance to the true moving point. Points fall between pixels:
interpolate $u$ bilinearly at each point (you may use
`regedu.spatial.warp_points`, which does exactly that). Points are `(N, 2)`
in (row, column) order, `disp` is `(1, 2, H, W)`; return the `N` distances.
"""),
answer(r"""
def tre(fixed_points, moving_points, disp):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def tre(fixed_points, moving_points, disp):
    mapped = warp_points(fixed_points.float(), disp)
    return (mapped - moving_points).norm(dim=-1)
"""),
code(r"""
tre_check = exercises.check("tre", tre)
"""),
md(r"""
**The analysis.** FIRE sorts fundus pairs into three categories: **S** (large
overlap, small motion), **P** (small overlap, large motion) and **A**
(anatomical change between visits). With your `tre`, measure the mean TRE per
category before registration and after dense instance optimisation (local NCC +
diffusion, coarse to fine: notebook 03), on a few FIRE-like pairs made from the
real retina image. (Runs once your `tre` passes.)

*Questions to answer in a markdown cell:* which category defeats the
optimiser, and why? (Compare the TRE before registration with the size of
motion a coarse-to-fine local optimiser can follow.) What would you put in
front of it for that category (notebook 03, notebook 07)?
"""),
code(r"""
n_per_category = 1 if profile.name == "ci" else 3
size = profile.fundus_size
ncc = losses.NCC(window=9)
tre_table = {}
if tre_check.passed:
    for category in "SPA":
        before, after = [], []
        for i in range(n_per_category):
            p = make_fire_pair(category, size=size, seed=1200 + i)
            u = instance_optimisation(p.moving[None], p.fixed[None], similarity=ncc, weight=1.0,
                                      levels=(4, 2, 1), iterations=(60, 40, 20), lr=0.1, progress=False).disp
            before.append(float(tre(p.fixed_points, p.moving_points, torch.zeros(1, 2, size, size)).mean()))
            after.append(float(tre(p.fixed_points, p.moving_points, u).mean()))
        tre_table[category] = (np.mean(before), np.mean(after))
        print(f"category {category}: mean TRE {tre_table[category][0]:6.2f} px before, "
              f"{tre_table[category][1]:6.2f} px after instance optimisation ({n_per_category} pair(s), {size} px)")
    x = np.arange(3)
    plt.figure(figsize=(5, 3.2))
    plt.bar(x - 0.2, [tre_table[c][0] for c in "SPA"], 0.4, label="before")
    plt.bar(x + 0.2, [tre_table[c][1] for c in "SPA"], 0.4, label="instance optimisation")
    plt.xticks(x, list("SPA")); plt.ylabel("mean TRE (px)"); plt.legend(); plt.title("TRE by FIRE category")
    plt.show()
else:
    print("finish exercise 4 (tre) to run this analysis")
"""),
md(r"""
## Exercise 5 · A regularisation sweep

Register one brain slice pair with dense instance optimisation
(`regedu.classic.instance_optimisation`: local NCC + $\lambda \cdot$ diffusion)
for at least three weights $\lambda$, and for each record

* `similarity`: the NCC loss of the fixed image and the warped moving image (lower is better),
* `roughness`: `losses.diffusion(disp)`, the mean squared gradient of the field,
* `folding`: the % of voxels with $\det J \le 0$ (`metrics.folding_stats`).

Fill `sweep_results[weight] = dict(similarity=..., roughness=..., folding=...)`.
The check looks for the trade-off every registration method lives with.
"""),
code(r"""
pair = BrainPairs(1, ndim=2, seed=12)[0]
moving, fixed = pair["moving"][None], pair["fixed"][None]
weights = [0.0, 0.3, 3.0, 100.0]
sweep_results = {}
"""),
answer(r"""
for weight in weights:
    # YOUR CODE HERE: run instance_optimisation(moving, fixed, similarity=ncc, weight=weight,
    # iterations=150, lr=0.2, progress=False), then fill sweep_results[weight]
    pass
""", r"""
for weight in weights:
    result = instance_optimisation(moving, fixed, similarity=ncc, weight=weight, iterations=150,
                                   lr=0.2, progress=False)
    sweep_results[weight] = dict(similarity=float(ncc(fixed, result.warped)),
                                 roughness=float(losses.diffusion(result.disp)),
                                 folding=metrics.folding_stats(result.disp)["percent_folding"])
for weight, row in sweep_results.items():
    print(f"lambda {weight:5.1f}: NCC loss {row['similarity']:.3f}, roughness {row['roughness']:.4f}, "
          f"folding {row['folding']:.2f}%")
"""),
code(r"""
exercises.check("sweep", sweep_results);
if sweep_results:
    w = list(sweep_results)
    fig, ax = plt.subplots(1, 3, figsize=(11, 3))
    for a, key in zip(ax, ["similarity", "roughness", "folding"]):
        a.plot(range(len(w)), [sweep_results[k][key] for k in w], "o-")
        a.set_xticks(range(len(w)), [str(k) for k in w]); a.set_xlabel("lambda"); a.set_title(key)
    plt.tight_layout(); plt.show()
"""),
md(r"""
## Exercise 6 · A small network change

Change the registration network and check that it still keeps the course's
contract (`forward(moving, fixed)` returns a `RegistrationOutput`, any input
size, starts near the identity) **and learns**: the check trains it for a few
dozen steps on a shifted 2D pair. Ideas, from the papers of the course:

* a backbone of **dilated convolutions** (a large receptive field without pooling),
  wrapped in `nets.Registration(backbone, spatial_dims=2)` (the backbone needs an
  `out_features` attribute);
* a **diffeomorphic** head: `nets.create("unet", spatial_dims=2, integrate_steps=7)`;
* a shallower or narrower U-Net (`encoder=`, `decoder=`).

`build_model()` returns a new 2D model.
"""),
answer(r"""
def build_model():
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
class DilatedBackbone(nn.Module):
    # Four 3x3 convolutions with dilation 1, 2, 4, 8: a 31-pixel receptive field at full resolution.
    def __init__(self, in_channels=2, width=16):
        super().__init__()
        layers, prev = [], in_channels
        for d in (1, 2, 4, 8):
            layers += [nn.Conv2d(prev, width, 3, padding=d, dilation=d), nn.LeakyReLU(0.2)]
            prev = width
        self.body = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x):
        return self.body(x)


def build_model():
    return nets.Registration(DilatedBackbone(), spatial_dims=2)
"""),
code(r"""
exercises.check("network", build_model);
"""),
md(r"""
## Exercise 7 · Windows of a transformer (notebook 17)

A Swin transformer (TransMorph's encoder) attends inside windows of
$w \times w$ tokens. Write `window_partition(x, window)`: `x` is a map of
tokens `(B, H, W, C)` (or `(B, D, H, W, C)` in 3D), each size a multiple of
`window`; return `(B * nW, window**ndim, C)`: for each item of the batch, the
windows in row-major order (the last axis fastest), and inside each window its
tokens in row-major order. One `view`, one `permute` and one `reshape` do it, in
2D and 3D alike. Do not call `regedu.nets.transmorph.window_partition`.
"""),
answer(r"""
def window_partition(x, window):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def window_partition(x, window):
    B, *sizes, C = x.shape
    nd = len(sizes)
    # (B, n0, w, n1, w, ..., C): each axis split into (number of windows, position in the window)
    x = x.reshape(B, *[v for n in sizes for v in (n // window, window)], C)
    grid_axes = [1 + 2 * k for k in range(nd)]
    inside_axes = [2 + 2 * k for k in range(nd)]
    return x.permute(0, *grid_axes, *inside_axes, 2 * nd + 1).reshape(-1, window ** nd, C)
"""),
code(r"""
exercises.check("windows", window_partition);
"""),
md(r"""
## Exercise 8 · A statistical deformation model (notebook 15)

Uzunova et al. (2017) make new training pairs from a PCA of displacement
fields. Write `pca(fields, k)`: `fields` is `(n, ndim, *spatial)`; flatten each
field to a row of an `(n, D)` matrix, subtract the mean row, and take its SVD
$X = U S V^\top$. Return the mean field `(1, ndim, *spatial)`, the first `k`
rows of $V^\top$ as modes `(k, ndim, *spatial)`, and their variances
$\lambda_i = S_i^2 / (n - 1)$ `(k,)`, largest first. (A mode's sign is
arbitrary; the check accepts either.) Do not call
`regedu.augment.fit_deformation_model`.
"""),
answer(r"""
def pca(fields, k):
    # YOUR CODE HERE
    raise NotImplementedError
""", r"""
def pca(fields, k):
    x = fields.double().reshape(len(fields), -1)
    mean = x.mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    shape = fields.shape[1:]
    return mean.reshape(1, *shape), vt[:k].reshape(k, *shape), s[:k] ** 2 / (len(fields) - 1)
"""),
code(r"""
exercises.check("pca", pca);
"""),
md(r"""
## Where you stand

`exercises.report()` lists every exercise with its status.
"""),
code(r"""
status = exercises.report()
"""),
md(r"""
## Checks

These run in automated tests: the student version must run without errors
(unfinished exercises report "not done yet"), and the solved version must pass
every check.
"""),
code(r"""
assert set(status) == set(exercises.EXERCISES), "every exercise should have been checked"
assert len(status) == 9, f"the introduction counts nine exercises, regedu.exercises has {len(status)}"
assert all(s in ("passed", "failed", "not done yet") for s in status.values()), status
""" + (r"""assert exercises.all_passed(), f"the solved notebook must pass every check: {status}"
assert tre_table["S"][1] < tre_table["S"][0], "instance optimisation should lower TRE on category S pairs"
print("all checks passed: every exercise is solved")
""" if solved else r"""print("the homework notebook runs; exercises passed so far:",
      sum(s == "passed" for s in status.values()), "of", len(status))
""")),
]


if __name__ == "__main__":
    (NOTEBOOKS / "solutions").mkdir(exist_ok=True)
    print(write("12_homework.ipynb", build(solved=False)))
    print(write("solutions/12_homework_solved.ipynb", build(solved=True)))
