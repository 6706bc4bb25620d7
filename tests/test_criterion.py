"""Tests of the matcher, the training criterion and contrastive denoising (CPU, tiny tensors).

The matcher and the criterion are compared with transformers' ``GroundingDinoHungarianMatcher``,
``GroundingDinoImageLoss`` and ``GroundingDinoForObjectDetectionLoss`` (transformers 4.57) on the
same random predictions and targets. How their inputs map onto ours:

- a target is ``class_labels[j]`` of an image whose ``label_maps[b]`` ([C, T], 0/1 per phrase)
  come from its caption; ours is the row-normalised ``positive_map = label_maps[b][class] / sum``
  (docs/interfaces.md). Their matcher normalises the rows and their loss takes them as 0/1, as
  ours does, so the two are exact.
- their ``text_mask`` is [B, Q, T] (the tokenizer's attention mask repeated over the queries);
  ours is the [B, T] mask. Both drop the masked (``-inf``) logits before the focal loss.
- both normalise every loss by the number of target boxes (at least 1), not by queries or
  tokens; their focal loss is our ``loss_class``, their ``loss_ce``.

Where transformers really differs (documented, kept out of the exact comparisons):

- ``GroundingDinoImageLoss._get_target_classes_one_hot`` offsets the class labels of image i by
  ``len(label_maps[i])`` instead of the number of rows before it in ``torch.cat(label_maps)``.
  This is right for a batch of two images with equally many phrases, or a batch sharing one
  caption (their usual single-prompt batch), and wrong otherwise: with three captions of three
  phrases (the ``different captions`` case below, seed 0) image 2's targets get image 1's token
  maps and their ``loss_ce`` is 53.277 where the correct value, ours, is 52.503. The comparison
  pads their label maps with zero rows to C, C, 2C, 4C, ... rows so that their offset lands on
  the right rows (:func:`_hf_label_maps`); the matcher is unaffected (it indexes per image).
- a target whose positive map is all zero (its phrase truncated away) gives NaN matching costs
  in transformers (0 / 0 normalisation; ``linear_sum_assignment`` then raises); ours gives it a
  zero class cost.
- transformers hard-codes the matcher's focal alpha 0.25 and gamma 2 and the loss's gamma 2;
  ours takes them from the config (the same values).
"""

import math

import pytest
import torch
from torchvision.ops import box_convert
from transformers.loss import loss_grounding_dino as hf_loss

from grounding_dino.modeling.criterion import GroundingCriterion
from grounding_dino.modeling.denoising import dn_match_indices, prepare_for_cdn, split_dn_outputs
from grounding_dino.modeling.matcher import HungarianMatcher

T = 16  # token slots (the model uses 256)
BIG = 12.0  # a confident logit
# The values of configs/common/models/grounding_dino_swin_t.py (and of transformers' config).
COSTS = {"cost_class": 1.0, "cost_bbox": 5.0, "cost_giou": 2.0}
FOCAL = {"focal_alpha": 0.25, "focal_gamma": 2.0}
WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
BASE_KEYS = tuple(WEIGHTS)


def _posmap(spans, num_tokens=T):
    """Row-normalised positive maps from token index lists."""
    pm = torch.zeros(len(spans), num_tokens)
    for i, toks in enumerate(spans):
        pm[i, toks] = 1.0 / len(toks)
    return pm


def _target(boxes, spans):
    boxes = torch.tensor(boxes, dtype=torch.float).reshape(-1, 4)
    return {
        "boxes": boxes,
        "positive_map": _posmap(spans),
        "labels": torch.arange(len(boxes), dtype=torch.long),
    }


def _text_mask(bs, num_valid):
    mask = torch.zeros(bs, T, dtype=torch.bool)
    mask[:, :num_valid] = True
    return mask


def _logits(bs, nq, text_mask, fill=-BIG):
    logits = torch.full((bs, nq, T), fill)
    return logits.masked_fill(~text_mask[:, None, :], float("-inf"))


def _matcher(**overrides):
    return HungarianMatcher(**{**COSTS, **FOCAL, **overrides})


def _criterion(weight_dict=WEIGHTS, losses=("labels", "boxes"), matcher=None):
    return GroundingCriterion(
        matcher=matcher or _matcher(), weight_dict=weight_dict, losses=losses, **FOCAL
    )


# ----------------------------------------------------------------------------- transformers
# Three captions of C = 3 phrases each: (number of valid tokens incl. [CLS] ... [SEP], spans).
CAPTIONS = [
    (12, [[1, 2], [4], [6, 7, 8]]),
    (9, [[1], [3, 4], [6]]),
    (14, [[2], [5, 6], [9, 10, 11]]),
]


def _random_boxes(*shape):
    """Random cxcywh boxes with positive sizes, a few slightly outside the image."""
    return torch.cat([torch.rand(*shape, 2) * 0.8 + 0.1, torch.rand(*shape, 2) * 0.5 + 0.02], -1)


