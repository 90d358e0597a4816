"""UperNet (the paper's section 4.4) on RSIR through segmentation_models_pytorch's timm encoders
("tu-rsir_tiny"): smp as a client of the models' timm API, features_only. smp is optional."""
import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch not installed "
                                                                "(requirements-dev.txt)")
import rsir_kernels  # noqa: E402,F401  registers the models with timm

# smp's transformer-style encoders: the input (stride 1), an empty stride-2 map, then stages 1-4
STRIDES = [1, 2, 4, 8, 16, 32]


def _upernet(name, classes=3, decoder_channels=32):
    return smp.UPerNet(encoder_name=f"tu-{name}", encoder_weights=None, classes=classes,
                       decoder_channels=decoder_channels, backend="cpp")


def _eval_capturing_features(model, images):
    """(masks, the encoder's outputs, the RSIR stages' own channels-last outputs) of one eval pass."""
    features, stages = [], []
    hooks = [model.encoder.register_forward_hook(lambda module, args, out: features.extend(out))]
    hooks += [stage.register_forward_hook(lambda module, args, out: stages.append(out))
              for stage in model.encoder.model.model.stages]
    with torch.no_grad():
        masks = model.eval()(images)
    for hook in hooks:
        hook.remove()
    return masks, features, stages


def test_upernet_on_rsir_tiny_gets_its_stage_maps_at_strides_4_to_32_at_512x512():
    """The encoder smp builds from timm's registry is rsir_tiny's features_only model: its
    channels, and in an eval pass the stages' own outputs, NCHW, at 512 / s."""
    torch.manual_seed(0)
    model = _upernet("rsir_tiny")
    rsir = model.encoder.model.model
    assert type(rsir).__name__ == "RSIRTransformer" and rsir.config.depths == (2, 2, 16, 2)
    assert model.encoder.out_channels == [3, 0, 64, 128, 256, 512]
    images = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    masks, features, stages = _eval_capturing_features(model, images)
    assert masks.shape == (1, 3, 512, 512) and torch.isfinite(masks).all()
    assert [tuple(f.shape) for f in features] == [(1, c, 512 // s, 512 // s)
                                                  for c, s in zip(model.encoder.out_channels, STRIDES)]
    assert torch.equal(features[0], images)
    assert all(torch.equal(f, s.permute(0, 3, 1, 2)) for f, s in zip(features[2:], stages))


def test_upernet_on_rsir_tiny_evaluates_at_512x2048():
    """ADE20K's test size (the paper's Table 6 FLOPs): one eval pass, maps at 512/s x 2048/s."""
    torch.manual_seed(0)
    model = _upernet("rsir_tiny")
    masks, features, _ = _eval_capturing_features(model, torch.randn(1, 3, 512, 2048))
    assert masks.shape == (1, 3, 512, 2048) and torch.isfinite(masks).all()
    assert [tuple(f.shape[2:]) for f in features] == [(512 // s, 2048 // s) for s in STRIDES]


def test_upernet_train_step_at_512x512_reaches_every_encoder_parameter():
    """rsir_micro (rsir_tiny's step takes ~20 s on 2 cores): a batch of 2 (smp's pooling
    BatchNorm needs more than one value per channel in training, for any encoder), every encoder
    parameter gets a finite gradient, and the step changes the weights."""
    size = (512, 512)
    torch.manual_seed(0)
    model = _upernet("rsir_micro").train()
    images, labels = torch.randn(2, 3, *size), torch.randint(0, 3, (2, *size))
    masks = model(images)
    assert masks.shape == (2, 3, *size)
    torch.nn.functional.cross_entropy(masks, labels).backward()
    encoder = list(model.encoder.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in encoder)
    before = [p.detach().clone() for _, p in encoder]
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(p, b) for (_, p), b in zip(encoder, before))


def _foreground_iou(model, images, labels):
    with torch.no_grad():
        predicted = model.eval()(images).argmax(dim=1) == 1
    return ((predicted & (labels == 1)).sum() / (predicted | (labels == 1)).sum()).item()


def test_upernet_overfits_a_small_set_through_timms_registry():
    """Four 32x32 images whose bright 12x12 square is class 1 (the rest 0): 12 AdamW steps bring
    the loss under a third of its start and the square's IoU in eval from ~0.1 over 0.5."""
    torch.manual_seed(0)
    model = _upernet("rsir_micro", classes=2)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(4, 3, 32, 32, generator=gen) * 0.5, torch.zeros(4, 32, 32, dtype=torch.long)
    for i in range(4):
        top, left = 2 + 4 * i, 18 - 4 * i
        images[i, :, top:top + 12, left:left + 12] += 1.0
        labels[i, top:top + 12, left:left + 12] = 1
    iou_before = _foreground_iou(model, images, labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model.train()(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3
    assert iou_before < 0.3 < 0.5 < _foreground_iou(model, images, labels)
