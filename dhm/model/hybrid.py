"""The Deep Hybrid Model (Kuleshov & Ermon 2017) and its variants.

    dhm     classifier trunk + beta-VAE; head on concat[classifier features, mu]
    resnet  classifier trunk + head on its features (alpha-only baseline)
    vae     beta-VAE only (beta-only baseline, no logits)
    zmodel  beta-VAE + head on mu only (a classifier on the latent)

Inputs are pixels in [0, 1]; the dataset's normalization is a buffer of the model, so attacks
and OOD sets share one input space. With ``vae_split_layer`` s >= 1 the VAE encodes the
classifier's activations entering stage s and its decoder reconstructs them (a stop-gradient
target, so the classifier cannot shrink its activations to make reconstruction trivial). The
VAE's loss then also trains the classifier trunk below stage s through the encoder's input,
unless ``vae_trunk_grad=False`` gives the encoder a stop-gradient copy too (the trunk then
learns from the cross-entropy alone).

The observation model's sigma is ``log_sigma``: a scalar (``sigma="global"``, learned; or
``"fixed"``, not trained) or one value per channel of the target (``"channel"``, learned). With
``sigma="optimal"`` training uses each batch's closed-form optimum instead
(``dhm.model.objectives.optimal_log_sigma``) and ``log_sigma`` is not trained: evaluation fits
it on the validation split, as for ``fixed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dhm.model.nets import ResNetDecoder, ResNetEncoder, encoder_stage_shape


@dataclass
class DHMOutput:
    """What a forward pass returns; a field is None when the model lacks that branch."""

    logits: torch.Tensor | None  # [B, C]
    mu: torch.Tensor | None  # [B, D]
    logvar: torch.Tensor | None  # [B, D]
    z: torch.Tensor | None  # [k, B, D]
    recon: torch.Tensor | None  # [k, B, *target] decoder means
    target: torch.Tensor | None  # [B, *target] what the decoder reconstructs
    log_sigma: torch.Tensor | None = None  # [] or [C, 1, 1]: log std of the observation model


def _head(
    in_features: int, hidden: int, num_classes: int, dropout: tuple[float, float]
) -> nn.Sequential:
    # The thesis head, kept as it was (no nonlinearity between the two linear layers).
    return nn.Sequential(
        nn.Dropout(dropout[0]),
        nn.Linear(in_features, hidden),
        nn.Dropout(dropout[1]),
        nn.Linear(hidden, num_classes),
    )


class DeepHybridModel(nn.Module):
    """forward(x [B,3,32,32] pixels in [0,1], k samples) -> DHMOutput."""

    def __init__(
        self,
        kind: str = "dhm",
        num_classes: int = 10,
        width: int = 64,
        latent_dim: int = 256,
        vae_split_layer: int = 0,
        obs_sigma: float = 0.1,
        sigma: str = "fixed",
        vae_trunk_grad: bool = True,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        norm: str = "batch",
        head_dropout: tuple[float, float] = (0.5, 0.25),
    ):
        super().__init__()
        self.kind, self.split = kind, vae_split_layer
        self.sigma, self.vae_trunk_grad = sigma, vae_trunk_grad
        self.has_classifier = kind in ("dhm", "resnet")
        self.has_vae = kind in ("dhm", "vae", "zmodel")
        self.has_head = kind != "vae"
        if vae_split_layer and not self.has_classifier:
            raise ValueError(
                f"vae_split_layer={vae_split_layer} needs a classifier; {kind} has none"
            )
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
        feat = 8 * width
        self.classifier = ResNetEncoder(width, norm=norm) if self.has_classifier else None
        if self.has_vae:
            self.vae_encoder = ResNetEncoder(width, first_stage=vae_split_layer, norm=norm)
            self.fc_mu = nn.Linear(feat, latent_dim)
            self.fc_logvar = nn.Linear(feat, latent_dim)
            self.decoder = ResNetDecoder(latent_dim, width, last_stage=vae_split_layer, norm=norm)
            if sigma not in ("global", "channel", "fixed", "optimal"):
                raise ValueError(
                    f"sigma={sigma!r} is not allowed: global, channel, fixed or optimal"
                )
            channels = encoder_stage_shape(vae_split_layer, width)[0]
            shape = (channels,) if sigma == "channel" else ()
            self.log_sigma = nn.Parameter(
                torch.full(shape, math.log(obs_sigma)), requires_grad=sigma in ("global", "channel")
            )
        if self.has_head:
            head_in = {"dhm": feat + latent_dim, "resnet": feat, "zmodel": latent_dim}[kind]
            hidden = 128 if kind == "zmodel" else 256
            self.head = _head(head_in, hidden, num_classes, tuple(head_dropout))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Classifier features [B, 8w] (or None), VAE encoder input and reconstruction target."""
        xn = self.normalize(x)
        feats, enc_in, target = None, xn, x
        if self.classifier is not None:
            feats, stage_inputs = self.classifier.stage_inputs(xn)
            if self.split:
                enc_in, target = stage_inputs[self.split], stage_inputs[self.split].detach()
                if not self.vae_trunk_grad:
                    enc_in = target
        return feats, enc_in, target

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] without running the decoder (the head needs mu only): for attacks."""
        if not self.has_head:
            raise ValueError(f"model={self.kind} has no classifier head")
        feats, enc_in, _ = self.encode(x)
        mu = self.fc_mu(self.vae_encoder(enc_in)) if self.has_vae else None
        return self._logits(feats, mu)

    def _logits(self, feats: torch.Tensor | None, mu: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "dhm":
            return self.head(torch.cat([feats, mu], 1))
        return self.head(feats if self.kind == "resnet" else mu)

    def forward(self, x: torch.Tensor, k: int = 1, eps: torch.Tensor | None = None) -> DHMOutput:
        """x [B,3,32,32] in [0,1]; k posterior samples, or the standard-normal noise ``eps``
        [k, B, D] to use for them (evaluation fixes it per image)."""
        feats, enc_in, target = self.encode(x)
        mu = logvar = z = recon = None
        if self.has_vae:
            h = self.vae_encoder(enc_in)
            mu, logvar = self.fc_mu(h), self.fc_logvar(h)
            if eps is None:
                eps = torch.randn((k, *mu.shape), device=mu.device, dtype=mu.dtype)
            k = eps.shape[0]
            z = mu.unsqueeze(0) + eps * torch.exp(0.5 * logvar).unsqueeze(0)
            # All k samples through the decoder as one batch.
            recon = self.decoder(z.reshape(k * mu.shape[0], -1))
            recon = recon.view(k, mu.shape[0], *recon.shape[1:])
        logits = self._logits(feats, mu) if self.has_head else None
        if not self.has_vae:
            return DHMOutput(logits, None, None, None, None, None)
        return DHMOutput(logits, mu, logvar, z, recon, target, self.observation_log_sigma())

    def observation_log_sigma(self) -> torch.Tensor:
        """log sigma shaped to broadcast against one target [B, C, H, W]: [] or [C, 1, 1]."""
        ls = self.log_sigma
        return ls.view(-1, 1, 1) if ls.ndim == 1 else ls


def build_model(model_cfg: Any, num_classes: int, mean, std) -> DeepHybridModel:
    """A DeepHybridModel from a ``ModelConfig`` and the dataset's classes and normalization."""
    return DeepHybridModel(
        kind=model_cfg.name,
        num_classes=num_classes,
        width=model_cfg.width,
        latent_dim=model_cfg.latent_dim,
        vae_split_layer=model_cfg.vae_split_layer,
        obs_sigma=model_cfg.obs_sigma,
        # The thesis objective does not involve sigma: it is fitted for evaluation instead.
        sigma="fixed" if model_cfg.likelihood == "thesis" else model_cfg.sigma,
        vae_trunk_grad=model_cfg.vae_trunk_grad,
        mean=tuple(mean),
        std=tuple(std),
        norm=model_cfg.norm,
        head_dropout=tuple(model_cfg.head_dropout),
    )


