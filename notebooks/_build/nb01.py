"""Notebook 01: warping and the spatial transformer."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 01 · Warping and the spatial transformer

Every registration method, classical or learned, ends the same way: it moves one
image onto another with a **displacement field**. This notebook builds that last
step by hand, the way the spatial transformer network (STN, Jaderberg et al. 2015)
does inside VoxelMorph and its relatives, and then checks it against
`regedu.spatial.warp`.

**Learning goals.** After this notebook you can

1. name the *moving* and the *fixed* image and say which one the displacement lives on;
2. write the deformation $\varphi(x) = x + u(x)$ and explain why warping *pulls* values;
3. build the STN's **grid generator** (where to look) and **bilinear sampler**
   (how to read between pixels) in a few lines of PyTorch, and show they agree
   with the library to $10^{-5}$;
4. predict exactly how a known translation moves an image;
5. explain why label maps are warped with nearest neighbour and images with bilinear;
6. show that the sampler is differentiable, so a network (or here, two numbers)
   can learn a transformation by gradient descent.
"""),
code(PROFILE_CELL),
md(r"""
## 1. Moving and fixed images

Registration looks for a spatial transformation that aligns a **moving** image
$M$ to a **fixed** (reference) image $F$. We use a real fundus photograph that
ships with scikit-image (`skimage.data.retina`, public domain), keep the green
channel (where vessels have the best contrast) and shrink it to the profile's size.
"""),
code(r"""
import numpy as np
import torch
import matplotlib.pyplot as plt
from skimage import data, transform

from regedu.spatial import warp, identity_grid, resize_field

size = profile.fundus_size
green = data.retina()[..., 1].astype(np.float32) / 255.0
retina = transform.resize(green, (size, size), anti_aliasing=True).astype(np.float32)
image = torch.from_numpy(retina)[None, None]        # (B, C, H, W) = (1, 1, size, size)
print("image:", tuple(image.shape), image.dtype, f"range [{image.min():.2f}, {image.max():.2f}]")
plt.imshow(retina, cmap="gray"); plt.title("the retina image (green channel)"); plt.axis("off"); plt.show()
"""),
md(r"""
## 2. Displacement and deformation

A **displacement field** $u$ stores, for every pixel $x$ of the *fixed* image, a
vector: how far to go to find the matching point in the moving image. The
**deformation** (transformation) is

$$\varphi(x) = x + u(x).$$

In regedu (and VoxelMorph) a 2D displacement is a tensor of shape
`(B, 2, H, W)`, in **pixels**, and channel 0 moves along axis 0 (rows) and
channel 1 along axis 1 (columns): tensor-axis order, not x-y.

Warping **pulls**: the output at $x$ is the moving image read at $\varphi(x)$,

$$(M \circ \varphi)(x) = M(x + u(x)).$$

Why not push each moving pixel to a new place? Because pushed pixels land
between grid points, several land on one, and some grid points get none: holes.
Pulling visits every output pixel exactly once. Let us see the holes.
"""),
code(r"""
# Push every pixel of the image to a zoomed position (scale 1.3 about the centre)
# and count the output pixels that nobody landed on.
rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
c = (size - 1) / 2
target_r = np.round(1.3 * (rows - c) + c).astype(int)
target_c = np.round(1.3 * (cols - c) + c).astype(int)
ok = (target_r >= 0) & (target_r < size) & (target_c >= 0) & (target_c < size)
pushed = np.zeros_like(retina)
hit = np.zeros(retina.shape, bool)
pushed[target_r[ok], target_c[ok]] = retina[ok]
hit[target_r[ok], target_c[ok]] = True
holes = 1 - hit.mean()
print(f"pushing: {holes:.0%} of the output pixels received no value")

fig, ax = plt.subplots(1, 2, figsize=(8, 4))
ax[0].imshow(pushed, cmap="gray"); ax[0].set_title("pushed (forward warping): holes")
ax[1].imshow(pushed[size // 3: size // 2, size // 3: size // 2], cmap="gray"); ax[1].set_title("zoom")
for a in ax: a.axis("off")
plt.show()
"""),
md(r"""
## 3. The grid generator

The STN splits warping into two parts. The **grid generator** turns the
displacement into sampling locations: the identity grid (each pixel's own
coordinates) plus $u$. That is all $\varphi(x) = x + u(x)$ means in code.
"""),
code(r"""
def grid_generator(disp):
    # Coordinates of every pixel (rows in channel 0, columns in channel 1), plus u.
    H, W = disp.shape[-2:]
    r, c = torch.meshgrid(torch.arange(H, dtype=disp.dtype), torch.arange(W, dtype=disp.dtype), indexing="ij")
    return torch.stack([r, c])[None] + disp             # (B, 2, H, W): where to read in the moving image

zero = torch.zeros(1, 2, size, size)
print("grid at pixel (2, 5):", grid_generator(zero)[0, :, 2, 5].tolist())
print("same as regedu.spatial.identity_grid:", torch.equal(grid_generator(zero), identity_grid((size, size))))
"""),
md(r"""
## 4. The bilinear sampler

The sampling locations are not integers. The **sampler** reads the moving image
between pixels: bilinear interpolation mixes the four surrounding pixels, each
weighted by how close it is. Outside the image we read 0 ("zeros" padding).

For a point $(r, c)$ with $r_0 = \lfloor r \rfloor$, $c_0 = \lfloor c \rfloor$,
$a = r - r_0$, $b = c - c_0$:

$$M(r, c) \approx (1-a)(1-b)\,M_{r_0,c_0} + (1-a)\,b\,M_{r_0,c_0+1} + a\,(1-b)\,M_{r_0+1,c_0} + a\,b\,M_{r_0+1,c_0+1}.$$

Every operation here is differentiable in the image *and* in the locations
(through $a$ and $b$): that is why a network that outputs $u$ can be trained
through the warp.
"""),
code(r"""
def read(image, r, c):
    # Pixel values at integer locations (B, H, W); 0 outside the image.
    B, C, H, W = image.shape
    inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    index = (r.clamp(0, H - 1) * W + c.clamp(0, W - 1)).flatten(1)          # (B, H*W)
    values = image.flatten(2).gather(2, index[:, None].expand(B, C, -1))    # (B, C, H*W)
    return values.view(B, C, *r.shape[1:]) * inside[:, None]


def bilinear_sampler(image, points):
    r, c = points[:, 0], points[:, 1]
    r0, c0 = torch.floor(r), torch.floor(c)
    a, b = (r - r0)[:, None], (c - c0)[:, None]
    r0, c0 = r0.long(), c0.long()
    return ((1 - a) * (1 - b) * read(image, r0, c0) + (1 - a) * b * read(image, r0, c0 + 1)
            + a * (1 - b) * read(image, r0 + 1, c0) + a * b * read(image, r0 + 1, c0 + 1))


def nearest_sampler(image, points):
    return read(image, torch.round(points[:, 0]).long(), torch.round(points[:, 1]).long())


def my_warp(image, disp, sampler=bilinear_sampler):
    return sampler(image, grid_generator(disp))
"""),
md(r"""
Now a random smooth displacement: random vectors on a coarse 5×5 grid, smoothly
interpolated to full size with `regedu.spatial.resize_field` and scaled so that
the longest is a tenth of the image. We warp the retina
with our hand-made STN and with the library, and compare.
"""),
code(r"""
torch.manual_seed(0)
# resize_field stretches the vectors with the grid (5 -> size pixels), so set the length afterwards.
u = resize_field(torch.randn(1, 2, 5, 5), (size, size))
u *= (size / 10) / u.norm(dim=1).max()                                 # the largest: a tenth of the image
mine = my_warp(image, u)
library = warp(image, u)
diff_bilinear = (mine - library).abs().max().item()
print(f"largest displacement: {u.norm(dim=1).max():.1f} px, in a {size} px image")
print(f"max |hand-made - regedu.spatial.warp| = {diff_bilinear:.2e}")

fig, ax = plt.subplots(1, 3, figsize=(12, 4))
ax[0].imshow(image[0, 0], cmap="gray"); ax[0].set_title("moving M")
ax[1].imshow(mine[0, 0], cmap="gray"); ax[1].set_title("M(x + u(x)), by hand")
im = ax[2].imshow((mine - library)[0, 0], cmap="coolwarm", vmin=-1e-5, vmax=1e-5); ax[2].set_title("by hand - library")
for a in ax: a.axis("off")
fig.colorbar(im, ax=ax[2], shrink=0.8, label="intensity difference")
plt.show()
"""),
md(r"""
## 5. A known translation moves the image exactly

A constant displacement $u(x) = t$ is a translation. Because warping pulls,
$u = (+5, -3)$ makes the output at $(r, c)$ show what the moving image has at
$(r + 5, c - 3)$: the picture itself moves **up by 5 and right by 3**. With
whole-pixel shifts no interpolation is needed and the result is exact; a half
pixel averages two neighbours.
"""),
code(r"""
t = torch.tensor([5.0, -3.0])
shifted = my_warp(image, t.view(1, 2, 1, 1).expand(1, 2, size, size))
expected = torch.zeros_like(image)
expected[..., : size - 5, 3:] = image[..., 5:, : size - 3]
translation_error = (shifted - expected).abs().max().item()
print("integer translation, max error:", translation_error)

half = my_warp(image, torch.tensor([0.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, size, size))
half_expected = 0.5 * (image[..., :-1] + image[..., 1:])
half_error = (half[..., :-1] - half_expected).abs().max().item()
print("half-pixel translation = average of two neighbours, max error:", half_error)
"""),
md(r"""
## 6. Nearest neighbour vs bilinear on a label map

A **label map** stores a class per pixel (here a toy map with four classes made
from intensity: 0 outside the eye, 1 dark, 2 medium, 3 bright). Bilinear
interpolation averages labels: where two classes meet it makes fractions that
belong to no class (the cell prints a few), and halfway between class 1 and
class 3 the average is 2, a class that is not there. Nearest
neighbour keeps the set of labels. This is why evaluation (Dice) warps label
maps with nearest neighbour, and `regedu.spatial.warp` picks it automatically
(`mode=None`) for integer tensors.
"""),
code(r"""
from skimage import filters

smooth = filters.gaussian(retina, sigma=2)
fov = smooth > 0.05
q1, q2 = np.quantile(smooth[fov], [0.3, 0.9])
labels_np = np.where(fov, 1 + (smooth > q1) + (smooth > q2), 0).astype(np.int64)
labels = torch.from_numpy(labels_np)[None, None]

lab_bilinear = my_warp(labels.float(), u)
lab_nearest = my_warp(labels.float(), u, sampler=nearest_sampler)
lab_library = warp(labels, u)          # integer input: nearest, dtype kept
not_a_label = ~torch.isin(lab_bilinear, torch.tensor([0.0, 1.0, 2.0, 3.0]))
print(f"bilinear: {not_a_label.float().mean():.1%} of pixels hold a value that is no label, "
      f"e.g. {[round(v, 2) for v in lab_bilinear[not_a_label & (lab_bilinear > 1)][:4].tolist()]}")
print("nearest labels:", torch.unique(lab_nearest).tolist(), "| library dtype:", lab_library.dtype)
disagree = lab_nearest.long() != lab_library
nearest_agrees = 1 - disagree.float().mean().item()
# Where a sampling point sits halfway between two pixels, rounding may go either way.
points = grid_generator(u)
halfway = ((points - points.floor() - 0.5).abs() < 1e-3).any(dim=1, keepdim=True)
print(f"hand-made nearest agrees with regedu.spatial.warp on {nearest_agrees:.4%} of pixels; "
      f"{int(disagree.sum())} differ, {int((disagree & halfway).sum())} of them at a halfway point")

fig, ax = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
crop = (slice(size // 3, 2 * size // 3),) * 2
ax[0].imshow(labels_np[crop], cmap="viridis", vmin=0, vmax=3); ax[0].set_title("labels")
ax[1].imshow(lab_bilinear[0, 0][crop], cmap="viridis", vmin=0, vmax=3); ax[1].set_title("bilinear: blended 'labels'")
im = ax[2].imshow(lab_nearest[0, 0][crop], cmap="viridis", vmin=0, vmax=3); ax[2].set_title("nearest: real labels")
for a in ax: a.axis("off")
fig.colorbar(im, ax=ax, shrink=0.8, ticks=[0, 1, 2, 3], label="label value (0 outside, 1 dark, 2 medium, 3 bright)")
plt.show()
"""),
md(r"""
(If the two nearest-neighbour results differ anywhere, it is where a sampling
point sits exactly halfway between two pixels and rounding can go either way:
the cell above counts those pixels, and the checks make sure no other pixel differs.)

## 7. Deformation-grid playground

`regedu.viz.DeformationPlayground` draws a random smooth displacement and
shows the warped retina, the **deformed grid** (a regular grid drawn on the
moving image and carried along by the warp exactly like the image, i.e. the
curves where a coordinate of $\varphi(x) = x + u(x)$ is constant) and the Jacobian
determinant (notebook 02). Move the sliders: `amplitude` scales the field (in
pixels), `smoothness` is the spacing of the random vectors that are
interpolated into a field (`regedu.spatial.random_field`; small: wiggly). Switch the interpolation to `nearest` and zoom in
on the vessels to see the staircase it makes. Look for the amplitude at which
grid lines start to cross: that is *folding*, the subject of notebook 02.

(Sliders need a live Jupyter kernel; in a static view you see the default.)
"""),
code(r"""
from regedu.viz import DeformationPlayground

DeformationPlayground(retina, amplitude=size / 16, smoothness=size / 10)
"""),
md(r"""
## 8. The sampler is differentiable: learn a translation

An STN is trained by backpropagating through the sampler. The smallest possible
"network" has two parameters, a translation $t$. We make a moving image whose
true alignment is $t^* = (3.0, -4.5)$ pixels and let gradient descent on the
mean squared error find it, through our hand-made sampler. To keep this quick
we work on a 128×128 copy (the method does not depend on the size). (A blurred image
gives a wider basin of attraction: gradients of a sharp image only "see" a
pixel or two.) The loss is taken away from the border: pixels that slid in
from outside the image hold zeros in one image and not in the other, and would
pull the optimum away from the truth.
"""),
code(r"""
small = min(size, 128)
fixed = torch.from_numpy(transform.resize(filters.gaussian(retina, sigma=3 * size / 128), (small, small),
                                          anti_aliasing=True).astype(np.float32))[None, None]
t_true = torch.tensor([3.0, -4.5])
# moving(y) = fixed(y - t*), so moving(x + t*) = fixed(x): the answer is u = t*.
moving = warp(fixed, -t_true.view(1, 2, 1, 1).expand(1, 2, small, small))

m = small // 8                      # ignore a border of m pixels
t_hat = torch.zeros(2, requires_grad=True)
optimiser = torch.optim.Adam([t_hat], lr=0.2)
path = []
for step in range(150):
    warped = my_warp(moving, t_hat.view(1, 2, 1, 1).expand(1, 2, small, small))
    loss = (warped - fixed)[..., m:-m, m:-m].square().mean()
    optimiser.zero_grad(); loss.backward(); optimiser.step()
    path.append(t_hat.detach().clone())
translation_found = t_hat.detach()
print(f"true t = {t_true.tolist()}, learned t = {[round(v, 3) for v in translation_found.tolist()]}")
path = torch.stack(path)
plt.plot(path[:, 0], label="t (rows)"); plt.plot(path[:, 1], label="t (columns)")
plt.axhline(float(t_true[0]), ls=":", c="C0"); plt.axhline(float(t_true[1]), ls=":", c="C1")
plt.xlabel("gradient step"); plt.ylabel("pixels"); plt.legend(); plt.title("learning a translation through the sampler"); plt.show()
"""),
md(r"""
A registration network does the same thing with millions of parameters: a
U-Net maps the pair $(M, F)$ to a whole field $u$, the STN warps $M$, and the
similarity between $F$ and $M \circ \varphi$ is backpropagated through the sampler
into the network. Notebook 04 trains one.

## Exercises

1. Replace `bilinear_sampler` by `nearest_sampler` in section 8. Does the
   translation still get learned? Why not? (Hint: what is the derivative of
   `round`?)
2. Change the padding: make `read` return the nearest edge pixel instead of 0
   outside the image, and compare with `warp(image, u, padding="border")`.
3. In section 5, which way does the image move for $u = (0, +10)$? Predict,
   then check.
4. Extend `grid_generator` and `bilinear_sampler` to 3D (eight neighbours).

## Checks

These fail if the notebook stops teaching what it claims.
"""),
code(r"""
assert holes > 0.2, f"pushing with a zoom should leave holes, got {holes:.1%}"
assert diff_bilinear < 1e-5, f"hand-made bilinear warp differs from regedu.spatial.warp by {diff_bilinear}"
assert abs(u.norm(dim=1).max() - size / 10) < 1e-3, "the random field's longest vector should be a tenth of the image"
assert translation_error == 0.0, f"an integer translation must be exact, error {translation_error}"
assert half_error < 1e-6, f"a half-pixel shift must average two neighbours, error {half_error}"
assert not_a_label.float().mean() > 0.002, "bilinear interpolation of labels should create non-labels"
assert set(torch.unique(lab_nearest).tolist()) <= {0.0, 1.0, 2.0, 3.0}, "nearest neighbour must keep the label set"
assert lab_library.dtype == torch.int64, "warp must keep the dtype of an integer label map"
assert nearest_agrees > 0.999, f"hand-made nearest should agree with the library, got {nearest_agrees:.4%}"
assert not (disagree & ~halfway).any(), "hand-made and library nearest may only differ at halfway points"
# Exercise 1's answer: rounding has no gradient, so nearest-neighbour sampling cannot learn t.
t_probe = torch.zeros(2, requires_grad=True)
assert not my_warp(moving, t_probe.view(1, 2, 1, 1).expand(1, 2, small, small), sampler=nearest_sampler).requires_grad, \
    "nearest-neighbour sampling should give no gradient with respect to the translation"
assert (translation_found - t_true).abs().max() < 0.1, f"learned translation {translation_found.tolist()} is not {t_true.tolist()}"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("01_warping_and_stn.ipynb", cells))
