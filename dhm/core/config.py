"""Typed schemas of the science configs (model/, data/, train/, eval/ groups), their value
checks, and a run's identity.

Hydra validates keys and types against these dataclasses when a config is composed; the
``check_*`` functions beside them validate values and raise ``ConfigError`` naming the key and
what is allowed, before anything is trained or written. ``training_identity`` is what a run id
hashes: only the settings that differ from these defaults (as Dora's signatures do), so a new
field with a neutral default leaves every existing run id where it was. Changing a default's
value changes what existing runs mean: bump ``IDENTITY_VERSION`` then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf

from dhm.core.datasets import DATASETS, OOD_SETS
from dhm.core.variants import NAME_RE as VARIANT_NAME
from dhm.core.variants import checkpoints_of

MODEL_KINDS = ("dhm", "resnet", "vae", "zmodel")
LIKELIHOODS = ("gaussian", "thesis")
SIGMAS = ("global", "channel", "fixed", "optimal")
# 1: every field hashed (until 2026-12); 2: the delta from the defaults; 3: a learned sigma
# trains at train.sigma_lr (2026-12-07). Version 3 applies only to runs whose training it
# changed (``training_identity``): a classifier, a fixed or optimal sigma, the thesis objective
# and train.sigma_lr=null train as before and keep their version-2 ids.
IDENTITY_VERSION = 3


class ConfigError(ValueError):
    """A config value outside what is allowed; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "dhm"  # dhm | resnet | vae | zmodel
    width: int = 64  # channels of the first ResNet stage (64 = ResNet-18)
    latent_dim: int = 256
    vae_split_layer: int = 0  # 0 = image; s >= 1: activations entering classifier stage s
    # s >= 1: whether the VAE's loss also trains the classifier trunk below the split (true),
    # or the VAE sees a stop-gradient copy of the activations (false). The target is always
    # stop-gradient, so the trunk cannot shrink its activations to make reconstruction trivial.
    vae_trunk_grad: bool = True
    # gaussian: N(target; decoder mean, sigma^2) summed over elements, -ELBO in nats.
    # thesis: the thesis' objective, mean squared error per element (of the normalized image)
    # + kl_coeff x the KL averaged over latent dims; not a likelihood (evaluation fits sigma).
    likelihood: str = "gaussian"
    # global | channel: learned (at train.sigma_lr); fixed: obs_sigma; optimal: each batch's
    # closed-form optimum, the RMS reconstruction error (the sigma-VAE, Rybkin et al. 2021).
    sigma: str = "global"
    obs_sigma: float = 0.1  # the fixed sigma, or a learned sigma's initial value (target units)
    kl_coeff: float = 0.1  # beta-VAE weight on the KL term
    importance_num: int = 1  # k samples; > 1 trains on the IWAE bound
    alpha: float = 1.0  # weight of the cross-entropy
    beta: float = 1.0  # weight of the VAE objective
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
    # Adam's learning rate for a learned decoder log sigma (model.sigma global | channel). Adam
    # moves a parameter by about lr per step, so at train.lr (1e-3) log sigma cannot reach its
    # optimum in a short run. null: train.lr, the behaviour before 2026-12-07.
    sigma_lr: float | None = 0.05
    seed: int = 0
    checkpoint_every_steps: int = 500  # 0: only at epoch ends
    keep_checkpoints: int = 2  # step checkpoints kept besides final.pt while training
    # Keep those step checkpoints once final.pt is written (false: a trained run keeps final.pt
    # only; retention, not identity: not part of the run id).
    keep_step_checkpoints: bool = False
    # Epochs whose weights are kept as checkpoints/epoch_<NNNN>.pt, for eval.checkpoints
    # (retention, not identity: not part of the run id).
    keep_epochs: list[int] = field(default_factory=list)
    log_every_steps: int = 10
    val_every_epochs: int = 1  # validation accuracy, NLL, -ELBO every N epochs (0: never)
    val_max_images: int | None = 10000  # cap on validation images per pass (None: all)
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
    batch_size: int = 500  # images per evaluation block; shards are unions of whole blocks
    iwae_k: list[int] = field(default_factory=lambda: [10])
    fgsm_eps: list[float] = field(
        default_factory=lambda: [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 8 / 255]
    )
    pgd_steps: int = 10  # PGD (L-inf, random start) over the fgsm_eps grid; 0: no PGD
    pgd_step_size: float | None = None  # pixel units; None: 2.5 * eps / pgd_steps (Madry et al.)
    seed: int = 1234
    shard_size: int = 0  # images per shard, a multiple of batch_size; 0 = one shard per set
    ood_sets: list[str] | None = None
    max_images: int | None = None  # cap on every evaluated set (quick looks); None = full sets
    images: int = 16  # test images kept with their reconstructions and prior samples (report)
    # auto (CUDA if there is one) | cpu | cuda. An eval task given GPUs by Slurm that finds
    # none fails unless this says cpu (hpc.stages.require_cuda). Not part of a variant.
    device: str = "auto"
    # The checkpoints evaluated: final and/or epochs the runs kept (train.keep_epochs).
    checkpoints: list[Any] = field(default_factory=lambda: ["final"])
    # This evaluation's name among the sweep's variants (dhm.core.variants); null: the variant
    # with these settings, or a new one named after how they differ from the default.
    variant: str | None = None


