"""rsir_kernels.detection: the RSIR backbone as torchvision's detection models take it (maps,
strides, norms, frozen stages, classification checkpoints) and Mask / Faster R-CNN on it."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision")
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402

from rsir_kernels import models  # noqa: E402
from rsir_kernels.detection import (RSIRBackbone, fasterrcnn_rsir_fpn, maskrcnn_rsir_fpn,  # noqa: E402
                                    rsir_fpn_backbone)

STRIDES = [4, 8, 16, 32]


def _images(*size, batch=1, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _normed_by_hand(maps, norms):
    """forward_intermediates' NCHW maps through the body's LayerNorms, over channels."""
    return [F.layer_norm(m.permute(0, 2, 3, 1), (m.shape[1],), n.weight, n.bias, n.eps).permute(0, 3, 1, 2)
            for m, n in zip(maps, norms)]


@pytest.mark.parametrize("size", [(230, 301), (33, 47), (64, 96)])
def test_backbone_maps_are_forward_intermediates_through_one_norm_per_stage(size):
    """Against an independently built classification model with the same weights: its
    forward_intermediates, normed by hand, at ceil(H / s) x ceil(W / s); the classification
    model itself is unchanged (no norm added to its maps)."""
    torch.manual_seed(0)
    backbone = rsir_fpn_backbone("rsir_micro").eval()
    torch.manual_seed(0)
    classifier = models.rsir_micro(num_classes=0).eval()
    shared = backbone.body.model.state_dict()
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in shared.items())
    images = _images(*size, batch=2)
    with torch.no_grad():
        got = backbone.body(images)
        want = _normed_by_hand(classifier.forward_intermediates(images, intermediates_only=True),
                               backbone.body.norms)
    assert list(got) == ["0", "1", "2", "3"]
    for (key, m), w, stride, c in zip(got.items(), want, STRIDES, [32, 64, 128, 256]):
        assert m.shape == (2, c, math.ceil(size[0] / stride), math.ceil(size[1] / stride)), key
        assert torch.equal(m, w), key
        # LayerNorm at its initial weight 1, bias 0: each cell's channels have mean 0, variance 1
        assert m.mean(dim=1).abs().max() < 1e-5 and (m.var(dim=1, unbiased=False) - 1).abs().max() < 1e-3


def test_fpn_gives_out_channels_levels_and_a_pooled_level_at_ceil_strides():
    backbone = rsir_fpn_backbone("rsir_micro", out_channels=48).eval()
    assert backbone.out_channels == 48
    height, width = 101, 75
    with torch.no_grad():
        levels = backbone(_images(height, width))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    for m, stride in zip(levels.values(), STRIDES + [64]):
        assert m.shape == (1, 48, math.ceil(height / stride), math.ceil(width / stride))


def test_returned_stages_select_the_maps_and_prune_the_stages_after_them():
    torch.manual_seed(0)
    backbone = rsir_fpn_backbone("rsir_micro", returned_stages=[2, 3], norm_layer=None).eval()
    torch.manual_seed(0)
    classifier = models.rsir_micro(num_classes=0).eval()
    body = backbone.body
    assert body.channels == [64, 128] and len(body.model.stages) == 3
    assert not any(name.startswith(("norm.", "head.")) for name, _ in body.model.named_parameters())
    images = _images(70, 50)
    with torch.no_grad():
        got = body(images)
        want = classifier.forward_intermediates(images, indices=[1, 2], intermediates_only=True)
    assert list(got) == ["0", "1"] and all(torch.equal(a, b) for a, b in zip(got.values(), want))
    assert list(backbone(images)) == ["0", "1", "pool"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="rsir_huge"), r"name='rsir_huge': not an RSIR model; one of rsir_micro, rsir_tiny, rsir_base"),
    (dict(trainable_stages=5), r"trainable_stages must be an int in 0..4 .* got 5"),
    (dict(trainable_stages=-1), r"trainable_stages must be an int in 0..4 .* got -1"),
    (dict(trainable_stages=True), r"trainable_stages .* got True"),
    (dict(returned_stages=[0, 1]), r"returned_stages must be distinct stage numbers in 1..4, ascending, got \[0, 1\]"),
    (dict(returned_stages=[5]), r"returned_stages .* got \[5\]"),
    (dict(returned_stages=[]), r"returned_stages .* got \[\]"),
    (dict(returned_stages=[3, 2]), r"returned_stages .* got \[3, 2\]"),
    (dict(returned_stages=[2, 2]), r"returned_stages .* got \[2, 2\]"),
])
def test_bad_arguments_are_value_errors_naming_them(kwargs, message):
    kwargs = dict({"name": "rsir_micro"}, **kwargs)
    with pytest.raises(ValueError, match=message):
        rsir_fpn_backbone(**kwargs)


def test_frozen_stages_get_no_gradient_stay_unchanged_after_a_step_and_run_as_in_eval():
    """trainable_stages=2: the stem, stages 1 and 2 frozen (no grad, the same bits after an
    optimizer step, eval mode under train(): fixed RS-Win orders and no stochastic depth, so
    their maps in training equal eval's); stages 3, 4, the norms and the FPN train."""
    torch.manual_seed(0)
    backbone = rsir_fpn_backbone("rsir_micro", trainable_stages=2, drop_path_rate=0.5).train()
    model = backbone.body.model
    frozen = [model.stem, model.stages[0], model.stages[1]]
    trainable = [model.stages[2], model.stages[3], backbone.body.norms, backbone.fpn]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert all(not s.training for m in frozen for s in m.modules())
    assert all(s.training for m in trainable for s in m.modules())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-2, weight_decay=0.05)
    images = _images(64, 96, batch=2)
    levels = backbone(images)
    sum(m.square().mean() for m in levels.values()).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for m in trainable for p in m.parameters())
    optimizer.step()
    frozen_names = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    after = backbone.state_dict()
    assert frozen_names and all(torch.equal(after[n], before[n]) for n in frozen_names)
    for module in trainable:  # (drop path may skip a whole branch: not every tensor moves)
        assert any(not torch.equal(p, before[n]) for n, p in backbone.named_parameters()
                   if any(p is q for q in module.parameters()))
    with torch.no_grad():
        in_training = backbone.body(images)
        in_eval = backbone.eval().body(images)
    assert torch.equal(in_training["0"], in_eval["0"]) and torch.equal(in_training["1"], in_eval["1"])
    assert not torch.equal(in_training["3"], in_eval["3"])  # stage 4 trains: fresh draws, drop path


