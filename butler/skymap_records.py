"""Register a skymap in a repository: its skymap, tract and patch records and the skyMap dataset.

Tract and patch regions in the registry are their *outer* regions (the tract including its
overlap, the patch including its border), so that "which patches overlap this detector?" finds
every patch whose pixels a detector can touch, as in LSST.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DatasetTypeConflictError
from .skymap import SkyMap

if TYPE_CHECKING:
    from .butler import Butler

__all__ = ["register_skymap", "SKYMAP_DATASET_TYPE"]

#: Name of the dataset holding the skymap definition (LSST's).
SKYMAP_DATASET_TYPE = "skyMap"


def register_skymap(butler: Butler, skymap: SkyMap, *, run: str = "skymaps") -> tuple[int, int]:
    """Insert the records of ``skymap`` and store it as the ``skyMap`` dataset in ``run``.

    Returns
    -------
    n_tracts, n_patches : int

    Raises
    ------
    DatasetTypeConflictError
        If a different skymap with the same name is already registered.
    """
    existing = butler.query_dimension_records("skymap", where="name = :n", bind={"n": skymap.name})
    if existing:
        if existing[0].get("hash") != skymap.config_hash:
            raise DatasetTypeConflictError(
                f"a different skymap named {skymap.name!r} is already registered; choose another name"
            )
        return 0, 0
    tracts = [skymap[tract_id] for tract_id in skymap.tract_ids]
    butler.insert_dimension_records(
        "skymap", [{"name": skymap.name, "hash": skymap.config_hash, "tract_max": max(skymap.tract_ids) + 1}]
    )
    butler.insert_dimension_records(
        "tract", [{"skymap": skymap.name, "id": t.tract_id, "region": t.outer_region()} for t in tracts]
    )
    patch_records = [
        {
            "skymap": skymap.name,
            "tract": t.tract_id,
            "id": p.sequential_index,
            "cell_x": p.index[0],
            "cell_y": p.index[1],
            "region": p.outer_region(),
        }
        for t in tracts
        for p in t.patches()
    ]
    butler.insert_dimension_records("patch", patch_records)
    butler.register_dataset_type(SKYMAP_DATASET_TYPE, ["skymap"], "SkyMap")
    butler.put(skymap, SKYMAP_DATASET_TYPE, {"skymap": skymap.name}, run=run)
    return len(tracts), len(patch_records)
