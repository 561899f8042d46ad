"""Typed schemas of the science configs (model/, data/, train/, eval/ groups) and their checks.

Hydra validates keys and types against these dataclasses when a config is composed (an unknown
key or a wrong type fails there); ``check_*`` functions validate values and raise ``ConfigError``
naming the key and what is allowed, before anything is trained or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf

MODEL_KINDS = ("dhm", "resnet", "vae", "zmodel")
DATA_NAMES = ("cifar10", "svhn", "digits")
OOD_NAMES = ("cifar10", "cifar100", "svhn", "digits_ood")


class ConfigError(ValueError):
    """A config value outside what is allowed; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "dhm"  # dhm | resnet | vae | zmodel
    width: int = 64  # channels of the first ResNet stage (64 = ResNet-18)
    latent_dim: int = 256
    vae_split_layer: int = 0  # 0 = image; s >= 1: activations entering classifier stage s
    kl_coeff: float = 0.1  # beta-VAE weight on the KL term
    importance_num: int = 1  # k samples; > 1 trains on the IWAE bound
    obs_sigma: float = 0.1  # std of the Gaussian observation model (target units)
    learn_sigma: bool = False
    alpha: float = 1.0  # weight of the cross-entropy
    beta: float = 1.0  # weight of -ELBO (or -IWAE)
    norm: str = "batch"  # batch | group (GroupNorm: independent of how a batch is split)
    head_dropout: list[float] = field(default_factory=lambda: [0.5, 0.25])
    sync_batchnorm: bool = False  # SyncBatchNorm across GPUs (CPU/gloo refuses it)
    warm_start: str | None = None  # path of a trained `resnet` checkpoint


@dataclass
class DataConfig:
    name: str = "digits"  # cifar10 | svhn | digits
    root: str = "data"
    download: bool = False
    val_size: int | None = None  # None: the dataset's default split
    split_seed: int = 0
    ood_sets: list[str] | None = None  # None: the dataset's defaults


@dataclass
class TrainConfig:
    epochs: int = 150
    batch_size: int = 400  # global batch, split across DDP ranks
    lr: float = 1e-3
    lr_decay: float = 0.1
    lr_decay_every: int = 50  # epochs
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every_steps: int = 500  # 0: only at epoch ends
    keep_checkpoints: int = 2  # step checkpoints kept besides final.pt
    log_every_steps: int = 10
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16
    compile: bool = False
    channels_last: bool = True  # on CUDA only
    # Rendezvous/collective timeout: a lost peer fails the job instead of hanging it for
    # torch's default 30 min, yet long enough for a slow checkpoint write on a shared filesystem.
    dist_timeout_s: int = 600
    progress: bool = True
    debug_nan_at_step: int | None = None  # testing aid: make the loss non-finite at this step


@dataclass
class EvalConfig:
    batch_size: int = 500
    iwae_k: list[int] = field(default_factory=lambda: [10])
    fgsm_eps: list[float] = field(
        default_factory=lambda: [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 8 / 255]
    )
    seed: int = 1234
    shard_size: int = 0  # images per shard; 0 = one shard per set
    ood_sets: list[str] | None = None
    max_images: int | None = None  # cap on every evaluated set (quick looks); None = full sets