def test_trainable_stages_zero_freezes_every_stage_and_four_none():
    frozen = rsir_fpn_backbone("rsir_micro", trainable_stages=0)
    assert not any(p.requires_grad for p in frozen.body.model.parameters())
    assert all(p.requires_grad for p in frozen.body.norms.parameters())
    for trainable in (4, None):
        backbone = rsir_fpn_backbone("rsir_micro", trainable_stages=trainable).train()
        assert all(p.requires_grad for p in backbone.parameters()) and backbone.body.model.stem.training


def _save_classification_checkpoint(path, name="rsir_micro", **model_kwargs):
    """A checkpoint as rsir_kernels.train writes it (train/state.py): the state dict, the model's
    name and its constructor arguments but the backend; returns the classifier."""
    from rsir_kernels import checkpoint_format as checkpoint
    classifier = getattr(models, name)(num_classes=10, **model_kwargs).eval()
    args = {k: v for k, v in dataclasses.asdict(classifier.config).items() if k != "backend"}
    checkpoint.save(str(path), {"model": classifier.state_dict(), "model_name": name, "model_args": args})
    return classifier


def test_a_classification_checkpoint_loads_into_the_backbone(tmp_path):
    """The trainer's file (and its dict, and the bare state dict): the stages' weights are the
    classifier's, and the body's maps are from_checkpoint's model's, normed by hand."""
    torch.manual_seed(1)
    path = tmp_path / "last.pt"
    classifier = _save_classification_checkpoint(path, window_size=4, rs_heads=2)
    rebuilt = models.from_checkpoint(str(path))
    images = _images(50, 70, batch=2)
    with torch.no_grad():
        want = _normed_by_hand(rebuilt.forward_intermediates(images, intermediates_only=True),
                               rsir_fpn_backbone("rsir_micro").body.norms)
    raw = torch.load(path, weights_only=True)
    for weights in (str(path), path, raw, raw["model"]):
        backbone = rsir_fpn_backbone("rsir_micro", weights=weights, window_size=4, rs_heads=2).eval()
        state = backbone.body.model.state_dict()
        assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in state.items())
        with torch.no_grad():
            got = backbone.body(images)
        assert all(torch.equal(a, b) for a, b in zip(got.values(), want))
    model = maskrcnn_rsir_fpn("rsir_micro", num_classes=3, weights_backbone=str(path), trainable_stages=3,
                              backbone_kwargs=dict(window_size=4, rs_heads=2))
    assert torch.equal(model.backbone.body.model.stem.conv.weight, classifier.stem.conv.weight)
    assert not model.backbone.body.model.stem.conv.weight.requires_grad


