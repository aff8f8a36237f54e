"""Notebook 14: learned similarity and learned regularisers (adversarial training, Fan et al. 2018
and Hu et al. 2018)."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 14 · Learned similarity and adversarial regularisers

Every network so far was trained with a hand-crafted objective: a similarity
(MSE, local NCC) that someone chose, and a regulariser (diffusion) that someone
chose. Two MICCAI 2018 papers let a second network, a **discriminator**, learn
either half instead, and train the registration network against it, as the
generator of a GAN:

1. **Adversarial similarity** (Fan et al., *Adversarial Similarity Network for
   Evaluating Image Alignment in Deep Learning Based Registration*): the
   discriminator learns whether a pair (fixed, warped) is well aligned; the
   registration network learns to make pairs that it takes for aligned.
2. **Adversarial deformation regularisation** (Hu et al., *Adversarial
   Deformation Regularization for Training Image Registration Neural
   Networks*): the discriminator learns to tell the network's displacement
   fields from plausible ones (Hu et al. simulate them with a biomechanical
   model); its verdict replaces the diffusion term.

The seed review (002, section 3.2.2) describes Fan et al.'s method so:
*"与现有的深度学习配准框架不同，作者的方法不需要 ground truth 变形和具体的相似性度量 …
鉴别网络被设计成判断一对配准图像是否足够相似。使用对抗训练,配准网络被训练来预测准确到足以欺骗鉴别网络的变形"*
(unlike other deep registration frameworks it needs neither true deformations nor
a chosen similarity; the discriminator judges whether a registered pair is similar
enough, and the registration network learns deformations accurate enough to fool it),
and reports, on four brain MRI data sets, Dice close to SyN, clearly above
Diffeomorphic Demons, and *"训练的鉴别网络也是优于 GT、SSD、CC 等常用相似性度量的"*: the
trained discriminator beats the usual similarity measures (ground-truth
supervision, SSD, CC). The review quotes no numbers for either paper (its
tables are images), so we quote the claims and measure our own.

**Learning goals.** After this notebook you can

1. train a discriminator as a learned similarity measure and score it against
   NCC and MSE on held-out pairs (ROC AUC);
2. write the alternating updates of adversarial training
   (`regedu.adversarial.adversarial_step`) and read their curves;
3. train a registration network with a learned similarity, and with a learned
   regulariser, and compare each with its hand-crafted counterpart at the same
   budget on held-out pairs (Dice, folding, SDlogJ);
4. look for the ways a discriminator can be fooled: it learns whatever cue
   separates its classes, which need not be the one you meant.
"""),
code(PROFILE_CELL),
code(r"""
import time
import warnings

import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt

from regedu import losses, metrics, nets
from regedu.adversarial import Discriminator, adversarial_step, discriminator_loss, plausible_fields
from regedu.datasets import brain_slice, mni_brain, synth_subject
from regedu.evaluate import dice_per_pair
from regedu.spatial import invert_field, jacobian_determinant, warp
from regedu.stats import paired_test
from regedu.train import seed_everything, train_step

started = time.perf_counter()
small = profile.name == "ci"
# 4 mm in ci, else 2 mm (as notebook 13): 2D slices keep every network cheap.
atlas = mni_brain(4 if small else 2)
source = brain_slice(atlas)
shape = tuple(source["image"].shape[1:])
grid = shape[0] / 40                                  # 1 at 4 mm, 2 at 2 mm
n_train, n_val, n_test = (300, 8, 16) if small else (400, 12, 24)
n = n_train + n_val + n_test
train_ids, val = torch.arange(n_train), torch.arange(n_train, n_train + n_val)
test = torch.arange(n_train + n_val, n)

# Subject-to-template pairs, as Fan et al. register subjects to a template (and VoxelMorph and
# VV-Net train): each moving image is a synthetic subject (the template under its own random
# diffeomorphism and bias field, what BrainPairs(mode="atlas") draws), made here with
# synth_subject because it also returns the subject's field, and so the TRUE field of the pair.
# noise=0: with noise, "warped by some field" and "barely moved" differ in noise texture
# alone, a cue a discriminator finds long before alignment (exercise 1).
subjects = [synth_subject(source, 1400 + i, noise=0.0) for i in range(n)]
moving = torch.stack([s["image"] for s in subjects])
moving_seg = torch.stack([s["seg"] for s in subjects])
fixed = torch.as_tensor(source["image"]).float()[None].expand(n, -1, -1, -1).contiguous()
fixed_seg = torch.as_tensor(source["seg"])[None, None].expand(n, -1, -1, -1).contiguous()
# moving = template o phi, so moving o phi^-1 = template: the true field is phi's inverse.
with warnings.catch_warnings():
    # The strongest fields converge slowly; the Dice of the result (printed) says how good it is.
    warnings.simplefilter("ignore", RuntimeWarning)
    true_disp = invert_field(torch.stack([s["disp"] for s in subjects]))
aligned = warp(moving, true_disp)                     # the moving image, truly aligned to the fixed one
structures = metrics.labels_present(fixed_seg, moving_seg)


def pair_dice(ids, disp):
    # Mean Dice over the structures of each pair; labels warped with nearest neighbour.
    return dice_per_pair(fixed_seg[ids], moving_seg[ids], disp, structures)


def field_stats(disp):
    # Per pair: % of pixels folded (det J <= 0) and the std of log det J.
    per_pair = [metrics.folding_stats(d[None]) for d in disp]
    return (np.array([s["percent_folding"] for s in per_pair]), np.array([s["sdlogj"] for s in per_pair]))


dice_identity = pair_dice(test, torch.zeros(len(test), 2, *shape))
dice_true = pair_dice(test, true_disp[test])
print(f"{n} subject-to-template pairs of {shape} slices at {atlas.spacing_mm:g} mm: {n_train} train, {n_val} validation, "
      f"{n_test} test; {len(structures)} structures")
print(f"test Dice: identity {dice_identity.mean():.3f}, the true field {dice_true.mean():.3f} (the ceiling; checked "
      f"against every network below)")
"""),
md(r"""
## 1. A learned similarity measure

Before any adversarial game: can a small network learn what alignment looks
like? `regedu.adversarial.Discriminator` is a few strided convolutions that
end in one logit per location, averaged (the mean of local verdicts). We show
it pairs of **training** images: positives (fixed, moving warped by the true
field $u$), negatives (fixed, moving warped by $t\,u$ with $t$ drawn from
$[0, 0.75]$: still misaligned, and interpolated like the positives, so that
interpolation itself is no cue), and train it with the binary cross-entropy
`discriminator_loss` (chance: $2\ln 2 = 1.386$).

Then we score **test** pairs and ask each measure to rank the aligned
versions above misaligned ones: the ROC AUC (1 is perfect, 0.5 is chance),
against the unregistered pairs ($t = 0$) and against half-registered ones
($t = 0.5$, the harder test). The hand-crafted measures take the same test:
local NCC (window 7) and MSE, negated so that higher means "more similar".
The baseline for the learned measure is the same network before training.
"""),
code(r"""
def auc(positive, negative):
    # Probability that a random positive scores above a random negative (ties count half).
    positive, negative = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((positive > negative).mean() + 0.5 * (positive == negative).mean())


def partly_aligned(ids, t):
    # The moving image warped by the fraction t of its true field (t = 1: aligned, t = 0: as it is).
    return warp(moving[ids], torch.as_tensor(t, dtype=torch.float32).view(-1, 1, 1, 1) * true_disp[ids])


torch.manual_seed(14)
critic = Discriminator(2, in_channels=2)
untrained = Discriminator(2, in_channels=2)
untrained.load_state_dict(critic.state_dict())        # the baseline: the same network before training
critic_steps, batch = (100, 8) if small else (200, 8)
optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(0)
critic_log = {"step": [], "train": [], "val": []}
val_t = torch.linspace(0, 0.75, len(val))
for step in range(critic_steps):
    ids = train_ids[torch.randint(n_train, (batch,), generator=g)]
    t = 0.75 * torch.rand(batch, generator=g)
    loss = discriminator_loss(critic, torch.cat([fixed[ids], aligned[ids]], 1),
                              torch.cat([fixed[ids], partly_aligned(ids, t)], 1))
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    if step % 10 == 0 or step == critic_steps - 1:
        with torch.no_grad():
            val_loss = discriminator_loss(critic, torch.cat([fixed[val], aligned[val]], 1),
                                          torch.cat([fixed[val], partly_aligned(val, val_t)], 1))
        critic_log["step"].append(step + 1)
        critic_log["train"].append(loss.item()); critic_log["val"].append(val_loss.item())

measures = {
    "discriminator, untrained": lambda f, w: untrained(torch.cat([f, w], 1)),
    "discriminator, trained": lambda f, w: critic(torch.cat([f, w], 1)),
    "local NCC (window 7)": lambda f, w: -losses.ncc_local(f, w, window=7, reduction="none"),
    "MSE": lambda f, w: -losses.mse(f, w, reduction="none"),
}
with torch.no_grad():
    auc_table = pd.DataFrame({
        f"AUC vs t = {t:g}": {name: auc(m(fixed[test], aligned[test]), m(fixed[test], partly_aligned(test, t)))
                              for name, m in measures.items()} for t in (0.0, 0.5)})
display(auc_table.round(3))
hard = "AUC vs t = 0.5"
best_hand = auc_table.loc[["local NCC (window 7)", "MSE"], hard].max()
learned = auc_table.loc["discriminator, trained", hard]
print(f"on the harder test the trained discriminator's AUC {learned:.3f} is "
      f"{'above' if learned > best_hand else 'equal to' if learned == best_hand else 'below'} the best "
      f"hand-crafted measure's ({best_hand:.3f}); untrained it scores {auc_table.loc['discriminator, untrained', hard]:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
axes[0].plot(critic_log["step"], critic_log["train"], label="training batch")
axes[0].plot(critic_log["step"], critic_log["val"], "o-", ms=3, label=f"validation ({n_val} pairs)")
axes[0].axhline(2 * np.log(2), color="k", ls=":", label="chance (2 ln 2)")
axes[0].set_xlabel("discriminator step"); axes[0].set_ylabel("binary cross-entropy"); axes[0].legend(fontsize=8)
auc_table.plot.barh(ax=axes[1])
axes[1].axvline(0.5, color="k", ls=":", label="chance")
axes[1].set_xlim(0, 1.05); axes[1].set_xlabel(f"ROC AUC, aligned vs misaligned ({n_test} test pairs)")
axes[1].legend(fontsize=8)
plt.tight_layout(); plt.show()
"""),
md(r"""
## 2. Training a registration network against the discriminator

Fan et al.'s game, one step of `adversarial_step(kind="similarity")`:

1. register a batch: `output = model(moving, fixed)`;
2. update the discriminator: real = (fixed, aligned), fake = (fixed, `output.warped`), detached;
3. update the network with the discriminator frozen: the non-saturating
   generator loss $-\log D(\text{fixed}, \text{warped})$ (`adversarial_loss`),
   plus the diffusion regulariser.

Fan et al. need no true field: their positives pair the fixed image with a
*reference*, a blend of the fixed and the warped image
(`regedu.adversarial.reference_image`). Here the positives are the moving
images warped by the true field: the easier, supervised variant (exercise 2
tries the blend).

The baselines, at the same budget (same U-Net, same initial weights, same
batches, same steps, same learning rate, same diffusion weight): the network
trained with local NCC, and no registration at all (identity). A game
between two networks is reported to vary from run to run more than plain
training does (Lucic et al., NeurIPS 2018, found GAN scores to vary widely
between random seeds), so
in the cpu profile each network is trained with three seeds (initial weights,
batches, discriminator) and each test pair's Dice is averaged over them before
the paired test; the ci profile trains seed 0 only.
"""),
code(r"""
steps, batch, lr, lam = (200, 8, 3e-3, 1.0) if small else (150, 8, 3e-3, 1.0)
every = max(steps // 8, 1)
ncc = losses.NCC(window=7)


def new_network(seed=0):
    seed_everything(14 + seed)                        # the same initial weights for every method
    return nets.create("unet", spatial_dims=2, encoder=(16, 32, 32), decoder=(32, 32, 32, 16))


def validation_dice(model):
    with torch.no_grad():
        return float(pair_dice(val, model(moving[val], fixed[val]).disp).mean())


def train(objective, kind=None, critic=None, weight=1.0, real=None, seed=0):
    # Plain training (train_step) or the alternating adversarial step, on identical batches.
    model = new_network(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    d_optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3 if kind == "similarity" else 1e-3) if kind else None
    g = torch.Generator().manual_seed(1 + seed)
    log = {"train": [], "val_step": [0], "val_dice": [validation_dice(model)]}
    for step in range(steps):
        ids = train_ids[torch.randint(n_train, (batch,), generator=g)]
        pairs = {"moving": moving[ids], "fixed": fixed[ids]}
        if kind is None:
            values = {k: float(v) for k, v in train_step(model, pairs, optimizer, losses=objective).items()}
        else:
            values = adversarial_step(model, critic, pairs, optimizer, d_optimizer, kind=kind, weight=weight,
                                      losses=objective, real=real(ids))
        log["train"].append(values)
        if (step + 1) % every == 0:
            log["val_step"].append(step + 1); log["val_dice"].append(validation_dice(model))
    with torch.no_grad():
        log["disp"] = model(moving[test], fixed[test]).disp
    return model, log


# Adversarial training is reported to vary from run to run: in cpu every network is trained with three
# seeds (initial weights, batches, discriminator), and each test pair's Dice is averaged over them.
similarity_seeds = (0,) if small else (0, 1, 2)
t = time.perf_counter()
seed_runs = {"NCC + diffusion": [], "adversarial similarity + diffusion": []}
for seed in similarity_seeds:
    seed_runs["NCC + diffusion"].append(train({"ncc": (ncc, 1.0), "diffusion": lam}, seed=seed)[1])
    torch.manual_seed(14 + seed)
    seed_runs["adversarial similarity + diffusion"].append(
        train({"diffusion": lam}, kind="similarity", critic=Discriminator(2, in_channels=2),
              real=lambda ids: aligned[ids], seed=seed)[1])
runs = {name: logs[0] for name, logs in seed_runs.items()}   # seed 0: the figures, and section 3's baseline
print(f"{2 * len(similarity_seeds)} networks of {steps} steps (training seeds {list(similarity_seeds)}) "
      f"in {time.perf_counter() - t:.0f} s")


def results(names):
    rows = {"identity": {"test Dice": dice_identity.mean(), "% folding": 0.0, "SDlogJ": 0.0}}
    for name in names:
        folding, sdlogj = field_stats(runs[name]["disp"])
        runs[name]["dice"] = pair_dice(test, runs[name]["disp"])
        rows[name] = {"test Dice": runs[name]["dice"].mean(), "% folding": folding.mean(), "SDlogJ": sdlogj.mean()}
    return pd.DataFrame(rows).T


per_seed = {name: np.stack([pair_dice(test, log["disp"]) for log in logs]) for name, logs in seed_runs.items()}
# Per seed: the mean % folding and mean SDlogJ over the test pairs (one Jacobian per field).
seed_fields = {name: np.array([[s.mean() for s in field_stats(log["disp"])] for log in logs])
               for name, logs in seed_runs.items()}
table_a = pd.DataFrame({"identity": {"test Dice": dice_identity.mean(), "std over seeds": 0.0,
                                     "% folding": 0.0, "SDlogJ": 0.0}} | {
    name: {"test Dice": per_seed[name].mean(), "std over seeds": per_seed[name].mean(axis=1).std(),
           "% folding": seed_fields[name][:, 0].mean(), "SDlogJ": seed_fields[name][:, 1].mean()}
    for name in seed_runs}).T
print(f"averaged over {len(similarity_seeds)} training seed(s); per seed, test Dice:",
      {name: np.round(d.mean(axis=1), 3).tolist() for name, d in per_seed.items()})
display(table_a.round(3))
# Each test pair's Dice averaged over the seeds: the paired test compares methods, not lucky runs.
dice_adv, dice_ncc = per_seed["adversarial similarity + diffusion"].mean(0), per_seed["NCC + diffusion"].mean(0)
gain_identity = dice_adv.mean() - dice_identity.mean()
vs_ncc = paired_test(dice_ncc, dice_adv, names=("NCC + diffusion", "adversarial similarity + diffusion"), metric="Dice")
vs_identity = paired_test(dice_identity, dice_adv, names=("identity", "adversarial similarity + diffusion"), metric="Dice")
print(f"adversarial similarity vs identity: {vs_identity.summary()}")
print(f"adversarial similarity vs NCC:      {vs_ncc.summary()}")
"""),
md(r"""
The curves of an adversarial run are read differently from a plain one. The
generator's loss need not fall steadily: it measures how well the network
fools a discriminator that keeps improving. The two probabilities tell the
game's state: the discriminator's mean probability of "aligned" for the true
pairs and for the network's pairs. When both sit at 0.5 it cannot tell them
apart, either because the network aligns, or because the discriminator has
lost the thread; only the validation Dice, measured on pairs neither network
trains on, says which.
"""),
code(r"""
def smooth(x, k=10):
    return np.convolve(x, np.ones(k) / k, mode="valid")


adv_log = runs["adversarial similarity + diffusion"]
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
axes[0].plot(smooth([v["adversarial"] for v in adv_log["train"]]), label="network: -log D(fixed, warped)")
axes[0].plot(smooth([v["discriminator"] for v in adv_log["train"]]), label="discriminator's cross-entropy")
axes[0].axhline(2 * np.log(2), color="k", ls=":", label="chance (2 ln 2)")
axes[0].set_xlabel("step"); axes[0].set_ylabel("loss (moving average of 10)"); axes[0].legend(fontsize=8)
axes[1].plot(smooth([v["p_real"] for v in adv_log["train"]]), label="D's P(aligned), true pairs")
axes[1].plot(smooth([v["p_fake"] for v in adv_log["train"]]), label="D's P(aligned), network's pairs")
axes[1].axhline(0.5, color="k", ls=":")
axes[1].set_xlabel("step"); axes[1].set_ylabel("probability (moving average of 10)"); axes[1].legend(fontsize=8)
for name in ["NCC + diffusion", "adversarial similarity + diffusion"]:
    axes[2].plot(runs[name]["val_step"], runs[name]["val_dice"], "o-", ms=3, label=name)
axes[2].axhline(pair_dice(val, torch.zeros(len(val), 2, *shape)).mean(), color="k", ls=":", label="identity")
axes[2].set_xlabel("step"); axes[2].set_ylabel(f"validation Dice ({n_val} pairs)"); axes[2].legend(fontsize=8)
plt.tight_layout(); plt.show()

# The verdict of paired_test (notebook 13): the interval must exclude 0 and Wilcoxon p < 0.05.
beats_ncc = vs_ncc.bootstrap.ci_low > 0 and vs_ncc.wilcoxon_p < 0.05
loses_ncc = vs_ncc.bootstrap.ci_high < 0 and vs_ncc.wilcoxon_p < 0.05
print(f"Fan et al. report that the adversarial similarity beats hand-crafted ones (SSD, CC). Here, at "
      f"{steps} steps and {len(similarity_seeds)} training seed(s): test Dice {dice_adv.mean():.3f} against {dice_ncc.mean():.3f} for local NCC and "
      f"{dice_identity.mean():.3f} for identity (ceiling {dice_true.mean():.3f}): the claim is "
      + ("reproduced" if beats_ncc else "NOT reproduced (NCC is clearly better)" if loses_ncc
         else "NOT reproduced (no clear difference)")
      + f"; the adversarial network is {gain_identity:+.3f} Dice from identity.")
"""),
md(r"""
## 3. A learned regulariser

Hu et al.'s discriminator sees displacement fields, not images: real ones are
plausible deformations, fakes are the network's. The seed review (002, section
3.2.3) sums the paper up as *"利用软件的生物力学模拟（Biomechanical）结果，可以调整解剖标签驱动的配准网络，
对核磁共振（MR）和三维程序内经直肠超声（TRUS）图像进行配准"*: biomechanical (finite-element)
simulations regularise a label-driven network that registers prostate MR to
3D transrectal ultrasound (108 pairs from 76 patients), and at inference the
network needs neither labels nor simulations. The review quotes no accuracy
for it either. `regedu.adversarial.plausible_fields` draws
smooth random velocities and integrates them (scaling and squaring), so that
they do not fold (checked below). We draw them with `synth_subject`'s settings
(a control point every 16 mm, a velocity of std 6 mm at them); the resulting
sizes, printed below, differ from those of our subjects' true fields.

Three networks, all trained with local NCC, the same budget as section 2:
unregularised, diffusion (the network of section 2, its seed 0), and the adversarial
regulariser in its place (`adversarial_step(kind="deformation")`, weight 0.1,
the discriminator of section 1 with two channels, one per displacement
component). Their test pairs are scored for Dice, folding and SDlogJ.
Exercise 3 gives the regulariser a weaker discriminator and a larger weight:
watch what the network does to fool it.
"""),
code(r"""
control = max(2, round(4 * grid))
points = tuple(s // control for s in shape)
amplitude = 1.5 * grid
field_generator = torch.Generator().manual_seed(2)
examples = plausible_fields(64, shape, amplitude, points, seed=3)
fold_examples, sdlogj_examples = field_stats(examples)
print(f"plausible fields: {points} control points, std {amplitude:.2f} px; mean |u| "
      f"{examples.norm(dim=1).mean():.2f} px (true fields of the training pairs {true_disp[train_ids].norm(dim=1).mean():.2f} px), "
      f"at most {fold_examples.max():.3f} % folding, SDlogJ {sdlogj_examples.mean():.2f}")

t = time.perf_counter()
_, runs["NCC, unregularised"] = train({"ncc": (ncc, 1.0)})
torch.manual_seed(14)
_, runs["NCC + adversarial regulariser"] = train({"ncc": (ncc, 1.0)}, kind="deformation",
                                                 critic=Discriminator(2, in_channels=2), weight=0.1,
                                                 real=lambda ids: plausible_fields(len(ids), shape, amplitude, points,
                                                                                   seed=field_generator))
print(f"two networks of {steps} steps in {time.perf_counter() - t:.0f} s")
table_b = results(["NCC, unregularised", "NCC + diffusion", "NCC + adversarial regulariser"])
display(table_b.round(3))
fold = {name: field_stats(runs[name]["disp"])[0] for name in table_b.index[1:]}
sdlogj = {name: field_stats(runs[name]["disp"])[1] for name in table_b.index[1:]}
adv_reg, unreg, diff = "NCC + adversarial regulariser", "NCC, unregularised", "NCC + diffusion"
dice_cost = table_b.loc[unreg, "test Dice"] - table_b.loc[adv_reg, "test Dice"]
print(f"the adversarial regulariser {'lowers' if sdlogj[adv_reg].mean() < sdlogj[unreg].mean() else 'does NOT lower'} "
      f"SDlogJ ({sdlogj[unreg].mean():.2f} -> {sdlogj[adv_reg].mean():.2f}) and "
      f"{'lowers' if fold[adv_reg].mean() < fold[unreg].mean() else 'does NOT lower'} folding "
      f"({fold[unreg].mean():.3f} % -> {fold[adv_reg].mean():.3f} %) against no regulariser, at a Dice "
      f"{'cost' if dice_cost > 0 else 'gain'} of {abs(dice_cost):.3f}; its Dice is "
      f"{table_b.loc[adv_reg, 'test Dice'] - dice_identity.mean():+.3f} from identity's, and its mean |u| "
      f"{runs[adv_reg]['disp'].norm(dim=1).mean():.2f} px (diffusion's {runs[diff]['disp'].norm(dim=1).mean():.2f} px)")
better_than_diffusion = (table_b.loc[adv_reg, "test Dice"] > table_b.loc[diff, "test Dice"]
                         and fold[adv_reg].mean() <= fold[diff].mean())
print(f"against diffusion at the same budget it is "
      + ("better on both Dice and folding" if better_than_diffusion else
         f"not better on both (Dice {table_b.loc[adv_reg, 'test Dice']:.3f} vs {table_b.loc[diff, 'test Dice']:.3f}, "
         f"folding {fold[adv_reg].mean():.3f} % vs {fold[diff].mean():.3f} %)"))
"""),
md(r"""
The fields of one test pair: each method's deformed grid over its Jacobian
determinant (blue shrinks, red grows, det $\le 0$ folds), beside the true
field and one plausible field the regulariser's discriminator was shown.
"""),
code(r"""
def grid_lines(ax, u, step=max(2, int(2 * grid))):
    # The curves x_k + u_k(x) = const: a regular grid carried by the deformation.
    u = u.numpy()
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    levels = np.arange(0, max(shape), step)
    ax.contour(cols + u[1], levels, colors="k", linewidths=0.5)
    ax.contour(rows + u[0], levels, colors="k", linewidths=0.5)


pair = 0
show = {"true field": true_disp[test][pair], "plausible field (a sample)": examples[0]}
show.update({name: runs[name]["disp"][pair] for name in ["NCC, unregularised", "NCC + diffusion",
                                                         "NCC + adversarial regulariser",
                                                         "adversarial similarity + diffusion"]})
fig, axes = plt.subplots(2, 3, figsize=(13, 8))
for ax, (name, u) in zip(axes.flat, show.items()):
    det = jacobian_determinant(u[None])[0]
    im = ax.imshow(det, cmap="coolwarm", vmin=0, vmax=2)
    ax.imshow(np.where((det <= 0).numpy()[..., None], [1.0, 0.9, 0.0, 1.0], 0.0))
    grid_lines(ax, u)
    fig.colorbar(im, ax=ax, shrink=0.8, label="det J (yellow: <= 0)")
    ax.set_title(f"{name}\n{float((det <= 0).float().mean() * 100):.2f} % folded", fontsize=9)
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()

reg_log = runs["NCC + adversarial regulariser"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
axes[0].plot(smooth([v["p_real"] for v in reg_log["train"]]), label="D's P(plausible), simulated fields")
axes[0].plot(smooth([v["p_fake"] for v in reg_log["train"]]), label="D's P(plausible), network's fields")
axes[0].axhline(0.5, color="k", ls=":")
axes[0].set_xlabel("step"); axes[0].set_ylabel("probability (moving average of 10)"); axes[0].legend(fontsize=8)
for name in ["NCC, unregularised", "NCC + diffusion", "NCC + adversarial regulariser"]:
    axes[1].plot(runs[name]["val_step"], runs[name]["val_dice"], "o-", ms=3, label=name)
axes[1].set_xlabel("step"); axes[1].set_ylabel(f"validation Dice ({n_val} pairs)"); axes[1].legend(fontsize=8)
plt.tight_layout(); plt.show()
print(f"notebook run time {time.perf_counter() - started:.0f} s")
"""),
md(r"""
## What to take away

* A discriminator **can** learn what alignment looks like from examples
  (section 1), and as a fixed measure it is tested like any other, on
  held-out pairs against the hand-crafted ones.
* As a training signal it is a moving target. The generator follows the
  gradient of whatever separates the classes *now*, and a discriminator may
  separate them by any cue it finds, not only the one you meant (noise
  texture, interpolation blur, the size of a field rather than its
  smoothness: exercises 1, 3 and 4 let you look for each). Adversarial
  training needs a balance (learning rates, weights, the discriminator's
  reach) that a hand-crafted loss does not, and a small budget leaves little
  room to find it; the verdicts above are printed from this run's numbers,
  whichever way they fall.
* Judge a learned loss as you judge any method: same budget, held-out pairs,
  a paired test (notebook 13), and the curves of both players.

## Exercises

1. Make the subjects with the default noise (`synth_subject(..., noise=0.02)`)
   and rerun section 1: how fast does the discriminator separate the classes,
   and how does the network of section 2 do? Then build the discriminator with
   `blur=1.0`, which smooths its input first: what changes, and why?
2. Replace the true-field positives of section 2 by Fan et al.'s reference:
   `real=None` in `adversarial_step` (it then pairs the fixed image with
   `reference_image(fixed, warped, alpha)`). Try `alpha` 0.2 and 0.8.
3. Raise the adversarial regulariser's weight to 0.3 and 1, and give it the
   weaker discriminator `Discriminator(2, in_channels=2, features=(16, 16))`.
   Plot Dice, SDlogJ and the mean |u| against the weight, beside the diffusion
   network, and watch `p_fake` in the curves: what does the network do to fool it?
4. Show the regulariser's discriminator fields that are too *large* but
   smooth (`plausible_fields(..., amplitude * 3)`) as fakes: does it call them
   implausible? What does this say about what it learned?

## Checks
"""),
code(r"""
# 1. the learned similarity
assert learned > 0.8 and learned > auc_table.loc["discriminator, untrained", hard] + 0.2, \
    f"the trained discriminator should rank aligned test pairs above half-aligned ones: {auc_table.round(3).to_dict()}"
assert critic_log["val"][-1] < critic_log["val"][0] - 0.1, \
    f"the discriminator's validation loss should fall: {critic_log['val'][0]:.3f} -> {critic_log['val'][-1]:.3f}"
# 2. the baselines behave: NCC learns, and the true field is the ceiling of every network (sections 2 and 3)
assert dice_ncc.mean() > dice_identity.mean() + 0.02, \
    f"the NCC network should beat identity: {dice_ncc.mean():.3f} vs {dice_identity.mean():.3f}"
best_network = max([*per_seed["NCC + diffusion"].mean(axis=1), *per_seed["adversarial similarity + diffusion"].mean(axis=1),
                    *table_b.loc[[unreg, adv_reg], "test Dice"]])
assert dice_true.mean() > best_network + 0.1, \
    f"the true field should remain well above any network here: {dice_true.mean():.3f} vs {best_network:.3f}"
# 2b. the adversarial similarity moves the test Dice above no registration (its paired test, printed
# in section 2, says whether clearly)
# A margin an untrained network (its flow head starts near zero: it stays at the identity) cannot reach by chance.
assert gain_identity > 0.003, f"the adversarially trained network should raise test Dice over identity by > 0.003: {vs_identity.summary()}"
# 3. the diffusion regulariser, the hand-crafted baseline of section 3, lowers folding
assert fold[diff].mean() <= fold[unreg].mean() and sdlogj[diff].mean() < 0.8 * sdlogj[unreg].mean(), \
    f"diffusion should make smoother fields than no regulariser: {table_b.round(3).to_dict()}"
assert fold_examples.max() == 0, f"the plausible fields should not fold: up to {fold_examples.max():.3f} %"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("14_learned_similarity_and_regularisers.ipynb", cells))
