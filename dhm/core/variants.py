"""Evaluation variants: named sets of eval settings whose shards live side by side.

A variant is the eval settings that change results (``settings_of``: attacks, bounds, sets,
checkpoints, ...; not eval.device); its id hashes them, and its name is the researcher's
(eval.variant) or says how it differs from the sweep's first, ``default``. ``<sweep>/variants.json``
lists a sweep's variants; a sweep from before it has one, ``default``, with the eval settings
of its plan.

A run's shards are stored by *part*, one folder per checkpoint, part and part id:

    runs/<id>/eval/<checkpoint>-<part>-<part id>/<set>__<start>-<stop>.h5

``scores`` (every set: logits, bounds, the report's images) and ``attacks`` (the test set of a
model with a classifier: FGSM and PGD predictions). The part id hashes only the settings that
change that part (``part_id``), so variants that agree on them share the folder: a variant
that changes the attack grid reuses every scores folder, one that adds an OOD set reuses the
sets it had. Nothing is moved or deleted when settings change: a folder's content is named by
its id. Shards of the layout before variants, ``eval/<set>__*.h5`` with both parts in one file,
stay where they are and count for the variant at the final checkpoint whose settings made them
(their ``eval_id`` attribute, ``legacy_eval_id``).

Torch-free; h5py only to read an old-layout shard's eval_id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhm.core.fsutil import atomic_write_text
from dhm.core.layout import SCHEMA_VERSION, eval_sets, names_in, set_complete, shard_spans

DEFAULT = "default"
FINAL = "final"
REGISTRY = "variants.json"
PARTS = ("scores", "attacks")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+\-]{0,59}$")
# The eval settings a variant is: everything that changes a shard or which shards exist.
SETTINGS = ("batch_size", "shard_size", "max_images", "seed", "iwae_k", "fgsm_eps", "pgd_steps",
            "pgd_step_size", "images", "ood_sets", "checkpoints")  # fmt: skip


def checkpoints_of(values: Iterable[Any]) -> list[Any]:
    """eval.checkpoints normalised: epochs (ints, ascending) then ``final``, each once;
    ValueError naming what is not an epoch >= 1 or ``final``."""
    epochs, final = set(), False
    for v in values:
        if str(v) == FINAL:
            final = True
        elif (
            isinstance(v, int | str)
            and not isinstance(v, bool)
            and str(v).isdigit()
            and int(v) >= 1
        ):
            epochs.add(int(v))
        else:
            raise ValueError(f"eval.checkpoints: {v!r} is not an epoch (an integer >= 1) or final")
    if not epochs and not final:
        raise ValueError("eval.checkpoints is empty: give epochs and/or final, e.g. [final]")
    return [*sorted(epochs), *([FINAL] if final else [])]


def settings_of(e: Any) -> dict[str, Any]:
    """A variant's settings (plain data) from an eval config (``dhm.core.config.EvalConfig``)."""
    return {
        "batch_size": int(e.batch_size),
        "shard_size": int(e.shard_size),
        "max_images": None if e.max_images is None else int(e.max_images),
        "seed": int(e.seed),
        "iwae_k": sorted(int(k) for k in e.iwae_k),
        "fgsm_eps": [float(x) for x in e.fgsm_eps],
        "pgd_steps": int(e.pgd_steps),
        "pgd_step_size": None if e.pgd_step_size is None else float(e.pgd_step_size),
        "images": int(e.images),
        "ood_sets": None if e.ood_sets is None else [str(s) for s in e.ood_sets],
        "checkpoints": checkpoints_of(e.get("checkpoints", [FINAL])),
    }


def _hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def variant_id(settings: dict[str, Any]) -> str:
    return _hash({"variant": 1, **{k: settings[k] for k in SETTINGS}})


def legacy_eval_id(s: dict[str, Any]) -> str:
    """The eval_id of a shard written before variants (one id over every setting), for
    settings ``s``: those shards count for the variant with these settings."""
    return _hash({
        "schema": SCHEMA_VERSION, "iwae_k": s["iwae_k"], "fgsm_eps": s["fgsm_eps"],
        "pgd": [s["pgd_steps"], s["pgd_step_size"]], "seed": s["seed"],
        "max_images": s["max_images"], "shard_size": s["shard_size"],
        "batch_size": s["batch_size"], "images": s["images"],
    })  # fmt: skip


