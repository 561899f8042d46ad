"""Shapes and parameter counts of every model kind and split layer, and the warm start."""

import pytest
import torch
import torchvision

from dhm.core.config import ConfigError, check_model, run_config
from dhm.model.hybrid import DeepHybridModel, warm_start_from_resnet
from dhm.model.nets import ResNetDecoder, ResNetEncoder, encoder_stage_shape

KINDS_AND_SPLITS = [("dhm", s) for s in range(5)] + [
    ("resnet", 0),
    ("vae", 0),
    ("zmodel", 0),
]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind,split", KINDS_AND_SPLITS)
def test_output_shapes(kind, split):
    torch.manual_seed(0)
    width, latent, k, b = 4, 6, 3, 2
    model = DeepHybridModel(
        kind, num_classes=7, width=width, latent_dim=latent, vae_split_layer=split
    )
    out = model(torch.rand(b, 3, 32, 32), k=k)
    if kind == "vae":
        assert out.logits is None
    else:
        assert out.logits.shape == (b, 7)
    if kind == "resnet":
        assert out.mu is None and out.recon is None
        return
    target_shape = encoder_stage_shape(split, width)
    assert out.mu.shape == out.logvar.shape == (b, latent)
    assert out.z.shape == (k, b, latent)
    assert out.target.shape == (b, *target_shape)
    assert out.recon.shape == (k, b, *target_shape)
    assert out.log_sigma.shape == ()


def test_split_target_is_the_classifier_activation_entering_that_stage():
    torch.manual_seed(0)
    model = DeepHybridModel("dhm", width=4, latent_dim=6, vae_split_layer=3).eval()
    x = torch.rand(2, 3, 32, 32)
    xn = model.normalize(x)
    c = model.classifier
    expected = c.stages[1](c.stages[0](c.stem(xn)))
    torch.testing.assert_close(model(x).target, expected)
    assert not model(x).target.requires_grad
    # Split 0 reconstructs the [0, 1] image itself, not the normalized one.
    model0 = DeepHybridModel("dhm", width=4, latent_dim=6, vae_split_layer=0)
    torch.testing.assert_close(model0(x).target, x)


@pytest.mark.parametrize("split", range(5))
def test_decoder_mirrors_encoder(split):
    enc = ResNetEncoder(8, first_stage=split)
    dec = ResNetDecoder(5, 8, last_stage=split)
    x = torch.rand(2, *encoder_stage_shape(split, 8))
    assert enc(x).shape == (2, 64)
    assert dec(torch.randn(2, 5)).shape == x.shape


def test_parameter_counts_at_width_64():
    # The classifier trunk equals torchvision's ResNet-18 with a CIFAR stem (3x3, no max-pool)
    # and without its fc layer: an independent count.
    reference = torchvision.models.resnet18()
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    trunk_params = _count(reference) - _count(reference.fc)
    assert trunk_params == 11_168_832
    dhm = DeepHybridModel("dhm", width=64, latent_dim=256)
    assert _count(dhm.classifier) == trunk_params
    assert _count(dhm.vae_encoder) == trunk_params
    # The decoder's residual stages are a third trunk (same conv shapes, mirrored).
    assert abs(_count(dhm.decoder.stages) - trunk_params) / trunk_params < 0.001
    head = (512 + 256) * 256 + 256 + 256 * 10 + 10
    vae_heads = 2 * (512 * 256 + 256)
    assert _count(dhm.head) == head
    assert _count(dhm.fc_mu) + _count(dhm.fc_logvar) == vae_heads
    total = _count(dhm)
    assert 35_500_000 < total < 36_500_000  # three ResNet-18 trunks + latent projection
    resnet = DeepHybridModel("resnet", width=64)
    assert _count(resnet) == trunk_params + 512 * 256 + 256 + 256 * 10 + 10
    zmodel = DeepHybridModel("zmodel", width=64, latent_dim=256)
    assert _count(zmodel.head) == 256 * 128 + 128 + 128 * 10 + 10
    assert not hasattr(DeepHybridModel("vae", width=64), "head")