def _random_case(seed, num_targets, same_caption, num_queries=9, num_layers=3):
    """The same random batch for ours and transformers.

    Returns:
        dict with "mask" [B, T], "label_maps" (tuple of B [C, T] long 0/1), "class_labels",
        "boxes" (lists of B), "layers" (num_layers (logits [B, Q, T], boxes [B, Q, 4]), last is
        the final layer), "enc" (logits, boxes) and ours' targets.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bs = len(num_targets)
    captions = [CAPTIONS[0] if same_caption else CAPTIONS[b % 3] for b in range(bs)]
    mask = torch.zeros(bs, T, dtype=torch.bool)
    label_maps = []
    for b, (length, spans) in enumerate(captions):
        mask[b, :length] = True
        label_map = torch.zeros(len(spans), T, dtype=torch.long)
        for c, span in enumerate(spans):
            label_map[c, span] = 1
        label_maps.append(label_map)
    class_labels = [torch.randint(0, 3, (n,), generator=gen) for n in num_targets]
    boxes = [_random_boxes(n) for n in num_targets]

    def layer():
        logits = torch.randn(bs, num_queries, T) * 3
        return logits.masked_fill(~mask[:, None], float("-inf")), _random_boxes(bs, num_queries)

    targets = [
        {
            "boxes": box,
            "positive_map": lm[cls].float() / lm[cls].sum(-1, keepdim=True),
            "labels": cls,
        }
        for box, lm, cls in zip(boxes, label_maps, class_labels)
    ]
    return {
        "mask": mask,
        "label_maps": tuple(label_maps),
        "class_labels": class_labels,
        "boxes": boxes,
        "layers": [layer() for _ in range(num_layers)],
        "enc": layer(),
        "targets": targets,
    }


def _hf_label_maps(label_maps):
    """Pad label map i with zero rows to C, C, 2C, 4C, ... rows (C = rows of map 0).

    transformers' loss reads image i's targets at ``torch.cat(label_maps)[label + len(map i)]``;
    with these lengths ``len(map i)`` is the number of rows before map i, the right offset.
    Identity for one or two images with equally many phrases.
    """
    num = len(label_maps[0])
    padded = []
    for i, label_map in enumerate(label_maps):
        rows = num if i == 0 else num * 2 ** (i - 1)
        padded.append(torch.cat([label_map, label_map.new_zeros(rows - len(label_map), T)]))
    return tuple(padded)


def _hf_targets(case):
    return [
        {"boxes": box, "class_labels": cls} for box, cls in zip(case["boxes"], case["class_labels"])
    ]


def _hf_outputs(case, logits, boxes, label_maps):
    bs, num_queries, _ = logits.shape
    return {
        "logits": logits,
        "pred_boxes": boxes,
        "label_maps": label_maps,
        "text_mask": case["mask"][:, None].expand(bs, num_queries, T),
    }


def _our_outputs(case, layers, enc=None):
    (logits, boxes), aux = layers[-1], layers[:-1]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "text_mask": case["mask"]}
    outputs["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in aux]
    if enc is not None:
        outputs["enc_outputs"] = {"pred_logits": enc[0], "pred_boxes": enc[1]}
    return outputs


CASES = {
    "one caption, 3/0/2 targets": ([3, 0, 2], True),
    "different captions, 3/0/2 targets": ([3, 0, 2], False),
    "different captions, 1/4/2/5 targets": ([1, 4, 2, 5], False),
    "no targets at all": ([0, 0], False),
}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize(
    "costs",
    [
        COSTS,
        {"cost_class": 1.0, "cost_bbox": 0.0, "cost_giou": 0.0},
        {"cost_class": 0.0, "cost_bbox": 1.0, "cost_giou": 0.0},
        {"cost_class": 0.0, "cost_bbox": 0.0, "cost_giou": 1.0},
    ],
    ids=["config", "class", "l1", "giou"],
)
def test_matcher_equals_transformers(case_name, costs, monkeypatch):
    """Same cost matrices (1e-5) and the same assignment as GroundingDinoHungarianMatcher."""
    num_targets, same_caption = CASES[case_name]
    case = _random_case(0, num_targets, same_caption)
    theirs_costs = []
    solve = hf_loss.linear_sum_assignment

    def recording_solve(cost):
        theirs_costs.append(torch.as_tensor(cost).clone())
        return solve(cost)

    monkeypatch.setattr(hf_loss, "linear_sum_assignment", recording_solve)
    theirs = hf_loss.GroundingDinoHungarianMatcher(
        class_cost=costs["cost_class"], bbox_cost=costs["cost_bbox"], giou_cost=costs["cost_giou"]
    )
    ours = _matcher(**costs)
    for logits, boxes in case["layers"]:
        expected = theirs(_hf_outputs(case, logits, boxes, case["label_maps"]), _hf_targets(case))
        got = ours({"pred_logits": logits, "pred_boxes": boxes}, case["targets"])
        assert len(got) == len(expected)
        for b, ((q, t), (hq, ht)) in enumerate(zip(got, expected)):
            assert q.tolist() == hq.tolist() and t.tolist() == ht.tolist(), f"image {b}"
        for b, target in enumerate(case["targets"]):
            cost = ours.cost_matrix(logits[b], boxes[b], target["boxes"], target["positive_map"])
            torch.testing.assert_close(cost, theirs_costs[b], rtol=0, atol=1e-5)
        theirs_costs.clear()
    # Matching is not trivial here: the last layer's queries are not simply 0, 1, 2, ...
    if num_targets == [1, 4, 2, 5] and costs == COSTS:
        assert got[3][0].tolist() != list(range(5))


@pytest.mark.parametrize("case_name", list(CASES))
def test_losses_and_gradients_equal_transformers(case_name):
    """loss_class, loss_bbox, loss_giou (last and auxiliary layers) and their gradients equal
    GroundingDinoImageLoss's loss_ce, loss_bbox, loss_giou to 1e-5 (our weights set to 1)."""
    num_targets, same_caption = CASES[case_name]
    case = _random_case(1, num_targets, same_caption)
    ours_layers = [tuple(x.clone().requires_grad_() for x in lay) for lay in case["layers"]]
    hf_layers = [tuple(x.clone().requires_grad_() for x in lay) for lay in case["layers"]]
    label_maps = _hf_label_maps(case["label_maps"])
    hf_outputs = _hf_outputs(case, *hf_layers[-1], label_maps)
    hf_outputs["auxiliary_outputs"] = [
        _hf_outputs(case, *lay, label_maps) for lay in hf_layers[:-1]
    ]
    matcher = hf_loss.GroundingDinoHungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    criterion = hf_loss.GroundingDinoImageLoss(
        matcher=matcher, focal_alpha=0.25, losses=["labels", "boxes"]
    )
    theirs = criterion(hf_outputs, _hf_targets(case))
    ours = _criterion(weight_dict=dict.fromkeys(BASE_KEYS, 1.0))(
        _our_outputs(case, ours_layers), case["targets"]
    )
    names = {"loss_class": "loss_ce", "loss_bbox": "loss_bbox", "loss_giou": "loss_giou"}
    for suffix in [""] + [f"_{i}" for i in range(len(case["layers"]) - 1)]:
        for key, hf_key in names.items():
            torch.testing.assert_close(
                ours[key + suffix], theirs[hf_key + suffix], rtol=0, atol=1e-5, msg=key + suffix
            )
    assert ours["loss_class"].item() > 1.0
    if sum(num_targets):
        assert ours["loss_bbox"].item() > 0.1 and ours["loss_giou"].item() > 0.1
    ours_grads = torch.autograd.grad(sum(ours.values()), [x for lay in ours_layers for x in lay])
    hf_grads = torch.autograd.grad(sum(theirs.values()), [x for lay in hf_layers for x in lay])
    for got, expected in zip(ours_grads, hf_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_transformers_label_offset_needs_padded_label_maps():
    """The number in the module docstring: without the padding of :func:`_hf_label_maps`,
    transformers' loss_ce of three different captions is not ours (52.503); padded, it is."""
    case = _random_case(0, [3, 0, 2], same_caption=False, num_layers=1)
    logits, boxes = case["layers"][0]
    ours = _criterion(weight_dict=dict.fromkeys(BASE_KEYS, 1.0))(
        _our_outputs(case, case["layers"]), case["targets"]
    )["loss_class"]
    matcher = hf_loss.GroundingDinoHungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    criterion = hf_loss.GroundingDinoImageLoss(matcher=matcher, focal_alpha=0.25, losses=["labels"])
    padded = criterion(
        _hf_outputs(case, logits, boxes, _hf_label_maps(case["label_maps"])), _hf_targets(case)
    )["loss_ce"]
    raw = criterion(_hf_outputs(case, logits, boxes, case["label_maps"]), _hf_targets(case))
    torch.testing.assert_close(ours, padded, rtol=0, atol=1e-5)
    assert ours.item() == pytest.approx(52.503, abs=1e-3)
    if abs(raw["loss_ce"].item() - ours.item()) < 1e-5:
        pytest.fail("transformers now offsets label maps correctly: drop _hf_label_maps' padding")
    assert raw["loss_ce"].item() == pytest.approx(53.277, abs=1e-3)


def test_weighted_total_equals_transformers_loss_function():
    """The config's weights over the last, auxiliary and encoder layers: our summed losses equal
    the total of GroundingDinoForObjectDetectionLoss (transformers' model loss)."""
    case = _random_case(2, [2, 3], same_caption=False, num_layers=4)
    config = type(
        "Config",
        (),
        dict(
            class_cost=1.0,
            bbox_cost=5.0,
            giou_cost=2.0,
            focal_alpha=0.25,
            auxiliary_loss=True,
            two_stage=True,
            decoder_layers=4,
            bbox_loss_coefficient=WEIGHTS["loss_bbox"],
            giou_loss_coefficient=WEIGHTS["loss_giou"],
        ),
    )
    logits = torch.stack([lg for lg, _ in case["layers"]])
    boxes = torch.stack([bx for _, bx in case["layers"]])
    theirs, theirs_dict, _ = hf_loss.GroundingDinoForObjectDetectionLoss(
        logits[-1],
        _hf_targets(case),
        "cpu",
        boxes[-1],
        config,
        _hf_label_maps(case["label_maps"]),
        case["mask"][:, None].expand(logits.shape[1:]),
        outputs_class=logits,
        outputs_coord=boxes,
        encoder_logits=case["enc"][0],
        encoder_pred_boxes=case["enc"][1],
    )
    ours = _criterion()(_our_outputs(case, case["layers"], case["enc"]), case["targets"])
    suffixes = ["", "_0", "_1", "_2", "_enc"]
    assert set(ours) == {
        k + s for s in suffixes + ["_dn", "_dn_0", "_dn_1", "_dn_2"] for k in WEIGHTS
    }
    assert all(ours[k].item() == 0 for k in ours if "_dn" in k)  # no denoising queries here
    assert {k for k in theirs_dict if "cardinality" not in k} == {
        k.replace("loss_class", "loss_ce") for k in ours if "_dn" not in k
    }
    torch.testing.assert_close(sum(ours.values()), theirs, rtol=1e-6, atol=1e-5)
    assert theirs.item() > 10


# ----------------------------------------------------------------------------- matcher
def test_matcher_picks_obvious_assignment():
    mask = _text_mask(1, 8)
    tgt = _target([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.4]], [[1, 2], [4]])
    logits = _logits(1, 4, mask)
    boxes = torch.tensor(
        [[[0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.1, 0.1], [0.9, 0.1, 0.05, 0.05]]]
    )
    logits[0, 2, [1, 2]] = BIG
    logits[0, 0, 4] = BIG
    q, t = _matcher()({"pred_logits": logits, "pred_boxes": boxes}, [tgt])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 2, 1: 0}
    assert q.dtype == torch.int64 and t.dtype == torch.int64


