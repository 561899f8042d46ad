"""The size of the model a run config builds, without torch: what a checkpoint holds.

``state_size(cfg)`` mirrors ``dhm.model.hybrid.build_model`` (and the trunks of
``dhm.model.nets``) layer by layer and counts every entry of the model's ``state_dict``:
parameters, BatchNorm's running statistics and ``num_batches_tracked`` (an int64), the pixel
normalization buffers and the decoder's ``log_sigma``. ``tests/test_disk.py`` compares it with
the real model's ``state_dict`` for each model kind, widths, split layers and latent sizes: a
layer added to the nets without a line here fails that test.

``checkpoint_bytes(cfg, final=...)`` turns that into the bytes of a checkpoint file as
``torch.save`` writes it (``dhm.training.train.checkpoint_state``): the weights, and in a step
checkpoint Adam's two moments and step counter per trained parameter, plus the zip archive's
per-record overhead. The launcher sizes a sweep's disk use with it (``hpc.disk``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dhm.core.datasets import DATASETS

FLOAT_BYTES = 4  # float32 parameters and buffers
INT64_BYTES = 8  # BatchNorm's num_batches_tracked
# torch.save's zip archive, per tensor: a 64-byte aligned record (local header, name, padding,
# central directory entry) and the tensor's entry in data.pkl; measured on torch 2.x
# (tests/test_disk.py checks the whole formula against files written by training).
RECORD_OVERHEAD = 190
# data.pkl per entry besides: a state_dict key ("vae_encoder.stages.3.1.bn2.running_var"), or
# an optimizer state's keys (exp_avg, exp_avg_sq, step under a parameter index).
MODEL_KEY_OVERHEAD = 95
OPTIMIZER_KEY_OVERHEAD = 33
CHECKPOINT_BASE = 3000  # config_yaml, the position and bookkeeping of a checkpoint dict


@dataclass
class StateSize:
    """The tensors of a model's state_dict: how many, their elements and bytes, and those of
    the parameters training updates (Adam keeps two moments of each)."""

    tensors: int = 0
    numel: int = 0
    bytes: int = 0
    trained_tensors: int = 0
    trained_numel: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # top-level module -> elements

    def add(self, part: str, numel: int, *, trained: bool, nbytes: int | None = None) -> None:
        self.tensors += 1
        self.numel += numel
        self.bytes += FLOAT_BYTES * numel if nbytes is None else nbytes
        self.parts[part] = self.parts.get(part, 0) + numel
        if trained:
            self.trained_tensors += 1
            self.trained_numel += numel


def _get(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def stage_channels(width: int) -> tuple[int, int, int, int]:
    """Channels of encoder stages 1..4 (``dhm.model.nets.stage_channels``)."""
    return (width, 2 * width, 4 * width, 8 * width)


class _Counter:
    """Adds the tensors of the nets' layers to a StateSize, as torch registers them."""

    def __init__(self, size: StateSize, norm: str):
        self.size, self.norm = size, norm

    def conv(self, part: str, c_in: int, c_out: int, k: int, trained: bool) -> None:
        self.size.add(part, c_out * c_in * k * k, trained=trained)  # bias=False everywhere

    def linear(self, part: str, n_in: int, n_out: int, trained: bool) -> None:
        self.size.add(part, n_out * n_in, trained=trained)
        self.size.add(part, n_out, trained=trained)

    def norm_layer(self, part: str, c: int, trained: bool) -> None:
        self.size.add(part, c, trained=trained)  # weight
        self.size.add(part, c, trained=trained)  # bias
        if self.norm == "batch":  # running_mean, running_var, num_batches_tracked
            self.size.add(part, c, trained=False)
            self.size.add(part, c, trained=False)
            self.size.add(part, 1, trained=False, nbytes=INT64_BYTES)

    def basic_block(self, part: str, c_in: int, c_out: int, stride: int, trained: bool) -> None:
        self.conv(part, c_in, c_out, 3, trained)
        self.norm_layer(part, c_out, trained)
        self.conv(part, c_out, c_out, 3, trained)
        self.norm_layer(part, c_out, trained)
        if stride != 1 or c_in != c_out:
            self.conv(part, c_in, c_out, 1, trained)
            self.norm_layer(part, c_out, trained)

    def up_block(self, part: str, c_in: int, c_out: int, scale: int, trained: bool) -> None:
        self.conv(part, c_in, c_in, 3, trained)
        self.norm_layer(part, c_in, trained)
        self.conv(part, c_in, c_out, 3, trained)
        self.norm_layer(part, c_out, trained)
        if scale != 1 or c_in != c_out:
            self.conv(part, c_in, c_out, 1, trained)
            self.norm_layer(part, c_out, trained)

    def encoder(self, part: str, width: int, first_stage: int, trained: bool) -> None:
        """``ResNetEncoder(width, first_stage)``."""
        ch = stage_channels(width)
        if first_stage == 0:
            self.conv(part, 3, width, 3, trained)
            self.norm_layer(part, width, trained)
        c_in = width
        for s in range(1, 5):
            c_out, stride = ch[s - 1], (1 if s == 1 else 2)
            if s >= max(first_stage, 1):
                self.basic_block(part, c_in, c_out, stride, trained)
                self.basic_block(part, c_out, c_out, 1, trained)
            c_in = c_out

    def decoder(self, part: str, latent: int, width: int, last_stage: int, trained: bool) -> None:
        """``ResNetDecoder(latent, width, last_stage)``."""
        ch = stage_channels(width)
        self.linear(part, latent, ch[3] * 4 * 4, trained)
        for s in range(4, max(last_stage, 1) - 1, -1):
            c_in, c_out = ch[s - 1], ch[max(s - 2, 0)]
            self.up_block(part, c_in, c_in, 1, trained)
            self.up_block(part, c_in, c_out, 2 if s >= 2 else 1, trained)
        if last_stage == 0:
            self.conv(part, width, 3, 3, trained)


