"""Bad input gets an error that says what was expected and what came."""
import numpy as np
import pytest
import torch

from regedu import losses, metrics, profiles, spatial


def test_2d_field_on_3d_image():
    with pytest.raises(ValueError, match=r"disp: expected spatial size \(5, 6, 7\).*got \(6, 7\)"):
        spatial.warp(torch.rand(1, 1, 5, 6, 7), torch.zeros(1, 2, 6, 7))


def test_field_with_wrong_channel_count():
    with pytest.raises(ValueError, match=r"disp: a 2D field needs 2 channels.*got shape \(1, 3, 6, 7\)"):
        spatial.warp(torch.rand(1, 1, 6, 7), torch.zeros(1, 3, 6, 7))


def test_image_without_batch_and_channel():
    with pytest.raises(ValueError, match=r"image: expected shape \(B, C, \*S\)"):
        spatial.warp(torch.rand(6, 7), torch.zeros(1, 2, 6, 7))


def test_numpy_arrays_are_accepted_alike_by_warp_losses_and_metrics():
    # One rule for the whole library: tensors or numpy arrays in, tensors out.
    img = np.random.default_rng(0).random((1, 1, 6, 7)).astype(np.float32)
    u = np.zeros((1, 2, 6, 7), np.float32)
    u[:, 1] = 1.0
    assert torch.equal(spatial.warp(img, u), spatial.warp(torch.from_numpy(img), torch.from_numpy(u)))
    assert float(losses.ncc_local(img, img)) == pytest.approx(float(losses.ncc_local(
        torch.from_numpy(img), torch.from_numpy(img))))
    assert float(losses.mse(img, img)) == 0.0
    assert float(losses.diffusion(u)) == 0.0
    assert metrics.jacobian_determinant(u).shape == (1, 6, 7)
    with pytest.raises(TypeError, match="image: expected a torch.Tensor or numpy array, got a list"):
        spatial.warp([[0.0]], u)


def test_fixed_and_moving_of_different_shapes():
    with pytest.raises(ValueError, match=r"fixed and warped must have the same shape, got \(1, 1, 8, 8\) and \(1, 1, 8, 9\)"):
        losses.mse(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="same shape"):
        losses.ncc_local(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))


def test_nan_in_image_and_field():
    img = torch.rand(1, 1, 6, 6)
    img[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="image: expected finite values, got 1 NaN"):
        spatial.warp(img, torch.zeros(1, 2, 6, 6))
    u = torch.zeros(1, 2, 6, 6)
    u[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="disp: expected finite values, got 0 NaN and 1 infinite"):
        metrics.jacobian_determinant(u)
    with pytest.raises(ValueError, match="warped: expected finite values"):
        losses.ncc_local(torch.rand(1, 1, 6, 6), img)


def test_float_label_map_with_non_integer_values():
    with pytest.raises(ValueError, match="a: expected a label map of whole numbers"):
        metrics.dice(np.array([0.5, 1.0]), np.array([1, 1]), [1])
    assert metrics.dice(np.array([0.0, 1.0]), np.array([1, 1]), [1]).mean == pytest.approx(2 / 3)


def test_integer_labels_with_bilinear():
    with pytest.raises(ValueError, match="label map can only be warped with mode='nearest'"):
        spatial.warp(torch.zeros(1, 1, 4, 4, dtype=torch.int64), torch.zeros(1, 2, 4, 4), mode="bilinear")


def test_integer_image_for_loss():
    with pytest.raises(TypeError, match="fixed: expected a floating-point tensor, got dtype torch.int64"):
        losses.mse(torch.zeros(1, 1, 4, 4, dtype=torch.int64), torch.zeros(1, 1, 4, 4))