def test_matcher_class_cost_breaks_box_ties():
    # Two queries with identical boxes: only the token logits tell them apart.
    mask = _text_mask(1, 8)
    tgt = _target([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]], [[1], [5, 6]])
    logits = _logits(1, 2, mask)
    logits[0, 0, [5, 6]] = BIG
    logits[0, 1, 1] = BIG
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 2])
    q, t = _matcher()({"pred_logits": logits, "pred_boxes": boxes}, [tgt])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 1, 1: 0}
    # Swapping the logits swaps the assignment.
    q, t = _matcher()({"pred_logits": logits.flip(1), "pred_boxes": boxes}, [tgt])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 0, 1: 1}


def test_matcher_truncated_target_has_zero_class_cost():
    # A target whose phrase was truncated away (all-zero positive map): transformers gives NaN.
    mask = _text_mask(1, 8)
    tgt = _target([[0.3, 0.3, 0.2, 0.2]], [[2]])
    tgt["positive_map"].zero_()
    torch.manual_seed(0)
    logits = torch.randn(1, 3, T).masked_fill(~mask[:, None], float("-inf"))
    boxes = _random_boxes(1, 3)
    class_only = _matcher(cost_bbox=0.0, cost_giou=0.0)
    assert (
        class_only.cost_matrix(logits[0], boxes[0], tgt["boxes"], tgt["positive_map"]).eq(0).all()
    )
    q, t = _matcher()({"pred_logits": logits, "pred_boxes": boxes}, [tgt])[0]
    assert len(q) == 1 and t.tolist() == [0]


