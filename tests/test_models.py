"""Tests for arow.models: shapes, parameter counts, normalisation, validation, FLOPs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from arow.models import (
    MODELS,
    Normalize,
    build_model,
    count_parameters,
    model_flops,
    wide_resnet,
)

from conftest import fmnist_available

# (in_channels, image_size, num_classes): Fashion-MNIST-like and CIFAR-100-like.
SHAPES = [(1, 28, 10), (3, 32, 100)]
# Too large to build for real in a fast test (267M parameters): checked on the meta device.
META_ONLY = {"wrn-70-16"}


def tiny_models() -> dict[str, nn.Module]:
    """One cheap instance of each architecture family (the full WRN-34-10 is 46M parameters)."""
    torch.manual_seed(0)
    return {
        "small-cnn": build_model("small-cnn", num_classes=10, in_channels=3, image_size=32),
        "resnet18": build_model("resnet18", num_classes=10, in_channels=3, image_size=32),
        "preact-resnet18": build_model(
            "preact-resnet18", num_classes=10, in_channels=3, image_size=32
        ),
        "wrn-10-1": wide_resnet(10, 1, num_classes=10, in_channels=3, image_size=32),
    }


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return tiny_models()


def test_registry_lists_the_paper_models() -> None:
    assert {"small-cnn", "resnet18", "preact-resnet18", "wrn-34-10"} <= set(MODELS.names())
    assert {"wrn-28-10", "wrn-70-16"} <= set(MODELS.names())


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in META_ONLY])
@pytest.mark.parametrize("in_channels,image_size,num_classes", SHAPES)
def test_every_model_outputs_logits(
    name: str, in_channels: int, image_size: int, num_classes: int
) -> None:
    torch.manual_seed(0)
    model = build_model(
        name, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )
    batch = 2 if name.startswith("wrn") else 3
    x = torch.rand(batch, in_channels, image_size, image_size)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (batch, num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels,image_size,num_classes", SHAPES)
def test_tiny_wide_resnet_outputs_logits(
    in_channels: int, image_size: int, num_classes: int
) -> None:
    model = wide_resnet(
        10, 1, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )
    assert model(torch.rand(4, in_channels, image_size, image_size)).shape == (4, num_classes)


@pytest.mark.parametrize(
    "name,expected",
    [
        # Hand counts, CIFAR-10: conv/fc weights 11,164,362 plus BatchNorm affine parameters.
        ("resnet18", 11_173_962),  # + 4,800 BN channels
        ("preact-resnet18", 11_172_170),  # + 3,392 block BN channels + 512 final BN
        ("wrn-34-10", 46_160_474),  # the value TRADES/ARoW report as 46.2M
    ],
)
def test_parameter_counts_match_known_values(name: str, expected: int) -> None:
    model = build_model(name, num_classes=10, in_channels=3, image_size=32)
    assert count_parameters(model) == expected


def test_small_cnn_matches_trades_layout() -> None:
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    # convs 320 + 9,248 + 18,496 + 36,928; fc 64*4*4*200+200, 200*200+200, 200*10+10
    assert count_parameters(model) == 312_202
    assert model.classifier.fc1.in_features == 64 * 4 * 4
    cifar = build_model("small-cnn", num_classes=10, in_channels=3, image_size=32)
    assert cifar.classifier.fc1.in_features == 64 * 5 * 5


def test_small_cnn_is_deterministic_in_train_mode() -> None:
    # No dropout and no BatchNorm: the attack sees the same function in train and eval mode.
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.rand(4, 1, 28, 28)
    model.train()
    a, b = model(x), model(x)
    model.eval()
    assert torch.equal(a, b) and torch.allclose(a, model(x))


def test_untrained_small_cnn_has_input_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    model(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_normalize_is_the_first_layer_and_applies_mean_std() -> None:
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    model = build_model(
        "resnet18", num_classes=10, in_channels=3, image_size=32, mean=mean, std=std
    )
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(first(x), expected)
    model.eval()
    assert torch.allclose(model(x), model.net(expected), atol=1e-6)
    # The normalisation travels with the checkpoint.
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    assert first.mean.shape == (1, 3, 1, 1) and first.std.shape == (1, 3, 1, 1)


def test_default_has_no_normalisation() -> None:
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    assert not any(isinstance(m, Normalize) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=1, in_channels=1, image_size=28), "num_classes"),
        (dict(num_classes=10, in_channels=0, image_size=28), "in_channels"),
        (dict(num_classes=10, in_channels=1, image_size=0), "image_size"),
        (dict(num_classes=10, in_channels=1, image_size=12), "image_size >= 16"),
        (dict(num_classes=10, in_channels=1, image_size=28, mean=[0.5]), "both mean and std"),
        (
            dict(num_classes=10, in_channels=1, image_size=28, mean=[0.5, 0.5], std=[1.0, 1.0]),
            "one value per",
        ),
        (dict(num_classes=10, in_channels=1, image_size=28, mean=[0.5], std=[0.0]), "positive"),
        (dict(num_classes=2.5, in_channels=1, image_size=28), "num_classes"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("small-cnn", **kwargs)


def test_resnet_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="image_size >= 8"):
        build_model("resnet18", num_classes=10, in_channels=3, image_size=4)
    with pytest.raises(ValueError, match="image_size >= 8"):
        wide_resnet(10, 1, num_classes=10, in_channels=3, image_size=4)


def test_wide_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wide_resnet(12, 1, num_classes=10, in_channels=3, image_size=32)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*resnet18.*small-cnn"):
        build_model("vgg16", num_classes=10, in_channels=3, image_size=32)


def test_flops_of_a_linear_layer() -> None:
    # 2 * batch * in * out multiply-adds; the bias is not counted.
    assert model_flops(nn.Linear(7, 5), (3, 7)) == 2 * 3 * 7 * 5


def test_flops_of_a_conv_layer() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)  # 32x32 -> 16x16
    assert model_flops(conv, (3, 32, 32)) == 2 * (8 * 16 * 16) * (3 * 3 * 3)
    grouped = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2)
    assert model_flops(grouped, (2, 4, 5, 5)) == 2 * (2 * 8 * 5 * 5) * (2 * 3 * 3)


def test_flops_of_resnet18_and_mode_restored() -> None:
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32).train()
    flops = model_flops(model, (3, 32, 32))
    assert 1.10e9 < flops < 1.12e9  # the well-known 0.56 GMACs per CIFAR image
    assert model_flops(model, (4, 3, 32, 32)) == 4 * flops
    assert model.training


def test_count_parameters_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 14
    assert count_parameters(model, trainable_only=True) == 6


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "preact-resnet18", "wrn-10-1"])
def test_two_forward_passes_share_one_backward(models: dict[str, nn.Module], name: str) -> None:
    # Clean and adversarial passes through the same model in one graph (TRADES/ARoW), plus an
    # input gradient (the attack): no in-place op may overwrite a saved tensor.
    model = models[name].train()
    model.zero_grad()
    x1 = torch.rand(2, 3, 32, 32)
    x2 = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = model(x1).log_softmax(1).sum() + model(x2).softmax(1)[:, 0].sum()
    loss.backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["small-cnn", "preact-resnet18", "wrn-10-1"])
def test_channels_last_gives_the_same_logits(models: dict[str, nn.Module], name: str) -> None:
    model = models[name].eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet18", "wrn-10-1"])
def test_sync_batchnorm_conversion_keeps_state_dict_keys(
    models: dict[str, nn.Module], name: str
) -> None:
    model = copy.deepcopy(models[name])  # the conversion edits the module in place
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    keys = set(model.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn > 0
    assert set(converted.state_dict()) == keys


@pytest.mark.parametrize("name", ["small-cnn", "wrn-10-1"])
def test_models_trace_without_graph_breaks(name: str) -> None:
    # backend="eager" checks that dynamo captures one graph without needing a C++ compiler.
    model = tiny_models()[name].eval()
    x = torch.rand(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- WRN sizes, activation
def wrn_parameters(depth: int, k: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """WRN-depth-k's parameters counted by hand: stem, blocks (BN, 3x3 convs, 1x1 shortcut), BN, fc."""
    n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    total = in_channels * 16 * 9
    for c_in, c_out in itertools.pairwise(widths):
        for i in range(n):
            a = c_in if i == 0 else c_out
            total += 2 * a + a * c_out * 9 + 2 * c_out + c_out * c_out * 9 + (a * c_out if a != c_out else 0)
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