@dataclass
class RunSections:
    """The four sections of a run's settings, shared by RunConfig and hpc's LaunchConfig."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RunConfig(RunSections):
    """One training run: what ``dhm.train.train`` receives."""

    run_dir: str = MISSING


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_model(m: Any) -> None:
    """Value checks of a model config (``ModelConfig`` fields)."""
    if m.name not in MODEL_KINDS:
        _fail("model.name", m.name, f"one of {', '.join(MODEL_KINDS)}")
    if m.width < 1:
        _fail("model.width", m.width, "an integer >= 1")
    if m.latent_dim <= 0:
        _fail("model.latent_dim", m.latent_dim, "an integer > 0")
    if m.vae_split_layer not in range(5):
        _fail("model.vae_split_layer", m.vae_split_layer, "0, 1, 2, 3 or 4")
    if m.name in ("vae", "zmodel") and m.vae_split_layer != 0:
        _fail("model.vae_split_layer", m.vae_split_layer, f"0 for model={m.name} (no classifier)")
    if m.norm not in ("batch", "group"):
        _fail("model.norm", m.norm, "batch or group")
    if len(m.head_dropout) != 2 or any(not 0 <= p < 1 for p in m.head_dropout):
        _fail("model.head_dropout", list(m.head_dropout), "two probabilities in [0, 1)")
    if m.importance_num < 1:
        _fail("model.importance_num", m.importance_num, "an integer >= 1 (1 = plain VAE)")
    if m.kl_coeff < 0:
        _fail("model.kl_coeff", m.kl_coeff, "a number >= 0")
    if not m.obs_sigma > 0:
        _fail("model.obs_sigma", m.obs_sigma, "a number > 0")
    if m.alpha < 0:
        _fail("model.alpha", m.alpha, "a number >= 0")
    if m.beta < 0:
        _fail("model.beta", m.beta, "a number >= 0")
    if m.alpha == 0 and m.beta == 0:
        _fail("model.alpha", m.alpha, "alpha and beta cannot both be 0")
    if m.name == "resnet" and m.beta != 0:
        _fail("model.beta", m.beta, "0 for model=resnet (it has no VAE)")
    if m.name == "vae" and m.alpha != 0:
        _fail("model.alpha", m.alpha, "0 for model=vae (it has no classifier)")


def check_run(cfg: Any) -> None:
    """Value checks of a whole run config, before anything is trained or written."""
    check_model(cfg.model)
    if cfg.data.name not in DATA_NAMES:
        _fail("data.name", cfg.data.name, f"one of {', '.join(DATA_NAMES)}")
    for name in cfg.data.ood_sets or []:
        if name not in OOD_NAMES:
            _fail("data.ood_sets", name, f"names from {', '.join(OOD_NAMES)}")
    t = cfg.train
    for key in ("epochs", "batch_size"):
        if t[key] < 1:
            _fail(f"train.{key}", t[key], "an integer >= 1")
    if not t.lr > 0:
        _fail("train.lr", t.lr, "a number > 0")
    if t.lr_decay_every < 1:
        _fail("train.lr_decay_every", t.lr_decay_every, "an integer >= 1 (epochs)")
    for key in ("keep_checkpoints", "log_every_steps"):
        if t[key] < 1:
            _fail(f"train.{key}", t[key], "an integer >= 1")
    if t.checkpoint_every_steps < 0:
        _fail("train.checkpoint_every_steps", t.checkpoint_every_steps, "an integer >= 0")
    if t.device not in ("auto", "cpu", "cuda"):
        _fail("train.device", t.device, "auto, cpu or cuda")
    if t.mixed_precision not in ("auto", "no", "bf16"):
        _fail("train.mixed_precision", t.mixed_precision, "auto, no or bf16")
    e = cfg.eval
    if e.batch_size < 1:
        _fail("eval.batch_size", e.batch_size, "an integer >= 1")
    if e.shard_size < 0:
        _fail("eval.shard_size", e.shard_size, "an integer >= 0 (0 = one shard per set)")
    if not e.iwae_k or any(k < 1 for k in e.iwae_k):
        _fail("eval.iwae_k", list(e.iwae_k), "integers >= 1")
    if any(not 0 <= eps <= 1 for eps in e.fgsm_eps):
        _fail("eval.fgsm_eps", list(e.fgsm_eps), "values in [0, 1] (pixel units)")
    for name in e.ood_sets or []:
        if name not in OOD_NAMES:
            _fail("eval.ood_sets", name, f"names from {', '.join(OOD_NAMES)}")


# Keys that change how a run executes but not the weights it ends with.
OPERATIONAL_TRAIN_KEYS = (
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "device",
    "compile",
    "dist_timeout_s",
    "progress",
    "debug_nan_at_step",
)


class Plain(dict):
    """Plain config data (nested dicts of YAML scalars and lists) read like a DictConfig.

    ``cfg.train.lr`` and ``cfg.train["lr"]`` both work, as for a DictConfig, which is what the
    checks here and the launcher read; building and reading one is ~100x cheaper than a
    DictConfig, which matters for a 1,000-run sweep. Values are whatever the schema made of
    them: build one from ``OmegaConf.to_container`` of a validated config (``Plain.of``).
    """

    __slots__ = ()

    @classmethod
    def of(cls, data: dict[str, Any]) -> Plain:
        return cls({k: cls.of(v) if isinstance(v, dict) else v for k, v in data.items()})

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def plain(self) -> dict[str, Any]:
        """The same data as built-in dicts (what PyYAML's safe dumper can write)."""
        return {k: v.plain() if isinstance(v, Plain) else v for k, v in self.items()}


def training_identity(cfg: Any) -> dict[str, Any]:
    """The settings that determine a run's trained weights (model, data, train), as plain data.

    Two configs with the same identity train the same model; it is what a resumed run must
    match and what a sweep hashes into the run id. Paths (data.root) and operational keys
    (logging, checkpoint cadence, device choice) are left out.
    """
    plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in plain["data"].items() if k not in ("root", "download", "ood_sets")}
    train = {k: v for k, v in plain["train"].items() if k not in OPERATIONAL_TRAIN_KEYS}
    return {"model": plain["model"], "data": data, "train": train}


def run_config(**overrides: Any) -> DictConfig:
    """A structured RunConfig with dotted overrides, e.g. ``run_config(**{"model.width": 8})``."""
    cfg = OmegaConf.structured(RunConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def from_yaml(text: str) -> DictConfig:
    """A stored config (checkpoint, config.yaml) on the current schema: newer keys get defaults."""
    return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))


class _YamlDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """PyYAML's safe dumper (libyaml when present), quoting the strings that OmegaConf's loader
    would read back as something else: ``"1e-3"`` (a float to OmegaConf, not to PyYAML)."""


_YAML_BOOL_WORDS = {"y", "yes", "n", "no", "true", "false", "on", "off"}


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    try:
        float(data)  # also "inf", "nan", "1_000", "1e-3"
        numeric = True
    except ValueError:
        numeric = False
    if numeric or data.lower() in _YAML_BOOL_WORDS:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'")
    return dumper.represent_str(data)


_YamlDumper.add_representer(str, _represent_str)


def to_yaml(cfg: Any) -> str:
    """Resolved YAML text of a config, as stored in checkpoints and HDF5 attributes.

    A ``Plain`` config is dumped with PyYAML's safe dumper (same YAML data; what ``from_yaml``
    reads back is equal), a DictConfig by OmegaConf.
    """
    if isinstance(cfg, Plain):
        return yaml.dump(cfg.plain(), Dumper=_YamlDumper, sort_keys=False)
    return OmegaConf.to_yaml(cfg, resolve=True)
