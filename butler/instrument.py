"""Instrument definitions: the records ``butler register-instrument`` inserts.

An instrument is data: a name, its detectors and its physical filters (each mapped to a band).
It comes from a YAML file or from a Python class (named by its dotted path) with a
``to_config()`` method, so that instrument packages plug in without the butler importing them.

YAML form::

    name: SimCam
    detectors: [{id: 0, full_name: S00}, {id: 1, full_name: S01}]
    physical_filters: [{name: r_sim, band: r}]
    visit_max: 100000
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import DataIdError

if TYPE_CHECKING:
    from .butler import Butler

__all__ = ["load_instrument_config", "register_instrument"]


def load_instrument_config(spec: str) -> dict[str, Any]:
    """Instrument config from a YAML path or a dotted Python class name.

    Raises
    ------
    DataIdError
        If the spec is neither, or the config lacks required keys.
    """
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DataIdError(f"instrument file {spec} does not exist")
        with open(path, encoding="utf-8") as stream:
            config = yaml.safe_load(stream)
        source = str(path)
    else:
        module_name, _, class_name = spec.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            raise DataIdError(
                f"cannot load instrument {spec!r}: give a YAML file or a dotted class name such as "
                "tasks.simcam.SimCam"
            ) from None
        config = cls().to_config() if isinstance(cls, type) else cls.to_config()
        source = spec
    return _validate(config, source)


def _validate(config: Any, source: str) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise DataIdError(f"{source}: an instrument definition must be a mapping")
    missing = [k for k in ("name", "detectors", "physical_filters") if k not in config]
    if missing:
        raise DataIdError(f"{source}: instrument definition lacks {missing}")
    for i, det in enumerate(config["detectors"]):
        if not isinstance(det, Mapping) or "id" not in det:
            raise DataIdError(f"{source}: detectors[{i}] needs an 'id'")
    for i, flt in enumerate(config["physical_filters"]):
        if not isinstance(flt, Mapping) or "name" not in flt or "band" not in flt:
            raise DataIdError(f"{source}: physical_filters[{i}] needs 'name' and 'band'")
    return dict(config)


def register_instrument(butler: Butler, config: Mapping[str, Any], *, class_name: str | None = None) -> str:
    """Insert the instrument, band, physical_filter and detector records (existing ones are kept)."""
    name = config["name"]
    dets = list(config["detectors"])
    butler.insert_dimension_records(
        "instrument",
        [
            {
                "name": name,
                "class_name": class_name,
                "detector_max": int(config.get("detector_max", max(int(d["id"]) for d in dets) + 1)),
                "visit_max": int(config.get("visit_max", 10**8)),
            }
        ],
        skip_existing=True,
    )
    bands = sorted({f["band"] for f in config["physical_filters"]})
    butler.insert_dimension_records("band", [{"name": b} for b in bands], skip_existing=True)
    butler.insert_dimension_records(
        "physical_filter",
        [{"instrument": name, "name": f["name"], "band": f["band"]} for f in config["physical_filters"]],
        skip_existing=True,
    )
    butler.insert_dimension_records(
        "detector",
        [{"instrument": name, **{k: v for k, v in d.items() if k in ("id", "full_name", "purpose")}} for d in dets],
        skip_existing=True,
    )
    return name