def parts_of(role: str, model: str, s: dict[str, Any]) -> tuple[str, ...]:
    """The parts a set has: scores always; attacks on the test set of a model with a
    classifier, when there are epsilons."""
    attacks = role == "id" and model != "vae" and bool(s["fgsm_eps"])
    return ("scores", "attacks") if attacks else ("scores",)


def part_id(s: dict[str, Any], role: str, part: str, model: str) -> str:
    """10 hex chars over the settings that change this part's shards, and nothing else."""
    key: dict[str, Any] = {"schema": SCHEMA_VERSION, "role": role, "part": part}
    key.update({k: s[k] for k in ("batch_size", "shard_size", "max_images")})
    if part == "attacks":  # PGD's random start is seeded by (seed, block)
        key.update({k: s[k] for k in ("fgsm_eps", "pgd_steps", "pgd_step_size", "seed")})
    elif role == "id":  # bounds (with a VAE) and the report's images
        key.update(seed=s["seed"], images=s["images"])
        if model != "resnet":
            key["iwae_k"] = s["iwae_k"]
    elif role == "ood" and model != "resnet":
        key.update(seed=s["seed"], iwae_k=s["iwae_k"])
    return _hash(key)


def checkpoint_label(checkpoint: Any) -> str:
    return FINAL if str(checkpoint) == FINAL else f"epoch{int(checkpoint)}"


def checkpoint_file(checkpoint: Any) -> str:
    """The file under checkpoints/ that a checkpoint of eval.checkpoints names."""
    return "final.pt" if str(checkpoint) == FINAL else f"epoch_{int(checkpoint):04d}.pt"


def unit_label(set_name: str, checkpoint: Any = FINAL, variant: str | None = None) -> str:
    """How the launcher, the ledger and status name one set of a run at one checkpoint under
    one variant: ``digits`` (the default variant, final), ``digits@epoch50``, ``digits/pgd50``."""
    label = set_name if str(checkpoint) == FINAL else f"{set_name}@{checkpoint_label(checkpoint)}"
    return label if variant in (None, DEFAULT) else f"{label}/{variant}"


def part_folder(s: dict[str, Any], checkpoint: Any, role: str, part: str, model: str) -> str:
    return f"{checkpoint_label(checkpoint)}-{part}-{part_id(s, role, part, model)}"


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, Any]

    @property
    def id(self) -> str:
        return variant_id(self.settings)

    def describe(self, base: Variant | None = None) -> str:
        """Its settings, or (given ``base``) how they differ from base's, as key=value text."""
        keys = [k for k in SETTINGS if base is None or self.settings[k] != base.settings[k]]
        return ", ".join(f"{k}={_text(self.settings[k])}" for k in keys) or "same settings"


def _text(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_text(x) for x in v) + "]"
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def auto_name(v: dict[str, Any], default: Variant | None) -> str:
    """A readable name from how the settings differ from the default (its id if too long)."""
    text = Variant("", v).describe(default).replace(", ", ",").replace("[", "").replace("]", "")
    text = re.sub(r"[^A-Za-z0-9_.=,+\-]", "-", text.replace(",", "+"))
    return text if NAME_RE.match(text) and default is not None else f"v-{variant_id(v)}"


