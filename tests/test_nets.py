"""regedu.nets: shapes at odd sizes, identity at start, gradients, voxelmorph parity,
VV-Net's structure, cascade composition, configs, input errors, summary."""
import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import smooth_field

from regedu import nets
from regedu.spatial import compose, integrate_velocity, warp

UNET = {"encoder": [4, 8, 8, 8], "decoder": [8, 8, 8, 8, 8, 4, 4]}
SMALL = {
    "unet": UNET,
    "vnet": {"features": [4, 8, 8]},
    "vvnet": {"features": [4, 8, 8], "deep_features": [8, 8, 8]},
    "affine": {"features": [4, 8, 8]},
    "affine_unet": {"affine_features": [4, 8], **UNET},
    "cascade": {"n_stages": 2, "stage": "unet", "stage_kwargs": UNET},
    "pyramid": {"features": [4, 8, 8, 8]},
    "transmorph": {"embed_dim": 8, "depths": [2, 2], "heads": [2, 2], "skip": 4, "out_features": 4},
}
ODD = {2: (37, 45), 3: (19, 23, 29)}


def small(name, nd, **kw):
    return nets.create(name, spatial_dims=nd, **{**SMALL[name], **kw})


def blob(shape, center=0.1):
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return torch.exp(-((g - center) ** 2).sum(0) / 0.2)[None, None]


class _Field(nn.Module):
    """Stands in for a flow head: returns a given field whatever its input."""

    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, x):
        return self.field


def test_registry_has_the_contract_names():
    assert set(nets.available_models()) == {"unet", "vnet", "vvnet", "affine", "affine_unet",
                                            "cascade", "pyramid", "rescaled", "transmorph"}


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_odd_sizes_give_full_size_outputs_near_identity(name, nd):
    model = small(name, nd)
    shape = ODD[nd]
    moving, fixed = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    out = model(moving, fixed)
    assert isinstance(out, nets.RegistrationOutput)
    assert out.warped.shape == moving.shape
    for field in [out.disp, *out.stages, *out.deep]:
        assert field.shape == (2, nd, *shape)
        # small initial weights: training starts from (almost) no motion
        assert field.abs().max() < 1e-2, name
    assert (out.warped - moving).abs().max() < 1e-2
    assert out.velocity is None


def test_default_models_run_in_2d():
    # The defaults (not only the small test configurations) handle odd sizes.
    moving, fixed = torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45)
    for name in ("unet", "vnet", "vvnet", "affine", "pyramid"):
        assert nets.create(name, spatial_dims=2)(moving, fixed).disp.shape == (1, 2, 37, 45)


