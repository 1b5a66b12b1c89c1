"""Kernel-candidate selection from a source catalog, and candidates from two PSF models."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from butler.geometry import Box
from butler.psf import GaussianPsf
from tasks.psfmatch.candidates import make_candidate_list, max_model_kernel_size, model_psf_matching_candidates
from tasks.psfmatch.config import PsfMatchConfig
from tasks.psfmatch.errors import NoKernelCandidatesError
from tasks.psfmatch.testing import make_psf_matching_pair

KERNEL = 21  # stamps of 43 px


@pytest.fixture()
def pair():
    return make_psf_matching_pair(shape=(300, 300), n_stars=0, noise=False)


def _add_sources(pair, rows):
    cat = pair.sources
    for n, (x, y, snr) in enumerate(rows):
        cat.add_row({"id": n + 1, "x": x, "y": y, "psfFlux": snr * 100.0, "psfFluxErr": 100.0})
    return cat


def test_selection_rejects_bad_sources_with_reasons(pair) -> None:
    sat_bit = pair.science.get_plane_bitmask("SAT")
    rows = [
        (60, 60, 50),  # 1 good
        (150, 60, 50),  # 2 SAT pixel in its science stamp
        (240, 60, 50),  # 3 catalog flag set
        (60, 150, 50),  # 4 crowded: 5 is 6 px away
        (66, 150, 50),  # 5
        (150, 150, 5),  # 6 S/N too low
        (240, 150, 5000),  # 7 S/N too high
        (10, 240, 50),  # 8 stamp off the image
        (150, 240, 50),  # 9 BAD column in the template stamp
        (240, 240, 50),  # 10 NaN in the science image
        (240, 200, np.nan),  # 11 no S/N
    ]
    cat = _add_sources(pair, rows)
    cat["pixelFlags_saturated"][2] = True
    pair.science.mask[55:58, 150] |= sat_bit
    pair.template.mask[:, 160] |= pair.template.get_plane_bitmask("BAD")
    pair.template.mask[:, 140] |= pair.template.get_plane_bitmask("INTRP")  # not a bad plane
    pair.science.image[245, 250] = np.nan
    cands = make_candidate_list(pair.template, pair.science, cat, KERNEL, PsfMatchConfig())
    assert [c.source_id for c in cands] == [1]
    c = cands[0]
    assert c.template.shape == (43, 43) and c.xy0 == (60 - 21, 60 - 21)
    np.testing.assert_array_equal(c.science, pair.science.image[39:82, 39:82])

    # the same catalog with the one good source flagged: a clear error with counts per reason
    cat["pixelFlags_saturated"][0] = True
    with pytest.raises(NoKernelCandidatesError) as info:
        make_candidate_list(pair.template, pair.science, cat, KERNEL, PsfMatchConfig())
    err = info.value
    assert err.n_input == 11
    assert err.rejected == {
        "flag pixelFlags_saturated": 2,
        "masked SAT": 1,
        "not isolated": 2,
        "S/N below 10": 1,
        "S/N above 500": 1,
        "stamp off image": 1,
        "masked BAD (template)": 1,
        "non-finite pixels": 1,
        "non-finite S/N": 1,
    }
    message = str(err)
    assert "no kernel candidates among 11 sources" in message
    assert "2 not isolated" in message and "1 masked SAT" in message


def test_evenly_spread_subset(pair) -> None:
    rng = np.random.default_rng(3)
    # a dense clump in one corner and a few elsewhere; the subset must not be all from the clump
    xs = np.r_[rng.uniform(30, 120, 40), [200, 250, 200, 250]]
    ys = np.r_[rng.uniform(30, 120, 40), [200, 200, 250, 250]]
    snr = np.r_[np.full(40, 400.0), np.full(4, 20.0)]
    cat = _add_sources(pair, list(zip(xs, ys, snr, strict=True)))
    cfg = PsfMatchConfig(max_candidates=8, candidate_grid=2, isolation_radius=0.0)
    cands = make_candidate_list(pair.template, pair.science, cat, KERNEL, cfg)
    assert len(cands) == 8
    far = [c for c in cands if c.x > 150 and c.y > 150]
    assert len(far) >= 2  # the upper-right cell gets its brightest in the first round


def test_model_psf_candidates_and_kernel_size_clamp(caplog) -> None:
    bbox = Box(0, 0, 400, 300)
    psf_in, psf_ref = GaussianPsf(1.5, size=25), GaussianPsf(2.2, size=25)
    cands, size = model_psf_matching_candidates(psf_in, psf_ref, bbox, (4, 3), 11)
    assert size == 11 and len(cands) == 12
    c = cands[0]
    assert c.template.shape == (25 + 10, 25 + 10)
    assert c.x == pytest.approx(49.5) and c.y == pytest.approx(49.5)
    assert c.template.sum() == pytest.approx(1.0) and c.science.sum() == pytest.approx(1.0)
    assert np.all(c.science_variance == 1.0) and np.all(c.template_variance == 0.0)
    assert max_model_kernel_size(25) == 11
    with caplog.at_level(logging.WARNING, logger="tasks.psfmatch.candidates"):
        _, size = model_psf_matching_candidates(psf_in, psf_ref, bbox, 2, 21)
    assert size == 11
    assert "too large" in caplog.text