def read_registry(sweep_dir: str | Path) -> list[Variant]:
    """The variants of ``<sweep>/variants.json``, oldest first; without one, ``default`` with
    the eval settings of the sweep's plan ([] when there is neither)."""
    sweep_dir = Path(sweep_dir)
    try:
        data = json.loads((sweep_dir / REGISTRY).read_text())
        return [Variant(str(v["name"]), dict(v["settings"])) for v in data["variants"]]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{sweep_dir / REGISTRY}: unreadable ({type(err).__name__}: {err})"
        ) from None
    try:
        plan = json.loads((sweep_dir / "plan.json").read_text())
        e = plan["runs"][0]["config"]["eval"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return []
    return [Variant(DEFAULT, settings_of(_Attrs({"checkpoints": [FINAL], **e})))]


class _Attrs(dict):
    """A plain dict read like a config (``e.batch_size``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def write_registry(sweep_dir: str | Path, variants: list[Variant]) -> Path:
    entries = [
        {
            "name": v.name,
            "id": v.id,
            "settings": v.settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for v in variants
    ]
    try:  # keep the creation times already recorded
        old = {
            e["name"]: e for e in json.loads((Path(sweep_dir) / REGISTRY).read_text())["variants"]
        }
        for e in entries:
            e["created"] = old.get(e["name"], e).get("created", e["created"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return atomic_write_text(
        Path(sweep_dir) / REGISTRY, json.dumps({"format": 1, "variants": entries}, indent=1)
    )


# ---------------------------------------------------------------------------- a run's shards


def eval_listing(
    run_dir: str | Path, top: Iterable[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """{"": shard names in eval/, "<folder>": names in eval/<folder>/} of one run, one listing
    each (``top``: eval/'s names, when already listed)."""
    eval_dir = os.path.join(run_dir, "eval")
    top = names_in(eval_dir) if top is None else list(top)
    out = {"": tuple(n for n in top if n.endswith(".h5"))}
    for name in top:
        if "-" in name and not name.endswith((".h5", ".tmp")):
            out[name] = tuple(names_in(os.path.join(eval_dir, name)))
    return out


@dataclass(frozen=True)
class SetParts:
    """One set of a run at one checkpoint under one variant: where each part is, which are
    complete, and whether the old layout (``legacy``) covers them all."""

    set_name: str
    role: str
    checkpoint: Any
    folders: dict[str, str]  # part -> folder under eval/
    done: frozenset[str]
    legacy: bool = False

    @property
    def todo(self) -> tuple[str, ...]:
        return tuple(p for p in self.folders if p not in self.done)

    @property
    def complete(self) -> bool:
        return not self.todo


def set_parts(
    run_cfg: Any,
    s: dict[str, Any],
    listing: dict[str, tuple[str, ...]],
    legacy_id: Callable[[str], str | None] | None = None,
    size: Callable[[str, str], int | None] | None = None,
) -> list[SetParts]:
    """Every (set, checkpoint) of a run under settings ``s``, with its parts' state.

    ``listing``: ``eval_listing`` of the run. ``legacy_id(path)``: the eval_id of an old-layout
    shard (None: such shards are not looked at). ``size(set, role)``: the set's size when known."""
    cfg = run_cfg
    eval_dir = os.path.join(cfg.run_dir, "eval")
    model = cfg.model.name
    sets = eval_sets(_with_ood(cfg, s))
    out = []
    for checkpoint in s["checkpoints"]:
        for set_name, role in sets:
            expected = size(set_name, role) if size else None
            folders = {
                p: part_folder(s, checkpoint, role, p, model) for p in parts_of(role, model, s)
            }
            done = frozenset(
                p
                for p, folder in folders.items()
                if folder in listing
                and set_complete(
                    os.path.join(eval_dir, folder), set_name, expected, listing[folder]
                )
            )
            legacy = False
            if done != set(folders) and checkpoint == FINAL and legacy_id is not None:
                legacy = _legacy_covers(eval_dir, set_name, expected, listing[""], s, legacy_id)
            out.append(
                SetParts(
                    set_name,
                    role,
                    checkpoint,
                    folders,
                    frozenset(folders) if legacy else done,
                    legacy,
                )
            )
    return out


def _with_ood(cfg: Any, s: dict[str, Any]) -> Any:
    """The run config's (model, data) with the variant's OOD sets, as eval_sets reads them."""
    return _Attrs(model=cfg.model, data=cfg.data, eval=_Attrs(ood_sets=s["ood_sets"]))


def _legacy_covers(eval_dir: str, set_name: str, size: int | None, names: tuple[str, ...],
                   s: dict[str, Any], legacy_id: Callable[[str], str | None]) -> bool:  # fmt: skip
    if not names or not set_complete(eval_dir, set_name, size, names):
        return False
    want = legacy_eval_id(s)
    return all(
        legacy_id(os.path.join(eval_dir, f)) in (want, None)
        for *_, f in shard_spans(eval_dir, set_name, names)
    )


def shard_paths(
    run_dir: str | Path, parts: SetParts, listing: dict[str, tuple[str, ...]]
) -> list[list[Path]]:
    """The shard files of each part of a set (one list per part; one list for the old layout)."""
    eval_dir = Path(run_dir) / "eval"
    if parts.legacy:
        return [[eval_dir / f for *_, f in shard_spans(eval_dir, parts.set_name, listing[""])]]
    return [
        [
            eval_dir / folder / f
            for *_, f in shard_spans(eval_dir / folder, parts.set_name, listing.get(folder, ()))
        ]
        for folder in parts.folders.values()
    ]


def shard_eval_id(path: str) -> str | None:
    from dhm.core.shard_attrs import shard_eval_id as read  # h5py: only for old-layout shards

    return read(path)