@dataclass
class RunSections:
    """The four sections of a run's settings, shared by RunConfig and hpc's LaunchConfig."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RunConfig(RunSections):
    """One training run: what ``dhm.training.train.train`` receives."""

    run_dir: str = MISSING


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _at_least(section: str, m: Any, keys: tuple[str, ...], low: int) -> None:
    for key in keys:
        if m[key] < low:
            _fail(f"{section}.{key}", m[key], f"an integer >= {low}")


def check_model(m: Any) -> None:
    """Value checks of a model config (``ModelConfig`` fields)."""
    if m.name not in MODEL_KINDS:
        _fail("model.name", m.name, f"one of {', '.join(MODEL_KINDS)}")
    _at_least("model", m, ("width", "latent_dim", "importance_num"), 1)
    if m.vae_split_layer not in range(5):
        _fail("model.vae_split_layer", m.vae_split_layer, "0, 1, 2, 3 or 4")
    if m.name in ("vae", "zmodel") and m.vae_split_layer != 0:
        _fail("model.vae_split_layer", m.vae_split_layer, f"0 for model={m.name} (no classifier)")
    if m.likelihood not in LIKELIHOODS:
        _fail("model.likelihood", m.likelihood, " or ".join(LIKELIHOODS))
    if m.sigma not in SIGMAS:
        _fail("model.sigma", m.sigma, ", ".join(SIGMAS))
    if m.likelihood == "thesis" and m.importance_num > 1:
        why = "1 with model.likelihood=thesis (an IWAE bound needs a likelihood: gaussian)"
        _fail("model.importance_num", m.importance_num, why)
    if m.norm not in ("batch", "group"):
        _fail("model.norm", m.norm, "batch or group")
    if len(m.head_dropout) != 2 or any(not 0 <= p < 1 for p in m.head_dropout):
        _fail("model.head_dropout", list(m.head_dropout), "two probabilities in [0, 1)")
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
    for check, _ in RUN_CHECKS:
        check(cfg)


def check_data(cfg: Any) -> None:
    """Value checks of a run's data settings (and the OOD sets its eval settings name)."""
    if cfg.data.name not in DATASETS:
        _fail("data.name", cfg.data.name, f"one of {', '.join(DATASETS)}")
    for key in ("data.ood_sets", "eval.ood_sets"):
        section, leaf = key.split(".")
        for name in cfg[section][leaf] or []:
            if name not in OOD_SETS:
                _fail(key, name, f"names from {', '.join(OOD_SETS)}")
    if cfg.data.val_size is not None and cfg.data.val_size < 0:
        _fail("data.val_size", cfg.data.val_size, "an integer >= 0 or null (the default split)")


def check_train(t: Any) -> None:
    """Value checks of a train config (``TrainConfig`` fields)."""
    _at_least("train", t, ("epochs", "batch_size", "lr_decay_every", "keep_checkpoints"), 1)
    _at_least("train", t, ("log_every_steps", "dist_timeout_s"), 1)
    _at_least("train", t, ("checkpoint_every_steps", "val_every_epochs"), 0)
    if not t.lr > 0:
        _fail("train.lr", t.lr, "a number > 0")
    if t.sigma_lr is not None and not t.sigma_lr > 0:
        _fail("train.sigma_lr", t.sigma_lr, "a number > 0, or null (train.lr)")
    if not 0 < t.lr_decay <= 1:
        _fail("train.lr_decay", t.lr_decay, "a factor in (0, 1]")
    if t.weight_decay < 0:
        _fail("train.weight_decay", t.weight_decay, "a number >= 0")
    if t.val_max_images is not None and t.val_max_images < 1:
        _fail("train.val_max_images", t.val_max_images, "an integer >= 1 or null (all)")
    if t.device not in ("auto", "cpu", "cuda"):
        _fail("train.device", t.device, "auto, cpu or cuda")
    if t.mixed_precision not in ("auto", "no", "bf16"):
        _fail("train.mixed_precision", t.mixed_precision, "auto, no or bf16")
    if any(not 1 <= int(e) <= t.epochs for e in t.keep_epochs):
        _fail("train.keep_epochs", list(t.keep_epochs), f"epochs in [1, train.epochs={t.epochs}]")


