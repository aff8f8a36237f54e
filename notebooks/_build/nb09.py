"""Notebook 09: full-resolution training on a GPU, with a reduced run on CPUs."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 09 · Full-resolution training on a GPU

The VV-Net paper trains at **160x192x224** (1 mm brains), batch 1, on one
16 GB GPU; VoxelMorph's experiments use the same crop. This notebook trains
VoxelMorph and VV-Net at that size with **automatic mixed precision** (AMP) and
prints what it costs: seconds per step and peak GPU memory.

**Without a GPU** (Binder, CI, a laptop) the same cells run a *reduced*
configuration and say so in a banner: the 4 mm grid, and a handful of steps
that **fine-tune** the two networks of notebook 10's semi-supervised
comparison (`checkpoints/brain_unet_4mm_semi_lr5e-4_s0.pt`,
`checkpoints/brain_vvnet_4mm_semi_lr5e-4_s0.pt`: the same data, steps, batch
and loss, checked at the end), since a handful of steps from scratch is too few to expect
learning (notebook 06 says why). Everything else (the data, the code, the
measurements, the checks) is the same, so you can read the notebook here and
run it unchanged where there is a GPU:
`REGEDU_PROFILE=gpu jupyter nbconvert --to notebook --execute 09_full_resolution_gpu.ipynb`.

The data are notebook 06's realistic subjects (pose, a real brain's anatomy,
intensity changes), **pre-aligned to the atlas with ANTs affine** as the
paper prepares its data, and notebook 10's test sets: new subjects of the
training brains and subjects of the held-out donors. In the `gpu` profile they
are made at 1 mm the first time they are used, each with its own ANTs
pre-alignment (its cost per test subject, and the grid, are printed below), so
the full run cycles through a smaller pool of training subjects than the
profile's pairs (the count is printed below).

**Learning goals.** After this notebook you can

1. say what dominates the memory of 3D registration training (activations, not
   weights) and estimate it before running;
2. switch on mixed precision and channels-last memory with `train.fit` and
   explain why registration losses are still computed in float32;
3. measure time per step and peak memory honestly (warm-up, synchronisation,
   `torch.cuda.max_memory_allocated`);
4. compare the estimate of `nets.summary` with the measured peak.
"""),
code(PROFILE_CELL),
code(r"""
import resource
import time

import numpy as np
import torch
from IPython.display import HTML, display

from pathlib import Path

from regedu import checkpoints, datasets, evaluate, losses, nets, train, viz

cuda = torch.cuda.is_available()
full = cuda and profile.paper_scale
# The two networks of notebook 10's semi-supervised comparison: the reduced run fine-tunes them, on their grid.
shipped = {"unet": Path("checkpoints/brain_unet_4mm_semi_lr5e-4_s0.pt"),
           "vvnet": Path("checkpoints/brain_vvnet_4mm_semi_lr5e-4_s0.pt")}
states = {name: checkpoints.load_checkpoint(path) for name, path in shipped.items()}
recipes = {name: checkpoints.training_recipe(state) for name, state in states.items()}
spacing = 1 if full else int(recipes["unet"]["spacing"][0])
if full:
    print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
else:
    reason = "no CUDA GPU on this machine" if not cuda else f"profile '{profile.name}' (set REGEDU_PROFILE=gpu)"
    display(HTML(
        "<div style='padding:0.8em;border:2px solid #c60;background:#fff4e5;color:#000'>"
        f"<b>Reduced configuration</b> ({reason}): this run fine-tunes the project's networks "
        f"on their own {spacing:g} mm grid for a few steps, in float32, on the CPU. The numbers below are "
        "<b>not</b> the full-resolution ones; the full run needs a CUDA GPU and the <code>gpu</code> profile.</div>"))
"""),
md(r"""
## 1. Estimate first

A 3D registration network holds, for the backward pass, several feature maps of
the *full* volume: 160x192x224 is 6.9 million voxels, so one 16-channel float32
map is 440 MB (160 x 192 x 224 x 16 x 4 bytes), half that in 16 bits. How many
such maps each network keeps, and the small share of the weights (with their
gradients and Adam's moments), are printed below; the share is checked at the
end.
`nets.summary` measures the saved activations on a smaller grid and scales them;
`amp=True` measures under autocast (16-bit activations).
"""),
code(r"""
paper_size = (160, 192, 224)
configs = {"VoxelMorph": dict(name="unet", spatial_dims=3), "VV-Net": dict(name="vvnet", spatial_dims=3)}
max_voxels = 80 * 96 * 112 if full else 20 * 24 * 28   # CPUs: measure small (memory budget)
estimates, weight_share = {}, {}
for label, cfg in configs.items():
    s = nets.summary(nets.from_config(cfg), paper_size, max_voxels=max_voxels, amp=True)
    estimates[label] = s.train_bytes
    weight_share[label] = 4 * s.param_bytes / s.train_bytes    # weights, gradients, Adam's two moments
    maps = s.activation_bytes / (np.prod(paper_size) * 16 * 2)   # 16-channel maps of 2-byte values
    print(f"{label:<11} {s.params:>10,} parameters; estimated training memory at 160x192x224 "
          f"with AMP: {s.train_bytes / 2**30:.1f} GiB, the activations of about {maps:.0f} full-volume 16-channel "
          f"16-bit maps; weights, gradients and Adam {weight_share[label]:.2%} of it")
"""),
md(r"""
## 2. Mixed precision

`train.fit(..., amp=True)` runs the network's forward pass under
`torch.autocast(float16)`: convolutions run on tensor cores and their
activations take half the memory. Two details matter for registration:

* the **loss is computed in float32**: local NCC subtracts nearly equal window
  sums, which float16 rounds to noise, and the diffusion term squares small
  gradients; `fit` casts the network's outputs back to float32 before the loss;
* a **gradient scaler** multiplies the loss before the backward pass so that
  small float16 gradients do not underflow to zero, and divides them back
  before Adam's step.

`channels_last=True` (also the default on CUDA) stores feature maps
channel-innermost, the layout cuDNN's fastest 3D convolutions use.
"""),
code(r"""
objective = recipes["unet"]["losses"]
assert all(r["losses"] == objective for r in recipes.values()), f"the two checkpoints should share one loss: {recipes}"
atlas = datasets.mni_brain(spacing)
shape = tuple(atlas.image.shape[1:])
structures = atlas.structures()
labels = list(structures)
# At 1 mm each subject is pre-aligned by ANTs the first time, before it is pooled on disk: the
# full run cycles through a smaller pool.
n_train = min(profile.n_train_pairs, 16) if full else profile.n_train_pairs
train_pairs = datasets.RealisticPairs(n_train, anatomy="train", seed=0, spacing_mm=spacing)
n_test = max(1, profile.n_test_pairs // 2)
test_sets = datasets.course_test_sets({name: n_test for name in datasets.COURSE_TEST_SETS}, spacing_mm=spacing)
test_pairs = [pair for pairs in test_sets.values() for pair in pairs]
print(f"{len(train_pairs)} training subjects of {', '.join(train_pairs.names)}; test pairs:",
      {name: len(pairs) for name, pairs in test_sets.items()}, f"on the {spacing:g} mm grid")
print("loss (both checkpoints'):", objective)
print(f"ANTs pre-alignment of each test subject on the {spacing:g} mm grid, when it was first made: "
      f"{np.mean([p['meta']['seconds'] for p in test_pairs]):.1f} s on average")

steps = min(profile.steps_3d, 500) if full else {"ci": 6, "cpu": 12}.get(profile.name, 12)
warmup = 3 if full else 1
print(f"grid {'x'.join(map(str, shape))}, {steps} timed steps after {warmup} warm-up step(s), "
      f"AMP {'on' if full else 'off (CPU)'}")
"""),
code(r"""
def measure(cfg):
    # Warm-up steps (cuDNN autotuning, allocator growth) are not timed.
    torch.manual_seed(0)
    model = nets.from_config(cfg) if full else checkpoints.load_model(states[cfg["name"]]).train()
    device = "cuda" if full else "cpu"
    options = dict(losses=objective, labels=labels, grad_clip=1.0, lr=1e-4, device=device,
                   amp=full, channels_last=full, progress=False)
    train.fit(model, train_pairs, steps=warmup, **options)
    if full:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    history = train.fit(model, train_pairs, steps=steps, seed=1, **options)
    if full:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if full else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return model.eval(), history, seconds, peak


if not full:
    for name, path in shipped.items():
        print(checkpoints.checkpoint_note(path, states[name]).splitlines()[0])
runs = {}
for label, cfg in configs.items():
    runs[label] = measure(cfg)
    _, history, seconds, peak = runs[label]
    what = "peak GPU memory (max_memory_allocated)" if full else "peak resident memory of this process"
    print(f"{label:<11} {seconds:6.2f} s per step; {what}: {peak / 2**30:.2f} GiB")
"""),
md(r"""
On a GPU, compare the measured peak with the estimate of section 1: the
estimate counts activations, weights, gradients and Adam's moments; the
allocator adds workspace for cuDNN and some fragmentation. On the CPU the
"peak" is the whole process (Python, data, every model so far), so it is an
upper bound, not the network's share.

## 3. Did it learn, and how well does it register?
"""),
code(r"""
baseline = "affine (pre-alignment)"
results = evaluate.compare({baseline: evaluate.identity, **{k: run[0] for k, run in runs.items()}},
                           test_pairs, labels=structures, progress=False, warmup=True)
report = evaluate.summary(results, metrics=("dice", "percent_folding", "seconds"), by="dataset")
report
"""),
code(r"""
ncc = {k: np.asarray(run[1]["train"]["ncc"]) for k, run in runs.items()}
for k, v in ncc.items():
    half = max(1, len(v) // 2)
    print(f"{k:<11} NCC term: first half {v[:half].mean():.4f} -> second half {v[half:].mean():.4f}")
with torch.no_grad():
    test_ncc = {baseline: float(np.mean([float(losses.ncc_local(p["fixed"][None], p["moving"][None])) for p in test_pairs]))}
    test_ncc.update({k: float(np.mean([float(losses.ncc_local(p["fixed"][None], run[0].cpu()(p["moving"][None], p["fixed"][None]).warped))
                                       for p in test_pairs])) for k, run in runs.items()})
print("local NCC of the test pairs (lower is better):", {k: round(v, 4) for k, v in test_ncc.items()})
mean_dice = {ev.name: ev.mean_dice() for ev in results}
held_out_dice = {ev.name: ev.mean_dice("held-out") for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
fig = viz.plot_history(runs["VV-Net"][1], keys=["ncc", "diffusion"])
fig
"""),
md(r"""
In the reduced configuration the networks were trained before this notebook
(the handful of steps here only continue them), so their Dice says what those
earlier runs bought, and the checks hold it above the pre-alignment's, on the
held-out donors as well as overall. On a GPU in
the `gpu` profile, new networks train for up to 500 steps at full resolution
(section 2 prints the time per step; this project has not had a GPU to measure
it on); the paper trains for many thousands.

## Exercises

1. On a GPU: run `measure` with `amp=False` (edit `options`). How much more
   memory and time does float32 take?
2. Double the batch size (`batch_size=2` in `train.fit`). Does memory double?
   Does time per step?
3. Which is larger at 160x192x224: VoxelMorph's or VV-Net's activation memory?
   Explain it from the architectures (resolution of the feature maps, not the
   parameter count).

## Checks
"""),
code(r"""
print("mean Dice, all test pairs:", {k: round(v, 4) for k, v in mean_dice.items()})
print("mean Dice, held-out donors:", {k: round(v, 4) for k, v in held_out_dice.items()})
seconds = {k: run[2] for k, run in runs.items()}
peaks = {k: run[3] for k, run in runs.items()}
assert all(np.isfinite(list(seconds.values()))) and all(s > 0 for s in seconds.values()), f"time per step must be measured: {seconds}"
assert all(np.isfinite(v).all() for v in ncc.values()), "training losses must be finite (AMP overflow would give inf/NaN)"
assert all(e > 0 for e in estimates.values()), f"memory estimates must be positive: {estimates}"
assert all(w < 0.02 for w in weight_share.values()), f"the weights (with gradients and Adam) should be under 2 % of the training memory: {weight_share}"
# The prose: the two checkpoints had the same data, steps, batch, learning rate and loss.
budgets = {name: {k: v for k, v in r.items() if k not in ("model", "parameters", "validation_dice")} for name, r in recipes.items()}
assert budgets["unet"] == budgets["vvnet"], f"the two checkpoints should have had the same budget: {budgets}"
if full:
    assert all(p < 16 * 2**30 for p in peaks.values()), f"batch-1 training at 160x192x224 with AMP should fit the paper's 16 GB GPU: {peaks}"
    assert all(mean_dice[k] > mean_dice[baseline] for k in runs), f"both networks should beat the pre-alignment after training: {mean_dice}"
else:
    MARGIN = 0.03
    assert all(mean_dice[k] > mean_dice[baseline] + MARGIN for k in runs), f"the fine-tuned networks should beat the pre-alignment by more than {MARGIN} Dice: {mean_dice}"
    assert all(held_out_dice[k] > held_out_dice[baseline] + MARGIN for k in runs), f"... on the held-out donors too: {held_out_dice}"
    assert all(test_ncc[k] < test_ncc[baseline] for k in runs), f"the networks should make the test pairs more similar (local NCC, lower is better): {test_ncc}"
    assert all(f < 1.0 for f in folds.values()), f"folding should stay below 1% of the voxels: {folds}"
print("all checks passed" + ("" if full else " (reduced configuration, no GPU)"))
print(f"peak memory of this kernel: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""),
]

if __name__ == "__main__":
    print(write("09_full_resolution_gpu.ipynb", cells))