def test_matcher_images_without_targets():
    mask = _text_mask(2, 6)
    targets = [_target([], []), _target([[0.3, 0.3, 0.2, 0.2]], [[2]])]
    outputs = {"pred_logits": _logits(2, 5, mask), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.2}
    outputs["pred_boxes"][1, 3] = torch.tensor([0.3, 0.3, 0.2, 0.2])
    (q0, t0), (q1, t1) = _matcher()(outputs, targets)
    assert len(q0) == 0 and len(t0) == 0
    assert q1.tolist() == [3] and t1.tolist() == [0]


def test_matcher_bad_input_errors():
    mask = _text_mask(1, 6)
    outputs = {"pred_logits": _logits(1, 3, mask), "pred_boxes": torch.rand(1, 3, 4)}
    bad = _target([[0.3, 0.3, 0.2, 0.2]], [[2]])
    bad["positive_map"] = bad["positive_map"][:, :8]
    with pytest.raises(ValueError, match="positive_map"):
        _matcher()(outputs, [bad])
    with pytest.raises(ValueError, match="target dicts"):
        _matcher()(outputs, [])
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        _matcher()(outputs, [_target([[0.3, 0.3, 0.2, 0.2]], [[2]])])
    with pytest.raises(ValueError, match="all matching costs are 0"):
        _matcher(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0)
    with pytest.raises(TypeError):
        HungarianMatcher(1.0, 5.0, 2.0, 0.25, 2.0)  # keyword-only
    with pytest.raises(TypeError, match="focal_gamma"):
        HungarianMatcher(**COSTS, focal_alpha=0.25)  # no defaults


# ----------------------------------------------------------------------------- criterion
def _perfect_outputs(targets, mask, nq=6):
    """Predictions where query i is exactly target i (binarised tokens, exact boxes)."""
    bs = len(targets)
    logits = _logits(bs, nq, mask)
    boxes = torch.full((bs, nq, 4), 0.5)
    boxes[..., 2:] = 0.1
    for b, t in enumerate(targets):
        n = len(t["boxes"])
        boxes[b, :n] = t["boxes"]
        logits[b, :n] = torch.where(t["positive_map"] > 0, BIG, logits[b, :n])
    return {"pred_logits": logits, "pred_boxes": boxes, "text_mask": mask}


def _two_image_targets():
    return [
        _target([[0.25, 0.3, 0.2, 0.3], [0.7, 0.7, 0.4, 0.2]], [[1, 2], [4]]),
        _target([[0.5, 0.5, 0.6, 0.6]], [[3]]),
    ]