def check_checkpoints(cfg: Any) -> None:
    """Every epoch eval.checkpoints names is one the run keeps (train.keep_epochs)."""
    kept = {int(e) for e in cfg.train.keep_epochs}
    for c in checkpoints_of(cfg.eval.checkpoints):
        if c != "final" and c not in kept:
            _fail(
                "eval.checkpoints",
                list(cfg.eval.checkpoints),
                f"final or epochs the runs keep: epoch {c} is not in train.keep_epochs="
                f"{sorted(kept)} (only those epochs' weights are kept)",
            )


def check_eval(e: Any) -> None:
    """Value checks of an eval config (``EvalConfig`` fields)."""
    _at_least("eval", e, ("batch_size",), 1)
    _at_least("eval", e, ("shard_size", "pgd_steps", "images"), 0)
    if e.shard_size % e.batch_size:
        _fail(
            "eval.shard_size",
            e.shard_size,
            f"0 or a multiple of eval.batch_size={e.batch_size} (a shard is a union of whole "
            "evaluation blocks, so no image shares a batch with other neighbours)",
        )
    if not e.iwae_k or any(k < 1 for k in e.iwae_k):
        _fail("eval.iwae_k", list(e.iwae_k), "a non-empty list of integers >= 1")
    if any(not 0 <= eps <= 1 for eps in e.fgsm_eps):
        _fail("eval.fgsm_eps", list(e.fgsm_eps), "values in [0, 1] (pixel units)")
    if e.pgd_step_size is not None and not 0 < e.pgd_step_size <= 1:
        _fail("eval.pgd_step_size", e.pgd_step_size, "a step in (0, 1] pixel units, or null")
    if e.device not in ("auto", "cpu", "cuda"):
        _fail("eval.device", e.device, "auto, cpu or cuda")
    if e.max_images is not None and e.max_images < 1:
        _fail("eval.max_images", e.max_images, "an integer >= 1 or null (full sets)")
    try:
        checkpoints_of(e.checkpoints)
    except ValueError as err:
        raise ConfigError(f"{err}; e.g. eval.checkpoints=[50,final]") from None
    if e.variant is not None and not VARIANT_NAME.match(str(e.variant)):
        _fail("eval.variant", e.variant, "a name of letters, digits and _ . = , + - (60 at most)")


# check_run's parts, each with the sections it reads: a sweep point that changes none of them
# leaves that part's verdict as it was (hpc.sweep.expand judges each distinct part once).
RUN_CHECKS: tuple[tuple[Callable[[Any], None], tuple[str, ...]], ...] = (
    (lambda cfg: check_model(cfg.model), ("model",)),
    (check_data, ("data", "eval")),
    (lambda cfg: check_train(cfg.train), ("train",)),
    (lambda cfg: check_eval(cfg.eval), ("eval",)),
    (check_checkpoints, ("train", "eval")),
)


# Keys that change how a run executes but not the weights it ends with.
OPERATIONAL_TRAIN_KEYS = (
    "checkpoint_every_steps",
    "keep_checkpoints",
    "keep_step_checkpoints",
    "keep_epochs",
    "log_every_steps",
    "val_every_epochs",
    "val_max_images",
    "device",
    "compile",
    "channels_last",
    "dist_timeout_s",
    "progress",
    "debug_nan_at_step",
)
OPERATIONAL_DATA_KEYS = ("root", "download", "ood_sets")


def check_known_keys(cfg: Any, schema: type, where: str = "") -> None:
    """ConfigError naming the first key of ``cfg`` that ``schema`` (a dataclass) lacks.

    Hydra refuses an unknown key only without a ``+``; ``+model.no_such_key=1`` (the fix its
    own error message suggests) would otherwise enter the config, change the run id and train
    nothing differently. Fields typed as dicts (``sweep.axes``) are open.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg:
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(
                f"{where}{key} is not a config key: {where or 'the config'} has {allowed}"
            )
        sub = _dataclass_of(fields[key])
        if sub is not None and isinstance(cfg[key], dict | DictConfig):
            check_known_keys(cfg[key], sub, f"{where}{key}.")


def _dataclass_of(f: dataclasses.Field) -> type | None:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return type(value) if dataclasses.is_dataclass(value) else None
    return None


class Plain(dict):
    """Plain config data (nested dicts of YAML scalars and lists) read like a DictConfig.

    ``cfg.train.lr`` and ``cfg.train["lr"]`` both work, as for a DictConfig, which is what the
    checks here and the launcher read; building and reading one is far cheaper than a
    DictConfig, which matters for a 1,000-run sweep. Values are whatever the schema made of
    them: build one from ``OmegaConf.to_container`` of a validated config (``Plain.of``).
    """

    __slots__ = ()

    @classmethod
    def of(cls, data: dict[str, Any]) -> Plain:
        """A new Plain holding a copy of ``data``: its dicts and lists are copied (a Plain is
        never a view of data that someone else may change), scalars shared."""
        return _plain_copy(data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def plain(self) -> dict[str, Any]:
        """The same data as built-in dicts (what PyYAML's safe dumper can write)."""
        return {k: v.plain() if isinstance(v, Plain) else v for k, v in self.items()}


SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})  # YAML's scalars


