"""The RSIR models as timm models: the checks timm's own tests/test_models.py makes for every
registered model (forward, backward, default cfg, features, intermediates, FX), on small inputs."""
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

import rsir_kernels as rk  # noqa: E402  registers the models
from rsir_kernels.models import RSIRTransformer  # noqa: E402

MODELS = ["rsir_micro", "rsir_tiny", "rsir_base"]
# minutes on 2 CPU cores: run with RSIR_SLOW=1
SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("RSIR_SLOW") != "1", reason="slow: RSIR_SLOW=1 runs it")]
SIZE = 64  # the smallest input with a 2x2 last stage: pooling is not a no-op


def _images(batch=2, size=SIZE, channels=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def test_registered_and_created_with_timm_keywords():
    assert set(MODELS) <= set(timm.list_models("rsir_*"))
    model = timm.create_model("rsir_tiny", num_classes=10, drop_path_rate=0.1, backend="reference",
                              window_size=4, in_chans=1, global_pool="avg")
    assert isinstance(model, RSIRTransformer) and model.num_classes == 10
    assert model.get_classifier().out_features == 10 and model.stem.conv.in_channels == 1
    attn = [m for m in model.modules() if isinstance(m, rk.RSIRAttention)]
    assert {a.window_size for a in attn} == {4} and {a.backend for a in attn} == {"reference"}
    last_block = model.stages[-1].blocks[-1]
    assert last_block.drop_path.p == pytest.approx(0.1) and model.stages[0].blocks[0].drop_path.p == 0.0


def test_pretrained_raises_a_clear_error():
    with pytest.raises(ValueError, match="no pretrained weights exist for rsir_micro"):
        timm.create_model("rsir_micro", pretrained=True)


def test_a_named_checkpoint_loads_with_pretrained_true(tmp_path):
    source = timm.create_model("rsir_micro")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = timm.create_model("rsir_micro", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_features_only_gives_strides_4_to_32_with_feature_info_channels():
    model = timm.create_model("rsir_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    images = _images(1)
    maps = model(images)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    for m, c, r in zip(maps, model.feature_info.channels(), model.feature_info.reduction()):
        assert m.shape == (1, c, SIZE // r, SIZE // r)
    # the same maps as the unwrapped model's stages (independently: the stage loop by hand)
    inner = model.model
    x = inner.stem(images)
    for m, stage in zip(maps, inner.stages):
        x = stage(x)
        assert torch.equal(m, x.permute(0, 3, 1, 2))
    subset = timm.create_model("rsir_micro", features_only=True, out_indices=(1, 3))
    assert [m.shape[1] for m in subset(images)] == [64, 256] == subset.feature_info.channels()


@pytest.mark.parametrize("size", [(230, 301), (800, 1333)])
def test_features_only_takes_any_size_at_ceil_strides(size):
    """Sizes that are not multiples of 32: stage maps of ceil(H / s) x ceil(W / s),
    the unwrapped model's forward_intermediates."""
    import math
    model = timm.create_model("rsir_micro", features_only=True, backend="cpp").eval()
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = model(images)
        reference = model.model.forward_intermediates(images, intermediates_only=True)
    for m, r, c, s in zip(maps, reference, model.feature_info.channels(), model.feature_info.reduction()):
        assert m.shape == (1, c, math.ceil(size[0] / s), math.ceil(size[1] / s)) and torch.equal(m, r)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "rsir_micro" else SLOW) for n in MODELS])
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = timm.create_model(name, num_classes=42)
    out = model(_images(2, 32))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_names_real_parameters(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert cfg["classifier"] + ".bias" in state
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
    assert state[cfg["classifier"] + ".weight"].shape[0] == cfg["num_classes"]
    assert tuple(cfg["pool_size"]) == tuple(s // 32 for s in cfg["input_size"][1:])
    assert cfg["paper_ids"] == "arXiv:2304.06250" and cfg["architecture"] == name
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["interpolation"] == "bicubic"


def test_default_cfg_shapes_and_classifier_resets():
    """timm's test_model_default_cfgs, at SIZE instead of the cfg's 224 (pool size scaled)."""
    model = timm.create_model("rsir_micro").eval()
    images = _images()
    pool = SIZE // 32
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, pool, pool, model.num_features)  # output_fmt NHWC
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size)
        assert torch.equal(pooled, features.mean(dim=(1, 2)))
        logits = model(images)
        assert torch.allclose(logits, model.get_classifier()(pooled), rtol=0, atol=1e-6)
        model.reset_classifier(0)
        assert torch.equal(model(images), pooled) and model.num_classes == 0
        model.reset_classifier(0, "")
        assert torch.equal(model(images), features)
        model.reset_classifier(7, "avg")
        assert model(images).shape == (2, 7)
    bare = timm.create_model("rsir_micro", num_classes=0, global_pool="").eval()
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        assert torch.equal(bare(images), features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    """In training, with fresh RS-Win draws and stochastic depth: the recomputation must reuse
    the forward's windows (drawn from an explicit generator, which checkpoint doesn't restore)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        model = rk.models.rsir_micro(num_classes=3, drop_path_rate=0.2, generator=gen)
        model.set_grad_checkpointing(checkpointing)
        out = model(_images())
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))


def test_forward_intermediates_and_pruning():
    model = timm.create_model("rsir_micro").eval()
    images = _images()
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        assert torch.equal(final, model.forward_features(images))
        for m, info in zip(maps, model.feature_info):
            assert m.shape == (2, info["num_chs"], SIZE // info["reduction"], SIZE // info["reduction"])
        nhwc = model.forward_intermediates(images, output_fmt="NHWC", intermediates_only=True)
        assert all(torch.equal(a, b.permute(0, 3, 1, 2)) for a, b in zip(maps, nhwc))
        last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
        assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, maps[2:]))
        picked = model.forward_intermediates(images, indices=[0, -1], intermediates_only=True)
        assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[3])
        normed = model.forward_intermediates(images, indices=[3], norm=True, intermediates_only=True)
        assert torch.equal(normed[0], final.permute(0, 3, 1, 2))
        assert model.prune_intermediate_layers(indices=[1]) == [1]
        assert len(model.stages) == 2
        assert torch.equal(model.forward_intermediates(images, intermediates_only=True)[1], maps[1])
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(images, indices=[5])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NLC")


def test_fx_feature_extraction_as_timm_does():
    """timm's test_model_forward_fx: torchvision FX with timm's leaf modules (RSIRAttention)."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = timm.create_model("rsir_micro").eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                        eval_return_nodes=[eval_nodes[-1]],
                                        tracer_kwargs=tracer_kwargs).eval()
    images = _images()
    with torch.no_grad():
        expected = model(images)
        fx_out = fx_model(images)
    fx_out = next(iter(fx_out.values())) if isinstance(fx_out, dict) else fx_out
    assert torch.equal(fx_out, expected)
    fx_features = timm.create_model("rsir_micro", features_only=True, feature_cls="fx").eval()
    # the traced graph keeps what its stages use: not the head, the final norm, nor the model's
    # window-size record (a buffer no forward reads)
    fx_features.load_state_dict({"graph_module." + k: v for k, v in model.state_dict().items()
                                 if not k.startswith(("head.", "norm.")) and k != "window_size"})
    for x in (images, torch.randn(2, 3, 70, 90)):  # the graph pads an odd size as the model does
        with torch.no_grad():
            maps = fx_features(x)  # the stage modules' outputs: channels last (output_fmt)
            reference = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert len(maps) == 4 and all(torch.equal(a, b) for a, b in zip(maps, reference))


def test_no_weight_decay_and_group_matcher():
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = timm.create_model("rsir_micro")
    skip = model.no_weight_decay()
    expected = {n for n, p in model.named_parameters() if p.ndim == 1} | {
        f"stages.{s}.blocks.{b}.cpe.weight" for s, d in enumerate(model.config.depths) for b in range(d)}
    assert skip == expected
    optimizer = create_optimizer_v2(model, "adamw", weight_decay=0.05)  # reads no_weight_decay()
    undecayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == {id(model.get_parameter(n)) for n in skip}
    names = [n for n, _ in model.named_parameters()]
    for coarse in (True, False):
        grouped = group_parameters(model, model.group_matcher(coarse=coarse))
        flat = [n for group in grouped.values() for n in group]
        assert sorted(flat) == sorted(names)  # every parameter in exactly one group
        order = {n: g for g, group in grouped.items() for n in group}
        assert [order[n] for n in names] == sorted(order[n] for n in names)  # depth order
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 1 + 4 + 1  # stem, stages, head


_SUBPROCESS_CHECK = """
import sys, warnings
warnings.simplefilter("error")
import rsir_kernels
assert "timm" not in sys.modules, "import rsir_kernels imported timm"
import timm
model = timm.create_model("rsir_micro", num_classes=3)
assert type(model).__name__ == "RSIRTransformer" and model.num_classes == 3
"""


def test_registration_waits_for_timm_import_and_costs_no_timm_import():
    """In a fresh interpreter: rsir_kernels first, then timm (the other order is this file's)."""
    done = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_without_timm_everything_else_works_and_nothing_warns():
    script = ("import sys, warnings; warnings.simplefilter('error'); sys.modules['timm'] = None\n"
              "import torch, rsir_kernels as rk\n"
              "assert rk.models.register_timm() is False\n"
              "m = rk.models.rsir_micro(num_classes=2).eval()\n"
              "assert m(torch.randn(1, 3, 32, 32)).shape == (1, 2)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


_THREADED_CHECK = """
import threading, warnings
warnings.simplefilter("error")  # timm warns when a name is registered twice
import rsir_kernels
errors, models = [], []
def build():
    try:
        import timm
        models.append(timm.create_model("rsir_micro", num_classes=3))
    except BaseException as exc:
        errors.append(exc)
threads = [threading.Thread(target=build) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join(timeout=120)
assert not any(t.is_alive() for t in threads), "registration deadlocked"
assert not errors, errors
import timm
assert sorted(timm.list_models("rsir_*")) == ["rsir_base", "rsir_micro", "rsir_tiny"]
assert [m.num_classes for m in models] == [3] * 4
"""


def test_registration_from_threads_importing_timm_at_once():
    """Four threads import timm and build a model at once: one registration, no deadlock
    between timm's import lock and the registry's lock, no duplicate-registration warning."""
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("indices", [None, 1, 2, [1], [0, 2], [-1], [3]])
@pytest.mark.parametrize("stop_early", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_every_indices_stop_early_norm_combination_as_timm_swin(indices, stop_early, norm):
    """Against the stages run by hand: the maps named by indices (the final norm on the last
    stage's only, with norm), and timm Swin's final output: forward_features' when every stage
    ran, the last run stage's map, unnormed, when it stopped early (the norm is sized for stage 4)."""
    model = timm.create_model("rsir_micro").eval()
    images = _images()
    with torch.no_grad():
        maps, x = [], model.stem(images)
        for stage in model.stages:
            x = stage(x)
            maps.append(x)
        take = {None: [0, 1, 2, 3], 1: [3], 2: [2, 3]}.get(indices) if not isinstance(indices, list) else \
            sorted(i % 4 for i in indices)
        want = [(model.norm(maps[i]) if norm and i == 3 else maps[i]).permute(0, 3, 1, 2) for i in take]
        final, got = model.forward_intermediates(images, indices=indices, norm=norm, stop_early=stop_early)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    ran_all = not stop_early or take[-1] == 3
    assert torch.equal(final, model.forward_features(images) if ran_all else maps[take[-1]])