def test_a_mismatched_checkpoint_is_refused_naming_the_mismatch(tmp_path):
    torch.manual_seed(0)
    micro = tmp_path / "micro.pt"
    _save_classification_checkpoint(micro)
    with pytest.raises(ValueError, match=r"weights .*micro.pt: holds rsir_micro's weights, the backbone is "
                                         r"rsir_tiny: build it as 'rsir_micro'"):
        rsir_fpn_backbone("rsir_tiny", weights=str(micro))
    windowed = tmp_path / "window4.pt"
    _save_classification_checkpoint(windowed, window_size=4)
    with pytest.raises(ValueError, match=r"trained with window_size=4, the backbone has window_size=7: "
                                         r"pass window_size=4 to build it as trained"):
        rsir_fpn_backbone("rsir_micro", weights=str(windowed))
    # a bare state dict has no record but its tensors: another window, another input's channels
    bare = torch.load(windowed, weights_only=True)["model"]
    with pytest.raises(ValueError, match=r"weights do not fit rsir_micro: .*window_size=4"):
        rsir_fpn_backbone("rsir_micro", weights=bare)
    gray = models.rsir_micro(in_chans=1).state_dict()
    with pytest.raises(ValueError, match=r"weights do not fit rsir_micro: .*size mismatch for stem.conv.weight"):
        rsir_fpn_backbone("rsir_micro", weights=gray)
    with pytest.raises(ValueError, match=r"do not fit rsir_tiny: .*stages.0.blocks.1"):
        rsir_fpn_backbone("rsir_tiny", weights=bare)
    with pytest.raises(ValueError, match=r"weights .*absent.pt: no such file"):
        rsir_fpn_backbone("rsir_micro", weights=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match=r"weights: expected a checkpoint or a state dict, got list"):
        rsir_fpn_backbone("rsir_micro", weights=[1])


def test_backbone_at_800x1333_gives_ceil_strides():
    backbone = rsir_fpn_backbone("rsir_micro", backend="cpp").eval()
    with torch.no_grad():
        levels = backbone(_images(800, 1333))
    assert [tuple(m.shape[2:]) for m in levels.values()] == [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)]


# Small heads and few proposals keep a Mask R-CNN step near a second on 2 CPU cores; the backbone
# and everything of torchvision between it and the heads are the builders' own.
def _small(channels=32, num_classes=2, **overrides):
    kwargs = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64,
                  box_head=TwoMLPHead(channels * 49, 64), box_predictor=FastRCNNPredictor(64, num_classes),
                  backbone_kwargs=dict(out_channels=channels, backend="cpp"))
    return dict(kwargs, **overrides)


def _mask_heads(channels=32, num_classes=2):
    return dict(mask_head=MaskRCNNHeads(channels, (channels, channels), 1),
                mask_predictor=MaskRCNNPredictor(channels, channels, num_classes))


