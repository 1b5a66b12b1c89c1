"""AssociateDiaSourcesTask (label ``associateDiaSources``): DIA sources of many visits -> DIA objects.

After LSST's ``DrpAssociationPipeTask``: one quantum per (skymap, tract, patch) reads the
``goodSeeingDiff_diaSrc`` catalogs of every visit-detector whose region overlaps the patch (the
graph's spatial join) and groups their sources into DIA objects.

Which sources
-------------
Every source ``detectAndMeasure`` reported is associated -- positive, negative and dipoles -- as
LSST's association does: artifacts (saturated, bad, no-data and edge centres) were already removed
by ``detectAndMeasure``; a variable star fainter than in the template is a *negative* source and
belongs to the same object as its positive epochs; a dipole is usually a mis-subtracted star or a
moving source whose classification is left to later steps.  The object table counts them
(``nNegativeDiaSources``, ``nDipoleDiaSources``) so that users can select.  ``excludeFlags`` names
diaSrc flag columns whose sources are left out (none by default).

How
---
1. Sources outside the patch's *outer* box (tract pixels) are dropped: the patch sees every source
   of any object whose position falls in its inner box, as long as an object is smaller than the
   patch border.
2. Friends-of-friends: two sources closer than ``matchRadius`` arcsec are linked (chord distance
   of unit vectors, ``scipy.spatial.cKDTree``); each connected group is one DIA object.  The result
   does not depend on the order of visits or detectors.
3. An object's position is the mean of its sources' positions (unit vectors) weighted by their
   inverse centroid variance (``xErr``, ``yErr``); dipoles count only in objects made of dipoles
   alone, their position being the midpoint of two lobes.  Only objects whose position is in the
   patch's *inner* box (and, with several tracts, in the tract's inner region) are kept, so each
   object belongs to exactly one patch.
4. Ids: ``diaObjectId = (tract * 10_000 + patch) * 10_000_000 + k``, ``k = 1, 2, ...`` in the order of
   the objects' smallest source id (unique across patches and tracts of a skymap).

Outputs
-------
``diaObject`` [skymap, tract, patch] (:data:`~.schemas.DIA_OBJECT_COLUMNS`: ``diaObjectId``,
``coord_ra``, ``coord_dec`` (deg), ``nDiaSources``, ``nNegativeDiaSources``, ``nDipoleDiaSources``,
``nVisits``, ``firstDiaSourceMjd``, ``lastDiaSourceMjd`` (MJD TAI)) and
``goodSeeingDiff_assocDiaSrc`` [skymap, tract, patch]: the member sources (all diaSrc columns plus
``diaObjectId``, ``visit``, ``detector``, ``midpointMjdTai``), the DIA-source half of the light
curves.

The epoch of each visit-detector is the diaSrc catalog's ``midpointMjdTai``; for catalogs written
without it, the ``visit_info.mjd`` of the difference image (one pixel of it is read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy.table import Table, vstack
from numpy.typing import NDArray
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from butler.exposure import VisitInfo
from butler.geometry import Box
from butler.skymap import SkyMap
from pipeline.config import Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import timeMethod

from .errors import ForcedPhotometryError, format_data_id
from .schemas import ASSOCIATION_COLUMNS, DIA_OBJECT_COLUMNS, make_table

__all__ = [
    "AssociateDiaSourcesConnections",
    "AssociateDiaSourcesConfig",
    "AssociateDiaSourcesTask",
    "add_visit_columns",
    "friends_of_friends",
    "unit_vectors",
]

PATCH_DIMENSIONS = ("skymap", "tract", "patch")
VISIT_DETECTOR = ("instrument", "visit", "detector")

#: The diaSrc columns association reads.
DIA_SOURCE_COLUMNS = ("id", "coord_ra", "coord_dec", "xErr", "yErr", "isNegative", "isDipole")

#: ``diaObjectId = id_base(tract, patch) + k``: room for 10^7 objects per patch.
OBJECTS_PER_PATCH = 10_000_000


class AssociateDiaSourcesConnections(
    PipelineTaskConnections, dimensions=PATCH_DIMENSIONS, defaultTemplates={"diffName": "goodSeeing"}
):
    diaSourceTables = Input(  # noqa: N815
        name="{diffName}Diff_diaSrc", storageClass="SourceCatalog", dimensions=VISIT_DETECTOR, multiple=True,
        doc="DIA sources of the visit-detectors overlapping the patch (spatial join)",
    )
    exposures = Input(
        name="{diffName}Diff_differenceExp", storageClass="Exposure", dimensions=VISIT_DETECTOR, multiple=True,
        deferLoad=True, doc="The difference images of those visit-detectors (only their epoch is read)",
    )
    skyMap = Input(  # noqa: N815
        name="skyMap", storageClass="SkyMap", dimensions=("skymap",), doc="The skymap defining the patch"
    )
    diaObjects = Output(  # noqa: N815
        name="diaObject", storageClass="ArrowAstropy", dimensions=PATCH_DIMENSIONS,
        doc="DIA objects whose position is in the patch's inner region",
    )
    assocDiaSources = Output(  # noqa: N815
        name="{diffName}Diff_assocDiaSrc", storageClass="SourceCatalog", dimensions=PATCH_DIMENSIONS,
        doc="The DIA sources of those objects, with diaObjectId, visit, detector and midpointMjdTai",
    )


class AssociateDiaSourcesConfig(PipelineTaskConfig, pipelineConnections=AssociateDiaSourcesConnections):
    """Configuration of :class:`AssociateDiaSourcesTask`."""

    matchRadius: float = Field(
        1.0, description="Friends-of-friends linking length, arcsec (sources closer than this share an object)"
    )
    excludeFlags: list[str] = Field(
        default_factory=list,
        description="diaSrc boolean columns whose sources are not associated (e.g. ['isDipole']); none by default",
    )

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.matchRadius) and self.matchRadius > 0):
            raise ValueError(f"matchRadius must be a positive number of arcsec, got {self.matchRadius}")


def unit_vectors(ra_deg: NDArray[np.float64], dec_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unit vectors ``(n, 3)`` of sky positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cos_dec = np.cos(dec)
    return np.column_stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)])


def friends_of_friends(xyz: NDArray[np.float64], radius_arcsec: float) -> NDArray[np.int64]:
    """Friends-of-friends group label (``0 .. n_groups - 1``) of each point (unit vectors), linking length in arcsec."""
    n = len(xyz)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(xyz).query_pairs(chord, output_type="ndarray")
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = csgraph.connected_components(graph, directed=False)
    return labels.astype(np.int64)


def add_visit_columns(catalog: Table, visit: int, detector: int, mjd: float) -> Table:
    """A copy of a diaSrc catalog with ``visit``, ``detector`` and ``midpointMjdTai`` columns."""
    out = catalog.copy(copy_data=True)
    n = len(out)
    for name, value in (("visit", visit), ("detector", detector), ("midpointMjdTai", mjd)):
        spec = ASSOCIATION_COLUMNS[name]
        out[name] = np.full(n, value, dtype=spec.dtype)
        if spec.unit:
            out[name].unit = spec.unit
        out[name].description = spec.description
    return out


def _catalog_epoch(catalog: Table) -> float | None:
    """The ``midpointMjdTai`` a diaSrc catalog carries (one finite value), else None."""
    if "midpointMjdTai" not in catalog.colnames:
        return None
    mjd = np.unique(np.asarray(catalog["midpointMjdTai"], dtype=float))
    return float(mjd[0]) if mjd.size == 1 and math.isfinite(mjd[0]) else None


def _visit_info(handle: Any, catalog: Table) -> VisitInfo | None:
    """The ``visit_info`` of a difference image, read with one pixel of it (at the catalog's most
    central source, which lies on the image); the whole image when that pixel is not on it."""
    x = np.asarray(catalog["x"], dtype=float)
    y = np.asarray(catalog["y"], dtype=float)
    k = int(np.argmin(np.abs(x - np.median(x)) + np.abs(y - np.median(y))))
    pixel = Box(int(math.floor(x[k] + 0.5)), int(math.floor(y[k] + 0.5)), 1, 1)
    try:
        return handle.get(parameters={"bbox": pixel}).visit_info
    except ValueError:  # a centroid half a pixel outside the image: read it all
        return handle.get().visit_info


class AssociateDiaSourcesTask(PipelineTask):
    """Group the DIA sources overlapping a patch into DIA objects (see the module docstring)."""

    ConfigClass = AssociateDiaSourcesConfig
    _DefaultName = "associateDiaSources"

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        data_id = butlerQC.dataId
        handles = {
            (int(ref.data_id["visit"]), int(ref.data_id["detector"])): ref for ref in inputRefs.exposures
        }
        tables = []
        for ref in inputRefs.diaSourceTables:
            key = (int(ref.data_id["visit"]), int(ref.data_id["detector"]))
            catalog = butlerQC.get(ref)
            if len(catalog) == 0:
                continue
            mjd = _catalog_epoch(catalog)
            if mjd is not None:
                tables.append(add_visit_columns(catalog, key[0], key[1], mjd))
                continue
            exposure_ref = handles.get(key)
            if exposure_ref is None:
                raise ForcedPhotometryError(
                    f"no difference image for the diaSrc of visit {key[0]} detector {key[1]}: its epoch is unknown "
                    f"[data ID {format_data_id(data_id)}]"
                )
            visit_info = _visit_info(butlerQC.get_deferred(exposure_ref), catalog)
            if visit_info is None or not math.isfinite(visit_info.mjd):
                raise ForcedPhotometryError(
                    f"the difference image of visit {key[0]} detector {key[1]} has no epoch (visit_info.mjd) "
                    f"[data ID {format_data_id(data_id)}]"
                )
            tables.append(add_visit_columns(catalog, key[0], key[1], float(visit_info.mjd)))
        outputs = self.run(tables, butlerQC.get(inputRefs.skyMap), int(data_id["tract"]), int(data_id["patch"]))
        butlerQC.put(outputs, outputRefs)

    @timeMethod
    def run(
        self,
        diaSourceTables: Sequence[Table],  # noqa: N803
        skyMap: SkyMap,  # noqa: N803
        tract: int,
        patch: int,
    ) -> Struct:
        """Associate the DIA sources into the patch's DIA objects.

        Parameters
        ----------
        diaSourceTables : sequence of astropy.table.Table
            diaSrc catalogs with ``visit``, ``detector`` and ``midpointMjdTai`` columns
            (:func:`add_visit_columns`).
        skyMap : SkyMap
        tract, patch : int

        Returns
        -------
        Struct
            ``diaObjects`` (:data:`~.schemas.DIA_OBJECT_COLUMNS`) and ``assocDiaSources``.

        Raises
        ------
        NoWorkFound
            If no DIA source falls in the patch.
        ValueError
            If a catalog lacks the visit columns or an ``excludeFlags`` column.
        """
        tract_info = skyMap[tract]
        patch_info = tract_info.get_patch_info(patch)
        sources = self._select(diaSourceTables, tract_info.wcs, patch_info.outer_bbox)
        if len(sources) == 0:
            raise NoWorkFound(f"no DIA source falls in tract {tract} patch {patch}")
        xyz = unit_vectors(sources["coord_ra"], sources["coord_dec"])
        with self.timer("friendsOfFriends"):
            labels = friends_of_friends(xyz, self.config.matchRadius)
        n_groups = int(labels.max()) + 1
        ra, dec = self._positions(sources, xyz, labels, n_groups)
        inner = self._in_inner_region(ra, dec, skyMap, tract, patch_info.inner_bbox)
        # Objects numbered by their smallest source id.
        ids = np.asarray(sources["id"], dtype=np.int64)
        first_id = np.full(n_groups, np.iinfo(np.int64).max)
        np.minimum.at(first_id, labels, ids)
        kept = np.flatnonzero(inner)
        kept = kept[np.argsort(first_id[kept], kind="stable")]
        object_id = np.full(n_groups, -1, dtype=np.int64)
        id_base = (int(tract) * 10_000 + int(patch)) * OBJECTS_PER_PATCH
        object_id[kept] = id_base + 1 + np.arange(kept.size, dtype=np.int64)

        dia_objects = self._object_table(sources, labels, kept, object_id, ra, dec)
        members = object_id[labels] >= 0
        assoc = sources[members]
        assoc["diaObjectId"] = object_id[labels][members]
        assoc["diaObjectId"].description = ASSOCIATION_COLUMNS["diaObjectId"].description
        if len(assoc):
            order = np.lexsort((np.asarray(assoc["id"]), np.asarray(assoc["midpointMjdTai"]), np.asarray(assoc["diaObjectId"])))
            assoc = assoc[order]
        meta = {"tract": int(tract), "patch": int(patch), "matchRadius": float(self.config.matchRadius)}
        dia_objects.meta.update(meta)
        assoc.meta = {**meta, "fluxUnit": "nJy"}
        self.metadata.update({
            "nDiaSources": len(sources), "nGroups": n_groups, "nDiaObjects": len(dia_objects), "nAssociated": len(assoc),
        })
        self.log.info(
            "tract %d patch %d: %d DIA sources in the patch -> %d groups, %d DIA objects in the inner region",
            tract, patch, len(sources), n_groups, len(dia_objects),
        )
        return Struct(diaObjects=dia_objects, assocDiaSources=assoc)

    @staticmethod
    def _positions(
        sources: Table, xyz: NDArray[np.float64], labels: NDArray[np.int64], n_groups: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Object positions (degrees): inverse-variance weighted means of the member positions.

        Dipoles count only in objects made of dipoles alone: a dipole's position is the midpoint
        of its two lobes (no dipole model is fit), not a measurement of the object's position.
        """
        err2 = np.asarray(sources["xErr"], float) ** 2 + np.asarray(sources["yErr"], float) ** 2
        weight = np.where(np.isfinite(err2) & (err2 > 0), 1.0 / np.where(err2 > 0, err2, 1.0), 1.0)
        dipole = np.asarray(sources["isDipole"], dtype=bool)
        has_other = np.bincount(labels, weights=~dipole, minlength=n_groups) > 0
        weight = np.where(dipole & has_other[labels], 0.0, weight)
        mean = np.zeros((n_groups, 3))
        np.add.at(mean, labels, xyz * weight[:, None])
        mean /= np.linalg.norm(mean, axis=1)[:, None]
        ra = np.degrees(np.arctan2(mean[:, 1], mean[:, 0])) % 360.0
        dec = np.degrees(np.arcsin(np.clip(mean[:, 2], -1.0, 1.0)))
        return ra, dec

    def _select(self, tables: Sequence[Table], tract_wcs: Any, outer: Box) -> Table:
        """The sources to associate: not excluded, inside the patch's outer box."""
        kept = []
        for table in tables:
            needed = (*DIA_SOURCE_COLUMNS, *ASSOCIATION_COLUMNS, *self.config.excludeFlags)
            missing = [c for c in dict.fromkeys(needed) if c != "diaObjectId" and c not in table.colnames]
            if missing:
                raise ValueError(
                    f"a diaSrc catalog lacks the column(s) {missing} (add visit columns with add_visit_columns; "
                    f"excludeFlags must name diaSrc columns); columns: {table.colnames}"
                )
            if len(table) == 0:
                continue
            keep = np.ones(len(table), dtype=bool)
            for flag in self.config.excludeFlags:
                keep &= ~np.asarray(table[flag], dtype=bool)
            ra, dec = np.asarray(table["coord_ra"], float), np.asarray(table["coord_dec"], float)
            x, y = tract_wcs.all_world2pix(ra, dec, 0)
            keep &= (x >= outer.x0 - 0.5) & (x < outer.x0 + outer.width - 0.5)
            keep &= (y >= outer.y0 - 0.5) & (y < outer.y0 + outer.height - 0.5)
            if keep.any():
                kept.append(table[keep])
        if not kept:
            return Table()
        sources = vstack(kept, join_type="exact", metadata_conflicts="silent")
        # Sorted by id: the objects, their positions (sums) and ids do not depend on the input order.
        return sources[np.argsort(np.asarray(sources["id"]), kind="stable")]

    @staticmethod
    def _in_inner_region(
        ra: NDArray[np.float64], dec: NDArray[np.float64], skyMap: SkyMap, tract: int, inner: Box  # noqa: N803
    ) -> NDArray[np.bool_]:
        x, y = skyMap[tract].wcs.all_world2pix(ra, dec, 0)
        inside = (x >= inner.x0 - 0.5) & (x < inner.x0 + inner.width - 0.5)
        inside &= (y >= inner.y0 - 0.5) & (y < inner.y0 + inner.height - 0.5)
        if len(skyMap.tract_ids) > 1 and inside.any():
            inside &= skyMap.find_tract_ids(ra, dec) == tract
        return inside

    @staticmethod
    def _object_table(
        sources: Table,
        labels: NDArray[np.int64],
        kept: NDArray[np.int64],
        object_id: NDArray[np.int64],
        ra: NDArray[np.float64],
        dec: NDArray[np.float64],
    ) -> Table:
        n_groups = object_id.size
        mjd = np.asarray(sources["midpointMjdTai"], dtype=np.float64)
        first = np.full(n_groups, np.inf)
        last = np.full(n_groups, -np.inf)
        np.minimum.at(first, labels, mjd)
        np.maximum.at(last, labels, mjd)
        counts = np.bincount(labels, minlength=n_groups)
        negative = np.bincount(labels, weights=np.asarray(sources["isNegative"], dtype=float), minlength=n_groups)
        dipole = np.bincount(labels, weights=np.asarray(sources["isDipole"], dtype=float), minlength=n_groups)
        visit_pairs = np.unique(np.column_stack([labels, np.asarray(sources["visit"], dtype=np.int64)]), axis=0)
        n_visits = np.bincount(visit_pairs[:, 0], minlength=n_groups)
        table = make_table(kept.size, DIA_OBJECT_COLUMNS)
        values: Mapping[str, NDArray[Any]] = {
            "diaObjectId": object_id[kept],
            "coord_ra": ra[kept],
            "coord_dec": dec[kept],
            "nDiaSources": counts[kept],
            "nNegativeDiaSources": negative[kept].round(),
            "nDipoleDiaSources": dipole[kept].round(),
            "nVisits": n_visits[kept],
            "firstDiaSourceMjd": first[kept],
            "lastDiaSourceMjd": last[kept],
        }
        for name, column in values.items():
            table[name][:] = column
        return table