def test_bad_options():
    with pytest.raises(ValueError, match="mode: expected one of 'bilinear', 'nearest', got 'cubic'"):
        spatial.warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), mode="cubic")
    with pytest.raises(ValueError, match="padding"):
        spatial.warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), padding="reflect")
    with pytest.raises(ValueError, match="window: expected an odd width"):
        losses.ncc_local(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), window=4)
    with pytest.raises(ValueError, match="steps: expected a non-negative integer"):
        spatial.integrate_velocity(torch.zeros(1, 2, 4, 4), steps=-1)
    with pytest.raises(ValueError, match="reduction"):
        losses.mse(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), reduction="sum")


def test_batch_mismatch():
    with pytest.raises(ValueError, match="disp: expected batch size|batch sizes 2 and 3"):
        spatial.warp(torch.rand(2, 1, 4, 4), torch.zeros(3, 2, 4, 4))


def test_affine_matrix_shape():
    with pytest.raises(ValueError, match=r"matrix: a 3D affine needs shape \(B, 3, 4\) or \(B, 4, 4\), got \(1, 2, 3\)"):
        spatial.affine_to_displacement(torch.zeros(1, 2, 3), (4, 5, 6))


def test_points_shape():
    with pytest.raises(ValueError, match=r"points: expected shape \(B, N, 2\)"):
        spatial.warp_points(torch.zeros(4, 3), torch.zeros(1, 2, 5, 5))


def test_tre_spacing_and_points():
    with pytest.raises(ValueError, match="fixed_points and moving_points must have the same shape"):
        metrics.tre(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="spacing: expected one number or 2"):
        metrics.tre(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(1, 2, 5, 5), spacing=[1, 2, 3])


def test_unknown_profile(monkeypatch):
    monkeypatch.setenv("REGEDU_PROFILE", "laptop")
    with pytest.raises(ValueError, match="REGEDU_PROFILE: expected one of ci, cpu, gpu, got 'laptop'"):
        profiles.get_profile()


def test_one_hot_requires_single_channel():
    with pytest.raises(ValueError, match=r"labels: expected shape \(B, 1, \*S\)"):
        losses.one_hot(torch.zeros(1, 2, 4, 4, dtype=torch.int64), [1])


@pytest.mark.parametrize("shape, fn", [((3, 16, 16, 16), "warp"), ((3, 16, 16, 16), "jacobian"),
                                       ((2, 16, 16), "jacobian")])
def test_a_field_without_its_batch_axis_gets_a_hint(shape, fn):
    u = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"without its batch axis: add it with disp\[None\]"):
        if fn == "warp":
            spatial.warp(torch.rand(1, 1, *shape[1:]), u)
        else:
            metrics.jacobian_determinant(u)


@pytest.mark.parametrize("fn", [losses.ncc_local, losses.mse, losses.ncc_global,
                                losses.mutual_information])
def test_a_volume_without_its_channel_axis_is_not_read_as_a_2d_image(fn):
    x = torch.rand(1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"fixed: shape \(1, 16, 16, 16\) reads as a 2D image "
                                         r"with 16 channels.*fixed\[None\]"):
        fn(x, x)
    # The intended reading works once the axis is there.
    assert fn(x[None], x[None]).shape == ()


def test_soft_dice_still_takes_many_one_hot_channels():
    x = torch.rand(1, 30, 8, 8)
    assert float(losses.soft_dice(x, x)) < 0.5


@pytest.mark.parametrize("labels, message", [
    ("123", "expected a sequence of integer labels"), ([1.5], "expected integer labels.*1.5"),
    (3, "expected a sequence of integer labels"), ([1, 1], "each label once"),
    ([float("nan")], "expected integer labels"), ([True], "expected integer labels")])
def test_dice_label_lists_must_be_integers(labels, message):
    a = np.array([0, 1, 1, 2])
    with pytest.raises((TypeError, ValueError), match=message):
        metrics.dice(a, a, labels)