@pytest.mark.parametrize(
    "name,depth,k,reported",
    [("wrn-28-10", 28, 10, 36.5e6), ("wrn-70-16", 70, 16, 267e6), ("wrn-34-10", 34, 10, 46.2e6)],
)
def test_wide_resnets_of_the_generated_data_papers(
    name: str, depth: int, k: int, reported: float
) -> None:
    # On the meta device: shapes and parameters without allocating (WRN-70-16 would take 1 GB).
    with torch.device("meta"):
        model = build_model(name, num_classes=10, in_channels=3, image_size=32, activation="silu")
        out = model(torch.empty(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert count_parameters(model) == wrn_parameters(depth, k)
    assert abs(count_parameters(model) / reported - 1) < 0.005
    assert sum(isinstance(m, nn.SiLU) for m in model.modules()) == (depth - 4) // 2 + 1
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_wrn_28_10_counts_36_5m_parameters_for_real() -> None:
    model = build_model("wrn-28-10", num_classes=10, in_channels=3, image_size=32)
    assert count_parameters(model) == 36_479_194  # Gowal et al. 2020: 36.5M
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "preact-resnet18", "wrn-10-1"])
def test_silu_is_used_when_asked(name: str) -> None:
    def build(activation: str) -> nn.Module:
        torch.manual_seed(0)
        if name == "wrn-10-1":
            return wide_resnet(10, 1, num_classes=10, in_channels=3, image_size=32,
                               activation=activation)
        return build_model(name, num_classes=10, in_channels=3, image_size=32,
                           activation=activation)

    relu, silu = build("relu").eval(), build("silu").eval()
    assert sum(isinstance(m, nn.SiLU) for m in silu.modules()) > 0
    assert not any(isinstance(m, nn.ReLU) for m in silu.modules())
    assert not any(isinstance(m, nn.SiLU) for m in relu.modules())
    # same weights (an activation holds none), different function
    silu.load_state_dict(relu.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(relu(x), silu(x))
        swaps = [(m, key) for m in silu.modules() for key, child in m.named_children()
                 if isinstance(child, nn.SiLU)]
        for m, key in swaps:  # swapping the activation back gives the ReLU network exactly
            setattr(m, key, nn.ReLU())
        assert torch.equal(relu(x), silu(x))


def test_activation_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*relu, silu"):
        build_model("resnet18", num_classes=10, in_channels=3, image_size=32, activation="gelu")

    def plain(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    monkeypatch.setitem(MODELS._items, "plain", plain)
    assert build_model("plain", num_classes=10, in_channels=1, image_size=8) is not None
    with pytest.raises(ValueError, match="model 'plain' has no choice of activation"):
        build_model("plain", num_classes=10, in_channels=1, image_size=8, activation="silu")


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_checkpoint_keeps_the_activation(tmp_path) -> None:
    # train_run saves the activation in the model spec; load_model (and `arow eval`) rebuild it.
    import arow
    from arow.runs.records import export_model, load_checkpoint
    from arow.config.schema import TrainConfig
    from arow.pipelines import train_run

    cfg = TrainConfig(model="small-cnn", activation="silu", epochs=1, limit_train=64, val_size=0,
                      batch_size=32, attack_steps=1, warmup_epochs=0, out=str(tmp_path / "run"))
    result = train_run(cfg, plots=False)
    assert load_checkpoint(tmp_path / "run")["model_spec"]["activation"] == "silu"
    export = export_model(load_checkpoint(tmp_path / "run"), tmp_path / "model.safetensors")
    x = torch.rand(3, 1, 28, 28)
    for source in (tmp_path / "run", export):
        model = arow.load_model(source)
        assert sum(isinstance(m, nn.SiLU) for m in model.modules()) == 6
        with torch.no_grad():
            assert torch.allclose(model(x), result.model.cpu()(x))
    # a checkpoint written before the activation was saved rebuilds as ReLU
    ckpt = load_checkpoint(tmp_path / "run")
    del ckpt["model_spec"]["activation"]
    assert not any(isinstance(m, nn.SiLU) for m in arow.model_from_checkpoint(ckpt).modules())
