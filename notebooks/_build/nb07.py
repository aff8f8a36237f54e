"""Notebook 07: affine + deformable pipelines, recursive cascades and pyramids."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 07 · Cascades and pyramids

One network, one forward pass, one field: VoxelMorph (notebook 06) has to get
large and small motions right at once. Three families of models split the work:

* **affine, then deformable**: the "ideal" pipeline of the registration survey (seed 001,
  section on pipelines): an affine network removes the global pose, a
  deformable U-Net the local differences, and a single spatial transformer warps
  the image once;
* **recursive cascades** (Zhao et al., *Recursive Cascaded Networks for
  Unsupervised Medical Image Registration*, ICCV 2019): register, warp, register
  the warped image again; with shared weights the same network can be applied
  more times at test time than in training;
* **pyramids** (Hu et al., *Dual-Stream Pyramid Registration Network*, MICCAI
  2019): coarse-to-fine inside one network, a residual field per resolution.

VV-Net (notebook 08) is a two-stage cascade with a pyramid-like helper network,
so this notebook is its background.

**Learning goals.** After this notebook you can

1. explain why cascades **compose fields** and warp the original image once,
   instead of warping a warped image again;
2. build the affine-then-deformable pipeline and read its affine matrix;
3. train recursive cascades with 1, 2 and 3 stages and run more recursions at
   test time;
4. explain how a pyramid network refines a field level by level;
5. compare every variant in one table: Dice over structures, folding, seconds.
"""),
code(PROFILE_CELL),
md(r"""
## 1. Data: subjects slightly out of pose

The atlas is notebook 06's. The subjects are the simpler kind the project's
first checkpoints were trained on (`datasets.BrainPairs`): the template under
random smooth deformations with intensity changes, and the six donors'
anatomy, already aligned to the template. The paper's data were affinely
pre-aligned with ANTs (notebook 06 does that to subjects that arrive out of
pose); here the pose is left to the network, so every subject gets a small
random affine misalignment (a few degrees, a few percent of scale, a few
voxels of shift), made with `regedu.spatial.affine_to_displacement`.
"""),
code(r"""
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

from regedu import checkpoints, datasets, evaluate, nets, train, viz
from regedu.losses import loss_terms
from regedu.spatial import affine_to_displacement, warp

atlas = datasets.mni_brain()
table = datasets.label_table()
labels = sorted(int(v) for v in table.loc[table["in_30"], "freesurfer"].unique())
names = {k: datasets.STRUCTURE_NAMES.get(k, str(k)) for k in labels}
shape = atlas.image.shape[1:]


def misalign(item, seed):
    # A random rotation about axis 0 (a few degrees), an anisotropic scaling and a shift (in 2 mm voxels).
    shape = item["moving"].shape[1:]
    g = np.random.default_rng(seed)
    angle = math.radians(g.uniform(-4, 4))
    matrix = np.eye(3, 4)
    matrix[1:, 1:3] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    matrix[:, :3] *= g.uniform(0.96, 1.04, size=3)[:, None]
    matrix[:, 3] = g.uniform(-2, 2, size=3) * shape[0] / 80
    disp = affine_to_displacement(torch.tensor(matrix, dtype=torch.float32)[None], shape, center="image")
    return {**item, "moving": warp(item["moving"][None], disp)[0],
            "moving_seg": warp(item["moving_seg"][None], disp, mode="nearest")[0]}, matrix


class Misaligned(torch.utils.data.Dataset):
    def __init__(self, pairs, seed):
        self.pairs, self.seed, self.cache, self.matrices = pairs, seed, {}, {}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        if i not in self.cache:
            # The applied matrix is kept aside (a pair's dict goes to the trainer as it is): the known
            # answer the affine stage is checked against.
            self.cache[i], self.matrices[i] = misalign(self.pairs[i], (self.seed, i))
        return self.cache[i]


donors = [datasets.donor_brain(d) for d in datasets.DONORS]
# Fine-tuning runs on the 4 mm grid in every profile but gpu (the grid of the checkpoint, with
# an eighth of a 2 mm grid's voxels); the test pairs are on this profile's grid.
train_spacing = profile.train_spacing_mm
atlas_train = datasets.mni_brain(train_spacing)
train_pairs = Misaligned(datasets.BrainPairs(profile.n_train_pairs, atlas=atlas_train, seed=0, subjects=[atlas_train] + [
    datasets.donor_brain(d, train_spacing) for d in datasets.DONORS[:4]]), seed=1)
n_test = max(1, profile.n_test_pairs // 2)
test_pairs, applied = [], []
for name, subjects, seed in (("synthetic", None, 100), ("donors", donors[4:], 101)):
    source = Misaligned(datasets.BrainPairs(n_test, atlas=atlas, subjects=subjects, seed=seed), seed + 1)
    for i in range(n_test):
        test_pairs.append({**source[i], "meta": {"dataset": name, "id": f"{name}-{i}"}})
        applied.append(source.matrices[i])
print(f"{len(train_pairs)} training pairs at {train_spacing:g} mm, {len(test_pairs)} test pairs at {'x'.join(map(str, shape))}")
angles = [math.degrees(math.atan2(abs(m[2, 1]), abs(m[2, 2]))) for m in applied]
scales = [abs(float(np.linalg.norm(m[k, :3])) - 1) for m in applied for k in range(3)]
shifts = [float(np.linalg.norm(m[:, 3])) * atlas.spacing_mm for m in applied]
print(f"misalignment of the test pairs: rotations up to {max(angles):.1f} degrees, scalings up to "
      f"{100 * max(scales):.1f} %, shifts up to {max(shifts):.1f} mm ({max(shifts) / atlas.spacing_mm:.1f} voxels)")
"""),
md(r"""
**Budget.** Training five 3D networks from scratch is far beyond a CPU
notebook. So every variant that contains a VoxelMorph U-Net **starts from the
VoxelMorph the project trained on these subjects** (`checkpoints/brain_unet_4mm.pt`,
made by `regedu train`; the command is printed below) and is fine-tuned for a few
steps (the number is printed with each run) at $10^{-4}$ on this notebook's
misaligned pairs. The pyramid
network has different layers: it starts from its own checkpoint, made by the
same kind of command with `--model pyramid` (`checkpoints/brain_pyramid_4mm.pt`,
printed in section 4), and is fine-tuned the same way. The loss of every run
is local NCC + diffusion + the Dice term, as for the checkpoints. Every model
is fine-tuned on 4 mm pairs (the grid the checkpoints know) and, in the `cpu`
and `gpu` profiles, runs on the finer test pairs inside `nets.Rescaled`
(inputs averaged down to 4 mm, fields upsampled back). The `gpu` profile
trains on its own grid, for the profile's steps.
"""),
code(r"""
checkpoint = Path("checkpoints/brain_unet_4mm.pt")
print(checkpoints.checkpoint_note(checkpoint))
unet_4mm = checkpoints.load_model(checkpoint)
factor = checkpoints.choose_factor(4, atlas.spacing_mm)        # test grid -> the checkpoint's 4 mm grid
train_factor = checkpoints.choose_factor(4, train_spacing)      # 1 except in the gpu profile
steps = {"ci": 10, "cpu": 20}.get(profile.name, profile.steps_3d)
lr = 1e-4
losses = {"ncc": 1.0, "diffusion": 1.0, "dice": 1.0}
seconds = {}


def at_4mm(model, f=None):
    # The whole model runs on the 4 mm grid: trained with f=train_factor, tested with f=factor.
    return nets.Rescaled(model, train_factor if f is None else f)


def fit(model, n_steps, name, lr=lr):
    torch.manual_seed(0)
    start = time.perf_counter()
    history = train.fit(model, train_pairs, losses=losses, steps=n_steps, lr=lr, labels=labels, progress=False)
    seconds[name] = time.perf_counter() - start
    # (The logged loss of single pairs is too noisy over a few steps to say which way it went.)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {n_steps} steps at {train_spacing:g} mm "
          f"in {seconds[name]:.0f} s")
    return model.eval(), history


def on_test_grid(model):
    # The same weights (a model trained inside at_4mm), with the 4 mm grid reached from this profile's grid.
    return at_4mm(model.model, factor).eval()
"""),
md(r"""
## 2. Affine, then deformable

`nets.AffineThenDeformable` (registry `"affine_unet"`) runs an `AffineNet`
(strided convolutions, global average pooling, a linear layer to the 12
parameters $[A \mid t]$, exactly the identity at initialisation) on the pair,
warps the moving image by it, runs a VoxelMorph U-Net on the result and returns

$$u = \mathrm{compose}(u_{\text{affine}}, u_{\text{deformable}}), \qquad \hat M = M \circ (\varphi_{\text{affine}} \circ \varphi_{\text{deformable}}),$$

warping the *original* image once. The affine field is also returned in
`output.deep`, so the trainer supervises the affine stage on its own: it must
align the pair as well as an affine map can, a true pre-alignment.

The deformable stage starts from the pre-trained U-Net and the affine stage
from the identity, so before fine-tuning the pipeline *is* the pre-trained U-Net
(checked on a training pair below).
"""),
code(r"""
inner = nets.create("affine_unet", spatial_dims=3)
inner.deformable.load_state_dict(unet_4mm.state_dict())
probe = train_pairs[0]
with torch.no_grad():
    gap = float((inner(probe["moving"][None], probe["fixed"][None]).disp
                 - unet_4mm(probe["moving"][None], probe["fixed"][None]).disp).abs().max())
print(f"before fine-tuning, pipeline vs pre-trained U-Net: fields differ by at most {gap:.1e} voxels")
pipeline, pipeline_history = fit(at_4mm(inner), steps, "affine + deformable")
pipeline = on_test_grid(pipeline)
pair = test_pairs[0]
with torch.no_grad():
    # The affine stage sees the pair on the 4 mm grid, as inside the pipeline.
    matrix = inner.affine.matrix(pipeline.coarsen(pair["moving"][None]), pipeline.coarsen(pair["fixed"][None]))[0]
    out = pipeline(pair["moving"][None], pair["fixed"][None])
np.set_printoptions(precision=3, suppress=True)
print("predicted [A | t] of the first test pair (4 mm voxels):\n", matrix.numpy())
print("stages:", [tuple(s.shape) for s in out.stages], " deep:", len(out.deep))
"""),
md(r"""
**Does the affine stage find the pose?** Every test pair was misaligned by a
known matrix, so the answer is known: the map that undoes it,
$x \mapsto L^{-1}(x - c - T) + c$ for the applied $x \mapsto L(x - c) + c + T$
about the image centre $c$. On the synthetic test pairs (the atlas under a
random deformation with no affine part of its own, so the inverse is the
whole affine answer) we measure the mean distance, in mm over the brain,
between each affine stage's map and that answer: for the identity (no stage),
for the learned stage of the pipeline, and for an affine found by optimisation
on the pair itself (`regedu.classic.affine_register`, notebook 03; coarse to
fine down to 4 mm), the pre-alignment the VV-Net paper gets from ANTs.
"""),
code(r"""
from regedu.classic import affine_register, displacement_to_affine

centre = np.array([(n - 1) / 2 for n in shape])
brain = np.argwhere(test_pairs[0]["fixed_seg"][0].numpy() > 0)[::5].astype(float)   # fixed = the atlas, every pair


def undo(m):
    # The map that undoes the applied misalignment x -> L (x - c) + c + T.
    inverse = np.linalg.inv(m[:, :3])
    return lambda x: (x - centre) @ inverse.T + centre - inverse @ m[:, 3]


def error_mm(mapping, m):
    return float(np.linalg.norm(mapping(brain) - undo(m)(brain), axis=1).mean()) * atlas.spacing_mm


synthetic = [i for i, p in enumerate(test_pairs) if p["meta"]["dataset"] == "synthetic"]
errors = {"identity": [], "learned affine stage": [], "optimised affine": []}
dets = {"learned affine stage": [], "optimised affine": []}
start = time.perf_counter()
for i in synthetic:
    p, m = test_pairs[i], applied[i]
    with torch.no_grad():   # on the 4 mm grid as inside the pipeline; 4 mm voxels are `factor` test voxels
        learned = inner.affine.matrix(pipeline.coarsen(p["moving"][None]), pipeline.coarsen(p["fixed"][None]))[0].double().numpy()
    optimised = displacement_to_affine(affine_register(p["moving"][None], p["fixed"][None],
                                                       levels=(4 * factor, 2 * factor, factor), iterations=(60, 30, 10)))
    errors["identity"].append(error_mm(lambda x: x, m))
    errors["learned affine stage"].append(error_mm(lambda x: (x - centre) @ learned[:, :3].T + centre + factor * learned[:, 3], m))
    errors["optimised affine"].append(error_mm(lambda x: x @ optimised[:3, :3].T + optimised[:3, 3], m))
    dets["learned affine stage"].append(float(np.linalg.det(learned[:, :3])))
    dets["optimised affine"].append(float(np.linalg.det(optimised[:3, :3])))
seconds["optimised affine, per pair"] = (time.perf_counter() - start) / len(synthetic)
pose_error = {k: float(np.mean(v)) for k, v in errors.items()}
for k, v in pose_error.items():
    print(f"{k:<22} {v:5.2f} mm from the known answer" + (f", det A {np.round(dets[k], 3).tolist()}" if k in dets else ""))
recovered = {k: 1 - pose_error[k] / pose_error["identity"] for k in dets}
print(f"-> the learned stage removes {recovered['learned affine stage']:.0%} of the misalignment after {steps} "
      f"fine-tuning steps, the optimised affine {recovered['optimised affine']:.0%} "
      f"({seconds['optimised affine, per pair']:.1f} s a pair)")
"""),
md(r"""
## 3. Recursive cascades

A cascade applies a registration network $k$ times. Stage $j$ registers the
*current* warped image to the fixed image and predicts $u_j$; the total field is
composed, $u \leftarrow \mathrm{compose}(u, u_j)$, and the original image is
warped by it once. Why compose instead of warping the warped image again? Each
warp interpolates, and $k$ interpolations blur the image $k$ times (measured
below: the image loses sharpness); fields are smooth, so interpolating *them*
loses far less.

With **shared weights** (`shared=True`) the cascade is one network applied
recursively. RCN trains it with a fixed number of recursions and applies more at
test time. We train the single-stage network first, then use its weights to
start the 2- and 3-stage cascades and fine-tune them with 2 and 3 recursions
(the whole unrolled cascade is trained end to end: the loss is on the final
warped image). Here the single stage is itself the pre-trained U-Net,
fine-tuned like the others.
"""),
code(r"""
def cascade(n, f=None):
    model = nets.create("cascade", spatial_dims=3, n_stages=n, shared=True, stage="rescaled",
                        stage_kwargs={"model": unet_4mm.config, "factor": train_factor if f is None else f})
    model.stages[0].model.load_state_dict(unet_4mm.state_dict())
    return model


def cascade_on_test_grid(trained, n):
    # Rescaled has no weights of its own: the trained stage loads into stages of the test grid's factor.
    model = cascade(n, factor)
    model.load_state_dict(trained.state_dict())
    return model.eval()


cascades = {1: cascade_on_test_grid(fit(cascade(1), steps, "cascade, 1 stage")[0], 1)}
for n in (2, 3):  # n recursions cost n times a step: fewer steps, the same start
    cascades[n] = cascade_on_test_grid(fit(cascade(n), max(1, steps // 2), f"cascade, {n} stages")[0], n)

with torch.no_grad():
    out3 = cascades[3](pair["moving"][None], pair["fixed"][None])
stage_motion = [float(u.norm(dim=1).mean()) for u in out3.stages]
print("per-stage fields of the 3-stage cascade, mean |u_j| (voxels):", [round(m, 3) for m in stage_motion])

# The blur of warping a warped image: the same three stage fields, applied one warp at a time.
with torch.no_grad():
    again = pair["moving"][None]
    for u in out3.stages:
        again = warp(again, u)
sharpness = {name: float(sum(g.square().mean() for g in torch.gradient(image[0, 0])))
             for name, image in (("moving", pair["moving"][None]), ("warped once by the composed field", out3.warped),
                                 ("warped three times, stage by stage", again))}
print("image sharpness, mean squared intensity gradient:", {k: round(v, 5) for k, v in sharpness.items()})
"""),
md(r"""
The later stages move less: each one only corrects what the previous stages
left. Now the test-time trick: apply the 3-stage cascade with 4 and 5 recursions.
`evaluate` accepts any callable `(moving, fixed) -> output`.
"""),
code(r"""
def recursions(cascade, n):
    def method(moving, fixed):
        with torch.no_grad():
            return cascade(moving, fixed, n_stages=n)
    return method


methods = {f"cascade, {n} stage{'s' if n > 1 else ''}": cascades[n] for n in (1, 2, 3)}
methods.update({f"cascade 3, {n} recursions at test": recursions(cascades[3], n) for n in (4, 5)})
"""),
md(r"""
## 4. A pyramid network

`nets.PyramidNet` (registry `"pyramid"`) follows Dual-PRNet's idea: one encoder
(shared weights) turns the moving and the fixed image *separately* into feature
pyramids. At the coarsest level a head predicts a field from both; at each finer
level the field is upsampled (its values doubled with the grid), the moving
*features* are warped by it, and a head predicts a residual field that is
composed with it. Large motions are found where they are small in voxels, at
coarse resolution; details are added on the way up.
"""),
code(r"""
def training_loss(model, n=3):
    # The loss on the first n training pairs, the same pairs every time (the logged training
    # loss changes with the pair drawn at each step, too noisy over a few steps).
    with torch.no_grad():
        return float(np.mean([float(loss_terms(model(p["moving"][None], p["fixed"][None]), p["moving"][None],
                                                     p["fixed"][None], losses=losses, moving_seg=p["moving_seg"][None],
                                                     fixed_seg=p["fixed_seg"][None], labels=labels)["loss"])
                              for p in (train_pairs[i] for i in range(n))]))


pyramid_checkpoint = Path("checkpoints/brain_pyramid_4mm.pt")
print(checkpoints.checkpoint_note(pyramid_checkpoint))
pyramid = at_4mm(checkpoints.load_model(pyramid_checkpoint).train())
pyramid_before = training_loss(pyramid)
pyramid, pyramid_history = fit(pyramid, steps, "pyramid")
pyramid_after = training_loss(pyramid)
print(f"pyramid: loss on 3 training pairs {pyramid_before:.4f} -> {pyramid_after:.4f}")
pyramid = on_test_grid(pyramid)
with torch.no_grad():
    outp = pyramid(pair["moving"][None], pair["fixed"][None])
print("field after each level, coarse to fine, mean |u| (voxels):",
      [round(float(u.norm(dim=1).mean()), 3) for u in outp.stages])
"""),
md(r"""
## 5. One table

Same test pairs, same metrics, every variant. "identity" is the Dice before
registration. Seconds are per pair on this machine (training times are printed
above).
"""),
code(r"""
methods = {"identity": evaluate.identity, "pre-trained U-Net (no fine-tuning)": at_4mm(unet_4mm, factor),
           "affine + deformable": pipeline, **methods, "pyramid": pyramid}
results = evaluate.compare(methods, test_pairs, labels=names, progress=False)
table_all = evaluate.summary(results, metrics=("dice", "percent_folding", "seconds"), by=None)
table_all
"""),
code(r"""
mean_dice = {ev.name: ev.mean_dice() for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
fig = viz.plot_dice({k: ev.dice.to_numpy(float) for k, ev in zip(methods, results)
                     if k in ("identity", "affine + deformable", "cascade, 1 stage", "cascade, 3 stages", "pyramid")},
                    labels=labels)
fig
"""),
code(r"""
with torch.no_grad():
    views = {"fixed": pair["fixed"][0], "moving": pair["moving"][0],
             "1 stage": cascades[1](pair["moving"][None], pair["fixed"][None]).warped[0, 0],
             "3 stages": out3.warped[0, 0], "pyramid": outp.warped[0, 0]}
fig = viz.plot_slices(views, index=profile.slices)
fig
"""),
md(r"""
How to read the table (each statement is printed from the numbers below,
so it says what this run measured):

* how much of the work the pre-trained U-Net already does, and which variants
  built on it keep or improve its Dice;
* the affine-then-deformable pipeline is built to take out the pose change
  that the U-Net was never trained on; how much of it its learned affine
  stage removed in this short run, against an optimised affine, was measured
  in section 2 and is printed again below;
* whether more cascade stages help, whether the returns diminish, and what the
  extra test-time recursions add: each stage corrects the residual of the
  previous one. The price is time: $k$ stages cost $k$ forward passes;
* the pyramid network is meant to reach large displacements through its
  coarse levels (the |u| of each level is printed above) at the cost of one
  network; its checkpoint had a quarter of the U-Net's
  training steps (compare the two commands printed above), so its row is not a
  fair ranking against the U-Net variants.

A few test pairs and short fine-tuning runs make this a demonstration, not a
ranking; the `gpu` profile trains long enough for the ordering to mean something.
"""),
code(r"""
reference = mean_dice["pre-trained U-Net (no fine-tuning)"]
best = max((k for k in mean_dice if k != "identity"), key=mean_dice.get)
share = (reference - mean_dice["identity"]) / (mean_dice[best] - mean_dice["identity"])
print(f"the pre-trained U-Net gains {reference - mean_dice['identity']:+.3f} Dice over identity, "
      f"{share:.0%} of the best variant's gain ({best}, {mean_dice[best] - mean_dice['identity']:+.3f})")
print("against the pre-trained U-Net:")
for name, value in mean_dice.items():
    if name not in ("identity", "pre-trained U-Net (no fine-tuning)"):
        verdict = "keeps or improves" if value >= reference - 0.005 else "LOSES"
        print(f"  {name:<34} {value - reference:+.3f} Dice  ({verdict})")
gain = {n: mean_dice[f"cascade, {n} stage{'s' if n > 1 else ''}"] for n in (1, 2, 3)}
gain.update({n: mean_dice[f"cascade 3, {n} recursions at test"] for n in (4, 5)})
print(f"pose change removed (section 2): learned affine stage {recovered['learned affine stage']:.0%}, "
      f"optimised affine {recovered['optimised affine']:.0%}")
steps_up = [gain[n + 1] - gain[n] for n in (1, 2, 3, 4)]
print(f"cascade stages 1 -> 2 -> 3: {steps_up[0]:+.3f}, {steps_up[1]:+.3f} Dice "
      f"({'diminishing returns' if steps_up[1] < steps_up[0] else 'NOT diminishing'}); "
      f"test-time recursions 3 -> 4 -> 5: {steps_up[2]:+.3f}, {steps_up[3]:+.3f} Dice")
seconds_pair = {ev.name: float(ev.table()["seconds"].mean()) for ev in results}
print(f"seconds per pair: 1 stage {seconds_pair['cascade, 1 stage']:.2f}, 3 stages {seconds_pair['cascade, 3 stages']:.2f} "
      f"({seconds_pair['cascade, 3 stages'] / seconds_pair['cascade, 1 stage']:.1f} times)")
"""),
md(r"""
## Exercises

1. Train the 3-stage cascade from scratch (no warm start from the single
   stage). Better or worse than fine-tuning, for the same number of steps?
2. Make a cascade with `shared=False` (three separate networks). Can it run 5
   recursions at test time? Read the error message.
3. Set `supervise_affine=False` in the pipeline: print the affine matrix again.
   Is it still a pre-alignment?
4. Add a 6th recursion. Where does Dice stop improving, and does folding grow?

## Checks
"""),
code(r"""
print({k: round(v, 4) for k, v in mean_dice.items()})
trained_here = [k for k in methods if k != "identity"]
assert all(mean_dice[k] > mean_dice["identity"] + 0.02 for k in trained_here), f"every variant should beat identity by more than 0.02 Dice: {mean_dice}"
assert mean_dice["cascade, 3 stages"] >= mean_dice["cascade, 1 stage"] - 0.005, f"3 cascade stages should be at least as good as 1: {mean_dice}"
assert mean_dice["cascade, 2 stages"] >= mean_dice["cascade, 1 stage"] - 0.005, f"2 cascade stages should be at least as good as 1: {mean_dice}"
assert pyramid_after < pyramid_before, f"fine-tuning should lower the pyramid's loss on its training pairs: {pyramid_before:.4f} -> {pyramid_after:.4f}"
assert stage_motion[0] > stage_motion[1] > stage_motion[2], f"the later cascade stages should move less: {stage_motion}"
assert len(out3.stages) == 3, f"a 3-stage cascade returns its 3 stage fields, got {len(out3.stages)}"
# The known misalignment is the answer: the identity (an untrained stage) is 0 % of the way there.
assert pose_error["optimised affine"] < 0.5 * pose_error["identity"], f"an affine stage that works should remove more than half of the known misalignment: {pose_error}"
assert all(0.8 < d < 1.25 for v in dets.values() for d in v), f"each affine stage should stay a plausible affine map (the applied scalings are within 4 %): det A = {dets}"
assert sharpness["warped once by the composed field"] > sharpness["warped three times, stage by stage"], f"warping once by the composed field should keep the image sharper than warping three times: {sharpness}"
assert all(f < 1.0 for f in folds.values()), f"folding should stay below 1% of the voxels: {folds}"
assert gap < 1e-3, f"before fine-tuning the pipeline should be the pre-trained U-Net (fields differ by {gap:.1e} voxels)"
steps_of = {p.name: checkpoints.load_checkpoint(p)["step"] for p in (checkpoint, pyramid_checkpoint)}
assert 4 * steps_of[pyramid_checkpoint.name] == steps_of[checkpoint.name], f"the prose says the pyramid had a quarter of the U-Net's steps: {steps_of}"
print("all checks passed")
print(f"peak memory of this kernel: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""),
]

if __name__ == "__main__":
    print(write("07_cascades_and_pyramids.ipynb", cells))