def _sample(height=70, width=90):
    """One image with a brighter box and its mask, label 1."""
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    image[:, 12:50, 10:40] += 1.0
    mask = torch.zeros(1, height, width, dtype=torch.uint8)
    mask[0, 12:50, 10:40] = 1
    return image, {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1]), "masks": mask}


def _losses_fall_over_steps(model, steps=5):
    image, target = _sample()
    if not model.roi_heads.has_mask():
        target = {k: v for k, v in target.items() if k != "masks"}

    def measured():  # the same proposals' sampling and RS-Win draws for each measurement
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model([image], [target]).values())

    model.train()
    before = measured()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        losses = model([image], [target])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return before, measured(), set(losses)


def _eval_at_sizes(model, sizes):
    model.eval()
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    with torch.no_grad():
        out = model([torch.rand(3, *size) for size in sizes])
    hook.remove()
    return out, seen


def test_maskrcnn_trains_its_loss_falls_and_it_evaluates_at_any_size():
    torch.manual_seed(0)
    model = maskrcnn_rsir_fpn("rsir_micro", **_small(), **_mask_heads())
    before, after, names = _losses_fall_over_steps(model)
    assert names == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert after < 0.5 * before
    model.transform.size_divisible = 1  # the backbone gets the odd sizes themselves
    out, seen = _eval_at_sizes(model, [(70, 90), (33, 47)])
    assert seen == [(64, 91)]  # one batch: resized to 64x82 and 64x91 (min_size 64), padded to the wider
    for o, size in zip(out, [(70, 90), (33, 47)]):
        assert set(o) == {"boxes", "labels", "scores", "masks"} and o["masks"].shape[1:] == (1, *size)
    out, seen = _eval_at_sizes(model, [(33, 47)])
    assert seen == [(64, 91)] and out[0]["masks"].shape[1:] == (1, 33, 47)


def test_fasterrcnn_trains_its_loss_falls_and_it_evaluates_at_any_size():
    torch.manual_seed(0)
    model = fasterrcnn_rsir_fpn("rsir_micro", **_small())
    before, after, names = _losses_fall_over_steps(model)
    assert names == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert after < 0.5 * before
    model.transform.size_divisible = 1
    out, seen = _eval_at_sizes(model, [(45, 61)])
    assert seen == [(64, 86)] and set(out[0]) == {"boxes", "labels", "scores"}


def test_a_320x336_batch_with_size_divisible_16_trains_and_evaluates():
    """336 = 10.5 x 32: the batch reaches the backbone as it is (once refused: not a multiple of 32)."""
    torch.manual_seed(0)
    model = maskrcnn_rsir_fpn("rsir_micro", **_small(min_size=320, max_size=336, size_divisible=16),
                              **_mask_heads())
    image, target = _sample(320, 336)
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    losses = model([image, image.flip(-1)], [target, target])
    assert seen == [(320, 336)] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        assert len(model([image])) == 1


def test_builders_defaults_are_torchvisions_on_rsir_tiny():
    """No model name: rsir_tiny; no num_classes: 91 (COCO), as torchvision's builders."""
    mask, faster = maskrcnn_rsir_fpn(min_size=64, max_size=96), fasterrcnn_rsir_fpn()
    for model in (mask, faster):
        assert model.backbone.body.channels == [64, 128, 256, 512] and model.backbone.out_channels == 256
        assert model.roi_heads.box_predictor.cls_score.out_features == 91
    assert mask.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 91
    assert faster.transform.min_size == (800,) and faster.transform.size_divisible == 32
    mask.eval()
    with torch.no_grad():
        out = mask([torch.rand(3, 50, 75)])
    assert out[0]["masks"].shape[1:] == (1, 50, 75)


def test_backbone_is_an_rsir_backbone_with_the_models_feature_info():
    body = rsir_fpn_backbone("rsir_micro", returned_stages=[1, 4]).body
    assert isinstance(body, RSIRBackbone)
    assert body.channels == [info["num_chs"] for info in models.rsir_micro().feature_info[0::3]] == [32, 256]