def test_losses_near_zero_for_perfect_predictions_and_grow_with_errors():
    mask = _text_mask(2, 8)
    targets = _two_image_targets()
    outputs = _perfect_outputs(targets, mask)
    losses = _criterion()(outputs, targets)
    assert losses["loss_bbox"].item() < 1e-6
    assert losses["loss_giou"].item() < 1e-4  # torchvision's eps
    assert losses["loss_class"].item() < 1e-3

    shifted = dict(outputs, pred_boxes=outputs["pred_boxes"].clone())
    shifted["pred_boxes"][0, 0, 0] += 0.05
    worse = _criterion()(shifted, targets)
    # One coordinate off by 0.05, three target boxes, weight 5.
    assert worse["loss_bbox"].item() == pytest.approx(5.0 * 0.05 / 3)
    assert worse["loss_giou"].item() > 1e-3

    more_shifted = dict(outputs, pred_boxes=outputs["pred_boxes"].clone())
    more_shifted["pred_boxes"][0, 0, 0] += 0.1
    assert _criterion()(more_shifted, targets)["loss_giou"] > worse["loss_giou"]

    wrong_token = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    wrong_token["pred_logits"][1, 3, 5] = BIG  # an unmatched query fires on a valid token
    assert _criterion()(wrong_token, targets)["loss_class"].item() > 0.5
    missed = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    missed["pred_logits"][1, 0, 3] = -BIG  # the matched query misses its token
    assert _criterion()(missed, targets)["loss_class"].item() > 0.5


def test_class_loss_ignores_invalid_tokens():
    targets = _two_image_targets()
    mask = _text_mask(2, 8)
    outputs = _perfect_outputs(targets, mask)
    base = _criterion()(outputs, targets)["loss_class"]
    # A confident logit at a padded token (the model writes -inf there) changes nothing.
    changed = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    changed["pred_logits"][0, 4, 10] = BIG
    assert torch.equal(_criterion()(changed, targets)["loss_class"], base)


def test_weights_are_applied_and_overridable():
    targets = _two_image_targets()
    outputs = _perfect_outputs(targets, _text_mask(2, 8))
    outputs["pred_boxes"] = outputs["pred_boxes"] + 0.01
    outputs["aux_outputs"] = [{k: outputs[k] for k in ("pred_logits", "pred_boxes")}]
    default = _criterion()(outputs, targets)
    custom = _criterion(weight_dict={**WEIGHTS, "loss_bbox": 1.0, "loss_bbox_0": 3.0})(
        outputs, targets
    )
    assert default["loss_bbox"].item() == pytest.approx(5 * custom["loss_bbox"].item())
    assert custom["loss_bbox_0"].item() == pytest.approx(3 * custom["loss_bbox"].item())
    assert custom["loss_giou"].item() == pytest.approx(default["loss_giou"].item())
    only_boxes = _criterion(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}, losses=("boxes",))
    losses = only_boxes(outputs, targets)
    assert not any(k.startswith("loss_class") for k in losses)
    assert losses["loss_bbox"].item() == pytest.approx(default["loss_bbox"].item())


def test_constructor_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown: \\['masks'\\]"):
        _criterion(losses=("labels", "masks"))
    with pytest.raises(ValueError, match="loss_giou"):
        _criterion(weight_dict={"loss_class": 2.0, "loss_bbox": 5.0})
    with pytest.raises(ValueError, match="loss_bbox_encoder"):
        _criterion(weight_dict={**WEIGHTS, "loss_bbox_encoder": 1.0})
    with pytest.raises(TypeError, match="sequence of names"):
        _criterion(losses="boxes")
    with pytest.raises(TypeError, match="losses"):
        GroundingCriterion(matcher=_matcher(), weight_dict=WEIGHTS, **FOCAL)  # no defaults
    with pytest.raises(TypeError):
        GroundingCriterion(_matcher(), WEIGHTS, 0.25, 2.0, ("labels",))  # keyword-only


def _require_grad(outputs):
    outputs["pred_logits"].requires_grad_(True)
    outputs["pred_boxes"].requires_grad_(True)
    return outputs


def test_gradients_flow_to_logits_and_boxes():
    targets = _two_image_targets()
    mask = _text_mask(2, 8)
    torch.manual_seed(0)
    logits = torch.randn(2, 6, T).masked_fill(~mask[:, None], float("-inf")).requires_grad_()
    boxes = (torch.rand(2, 6, 4) * 0.4 + 0.2).requires_grad_()
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes, "text_mask": mask}, targets)
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert logits.grad[:, :, :8].abs().sum() > 0
    assert logits.grad[:, :, 8:].abs().sum() == 0  # padded tokens get no gradient
    assert (boxes.grad.abs().sum(-1) > 0).sum() == 3  # exactly the three matched queries


@pytest.mark.parametrize("all_empty", [False, True])
def test_images_without_targets(all_empty):
    mask = _text_mask(2, 8)
    targets = _two_image_targets()
    targets[0] = _target([], [])
    if all_empty:
        targets[1] = _target([], [])
    torch.manual_seed(0)
    outputs = _require_grad(
        {
            "pred_logits": torch.randn(2, 5, T).masked_fill(~mask[:, None], float("-inf")),
            "pred_boxes": torch.rand(2, 5, 4) * 0.4 + 0.2,
            "text_mask": mask,
        }
    )
    outputs["aux_outputs"] = [{k: outputs[k] * 1.0 for k in ("pred_logits", "pred_boxes")}]
    outputs["enc_outputs"] = {k: outputs[k] * 1.0 for k in ("pred_logits", "pred_boxes")}
    losses = _criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v.requires_grad for v in losses.values())
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(outputs["pred_boxes"].grad).all()
    assert outputs["pred_logits"].grad[:, :, :8].abs().sum() > 0  # all-negative focal loss
    if all_empty:
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou_enc"].item() == 0
        assert outputs["pred_boxes"].grad.abs().sum() == 0
    else:
        assert losses["loss_bbox"].item() > 0