def warm_start_from_resnet(model: DeepHybridModel, resnet_state: dict[str, torch.Tensor]) -> None:
    """Load a trained ``resnet``'s classifier trunk and head into a dhm/resnet model.

    For a dhm the head's first layer sees [features, mu]: the resnet's weights fill the
    feature columns and the mu columns start at zero, so the warm-started DHM computes exactly
    the resnet's logits until training moves it. Raises ValueError on a mismatched checkpoint.
    """
    if model.classifier is None:
        raise ValueError(f"warm start needs a classifier branch; model={model.kind} has none")
    trunk = {
        k[len("classifier.") :]: v for k, v in resnet_state.items() if k.startswith("classifier.")
    }
    if not trunk:
        raise ValueError(
            "warm start checkpoint has no classifier.* weights (not a resnet/dhm model)"
        )
    try:
        model.classifier.load_state_dict(trunk)
    except RuntimeError as err:
        raise ValueError(f"warm start checkpoint does not match this classifier: {err}") from None
    w, b = resnet_state["head.1.weight"], resnet_state["head.1.bias"]
    first = model.head[1]
    with torch.no_grad():
        if first.weight.shape[0] != w.shape[0] or first.weight.shape[1] < w.shape[1]:
            raise ValueError(
                f"warm start head {tuple(w.shape)} does not fit this head "
                f"{tuple(first.weight.shape)}"
            )
        first.weight.zero_()
        first.weight[:, : w.shape[1]] = w
        first.bias.copy_(b)
        model.head[3].load_state_dict(
            {"weight": resnet_state["head.3.weight"], "bias": resnet_state["head.3.bias"]}
        )