def split_channels(split: int, width: int) -> int:
    """Channels of the tensor entering encoder stage ``split`` (``encoder_stage_shape``)."""
    if split == 0:
        return 3
    return width if split in (1, 2) else stage_channels(width)[split - 2]


def state_size(model: Any, num_classes: int | None = None, data: str | None = None) -> StateSize:
    """The state_dict of ``build_model(model, num_classes, ...)`` for a ModelConfig ``model``
    (a run config's ``model`` section: a DictConfig, Plain or dict). ``num_classes`` defaults
    to the classes of dataset ``data`` (a run config's ``data.name``).

    ``trained_*`` count the parameters Adam updates: those with requires_grad whose branch
    has a loss term (alpha = 0 leaves the head without gradients, beta = 0 the decoder,
    fc_logvar and sigma), as ``make_accelerator``'s find_unused_parameters assumes.
    """
    if num_classes is None:
        num_classes = DATASETS[data or "digits"].num_classes
    kind, width = _get(model, "name"), int(_get(model, "width"))
    latent, split = int(_get(model, "latent_dim")), int(_get(model, "vae_split_layer"))
    norm = _get(model, "norm")
    alpha, beta = float(_get(model, "alpha")), float(_get(model, "beta"))
    sigma = "fixed" if _get(model, "likelihood") == "thesis" else _get(model, "sigma")
    has_classifier, has_vae = kind in ("dhm", "resnet"), kind in ("dhm", "vae", "zmodel")
    size = StateSize()
    c = _Counter(size, norm)
    size.add("pixel_mean", 3, trained=False)
    size.add("pixel_std", 3, trained=False)
    feat = 8 * width
    if has_classifier:
        # The trunk trains from the cross-entropy, and from the VAE's loss through a split.
        vae_grad = split > 0 and beta != 0 and bool(_get(model, "vae_trunk_grad"))
        c.encoder("classifier", width, 0, alpha != 0 or vae_grad)
    if has_vae:
        # The VAE encoder trains from beta, and from alpha through mu (dhm, zmodel heads).
        enc = beta != 0 or (kind != "vae" and alpha != 0)
        c.encoder("vae_encoder", width, split, enc)
        c.linear("fc_mu", feat, latent, enc)
        c.linear("fc_logvar", feat, latent, beta != 0)
        c.decoder("decoder", latent, width, split, beta != 0)
        learned = sigma in ("global", "channel")
        numel = split_channels(split, width) if sigma == "channel" else 1
        size.add("log_sigma", numel, trained=learned and beta != 0)
    if kind != "vae":
        head_in = {"dhm": feat + latent, "resnet": feat, "zmodel": latent}[kind]
        hidden = 128 if kind == "zmodel" else 256
        c.linear("head", head_in, hidden, alpha != 0)
        c.linear("head", hidden, num_classes, alpha != 0)
    return size


def run_state_size(cfg: Any) -> StateSize:
    """``state_size`` of a run config (its model section and dataset)."""
    return state_size(_get(cfg, "model"), data=_get(_get(cfg, "data"), "name"))


def checkpoint_bytes(cfg: Any, *, final: bool) -> int:
    """Bytes of a run's checkpoint file: ``final.pt`` (weights only) or a step checkpoint
    (weights, Adam's exp_avg and exp_avg_sq and a step counter per trained parameter, and the
    scheduler), as ``dhm.training.train.checkpoint_state`` builds it for run config ``cfg``."""
    s = run_state_size(cfg)
    data, tensors = s.bytes, s.tensors
    pickled = s.tensors * MODEL_KEY_OVERHEAD
    if not final:
        optimizer = 3 * s.trained_tensors  # exp_avg, exp_avg_sq and a float32 step each
        data += 2 * FLOAT_BYTES * s.trained_numel + FLOAT_BYTES * s.trained_tensors
        tensors += optimizer
        pickled += optimizer * OPTIMIZER_KEY_OVERHEAD
    # Records are aligned to 64 bytes: half a block of padding on average.
    return CHECKPOINT_BASE + data + tensors * (RECORD_OVERHEAD + 32) + pickled


def human(n: float) -> str:
    """Bytes in words: '950 B', '95 MB', '1.2 GB' (powers of 1000, as du --si)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n} TB"  # pragma: no cover