def test_dice_accepts_whole_floats_and_numpy_labels():
    a = np.array([0, 1, 1, 2])
    assert metrics.dice(a, a, [1.0, np.int64(2)]).as_dict() == {1: 1.0, 2: 1.0}
    assert metrics.dice(a, a, np.array([1, 2])).mean == 1.0


def test_nan_and_infinite_label_maps_are_refused():
    with pytest.raises(ValueError, match="b: expected a label map of whole numbers, got NaN"):
        metrics.dice(np.array([0, 1]), np.array([np.nan, 1.0]), [1])
    with pytest.raises(ValueError, match="labels: expected a label map of whole numbers"):
        losses.one_hot(torch.tensor([[[[0.5, 1.0]]]]), [1])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0])
def test_non_finite_or_non_positive_options_are_refused(value):
    with pytest.raises(ValueError, match="sigma: expected a positive number"):
        spatial.gaussian_blur(torch.rand(1, 1, 8, 8), value)


# ---------------------------------------------------------------- evaluate and datasets

def _pair(**changes):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 12, 12, generator=g)
    seg = (img > 0.5).long()
    pair = {"moving": img, "fixed": img.clone(), "moving_seg": seg, "fixed_seg": seg.clone()}
    pair.update(changes)
    return pair


def test_evaluate_refuses_nan_images_and_fractional_labels():
    from regedu.evaluate import evaluate, identity
    img = torch.rand(1, 12, 12)
    img[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"pairs\[0\]\['moving'\]: expected finite values, got 1 NaN"):
        evaluate(identity, [_pair(moving=img)], labels=[1], progress=False)
    with pytest.raises(ValueError, match=r"pairs\[0\]\['fixed_seg'\]: expected a label map of whole numbers"):
        evaluate(identity, [_pair(fixed_seg=torch.full((1, 12, 12), 0.5))], labels=[1], progress=False)
    with pytest.raises(ValueError, match="labels: expected integer labels"):
        evaluate(identity, [_pair()], labels=[1.5], progress=False)


def test_evaluate_warns_about_labels_in_no_map():
    from regedu.evaluate import evaluate, identity
    with pytest.warns(UserWarning, match="labels: 7 in no label map of any pair"):
        result = evaluate(identity, [_pair()], labels=[1, 7], progress=False)
    assert result.records[0]["dice_mean"] == 1.0


def test_evaluate_reads_shapes_with_the_model_s_own_dimensions():
    from regedu import nets
    from regedu.evaluate import evaluate
    model = nets.create("unet", spatial_dims=3, encoder=(4, 4), decoder=(4, 4, 4)).eval()
    volume = torch.rand(1, 4, 16, 16)  # (C, D, H, W); its 4 axes alone read as a 2D batch of 4 channels
    result = evaluate(model, [{"moving": volume, "fixed": volume}], progress=False)
    assert len(result.records) == 1


def test_dataset_label_maps_are_checked_not_truncated():
    from regedu.datasets import SubjectPairs, resize_labels
    with pytest.raises(ValueError, match="labels: expected a label map of whole numbers"):
        resize_labels(np.array([[0.5, 1.0], [1.0, 2.0]]), (4, 4))
    with pytest.raises(ValueError, match=r"size: expected 2 positive sizes"):
        resize_labels(np.zeros((2, 2), int), (4, 4, 4))
    subjects = {k: {"image": np.random.rand(1, 8, 8).astype(np.float32),
                    "seg": np.full((8, 8), 1.5)} for k in ("a", "b")}
    with pytest.raises(ValueError, match="a: seg: expected a label map of whole numbers"):
        SubjectPairs(subjects.__getitem__, ["a", "b"])[0]


def test_a_model_refuses_nan_inputs():
    from regedu import nets
    model = nets.create("unet", spatial_dims=2, encoder=(4, 4), decoder=(4, 4, 4))
    x = torch.rand(1, 1, 16, 16)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="moving: expected finite values, got 1 NaN"):
        model(x, torch.rand(1, 1, 16, 16))