def _plain_copy(value: Any) -> Any:
    """A copy of YAML data for a Plain: its dicts become Plain, lists are copied."""
    if isinstance(value, dict):
        return Plain(
            {k: v if type(v) in SCALAR_TYPES else _plain_copy(v) for k, v in value.items()}
        )
    if isinstance(value, list):
        return [v if type(v) in SCALAR_TYPES else copy_data(v) for v in value]
    return value


def copy_data(value: Any) -> Any:
    """``copy.deepcopy`` of YAML data (dicts, lists, scalars), several times faster."""
    if type(value) in SCALAR_TYPES:
        return value
    if isinstance(value, dict):
        return {k: copy_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_data(v) for v in value]
    return value


# RunConfig's defaults as plain data (read only): what identities and key checks compare with.
RUN_DEFAULTS = dataclasses.asdict(RunConfig())


def _delta(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        default = defaults.get(key, _ABSENT)
        if isinstance(value, dict) and isinstance(default, dict):
            sub = _delta(value, default)
            if sub:
                out[key] = sub
        elif value != default or type(value) is not type(default):
            out[key] = value
    return out


_ABSENT = object()


def training_identity(cfg: Any, *, full: bool = False) -> dict[str, Any]:
    """The settings that determine a run's trained weights, as plain data: model, data and
    train without paths (data.root) and operational keys (logging, checkpoint cadence,
    validation, device choice).

    By default only what differs from the schema's defaults (what a run id hashes); ``full``
    keeps every such field (what a resumed run must match key for key).
    """
    plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in plain["data"].items() if k not in OPERATIONAL_DATA_KEYS}
    train = {k: v for k, v in plain["train"].items() if k not in OPERATIONAL_TRAIN_KEYS}
    if not learns_sigma(plain["model"]) or train.get("sigma_lr") is None:
        # No learned sigma (its rate trains nothing), or null: trained as version 2 did.
        train.pop("sigma_lr", None)
    ident = {"model": dict(plain["model"]), "data": data, "train": train}
    if full:
        return ident
    defaults = {k: RUN_DEFAULTS[k] for k in ident}
    version = IDENTITY_VERSION if "sigma_lr" in train else 2
    return {"identity": version, **_delta(ident, defaults)}


def learns_sigma(model: Any) -> bool:
    """Whether a run trains its decoder sigma by gradient: model.sigma global | channel, with
    the Gaussian likelihood, a VAE and a VAE loss (beta != 0) to train it."""
    return (
        model["name"] != "resnet"
        and model["likelihood"] == "gaussian"
        and model["sigma"] in ("global", "channel")
        and model["beta"] != 0
    )


def run_config(**overrides: Any) -> DictConfig:
    """A structured RunConfig with dotted overrides, e.g. ``run_config(**{"model.width": 8})``."""
    cfg = OmegaConf.structured(RunConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def from_yaml(text: str) -> DictConfig:
    """A stored config (checkpoint, config.yaml) on the current schema: newer keys get defaults.

    Configs written before ``model.sigma`` existed had ``model.learn_sigma``; they are read as
    ``sigma: global`` (learned) or ``fixed``, what they trained with. Configs written before
    ``train.sigma_lr`` existed read it as null (sigma trained at train.lr), what they did.
    """
    data = OmegaConf.create(text)
    model = data.get("model") if isinstance(data, DictConfig) else None
    if isinstance(model, DictConfig) and "learn_sigma" in model:
        learned = model.pop("learn_sigma")
        if "sigma" not in model:
            model.sigma = "global" if learned else "fixed"
    train = data.get("train") if isinstance(data, DictConfig) else None
    if isinstance(train, DictConfig) and "sigma_lr" not in train:
        train.sigma_lr = None  # written before train.sigma_lr: sigma trained at train.lr
    return OmegaConf.merge(OmegaConf.structured(RunConfig), data)


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