def test_affine_net_is_exactly_the_identity_at_start():
    model = small("affine", 2)
    moving, fixed = torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45)
    assert torch.equal(model.matrix(moving, fixed), torch.eye(2, 3)[None])
    assert torch.equal(model(moving, fixed).disp, torch.zeros(1, 2, 37, 45))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(1)
    model = small(name, 2)
    fixed = blob((24, 28))
    moving = warp(fixed, smooth_field((24, 28), 2.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Two steps: zero-initialised layers (the affine head) pass gradients on
    # only once they have moved.
    for _ in range(2):
        opt.zero_grad()
        out = model(moving, fixed)
        loss = ((out.warped - fixed) ** 2).mean() + sum(
            ((warp(moving, d) - fixed) ** 2).mean() for d in out.deep)
        loss.backward()
        opt.step()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{name}: no gradient for {missing}"


def test_voxelmorph_defaults_have_voxelmorphs_parameter_count():
    # VoxelMorph (TMI 2019, "VM-2"): 3D U-Net 16,32,32,32 / 32,32,32,32,32,16,16,
    # 3x3x3 convolutions with bias, a flow convolution 16 -> 3.
    layers = [(2, 16), (16, 32), (32, 32), (32, 32),              # encoder
              (32, 32), (64, 32), (64, 32), (64, 32),              # decoder levels
              (48, 32), (32, 16), (16, 16), (16, 3)]               # full resolution, flow
    expected = sum(cin * cout * 27 + cout for cin, cout in layers)
    model = nets.VoxelMorph(spatial_dims=3)
    assert sum(p.numel() for p in model.parameters()) == expected == 327331


@pytest.mark.parametrize("nd", [2, 3])
def test_parameters_match_voxelmorph_034_layer_for_layer(nd):
    vxm = pytest.importorskip("voxelmorph")
    theirs = vxm.nn.models.VxmPairwise(nd, 1, 1, nb_features=[[16, 32, 32, 32], [32, 32, 32, 32]],
                                      integration_steps=0)
    ours = nets.VoxelMorph(nd, decoder=(32, 32, 32, 32, 32), out_channels=nd)
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_integrated_model_returns_velocity_and_its_exponential():
    model = nets.create("unet", spatial_dims=2, integrate_steps=7, **UNET)
    model.flow = _Field(smooth_field((24, 28), 3.0))
    moving, fixed = torch.rand(1, 1, 24, 28), torch.rand(1, 1, 24, 28)
    out = model(moving, fixed)
    assert torch.equal(out.velocity, model.flow.field)
    assert out.velocity is not None and out.velocity.shape == out.disp.shape
    assert torch.allclose(out.disp, integrate_velocity(out.velocity, 7))
    assert not torch.allclose(out.disp, out.velocity)


def _record_sizes(module, names):
    sizes = {}

    def hook(name):
        def record(mod, args, output):
            sizes[name] = tuple(output.shape[2:])
        return record

    for n in names:
        module.get_submodule(n).register_forward_hook(hook(n))
    return sizes


def test_vvnet_structure_follows_the_paper():
    model = nets.VVNet(3, features=(4, 8, 12), deep_features=(6, 10, 14))
    vnets = [m for m in model.modules() if isinstance(m, nets.VNet)]
    assert len(vnets) == 3
    # V-Net 3 reads V-Net 1's bottleneck (c2 = 12 channels) and feeds V-Net 2's bottleneck.
    assert model.vnet3.enc1[0].in_channels == 12
    assert model.fuse.in_channels == 12 + 6 and model.fuse.out_channels == 12
    sizes = _record_sizes(model, ["vnet1.bottleneck", "vnet2.bottleneck", "vnet3.bottleneck",
                                  "vnet3.dec1", "vnet1.dec1"])
    out = model(torch.rand(1, 1, 16, 32, 48), torch.rand(1, 1, 16, 32, 48))
    assert sizes["vnet1.bottleneck"] == sizes["vnet2.bottleneck"] == (4, 8, 12)     # 1/4
    assert sizes["vnet3.bottleneck"] == (1, 2, 3)                                   # 1/16
    assert sizes["vnet3.dec1"] == (4, 8, 12)                                        # back to 1/4
    assert sizes["vnet1.dec1"] == (16, 32, 48)
    # deep supervision: V-Net 1's fused stage predictions (phi1), at full resolution
    assert len(out.deep) == 1 and len(out.stages) == 1
    assert torch.equal(out.deep[0], out.stages[0])
    # the final layer fuses six stage predictions (three of V-Net 3, three of V-Net 2)
    assert model.final.in_channels == 6 * 3


def test_vvnet_deep_output_supervises_vnet1_only():
    model = small("vvnet", 2)
    out = model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    out.deep[0].square().mean().backward()
    assert all(p.grad is not None for p in model.vnet1.parameters())
    assert all(p.grad is None for p in model.vnet2.parameters())
    assert all(p.grad is None for p in model.final.parameters())


def test_vvnet_compose_option():
    torch.manual_seed(2)
    composed = small("vvnet", 2)
    with torch.no_grad():  # larger heads, so that phi1 and phi2 are far from zero
        for head in [*composed.heads1, *composed.heads2, *composed.heads3]:
            head.weight.mul_(3e4)
    literal = small("vvnet", 2, compose=False)
    literal.load_state_dict(composed.state_dict())
    moving, fixed = torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48)
    a, b = composed(moving, fixed), literal(moving, fixed)
    phi1, phi2 = a.stages[0], b.disp
    assert torch.equal(a.stages[0], b.stages[0])
    assert phi1.abs().max() > 0.1 and phi2.abs().max() > 0.1
    assert not torch.allclose(a.disp, b.disp, atol=1e-3)
    # default: phi1 first, then phi2 (no padding at 32x48, so exactly compose)
    assert torch.allclose(a.disp, compose(phi1, phi2), atol=1e-5)


def test_cascade_composition_equals_warping_stage_by_stage():
    shape = (40, 48)
    model = small("cascade", 2, n_stages=3)
    fields = [smooth_field(shape, 2.5, seed=s) for s in range(3)]
    for stage, u in zip(model.stages, fields):
        stage.flow = _Field(u)
    moving = blob(shape, center=0.0)
    out = model(moving, torch.rand(1, 1, *shape))
    for got, u in zip(out.stages, fields):
        assert torch.equal(got, u)
    assert torch.allclose(out.disp, compose(compose(fields[0], fields[1]), fields[2]))
    stepwise = moving
    for u in fields:
        stepwise = warp(stepwise, u)
    inner = (Ellipsis, slice(6, -6), slice(6, -6))
    err = (out.warped - stepwise)[inner].abs().max()
    assert err < 0.02 * moving.max(), float(err)
    assert torch.allclose(out.warped, warp(moving, out.disp))


def test_cascade_shared_weights_allow_extra_recursions():
    shared = small("cascade", 2, n_stages=2, shared=True)
    assert len(shared.stages) == 1
    x = torch.rand(1, 1, 24, 28)
    assert len(shared(x, x, n_stages=5).stages) == 5
    separate = small("cascade", 2, n_stages=2)
    assert len(separate.stages) == 2
    assert len(separate(x, x, n_stages=1).stages) == 1
    with pytest.raises(ValueError, match="shared=True"):
        separate(x, x, n_stages=3)


def test_affine_then_deformable_composes_its_stages():
    torch.manual_seed(3)
    model = small("affine_unet", 2)
    with torch.no_grad():
        model.affine.theta.bias.copy_(torch.tensor([0.05, 0.0, 0.1, 0.0, -0.05, 0.0]))
        model.deformable.flow.bias.copy_(torch.tensor([0.7, -1.2]))
    moving, fixed = blob((32, 36)), torch.rand(1, 1, 32, 36)
    out = model(moving, fixed)
    u_affine, u_deformable = out.stages
    assert torch.allclose(out.disp, compose(u_affine, u_deformable))
    assert torch.equal(out.deep[0], u_affine)
    assert torch.allclose(out.warped, warp(moving, out.disp))
    assert len(small("affine_unet", 2, supervise_affine=False)(moving, fixed).deep) == 0


def test_pyramid_refines_coarse_to_fine():
    model = small("pyramid", 2)
    out = model(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    assert len(out.stages) == 4 and torch.equal(out.stages[-1], out.disp)
    # dual stream: one encoder, shared by the moving and fixed images
    assert model.encoder[0][0][0].in_channels == 1


@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_round_trip(name):
    model = small(name, 2)
    config = json.loads(json.dumps(model.config))
    assert config["name"] == name
    rebuilt = nets.from_config(config)
    assert rebuilt.config == model.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(rebuilt) == count(model)
    rebuilt.load_state_dict(model.state_dict())
    moving, fixed = torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45)
    assert torch.equal(rebuilt(moving, fixed).disp, model(moving, fixed).disp)


def test_custom_backbone_wrapper():
    backbone = nets.UNet(2, in_channels=2, **UNET)
    model = nets.Registration(backbone, spatial_dims=2)
    assert model(torch.rand(1, 1, 20, 21), torch.rand(1, 1, 20, 21)).disp.shape == (1, 2, 20, 21)
    with pytest.raises(ValueError, match="custom backbone"):
        nets.from_config(model.config)
    with pytest.raises(TypeError, match="out_features"):
        nets.Registration(nn.Conv2d(2, 4, 3), spatial_dims=2)


def test_a_fixed_atlas_is_broadcast_over_the_batch():
    model = small("unet", 2)
    out = model(torch.rand(3, 1, 20, 24), torch.rand(1, 1, 20, 24))
    assert out.disp.shape == (3, 2, 20, 24)


@pytest.mark.parametrize("moving, fixed, message", [
    (torch.rand(1, 3, 20, 24), torch.rand(1, 3, 20, 24), "moving: this model expects 1 image"),
    (torch.rand(1, 1, 20, 24), torch.rand(1, 1, 20, 25), "moving and fixed: expected the same"),
    (torch.rand(1, 1, 8, 20, 24), torch.rand(1, 1, 8, 20, 24), "is 2D.*spatial_dims=3"),
    (torch.rand(20, 24), torch.rand(20, 24), r"moving\[None, None\]"),
    (torch.rand(1, 1, 8, 8, 20, 24), torch.rand(1, 1, 8, 8, 20, 24), "6 axes"),
    (torch.rand(2, 1, 20, 24), torch.rand(3, 1, 20, 24), "batch sizes 2 and 3"),
])
@pytest.mark.parametrize("name", ["unet", "vvnet", "affine", "cascade", "pyramid"])
def test_bad_inputs_give_clear_errors(name, moving, fixed, message):
    with pytest.raises(ValueError, match=message):
        small(name, 2)(moving, fixed)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(TypeError, match="moving: expected a torch.Tensor"):
        small("unet", 2)(torch.rand(1, 1, 8, 8).numpy(), torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        small("unet", 2)(torch.ones(1, 1, 8, 8, dtype=torch.long), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims: expected 2"):
        nets.create("unet", spatial_dims=4)
    with pytest.raises(ValueError, match="name: expected one of"):
        nets.create("resnet")
    with pytest.raises(ValueError, match="features: expected 3 channel counts"):
        nets.create("vvnet", features=(8, 16))
    with pytest.raises(ValueError, match="decoder: expected at least one entry per encoder level"):
        nets.create("unet", encoder=(8, 8, 8), decoder=(8, 8))
    with pytest.raises(ValueError, match="integrate_steps"):
        nets.create("unet", integrate_steps=-1)
    with pytest.raises(ValueError, match="'name' key"):
        nets.from_config({"spatial_dims": 2})
    with pytest.raises(ValueError, match="pass spatial_dims= to Cascade"):
        nets.create("cascade", stage_kwargs={"spatial_dims": 2})


def test_summary_counts_parameters_and_scales_memory():
    model = small("unet", 2)
    full = nets.summary(model, (64, 96))
    scaled = nets.summary(model, (64, 96), max_voxels=32 * 48)
    assert full.params == sum(p.numel() for p in model.parameters())
    assert full.param_bytes == 4 * full.params
    assert full.measured_at == (64, 96) and scaled.measured_at == (32, 48)
    # activations grow with the number of voxels: the extrapolation is close
    assert math.isclose(scaled.activation_bytes, full.activation_bytes, rel_tol=0.1)
    # at least the input pair and one feature map per convolution are kept
    assert full.activation_bytes > 4 * 64 * 96 * (2 + 4 + 8)
    assert full.train_bytes == full.activation_bytes + 4 * full.param_bytes
    assert full.outputs["disp"] == (1, 2, 64, 96)
    assert [r["name"] for r in full.rows] == ["backbone", "flow", "(own ops)"]
    assert "saved for backward" in str(full)


def test_summary_lists_vvnet_stages():
    s = nets.summary(small("vvnet", 2), (37, 45))
    names = [r["name"] for r in s.rows]
    for part in ("vnet1.bottleneck", "vnet3.bottleneck", "fuse", "vnet2.bottleneck", "final"):
        assert part in names
    row = s.rows[names.index("vnet3.bottleneck")]
    assert row["output"][2:] == (3, 3)  # 37x45 padded to 48x48, then 1/16
    assert len(s.outputs["deep"]) == 1


def test_output_is_a_pytree_for_distributed_training():
    # DistributedDataParallel(find_unused_parameters=True) finds tensors through pytrees.
    from torch.utils._pytree import tree_flatten, tree_unflatten
    out = small("affine_unet", 2)(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    leaves, spec = tree_flatten(out)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    assert len(tensors) == 2 + len(out.stages) + len(out.deep)
    again = tree_unflatten(leaves, spec)
    assert isinstance(again, nets.RegistrationOutput) and again.disp is out.disp


class _ConstantModel(nn.Module):
    """A registration 'model' whose field is a fixed tensor (to test wrappers exactly)."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.config = {"name": "constant", "spatial_dims": field.dim() - 2, "in_channels": 1}
        self.seen = None

    def forward(self, moving, fixed):
        self.seen = moving.shape
        return nets.RegistrationOutput(moving, self.field.expand(moving.shape[0], *self.field.shape[1:]))


@pytest.mark.parametrize("nd", [2, 3])
def test_rescaled_runs_coarse_and_scales_the_field_back(nd):
    coarse_shape = (5, 6, 7)[:nd]
    # A coarse translation by t coarse voxels is f * t fine voxels everywhere.
    t = torch.tensor([1.0, -2.0, 0.5][:nd]).view(1, nd, *[1] * nd)
    inner = _ConstantModel(t.expand(1, nd, *coarse_shape).clone())
    model = nets.Rescaled(inner, 2)
    moving = torch.rand(1, 1, *[2 * n for n in coarse_shape])
    out = model(moving, moving)
    assert inner.seen[2:] == coarse_shape
    assert torch.allclose(out.disp, 2 * t.expand_as(out.disp), atol=1e-6)
    # A linear coarse field u(i) = i (one voxel of motion per coarse voxel) is linear on the
    # fine grid with the block centres at f i + (f - 1) / 2: u_fine(x) = f * (x - 0.5) / 2.
    ramp = torch.arange(coarse_shape[0], dtype=torch.float32).view(1, 1, -1, *[1] * (nd - 1))
    field = torch.zeros(1, nd, *coarse_shape)
    field[:, :1] = ramp.expand(1, 1, *coarse_shape)
    disp = nets.Rescaled(_ConstantModel(field), 2)(moving, moving).disp
    along_axis0 = disp[(0, 0, slice(1, -1)) + (0,) * (nd - 1)]  # the end voxels are clamped
    x = torch.arange(1, 2 * coarse_shape[0] - 1, dtype=torch.float32)
    assert torch.allclose(along_axis0, 2 * (x - 0.5) / 2, atol=1e-5)


def test_rescaled_round_trips_through_its_config_and_checks_sizes():
    model = nets.Rescaled(small("unet", 3), 2)
    again = nets.from_config(model.config)
    again.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, 16, 20, 24)
    assert torch.equal(again(x, x).disp, model(x, x).disp)
    assert again.config == model.config and again.config["model"]["name"] == "unet"
    by_name = nets.create("rescaled", model="unet", factor=4, spatial_dims=2)
    assert by_name.config["model"]["spatial_dims"] == 2 and by_name.factor == 4
    with pytest.raises(ValueError, match="multiple of factor=2"):
        model(torch.rand(1, 1, 16, 20, 25), torch.rand(1, 1, 16, 20, 25))
    # coarsen is what the wrapped model sees: 2x2x2 block means
    assert torch.allclose(model.coarsen(x)[0, 0, 1, 2, 3], x[0, 0, 2:4, 4:6, 6:8].mean())
    assert model.coarsen(x).shape == (1, 1, 8, 10, 12)
    with pytest.raises(TypeError, match="registration model"):
        nets.Rescaled(nn.Identity(), 2)
    with pytest.raises(ValueError, match="spatial_dims=3, got 2"):
        nets.Rescaled(small("unet", 3), 2, spatial_dims=2)
    # as a cascade stage: the same coarse network applied twice, fields composed at full size
    cascade = nets.create("cascade", spatial_dims=3, n_stages=2, shared=True, stage="rescaled",
                          stage_kwargs={"model": small("unet", 3).config, "factor": 2})
    assert cascade(x, x).disp.shape == (1, 3, 16, 20, 24)


@pytest.mark.parametrize("stride, size, kernel", [(1, (9, 11, 13), 3), (2, (9, 11, 13), 3), (2, (10, 12, 14), 3),
                                                  (1, (6, 7, 16), 5), (1, (8, 8, 3), 3)])
def test_conv3d_for_one_volume_equals_nn_conv3d(stride, size, kernel):
    """The batch-of-one path (two overlapping halves as a batch of two) gives nn.Conv3d's result and gradients."""
    from regedu.nets._base import Conv3d, _takes_native_path
    torch.manual_seed(0)
    ref = torch.nn.Conv3d(4, 6, kernel, stride=stride, padding=kernel // 2)
    ours = Conv3d(4, 6, kernel, stride=stride, padding=kernel // 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 4, *size, requires_grad=True)
    assert _takes_native_path(x, ours), "the test must exercise the split path"
    a, b = ref(x), ours(x)
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), [x, ref.weight, ref.bias])
    gb = torch.autograd.grad(b.square().sum(), [x, ours.weight, ours.bias])
    for g_ours, g_ref in zip(gb, ga):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))
    big = torch.randn(2, 4, *size)
    assert not _takes_native_path(big, ours)  # a real batch keeps PyTorch's own path
    torch.testing.assert_close(ours(big), ref(big))


def _reference_block(block, low, skip):
    return block(torch.cat([torch.nn.functional.interpolate(low, scale_factor=2, mode="nearest"), skip], 1))


@pytest.mark.parametrize("nd, low_size, batch, layout", [
    (2, (5, 7), 3, "contiguous"), (2, (5, 7), 3, "channels_last"),
    (3, (3, 4, 5), 1, "contiguous"), (3, (3, 4, 5), 2, "channels_last"),
    (3, (6, 5, 4), 1, "channels_last")])   # batch one of a small volume: the two-halves path
def test_upsample_conv_block_equals_upsampling_concatenation_and_convolution(nd, low_size, batch, layout):
    """The transposed-convolution form gives the upsample-concatenate-convolve result and gradients."""
    from regedu.nets._base import conv_block, cpu_channels_last, upsample_conv_block
    torch.manual_seed(0)
    block = conv_block(nd, 4 + 3, 5)
    low = torch.randn(batch, 4, *low_size)
    skip = torch.randn(batch, 3, *(2 * n for n in low_size))
    if layout == "channels_last":
        low, skip = cpu_channels_last(low), cpu_channels_last(skip)
    low.requires_grad_(), skip.requires_grad_()
    ref = _reference_block(block, low, skip)
    got = upsample_conv_block(block, low, skip)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(ref)        # a loss that weighs every output voxel differently
    ga = torch.autograd.grad((ref * weights).sum(), [low, skip, block[0].weight, block[0].bias])
    gb = torch.autograd.grad((got * weights).sum(), [low, skip, block[0].weight, block[0].bias])
    for g_got, g_ref in zip(gb, ga):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))