# ----------------------------------------------------------------------------- denoising
DN = {"dn_number": 100, "label_noise_ratio": 0.5, "box_noise_scale": 1.0}  # the config's


def _cdn(targets, feats, mask, num_queries=5, **overrides):
    return prepare_for_cdn(targets, feats, mask, num_queries=num_queries, **{**DN, **overrides})


def _text(bs=2, dim=8, num_valid=(8, 6)):
    torch.manual_seed(1)
    feats = torch.randn(bs, T, dim)
    mask = torch.zeros(bs, T, dtype=torch.bool)
    for b, n in enumerate(num_valid):
        mask[b, :n] = True
    return feats, mask


def _dn_targets():
    return [
        _target(
            [[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.2], [0.6, 0.5, 0.2, 0.1]], [[1, 2], [3], [5]]
        ),
        _target([[0.5, 0.5, 0.3, 0.3]], [[2]]),
    ]


def test_cdn_shapes_and_attention_mask():
    feats, mask = _text()
    num_queries = 7
    content, boxes, attn, meta = _cdn(_dn_targets(), feats, mask, num_queries, dn_number=10)
    m, g = 3, 10 // 3
    p = 2 * m * g
    assert meta == {
        "pad_size": p,
        "num_groups": g,
        "group_size": 2 * m,
        "max_targets": m,
        "num_targets": [3, 1],
    }
    assert content.shape == (2, p, 8) and boxes.shape == (2, p, 4)
    assert attn.shape == (p + num_queries, p + num_queries) and attn.dtype == torch.bool
    assert attn[p:, :p].all()  # matching queries are blind to the denoising queries
    assert not attn[p:, p:].any()
    assert not attn[:p, p:].any()  # denoising queries see the matching queries
    for i in range(g):
        for j in range(g):
            block = attn[2 * m * i : 2 * m * (i + 1), 2 * m * j : 2 * m * (j + 1)]
            assert block.all() if i != j else not block.any()
    # Padding slots (image 1 has one target out of M = 3) are zeros.
    group = content[1].view(g, 2, m, 8)
    assert group[:, :, 1:].abs().sum() == 0 and boxes[1].view(g, 2, m, 4)[:, :, 1:].abs().sum() == 0


def test_cdn_content_is_phrase_feature_without_label_noise():
    feats, mask = _text()
    targets = _dn_targets()
    content, _, _, meta = _cdn(targets, feats, mask, 5, dn_number=6, label_noise_ratio=0.0)
    m, g = meta["max_targets"], meta["num_groups"]
    slots = content.view(2, g, 2, m, -1)
    expected0 = torch.stack([feats[0, [1, 2]].mean(0), feats[0, 3], feats[0, 5]])
    torch.testing.assert_close(slots[0], expected0.expand(g, 2, m, -1))
    torch.testing.assert_close(slots[1, :, :, 0], feats[1, 2].expand(g, 2, -1))
    # Text features narrower than the positive maps (the batch's longest caption < T).
    narrow, _, _, _ = _cdn(
        targets, feats[:, :8], mask[:, :8], 5, dn_number=6, label_noise_ratio=0.0
    )
    torch.testing.assert_close(narrow, content)


def test_cdn_label_noise_uses_valid_tokens_of_the_caption():
    feats, mask = _text(num_valid=(8, 6))
    targets = [_target([[0.5, 0.5, 0.2, 0.2]] * 20, [[1, 2]] * 20), _target([], [])]
    torch.manual_seed(0)
    content, _, _, meta = _cdn(targets, feats, mask, 5, dn_number=200, label_noise_ratio=1.0)
    slots = content[0]  # image 0: every slot is a real target
    phrase = feats[0, [1, 2]].mean(0)
    is_phrase = torch.isclose(slots, phrase, atol=1e-6).all(-1)
    dist = (slots[:, None] - feats[0][None]).abs().amax(-1)  # [P, T]
    is_token = dist.min(-1).values < 1e-5
    assert (is_phrase | is_token).all()
    assert (dist[~is_phrase].argmin(-1) < 8).all()  # only valid tokens are drawn
    frac = 1 - is_phrase.float().mean().item()
    assert 0.4 < frac < 0.6  # label_noise_ratio / 2 of the queries are relabelled
    assert content[1].abs().sum() == 0  # image 1 has no targets: all padding


