"""Notebook 17: transformers (TransMorph against the U-Net at a similar size) and diffusion
models (DiffuseMorph: what it does, why it is out of scope here)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 17 · Transformers and diffusion models

The survey (seed 001) closes its list of methods with two recent families:
**TransMorph** (2021-22), "a transformer-based unsupervised medical image
registration method", and **DiffuseMorph** (2022), "an unsupervised method
based on a diffusion model". This notebook builds the first from its paper's
parts, trains it against the VoxelMorph U-Net at a similar parameter count and
an equal budget, and explains what the second does and why it does not fit a
CPU course.

**Learning goals.** After this notebook you can

1. say what a Swin transformer block computes: self-attention inside windows,
   shifted windows that let information cross window borders, and a relative
   position bias;
2. build TransMorph from those blocks (`regedu.nets.create("transmorph")`) and
   count its parameters against the U-Net's;
3. compare two architectures fairly: the same pairs, loss, optimiser, steps and
   batch, held-out test pairs, several seeds and a paired test, and state the
   verdict the numbers support at this budget;
4. explain DiffuseMorph's idea and what training it would cost.

A correction first. The survey says TransMorph "uses a Transformer model to
carry out the spatial transformation" (使用了Transformer 模型来进行空间变换).
It does not: in TransMorph (Chen et al., *Medical Image Analysis* 2022) the
transformer is the **encoder** that reads the image pair; a convolutional
decoder turns its features into a displacement field, and the warp is the same
spatial transformer as VoxelMorph's (notebook 01). Only the network that
predicts the field changes.
"""),
code(PROFILE_CELL),
code(r"""
import time

import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt

from regedu import metrics, nets, viz
from regedu.datasets import BrainPairs, mni_brain
from regedu import evaluate
from regedu.losses import NCC
from regedu.nets.transmorph import _SwinBlock, _shift_mask
from regedu.stats import paired_test
from regedu.train import fit

started = time.perf_counter()
# 2D slices at 4 mm in every profile: the question is the architecture, and 2D at 4 mm lets the
# cpu profile afford three seeds per model (the gpu profile runs the same comparison).
atlas = mni_brain(4)
n_train, n_test = 64, (8 if profile.name == "ci" else 16)
steps = 200 if profile.name == "ci" else 300
seeds = (0,) if profile.name == "ci" else (0, 1, 2)
# Subject-to-subject pairs: each image is the template under its own random diffeomorphism, bias
# field and noise; the test pairs come from another seed, never seen in training.
train_pairs = BrainPairs(n_train, atlas=atlas, mode="subject", ndim=2, seed=1700, cache=True)
test_pairs = BrainPairs(n_test, atlas=atlas, mode="subject", ndim=2, seed=1750, cache=True)
items = [test_pairs[i] for i in range(len(test_pairs))]
moving, fixed = (torch.stack([p[k] for p in items]) for k in ("moving", "fixed"))
moving_seg, fixed_seg = (torch.stack([p[k] for p in items]) for k in ("moving_seg", "fixed_seg"))
structures = metrics.labels_present(fixed_seg, moving_seg)
shape = tuple(moving.shape[2:])
print(f"{n_train} training and {n_test} test pairs of {shape} slices at {atlas.spacing_mm:g} mm, "
      f"{len(structures)} structures; {steps} steps x {len(seeds)} seed(s) per model")
"""),
md(r"""
## 1. Attention inside windows

A transformer turns the image into **tokens**: TransMorph cuts the pair into
patches (a strided convolution) and each patch becomes a vector. Self-attention
lets every token take a weighted mean of the others, with weights computed from
the tokens themselves, so a token can draw on anything it attends to, near or
far. Over all tokens of a 3D volume that is too many pairs, so the Swin
transformer attends only inside **windows** of $w \times w$ tokens, adds a
learned bias for each relative position inside a window, and, in every second
block, **shifts** the windows by $w/2$ so that information crosses the borders
of the previous partition. After the cyclic shift a window at the image's edge
holds tokens from opposite sides; a mask keeps them from attending to each other.

The cell below measures this on one block of each kind: how much the output at
a token depends on the input at another (the gradient), for a token pair in
different windows of the plain partition, and for the two corners a cyclic
shift brings together.
"""),
code(r"""
torch.manual_seed(0)
plain = _SwinBlock(2, dim=8, heads=2, window=4, shift=0, mlp_ratio=2.0)
shifted = _SwinBlock(2, dim=8, heads=2, window=4, shift=2, mlp_ratio=2.0)
shifted.load_state_dict(plain.state_dict())          # the same weights: only the windows differ


def influence(block, target, size=8):
    # |d output[target] / d input| at every token: where the block reads from.
    x = torch.rand(1, size, size, 8, requires_grad=True)
    block(x)[(0, *target)].sum().backward()
    return x.grad[0].abs().sum(-1)


maps = {"plain windows": influence(plain, (3, 3)), "shifted windows": influence(shifted, (3, 3)),
        "shifted, corner (7, 7)": influence(shifted, (7, 7))}
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), layout="constrained")
for ax, (name, m) in zip(axes, maps.items()):
    im = ax.imshow(m > 0, cmap="Greys", vmin=0, vmax=1)
    ax.set_title(f"{name}: reads {int((m > 0).sum())} tokens")
    ax.add_patch(plt.Rectangle((-0.5, -0.5), 4, 4, fill=False, edgecolor="tab:red", lw=2))
    ax.set_xlabel("token column"); ax.set_ylabel("token row")
mask = _shift_mask((8, 8), 4, 2)
im = axes[3].imshow(torch.isfinite(mask[3]), cmap="Greys")
axes[3].set_title("mask of the corner window"); axes[3].set_xlabel("key token"); axes[3].set_ylabel("query token")
plt.show()
# Tokens read outside the plain partition's window of (3, 3), the top-left 4x4 (red square).
outside = {name: int((m > 0).sum() - (m[:4, :4] > 0).sum()) for name, m in maps.items() if "(7, 7)" not in name}
corner_reads = int((maps["shifted, corner (7, 7)"] > 0).sum())
print(f"The token (3, 3) reads {outside['plain windows']} tokens outside its window through a plain block "
      f"and {outside['shifted windows']} through a shifted one; the corner token (7, 7) reads "
      f"{corner_reads} tokens: (0, 0), rolled into its window, is masked "
      f"(influence {float(maps['shifted, corner (7, 7)'][0, 0]):.1f}).")
"""),
md(r"""
## 2. TransMorph at the U-Net's size

`regedu.nets.create("transmorph")` puts those blocks together as the paper
does: patch embedding, a Swin stage, patch merging (half the size, twice the
channels), a second Swin stage; a convolutional decoder goes back up,
concatenating each stage's features and convolutional skips of the input, and
the flow head and warp are VoxelMorph's. The paper's 3D model has an embedding
of 96 channels, four stages of depths (2, 2, 4, 2) and 46.8 M parameters for
160x192x224 volumes, cut into patches of 4 (a map of 40x48x56 tokens); ours
is cut down to the 2D U-Net's size, and takes patches of 2 so that the small
slices here still make a map of tokens of some size (printed below).
"""),
code(r"""
builders = {
    "U-Net (VoxelMorph)": lambda: nets.create("unet", spatial_dims=2),
    "TransMorph": lambda: nets.create("transmorph", spatial_dims=2, patch=2),
}
n_params = {name: sum(p.numel() for p in build().parameters()) for name, build in builders.items()}
for name, n in n_params.items():
    print(f"{name:20s} {n:8,d} parameters")
ratio = n_params["TransMorph"] / n_params["U-Net (VoxelMorph)"]
print(f"TransMorph has {ratio:.2f}x the U-Net's parameters; patches of 2 make a "
      f"{shape[0] // 2}x{shape[1] // 2} map of tokens, each {2 * atlas.spacing_mm:g} mm across")
print(nets.summary(builders["TransMorph"](), shape))
"""),
md(r"""
## 3. An equal budget

Both networks get the same recipe: the same training pairs, local NCC
(window 5, for slices this small) + diffusion, Adam at lr 2e-3, batch 4, the same
number of steps, and the same seeds (the seed sets the initial weights and the
order of the pairs). Each is scored on the held-out test pairs: mean Dice over
the structures (labels warped with nearest neighbour) and folding.
"""),
code(r"""
objective = {"ncc": (NCC(window=5), 1.0), "diffusion": 1.0}
dice_per_pair, rows, histories, trained = {}, [], {}, {}


def pair_dice(disp):
    return evaluate.dice_per_pair(fixed_seg, moving_seg, disp, structures)


dice_per_pair["identity"] = pair_dice(torch.zeros(len(items), 2, *shape))
for name, build in builders.items():
    for seed in seeds:
        torch.manual_seed(seed)
        model = build()
        start = time.perf_counter()
        histories[name, seed] = fit(model, train_pairs, losses=objective, steps=steps, lr=2e-3,
                                    batch_size=4, seed=seed, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            disp = model.eval()(moving, fixed).disp
        dice_per_pair[name, seed] = pair_dice(disp)
        trained[name, seed] = model
        rows.append({"model": name, "seed": seed, "test Dice": dice_per_pair[name, seed].mean(),
                     "% folding": metrics.folding_stats(disp)["percent_folding"],
                     "ms per step": 1000 * seconds / steps})
runs = pd.DataFrame(rows)
table = runs.groupby("model")[["test Dice", "% folding", "ms per step"]].agg(["mean", "std"])
identity_dice = dice_per_pair["identity"].mean()
print(f"identity: test Dice {identity_dice:.4f}")
table.round(4)
"""),
code(r"""
fig, axes = plt.subplots(1, len(builders), figsize=(12, 3.4), layout="constrained", sharey=True)
for ax, name in zip(axes, builders):
    for seed in seeds:
        h = histories[name, seed]["train"]
        ax.plot(h["step"], h["loss"], alpha=0.8, label=f"seed {seed}")
    ax.set_title(name); ax.set_xlabel("step"); ax.set_ylabel("training loss (-NCC + diffusion)")
    ax.legend()
plt.show()
"""),
md(r"""
The verdict, from the numbers above: each network against the identity, and the
two against each other on the same test pairs (per-pair Dice averaged over the
seeds; a paired bootstrap interval and a Wilcoxon test, notebook 13).
"""),
code(r"""
mean_over_seeds = {name: np.mean([dice_per_pair[name, s] for s in seeds], axis=0) for name in builders}
comparison = paired_test(mean_over_seeds["U-Net (VoxelMorph)"], mean_over_seeds["TransMorph"],
                         names=("U-Net (VoxelMorph)", "TransMorph"), metric="Dice")
gain = {name: d.mean() - identity_dice for name, d in mean_over_seeds.items()}
for name, g in gain.items():
    print(f"{name}: test Dice {mean_over_seeds[name].mean():.4f}, {g:+.4f} over the identity")
print(comparison.summary())
if len(seeds) == 1:
    print(f"One seed in the {profile.name} profile cannot tell a difference between the networks from "
          f"one between seeds, so no ranking is claimed here (the cpu profile trains three).")
elif comparison.bootstrap.ci_low > 0 or comparison.bootstrap.ci_high < 0:
    leader = "TransMorph" if comparison.bootstrap.ci_low > 0 else "U-Net (VoxelMorph)"
    print(f"At {steps} steps on {n_train} pairs, {leader} leads on these {n_test} held-out pairs.")
else:
    print(f"At {steps} steps on {n_train} pairs the two do not differ clearly on these "
          f"{n_test} held-out pairs.")
time_ratio = table.loc["TransMorph", ("ms per step", "mean")] / table.loc["U-Net (VoxelMorph)", ("ms per step", "mean")]
print(f"A TransMorph training step took {time_ratio:.2f}x the U-Net's here.")
"""),
md(r"""
What the paper reports is a different regime: on brain MRI at 160x192x224,
trained for hundreds of epochs on a GPU, TransMorph scores above VoxelMorph
(and above its convolutional variants of equal size), which the authors credit
to attention's large effective receptive field. A comparison at a few hundred
steps on 2D slices, with one learning rate for both networks (tuned for
neither), says what happens in this regime only, whichever way it comes out.
To see where each network draws its field from, the cell below measures the
**effective receptive field** of the trained networks (seed 0): how much the
displacement at the centre pixel depends on every input pixel.
"""),
code(r"""
centre = tuple(n // 2 for n in shape)
fig, axes = plt.subplots(1, len(builders), figsize=(10, 3.6), layout="constrained")
spread = {}
for ax, name in zip(axes, builders):
    model = trained[name, seeds[0]]
    pair = torch.cat([moving[:1], fixed[:1]], 1).requires_grad_(True)
    out = model(pair[:, :1], pair[:, 1:])
    out.disp[(0, slice(None), *centre)].abs().sum().backward()
    g = pair.grad[0].abs().sum(0)
    g = g / g.sum()
    yy, xx = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    distance = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2).sqrt() * atlas.spacing_mm
    spread[name] = float((g * distance).sum())
    im = ax.imshow(g, cmap="magma")
    fig.colorbar(im, ax=ax, label="share of the gradient")
    ax.set_title(f"{name}: mean distance {spread[name]:.1f} mm")
    ax.set_xlabel("column (pixels)"); ax.set_ylabel("row (pixels)")
plt.show()
print("The displacement at the centre draws on input, on average, "
      + " and ".join(f"{d:.1f} mm away for {name}" for name, d in sorted(spread.items(), key=lambda x: -x[1])) + ".")
"""),
md(r"""
## 4. DiffuseMorph, and why it is not trained here

DiffuseMorph (Kim, Han and Ye, 2022; the survey's reference [8]) joins a
**denoising diffusion model** to a registration network. A diffusion model
learns to undo noise: training adds Gaussian noise of a random level to an
image and teaches a network to predict that noise, for every level from
almost none to pure noise. DiffuseMorph conditions that denoiser on the moving
and fixed images and noises the fixed one; the features the denoiser computes
feed a second network that outputs the deformation, and both are trained
together (the denoising loss plus an NCC + smoothness registration loss). Once
trained, one pass gives the field, and scaling the denoiser's features gives
a continuous path of deformations between the two images.

Why it is out of scope on a CPU: it trains two networks per step, and the
denoiser must learn every noise level, which would likely take many more steps
than the few hundred a course notebook can afford (the survey also notes its
high computational cost, 计算复杂度较高). A scaled-down version here would most
likely measure its failure to converge in the budget, not the method. What carries over is the idea:
the deformation network is a small head on features learned for another task,
the same idea as the joint models of notebook 16.

## Exercises

1. Train TransMorph with patches of 4 (`patch=4`), the paper's. How many
   tokens does a slice become, and what happens to the test Dice?
2. Make the windows 2x2 (`window=2`) or 8x8. What does the effective receptive
   field do, and the Dice?
3. Make the transformer diffeomorphic (`integrate_steps=7`, TransMorph-diff).
   Compare folding.
4. Train both networks four times longer. Does the verdict change?
5. Choose each network's learning rate on validation pairs (a third seed of
   `BrainPairs`, notebook 13), then compare again on the test pairs.

## Checks
"""),
code(r"""
assert outside["plain windows"] == 0 and outside["shifted windows"] > 0, \
    f"a plain block reads only its 4x4 window and a shifted one across its borders: {outside}"
assert float(maps["shifted, corner (7, 7)"][0, 0]) == 0.0, "the shift mask should keep opposite corners apart"
assert 0.8 < ratio < 1.2, f"the comparison needs similar sizes: TransMorph/U-Net parameters {ratio:.2f}"
for name, g in gain.items():
    assert g > 0.01, f"{name} should beat the identity on held-out pairs by 0.01 Dice: {g:+.4f}"
assert runs["% folding"].max() < 1.0, f"the diffusion term should keep folding under 1 %: {runs['% folding'].max():.3f}"
print(f"notebook run time {time.perf_counter() - started:.0f} s")
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("17_transformers_and_diffusion.ipynb", cells))