def test_warm_start_reproduces_the_resnet_logits():
    torch.manual_seed(0)
    resnet = DeepHybridModel("resnet", width=4, latent_dim=6).eval()
    dhm = DeepHybridModel("dhm", width=4, latent_dim=6).eval()
    warm_start_from_resnet(dhm, resnet.state_dict())
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(dhm(x).logits, resnet(x).logits)
    vae = DeepHybridModel("vae", width=4, latent_dim=6)
    with pytest.raises(ValueError, match="no classifier"):
        warm_start_from_resnet(dhm, vae.state_dict())
    wider = DeepHybridModel("resnet", width=8)
    with pytest.raises(ValueError, match="does not match"):
        warm_start_from_resnet(dhm, wider.state_dict())


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.name", "gan", "one of dhm, resnet, vae, zmodel"),
        ("model.latent_dim", 0, "model.latent_dim=0"),
        ("model.vae_split_layer", 5, "0, 1, 2, 3 or 4"),
        ("model.vae_split_layer", -1, "0, 1, 2, 3 or 4"),
        ("model.importance_num", 0, "model.importance_num=0"),
        ("model.alpha", -1.0, "model.alpha=-1.0"),
        ("model.beta", -0.5, "model.beta=-0.5"),
    ],
)
def test_bad_model_values_name_the_key(key, value, message):
    cfg = run_config(**{key: value})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_model(cfg.model)


def test_both_coefficients_zero_and_branch_mismatches_are_rejected():
    with pytest.raises(ConfigError, match="cannot both be 0"):
        check_model(run_config(**{"model.alpha": 0.0, "model.beta": 0.0}).model)
    with pytest.raises(ConfigError, match="no VAE"):
        check_model(run_config(**{"model.name": "resnet"}).model)
    with pytest.raises(ConfigError, match="no classifier"):
        check_model(run_config(**{"model.name": "zmodel", "model.vae_split_layer": 2}).model)


@pytest.mark.parametrize("trunk_grad", [True, False])
def test_the_vae_loss_trains_the_classifier_trunk_below_the_split_only_if_asked(trunk_grad):
    # vae_split_layer = 2: the VAE encodes the activations entering stage 2. Its loss reaches
    # the stem and stage 1 through the encoder's input (vae_trunk_grad=True), or not at all
    # (False); the target is stop-gradient either way, and stage 2 onwards never sees it.
    torch.manual_seed(0)
    model = DeepHybridModel(
        "dhm", width=4, latent_dim=6, vae_split_layer=2, vae_trunk_grad=trunk_grad
    )
    out = model(torch.rand(3, 3, 32, 32))
    assert not out.target.requires_grad
    vae_loss = (out.recon - out.target.unsqueeze(0)).square().mean() + out.mu.square().mean()
    vae_loss.backward()
    below = [p.grad for p in model.classifier.stem.parameters()]
    below += [p.grad for p in model.classifier.stages[0].parameters()]
    above = [p.grad for p in model.classifier.stages[1].parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in below)
    assert reached == trunk_grad
    assert all(g is None or g.abs().sum() == 0 for g in above)


def test_sigma_is_a_learned_scalar_a_learned_vector_per_channel_or_fixed():
    for sigma, shape, learned in (
        ("global", (), True),
        ("channel", (3,), True),
        ("fixed", (), False),
    ):
        model = DeepHybridModel("vae", width=4, latent_dim=6, sigma=sigma, obs_sigma=0.2)
        assert model.log_sigma.shape == shape and model.log_sigma.requires_grad == learned
        assert torch.allclose(model.log_sigma.exp(), torch.tensor(0.2))
        out = model(torch.rand(2, 3, 32, 32))
        assert out.log_sigma.shape == (() if sigma != "channel" else (3, 1, 1))
    split = DeepHybridModel("dhm", width=4, latent_dim=6, vae_split_layer=3, sigma="channel")
    assert split.log_sigma.shape == (8,)  # one per channel of the activations entering stage 3
