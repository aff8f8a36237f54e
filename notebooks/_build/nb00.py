"""Notebook 00: welcome (environment check, course map, sliders, profiles)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 00 · Welcome to regedu

This course teaches **deep-learning image registration** by doing it: you will
warp a retinal photograph by hand, measure similarity and smoothness, run
classical registration, train networks that register fundus images and brain
MRI, and evaluate them the way papers do.

**Learning goals.** After this notebook you can

1. check that your environment works (Python, PyTorch, CUDA or not, the course data);
2. find your way through the course and know which notebooks want a GPU;
3. use a slider to explore an image;
4. switch between the `ci`, `cpu` and `gpu` profiles;
5. warp your first image with `regedu.spatial.warp`.
"""),
code(PROFILE_CELL),
md(r"""
## 1. Environment check

The next cell prints the versions the course relies on. If an import fails,
run `make lab` from the repository root: it builds the environment.
"""),
code(r"""
import importlib, platform, sys
import torch

versions = {"python": platform.python_version()}
for name in ["torch", "numpy", "scipy", "skimage", "matplotlib", "nibabel", "ipywidgets"]:
    versions[name] = importlib.import_module(name).__version__
versions["regedu"] = regedu.__version__
for name, v in versions.items():
    print(f"{name:>11}: {v}")
print(f"{'CUDA':>11}: {'yes, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no (CPU only)'}")
print(f"{'threads':>11}: {torch.get_num_threads()}")
"""),
md(r"""
## 2. The course map

| # | notebook | what you do | GPU? |
| --- | --- | --- | --- |
| 00 | welcome | this page | no |
| 01 | warping and the STN | build $\varphi(x) = x + u(x)$, a grid generator and a bilinear sampler by hand | no |
| 02 | similarity and regularity | MSE vs NCC vs MI, the diffusion regulariser, Dice on labels, Jacobian and folding | no |
| 03 | classical registration | affine by optimisation, dense instance optimisation, ANTs SyN | no |
| 04 | FIRE fundus, unsupervised | a U-Net + STN trained without labels on fundus pairs, FIRE evaluation | no |
| 05 | supervised vs unsupervised, diffeomorphic | RegNet-style training on synthetic fields, velocity fields | no |
| 06 | VoxelMorph in 3D | atlas-based brain registration, Dice over structures | helps |
| 07 | cascades and pyramids | affine + deformable, recursive cascades, a pyramid network | helps |
| 08 | VV-Net | build the paper's network, deep supervision, train it | helps |
| 09 | full-resolution GPU training | 160x192x224 with mixed precision | **yes** (runs reduced on CPU) |
| 10 | evaluation like a paper | Affine vs SyN vs VoxelMorph vs VV-Net | helps |
| 11 | atlas-based segmentation | label propagation, label fusion, template vs atlas selection | no |
| 12 | homework | exercises checked automatically | no |
| 13 | trustworthy evaluation | inverse consistency (ICON), lambda on validation, HD95 / ASD, FLE / FRE / TRE, label leakage, paired tests | no |
| 14 | learned similarity and regularisers | a discriminator as similarity (AUC against NCC and MSE), adversarial similarity and adversarial deformation regularisation against NCC and diffusion | no |
| 15 | agents and augmentation | a rigid agent trained by deep Q-learning, RegNet's synthetic fields, a global and a local PCA deformation model, augmentation when only 8 pairs exist | no |
| 16 | supervised and joint models | regress a classical method's fields (Cao et al.), SVF-Net's velocity regression, joint segmentation + registration, Shan et al. with unlabelled data | no |
| 17 | transformers and diffusion models | TransMorph's shifted windows, TransMorph against the U-Net at a similar size and budget, what DiffuseMorph does | no |

Every notebook starts with the profile cell you saw above and ends with a cell of
**checks**: `assert`s that fail if the notebook stops teaching what it claims.

## 3. Profiles

One switch chooses how large the course's runs are. The table gives each
profile's defaults; on CPUs the 3D notebooks fine-tune a shipped checkpoint
on its own 4 mm grid (40x48x56) with a short step count of their own, and
each prints the grid and the steps it uses:

| profile | for | fundus | brain volume |
| --- | --- | --- | --- |
| `ci` | automated checks: the smallest runs that still learn measurably (README lists each notebook's time) | 128 px | 40x48x56 |
| `cpu` | a laptop or Binder: larger runs, real results (README lists each notebook's time) | 256 px | 80x96x112 |
| `gpu` | paper scale | 512 px | 160x192x224 |

The default is `gpu` when CUDA is available, else `cpu`. Set the environment
variable `REGEDU_PROFILE` before starting Jupyter, or call
`regedu.profiles.set_profile("ci")` at the top of a notebook.
"""),
code(r"""
from regedu.profiles import PROFILES, set_profile

for name, p in PROFILES.items():
    print(f"{name:>4} defaults: fundus {p.fundus_size} px, brain {p.brain_shape} at {p.brain_spacing_mm} mm, "
          f"{p.steps_2d} 2D / {p.steps_3d} 3D training steps")
print("viewer slices at full resolution:", PROFILES["gpu"].slices)
"""),
md(r"""
## 4. Sliders

Many figures in this course come with sliders: drag one and the picture follows.
Here is the simplest kind: a slider that picks a row of the retina photo and
plots its green-channel intensity profile. (The green channel shows vessels
best, so the course uses it throughout.) If you read this outside a live
notebook, the figure below still shows the default row.
"""),
code(r"""
import numpy as np
import matplotlib.pyplot as plt
import ipywidgets as widgets
from skimage import data, transform

size = profile.fundus_size
green = transform.resize(data.retina()[..., 1] / 255.0, (size, size), anti_aliasing=True).astype(np.float32)

from regedu import viz

def show_row(row):
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    a.imshow(green, cmap="gray"); a.axhline(row, color="tab:red"); a.set_title("green channel")
    b.plot(green[row]); b.set_ylim(0, 1); b.set_title(f"intensity along row {row}")
    b.set_xlabel("column (px)"); b.set_ylabel("green intensity")
    return fig

# Like ipywidgets.interact, but a static view (nbconvert, a web viewer) still gets the figure.
viz.InteractiveFigure(show_row, row=widgets.IntSlider(size // 2, 0, size - 1, description="row"))
"""),
md(r"""
## 5. Your first warp

A **displacement field** $u$ says, for every pixel $x$ of the fixed image, where
to look in the moving image: $\text{warped}(x) = \text{moving}(x + u(x))$.
Shapes in regedu are always `(batch, channels, rows, columns)` for images and
`(batch, 2, rows, columns)` for 2D displacements, in pixels, channel 0 along the
rows and channel 1 along the columns.

Below, every pixel looks 20 pixels further down: the picture moves **up**.
"""),
code(r"""
from regedu.spatial import warp

moving = torch.from_numpy(green)[None, None]
u = torch.zeros(1, 2, size, size)
u[:, 0] = 20.0   # look 20 rows further down
warped = warp(moving, u)

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, img, title in zip(axes, [moving, warped], ["moving", "warped: content moved up"]):
    ax.imshow(img[0, 0], cmap="gray"); ax.set_title(title); ax.axis("off")
difference = (warped - moving)[0, 0]
lim = difference.abs().max()
im = axes[2].imshow(difference, cmap="RdBu_r", vmin=-lim, vmax=lim)   # symmetric: white = no change
axes[2].set_title("difference: warped - moving"); axes[2].axis("off")
fig.colorbar(im, ax=axes[2], shrink=0.8, label="intensity difference")
plt.show()
"""),
md(r"""
**Exercise.** Change `u[:, 0] = 20.0` to `u[:, 1] = -15.0`. Which way does the
picture move now, and what fills the strip that appears? (Answer: right; zeros,
because outside the image we read 0. The checks below test this answer.)

## 6. Checks

These run in automated tests too: they fail if the environment or the first
warp stop behaving as this page says.
"""),
code(r"""
assert sys.version_info >= (3, 10), f"regedu needs Python >= 3.10, this is {platform.python_version()}"
assert int(torch.__version__.split(".")[0]) >= 2, f"regedu needs torch >= 2, found {torch.__version__}"
assert profile.name in PROFILES, f"unknown profile {profile.name}"
assert profile.device == ("cuda" if torch.cuda.is_available() else "cpu"), "the profile picked the wrong device"
assert green.shape == (size, size) and 0 <= green.min() and green.max() <= 1, "the retina image should be in [0, 1]"
assert torch.equal(warped[0, 0, : size - 20], moving[0, 0, 20:]), \
    "a displacement of +20 rows should move the content up by exactly 20 rows"
assert warped[0, 0, size - 20 :].abs().max() == 0, "pixels that look outside the image should be 0"
u_exercise = torch.zeros(1, 2, size, size)
u_exercise[:, 1] = -15.0
moved = warp(moving, u_exercise)
assert torch.equal(moved[0, 0, :, 15:], moving[0, 0, :, : size - 15]) and moved[0, 0, :, :15].abs().max() == 0, \
    "the exercise's answer: u[:, 1] = -15 moves the picture 15 columns right and fills the left strip with zeros"
# The profile table of section 3.
table = {"ci": (128, (40, 48, 56)), "cpu": (256, (80, 96, 112)), "gpu": (512, (160, 192, 224))}
for name, (fundus, brain) in table.items():
    assert (PROFILES[name].fundus_size, PROFILES[name].brain_shape) == (fundus, brain), \
        f"section 3's table is out of date for {name}: {PROFILES[name]}"
print("All checks passed: the environment works and you warped your first image.")
"""),
]

if __name__ == "__main__":
    print(write("00_welcome.ipynb", cells))