def test_upsample_conv_block_falls_back_where_the_identity_does_not_hold():
    """Another kernel size or a skip that is not twice the size: the plain computation."""
    from regedu.nets._base import conv, upsample_conv_block
    torch.manual_seed(0)
    block = nn.Sequential(conv(2, 6, 4, kernel_size=5), nn.LeakyReLU(0.2))
    low, skip = torch.randn(1, 4, 5, 6), torch.randn(1, 2, 10, 12)
    torch.testing.assert_close(upsample_conv_block(block, low, skip), _reference_block(block, low, skip))


@pytest.mark.parametrize("nd, size, kwargs", [
    (3, (37, 45, 21), {}), (3, (32, 32, 48), dict(decoder=(32, 32, 32, 32, 32), out_channels=3)),
    (3, (16, 16, 32), dict(decoder=(32, 32, 32, 32))), (2, (37, 45), {})])
def test_unet_equals_its_layers_applied_one_by_one(nd, size, kwargs):
    """UNet's fast forward (channels-last, transposed convolutions) computes VoxelMorph's U-Net:
    the same layers applied in the textbook order (convolve, pool; convolve, upsample,
    concatenate), same values and gradients to float rounding."""
    from regedu.nets._base import crop, pad_to_multiple
    torch.manual_seed(0)
    net = nets.UNet(nd, in_channels=2, **kwargs)

    def textbook(x):
        x, region = pad_to_multiple(x, net.multiple)
        skips = []
        for block in net.down:
            skips.append(block(x))
            x = net._pool(skips[-1], 2)
        for block in net.up:
            x = torch.cat([torch.nn.functional.interpolate(block(x), scale_factor=2), skips.pop()], 1)
        for block in net.extra:
            x = block(x)
        return crop(net.out(x) if net.out is not None else x, region)

    x = torch.randn(1, 2, *size)
    ref, got = textbook(x), net(x)      # float32: the channels-last path
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # Gradients in float64: in float32 a pre-activation within rounding of 0 can take
    # the other side of LeakyReLU's kink when the sums run in another order, which
    # moves a gradient by up to 1 % (measured: one voxel of 2.4 million, the same for
    # the textbook order against float64); float64 leaves no voxel that close.
    net, x = net.double(), x.double()
    ref, got = textbook(x), net(x)
    weights = torch.randn_like(ref)
    ga = torch.autograd.grad((ref * weights).sum(), list(net.parameters()))
    gb = torch.autograd.grad((got * weights).sum(), list(net.parameters()))
    for g_got, g_ref in zip(gb, ga):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-9 * float(g_ref.abs().max()))