def test_cdn_noised_boxes_within_bounds():
    feats, mask = _text()
    scale = 0.4  # small enough that no negative box turns inside out
    targets = [
        _target([[0.5, 0.5, 0.2, 0.3]] * 4, [[1]] * 4),
        _target([[0.5, 0.5, 0.3, 0.2]], [[2]]),
    ]
    torch.manual_seed(3)
    _, boxes_u, _, meta = _cdn(targets, feats, mask, 5, dn_number=200, box_noise_scale=scale)
    g, m = meta["num_groups"], meta["max_targets"]
    boxes = boxes_u.sigmoid().view(2, g, 2, m, 4)[0]  # image 0: all slots real
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    assert (xyxy >= -1e-3).all() and (xyxy <= 1 + 1e-3).all()
    gt = box_convert(torch.tensor([0.5, 0.5, 0.2, 0.3]), "cxcywh", "xyxy")
    half = torch.tensor([0.1, 0.15, 0.1, 0.15]) * scale
    shift = (xyxy - gt).abs() / half  # in units of the scaled half size
    assert (shift[:, 0] <= 1 + 1e-2).all()  # positives: within one half size
    assert (shift[:, 1] >= 1 - 1e-2).all() and (shift[:, 1] <= 2 + 1e-2).all()  # negatives
    assert shift[:, 0].std() > 0.1  # actually random
    # Large noise near the border: still valid boxes inside the image.
    targets = [_target([[0.05, 0.9, 0.1, 0.2]] * 4, [[1]] * 4), _target([], [])]
    _, boxes_u, _, _ = _cdn(targets, feats, mask, 5, dn_number=200, box_noise_scale=2.0)
    xyxy = box_convert(boxes_u[0].sigmoid(), "cxcywh", "xyxy")
    assert (xyxy >= -1e-3).all() and (xyxy <= 1 + 1e-3).all()
    assert (boxes_u[0].sigmoid()[:, 2:] > 0).all()


def test_cdn_no_targets_and_determinism():
    feats, mask = _text()
    empty = [_target([], []), _target([], [])]
    assert _cdn(empty, feats, mask, 5) == (None, None, None, None)
    assert _cdn(_dn_targets(), feats, mask, 5, dn_number=0) == (None,) * 4
    torch.manual_seed(7)
    first = _cdn(_dn_targets(), feats, mask, 5)
    torch.manual_seed(7)
    second = _cdn(_dn_targets(), feats, mask, 5)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(5)
    third = _cdn(_dn_targets(), feats, mask, 5, generator=gen)
    gen = torch.Generator().manual_seed(5)
    fourth = _cdn(_dn_targets(), feats, mask, 5, generator=gen)
    assert torch.equal(third[0], fourth[0]) and torch.equal(third[1], fourth[1])
    assert not torch.equal(first[1], third[1])
    with pytest.raises(ValueError, match="text_mask"):
        _cdn(_dn_targets(), feats, mask[:, :4], 5)


def test_cdn_is_keyword_only_without_defaults():
    feats, mask = _text()
    with pytest.raises(TypeError):
        prepare_for_cdn(_dn_targets(), feats, mask, 5, 100, 0.5, 1.0)
    with pytest.raises(TypeError, match="box_noise_scale"):
        prepare_for_cdn(
            _dn_targets(), feats, mask, num_queries=5, dn_number=10, label_noise_ratio=0.5
        )


def test_split_dn_outputs_inverts_the_decoder_input_layout():
    # The decoder input is cat([dn_queries, matching_queries], dim=-2); stacked layers too.
    meta = {
        "pad_size": 8,
        "num_groups": 2,
        "group_size": 4,
        "max_targets": 2,
        "num_targets": [2, 0],
    }
    dn, match = torch.randn(3, 2, 8, 5), torch.randn(3, 2, 7, 5)
    got_dn, got_match = split_dn_outputs(torch.cat([dn, match], -2), meta)
    assert torch.equal(got_dn, dn) and torch.equal(got_match, match)
    got_dn, got_match = split_dn_outputs(match, None)
    assert got_dn is None and got_match is match


def test_dn_match_indices_point_at_positive_copies():
    """Every (query, target) pair is a positive copy of that target: its noised box lies within
    one scaled half size of the target's corners; the other real slots are negatives."""
    feats, mask = _text()
    gts = [
        [[0.3, 0.3, 0.2, 0.2], [0.7, 0.3, 0.2, 0.2], [0.5, 0.7, 0.2, 0.2]],
        [[0.5, 0.5, 0.3, 0.3]],
    ]
    targets = [_target(gts[0], [[1], [2], [3]]), _target(gts[1], [[1]])]
    scale = 0.4
    torch.manual_seed(0)
    _, boxes_u, _, meta = _cdn(targets, feats, mask, 5, dn_number=9, box_noise_scale=scale)
    assert meta["num_groups"] == 3 and meta["group_size"] == 6
    xyxy = box_convert(boxes_u.sigmoid(), "cxcywh", "xyxy")
    indices = dn_match_indices(meta)
    for b, (q, t) in enumerate(indices):
        n = len(gts[b])
        assert len(q) == len(t) == 3 * n and sorted(t.tolist()) == sorted(list(range(n)) * 3)
        gt = box_convert(targets[b]["boxes"], "cxcywh", "xyxy")
        half = targets[b]["boxes"][:, 2:].repeat(1, 2) / 2 * scale
        shift = (xyxy[b, q] - gt[t]).abs() / half[t]
        assert (shift <= 1 + 1e-2).all()
        # The real slots of image b: n positives then n negatives in every group.
        real = {g * 6 + k for g in range(3) for k in list(range(n)) + list(range(3, 3 + n))}
        negatives = sorted(real - set(q.tolist()))
        assert len(negatives) == 3 * n
        neg_target = torch.tensor(negatives) % 6 - 3
        neg_shift = (xyxy[b, negatives] - gt[neg_target]).abs() / half[neg_target]
        assert (neg_shift >= 1 - 1e-2).all()
    # A hand-written layout: 2 groups of 4 slots (M = 2), image 1 has no targets.
    meta = {
        "pad_size": 8,
        "num_groups": 2,
        "group_size": 4,
        "max_targets": 2,
        "num_targets": [2, 0],
    }
    (q0, t0), (q1, t1) = dn_match_indices(meta)
    assert q0.tolist() == [0, 1, 4, 5] and t0.tolist() == [0, 1, 0, 1]
    assert len(q1) == 0 and len(t1) == 0


