"""regedu.joint: the consistency term, the segmentation loss, the joint objective and its step."""
import pytest
import torch

from regedu import losses, metrics
from regedu.joint import JointModel, consistency, joint_step, joint_terms, segmentation_loss

SMALL = dict(encoder=(8, 8), decoder=(8, 8, 8))
LABELS = [2, 5]


def squares(shift=(0, 0), shape=(24, 24)):
    seg = torch.zeros(1, 1, *shape, dtype=torch.long)
    r, c = shift
    seg[..., 5 + r:11 + r, 5 + c:12 + c] = 2
    seg[..., 13 + r:19 + r, 10 + c:18 + c] = 5
    return seg


def with_background(seg):
    onehot = losses.one_hot(seg, LABELS)
    return torch.cat([1 - onehot.sum(1, keepdim=True), onehot], 1)


def test_consistency_is_zero_for_consistent_labels_and_positive_otherwise():
    # fixed(x) = moving(x + t): the moving labels warped by u = t are the fixed labels.
    t = (2, -3)
    moving, fixed = squares(), squares(shift=(-t[0], -t[1]))
    disp = torch.tensor(t, dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, 24, 24)
    assert float(consistency(with_background(moving), with_background(fixed), disp)) < 1e-4
    wrong = float(consistency(with_background(moving), with_background(fixed), torch.zeros_like(disp)))
    expected = 1 - metrics.dice(fixed[0, 0], moving[0, 0], LABELS).mean
    assert wrong == pytest.approx(expected, abs=1e-3)
    assert wrong > 0.3


def test_segmentation_loss_is_near_zero_for_the_right_answer_only():
    seg = squares()
    right = 20.0 * (2 * with_background(seg) - 1)
    assert float(segmentation_loss(right, seg, LABELS)) < 1e-3
    assert float(segmentation_loss(right, squares(shift=(3, 3)), LABELS)) > 0.3
    with pytest.raises(ValueError, match="logits"):
        segmentation_loss(right[:, :2], seg, LABELS)


def batch(labelled=True):
    moving, fixed = squares(), squares(shift=(1, 1))
    out = {"moving": moving.float() / 5, "fixed": fixed.float() / 5, "moving_seg": moving, "fixed_seg": fixed}
    out["moving_labelled"] = torch.tensor([labelled])
    out["fixed_labelled"] = torch.tensor([False])
    return out


def test_joint_terms_skip_what_is_weighted_zero():
    torch.manual_seed(0)
    model = JointModel(LABELS, 2, **SMALL)
    assert sorted(joint_terms(model, batch())) == ["consistency", "loss", "registration", "segmentation"]
    assert sorted(joint_terms(model, batch(labelled=False))) == ["consistency", "loss", "registration"]
    registration_only = joint_terms(model, batch(), weights={"segmentation": 0, "consistency": 0})
    assert sorted(registration_only) == ["loss", "registration"]
    segmentation_only = joint_terms(model, batch(), weights={"registration": 0, "consistency": 0})
    assert sorted(segmentation_only) == ["loss", "segmentation"]
    assert torch.equal(segmentation_only["loss"], segmentation_only["segmentation"])


def test_joint_step_learns_to_segment_a_labelled_image():
    torch.manual_seed(0)
    model = JointModel(LABELS, 2, **SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batch()
    for _ in range(80):
        terms = joint_step(model, data, optimizer)
    predicted = model.eval().predict_labels(data["moving"])
    assert set(predicted.unique().tolist()) <= {0, *LABELS}
    assert metrics.dice(data["moving_seg"][0, 0], predicted[0, 0], LABELS).mean > 0.9
    assert set(terms) == {"registration", "segmentation", "consistency", "loss"}


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="labels"):
        JointModel([], 2)
    model = JointModel(LABELS, 2, **SMALL)
    with pytest.raises(ValueError, match="weights"):
        joint_terms(model, batch(), weights={"dice": 1.0})
    bad = batch()
    bad["moving_labelled"] = torch.tensor([True, False])
    with pytest.raises(ValueError, match="moving_labelled"):
        joint_terms(model, bad)
    one = torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match="moving_prob"):
        consistency(one, one, torch.zeros(1, 2, 8, 8))