# ----------------------------------------------------------------------------- end to end
def _full_outputs(targets, mask, nq, dn_meta, num_layers=3, seed=0):
    """Outputs with aux, enc and denoising parts; dn positives predict their target exactly."""
    torch.manual_seed(seed)
    bs = len(targets)
    p = dn_meta["pad_size"]

    def layer(n):
        return {
            "pred_logits": torch.randn(bs, n, T).masked_fill(~mask[:, None], float("-inf")),
            "pred_boxes": torch.rand(bs, n, 4) * 0.4 + 0.2,
        }

    layers = [_require_grad(layer(p + nq)) for _ in range(num_layers)]
    for lay in layers:  # perfect positive denoising boxes
        with torch.no_grad():
            for b, (q, t) in enumerate(dn_match_indices(dn_meta)):
                lay["pred_boxes"][b, q] = targets[b]["boxes"][t]
    split = [{k: split_dn_outputs(v, dn_meta) for k, v in lay.items()} for lay in layers]
    dn = [{k: v[0] for k, v in s.items()} for s in split]
    match = [{k: v[1] for k, v in s.items()} for s in split]
    outputs = dict(match[-1], text_mask=mask, aux_outputs=match[:-1], enc_outputs=layer(nq))
    outputs["dn_outputs"] = dict(dn[-1], aux_outputs=dn[:-1])
    return outputs, layers


def test_full_loss_dict_with_denoising():
    feats, mask = _text()
    targets = _dn_targets()
    _, _, _, meta = _cdn(targets, feats, mask, 6, dn_number=12)
    outputs, layers = _full_outputs(targets, mask, 6, meta)
    losses = _criterion()(outputs, targets, meta)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]
    assert set(losses) == {k + s for s in suffixes for k in WEIGHTS}
    assert all(torch.isfinite(v) for v in losses.values())
    for s in ("_dn", "_dn_0", "_dn_1"):
        assert losses["loss_bbox" + s].item() < 1e-6 and losses["loss_giou" + s].item() < 1e-4
    assert losses["loss_bbox"].item() > 0.1
    # Denoising losses are normalised by num_boxes * num_groups: every positive copy off by
    # 0.01 in cx gives an L1 of 0.01 per target box, times the weight 5.
    shifted = dict(outputs, dn_outputs=dict(outputs["dn_outputs"]))
    boxes = outputs["dn_outputs"]["pred_boxes"].detach().clone()
    for b, (q, _) in enumerate(dn_match_indices(meta)):
        boxes[b, q, 0] += 0.01
    shifted["dn_outputs"]["pred_boxes"] = boxes
    assert meta["num_groups"] == 4
    shifted_losses = _criterion()(shifted, targets, meta)
    assert shifted_losses["loss_bbox_dn"].item() == pytest.approx(5 * 0.01, rel=1e-4)
    # dn_meta can also travel inside the outputs; the results are deterministic.
    again = _criterion()(dict(outputs, dn_meta=meta), targets)
    assert all(torch.equal(losses[k], again[k]) for k in losses)
    sum(losses.values()).backward()
    for lay in layers:
        assert lay["pred_logits"].grad[:, : meta["pad_size"], :6].abs().sum() > 0
        assert torch.isfinite(lay["pred_logits"].grad).all()
    # The denoising targets must be the ones the queries were built for.
    with pytest.raises(ValueError, match="dn_meta"):
        _criterion()(outputs, [targets[0], _target([], [])], meta)


def test_denoising_losses_present_as_zeros_without_dn():
    targets = [_target([], []), _target([], [])]
    mask = _text_mask(2, 8)
    outputs = _require_grad(
        {"pred_logits": _logits(2, 4, mask), "pred_boxes": torch.rand(2, 4, 4), "text_mask": mask}
    )
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"] * 1.0, "pred_boxes": outputs["pred_boxes"] * 1.0}
    ]
    losses = _criterion()(outputs, targets, dn_meta=None)
    for s in ("_dn", "_dn_0"):
        for k in WEIGHTS:
            assert losses[k + s].item() == 0 and losses[k + s].requires_grad
    assert math.isfinite(sum(losses.values()).item())


def test_dn_content_carries_gradient_to_text_features():
    feats, mask = _text()
    feats.requires_grad_(True)
    content, _, _, _ = _cdn(_dn_targets(), feats, mask, 5, dn_number=6)
    content.sum().backward()
    assert feats.grad[:, :8].abs().sum() > 0
    assert feats.grad[:, 8:].abs().sum() == 0  # padded tokens are never used
