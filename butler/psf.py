"""Point-spread-function models behind one small protocol.

Every model answers three questions about a position ``(x, y)`` in its exposure's parent pixel
frame:

- :meth:`Psf.image` -- the *kernel image*: an odd-sized float64 array, normalized to sum 1, with the
  PSF centre on the central pixel (LSST's ``computeKernelImage``);
- :meth:`Psf.shifted_image` -- the PSF realized at the sub-pixel position itself, with the parent
  pixel of its lower-left corner (LSST's ``computeImage``), for rendering and PSF photometry;
- :meth:`Psf.fwhm` -- the full width at half maximum in pixels.

Images are pixel-integrated (what a detector records); :func:`measure_fwhm` removes the pixel
response so that a :class:`GaussianPsf` of width ``sigma`` measures ``2.3548 * sigma``.

Models serialize to plain data with :meth:`Psf.to_dict` and back with :func:`psf_from_dict`.
Returned arrays are read-only views of cached data: copy before modifying.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage, optimize, special

from .errors import PsfError
from .geometry import Box
from .serialization import decode_array, encode_array

__all__ = [
    "Psf",
    "GaussianPsf",
    "ImagePsf",
    "GridPsf",
    "PolynomialPsf",
    "CoaddPsf",
    "CoaddPsfInput",
    "psf_from_dict",
    "measure_fwhm",
    "SIGMA_TO_FWHM",
]

_log = logging.getLogger(__name__)

#: FWHM of a Gaussian in units of its sigma.
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Largest allowed departure of a kernel image's sum from 1.
NORMALIZATION_TOLERANCE = 1e-3

_REGISTRY: dict[str, type[Psf]] = {}


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _validate_kernel(image: np.ndarray, what: str, *, normalized: bool = True) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype.kind not in "iuf":
        raise PsfError(f"{what}: PSF image must be real-valued, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise PsfError(f"{what}: PSF image must be 2-D, got shape {arr.shape}")
    if arr.shape[0] % 2 == 0 or arr.shape[1] % 2 == 0:
        raise PsfError(f"{what}: PSF image dimensions must be odd (centred), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise PsfError(f"{what}: PSF image contains NaN or infinite values")
    if normalized:
        total = float(arr.sum())
        if abs(total - 1.0) > NORMALIZATION_TOLERANCE:
            raise PsfError(
                f"{what}: PSF image sums to {total:.6g}, not 1 (tolerance {NORMALIZATION_TOLERANCE}); "
                "normalize it first, e.g. ImagePsf(image / image.sum())"
            )
    return arr


def measure_fwhm(image: np.ndarray, *, pixel_integrated: bool = True) -> float:
    """FWHM in pixels of a centred kernel image, from a round Gaussian fitted to its core.

    The model is a pixel-integrated Gaussian centred on the central pixel, fitted by least squares
    (amplitude solved linearly, width by a bounded 1-D search) to the pixels within 1.5 FWHM.  It
    stays accurate for undersampled PSFs, where weighted moments on the pixel grid are biased, and
    the wings of non-Gaussian profiles barely move it.  A Gaussian of width ``sigma`` gives
    ``2.3548 * sigma``.

    Parameters
    ----------
    image : numpy.ndarray
        Odd-sized kernel image with its centre on the central pixel.
    pixel_integrated : bool
        Model pixels as integrals over the pixel (True for every model here) rather than samples.
    """
    img = np.asarray(image, dtype=np.float64)
    ny, nx = img.shape
    dx = np.arange(nx) - (nx - 1) / 2.0
    dy = np.arange(ny) - (ny - 1) / 2.0
    r2 = dx[None, :] ** 2 + dy[:, None] ** 2
    if not img.max() > 0:
        raise PsfError("cannot measure the FWHM of a kernel image with no positive pixels")
    # Start from the half-maximum area, which wings do not inflate, then fit within ~1 FWHM of the
    # centre, refining the region on the fitted width.
    above_half = float(np.count_nonzero(img >= 0.5 * img.max()))
    sigma = max(math.sqrt(above_half / math.pi) / math.sqrt(2.0 * math.log(2.0)), 0.2)

    def profile(offsets: np.ndarray, width: float) -> np.ndarray:
        if not pixel_integrated:
            return np.exp(-0.5 * (offsets / width) ** 2)
        scale = 1.0 / (math.sqrt(2.0) * width)
        return 0.5 * (special.erf((offsets + 0.5) * scale) - special.erf((offsets - 0.5) * scale))

    upper = math.log(max(nx, ny))
    for _ in range(3):
        core = r2 <= max(4.0, (1.5 * SIGMA_TO_FWHM * sigma) ** 2)
        data = img[core]

        def cost(log_sigma: float, core: np.ndarray = core, data: np.ndarray = data) -> float:
            width = math.exp(log_sigma)
            model = (profile(dy, width)[:, None] * profile(dx, width)[None, :])[core]
            amplitude = float(model @ data) / float(model @ model)
            residual = data - amplitude * model
            return float(residual @ residual)

        result = optimize.minimize_scalar(
            cost, bounds=(math.log(0.05), upper), method="bounded", options={"xatol": 1e-7}
        )
        sigma = math.exp(result.x)
    if sigma > 0.99 * math.exp(upper):
        raise PsfError(f"kernel image {img.shape} is too small to measure a FWHM of ~{SIGMA_TO_FWHM * sigma:.1f} px")
    return SIGMA_TO_FWHM * sigma


def _shift_kernel(kernel: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift a kernel image by a sub-pixel offset with cubic-spline interpolation, keeping sum 1."""
    if dx == 0.0 and dy == 0.0:
        return kernel.copy()
    shifted = ndimage.shift(kernel, (dy, dx), order=3, mode="constant", cval=0.0, prefilter=True)
    total = shifted.sum()
    return shifted / total if total != 0 else shifted


class Psf(abc.ABC):
    """A PSF model: kernel images and FWHM as functions of parent-frame pixel position.

    Subclasses register themselves under their class name for :func:`psf_from_dict`.
    """

    type_name: ClassVar[str]
    #: The model is the same everywhere (its image does not depend on the position).
    is_constant: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__
        _REGISTRY[cls.__name__] = cls

    @abc.abstractmethod
    def image(self, x: float, y: float) -> np.ndarray:
        """Kernel image at ``(x, y)`` (pixels): odd-sized, centred, sums to 1, read-only."""

    def fwhm(self, x: float, y: float) -> float:
        """FWHM in pixels at ``(x, y)``."""
        return measure_fwhm(self.image(x, y))

    def shifted_image(self, x: float, y: float) -> tuple[np.ndarray, int, int]:
        """The PSF realized at the sub-pixel position ``(x, y)``.

        Returns
        -------
        image : numpy.ndarray
            A new array, same size as the kernel image, summing to 1.
        x0, y0 : int
            Parent-frame pixel of the image's lower-left corner.
        """
        kernel = self.image(x, y)
        ix, iy = int(round(x)), int(round(y))
        stamp = _shift_kernel(kernel, x - ix, y - iy)
        return stamp, ix - kernel.shape[1] // 2, iy - kernel.shape[0] // 2

    def kernel_shape(self, x: float = 0.0, y: float = 0.0) -> tuple[int, int]:
        """Shape ``(height, width)`` of the kernel image at ``(x, y)``."""
        return self.image(x, y).shape

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """Plain-data parameters (JSON-able), without the type tag."""

    @classmethod
    @abc.abstractmethod
    def _from_params(cls, params: dict[str, Any]) -> Psf:
        """Inverse of :meth:`_params`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data with a ``type`` tag; read back with :func:`psf_from_dict`."""
        return {"type": self.type_name, **self._params()}


def psf_from_dict(data: dict[str, Any]) -> Psf:
    """Build a PSF model from the output of :meth:`Psf.to_dict`.

    Raises
    ------
    PsfError
        If the type is unknown or a parameter is missing or malformed.
    """
    if not isinstance(data, dict) or "type" not in data:
        raise PsfError(f"a serialized PSF must be a mapping with a 'type' key, got {type(data).__name__}")
    kind = data["type"]
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise PsfError(f"unknown PSF type {kind!r}; known types: {', '.join(sorted(_REGISTRY))}")
    params = {k: v for k, v in data.items() if k != "type"}
    try:
        return cls._from_params(params)
    except PsfError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise PsfError(f"malformed {kind} parameters: {exc}") from None


def _gaussian_stamp(
    size: int, sigma: float, axis_ratio: float, theta_deg: float, dx: float = 0.0, dy: float = 0.0
) -> np.ndarray:
    """Pixel-integrated elliptical Gaussian (5x5 sub-sampling per pixel), centred at offset (dx, dy)."""
    sub = 5
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    half = size // 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    xs = (grid[:, None] + offsets[None, :]).ravel() - dx
    ys = (grid[:, None] + offsets[None, :]).ravel() - dy
    theta = math.radians(theta_deg)
    c, s = math.cos(theta), math.sin(theta)
    # Summing sub x sub point samples per pixel is a discrete box of variance (1 - h^2)/12 rather
    # than the pixel's 1/12 (h = 1/sub); widening the Gaussian by h^2/12 restores the integral.
    widen = (1.0 / sub) ** 2 / 12.0
    sig_major = math.sqrt(sigma**2 + widen)
    sig_minor = math.sqrt((sigma * axis_ratio) ** 2 + widen)
    xx, yy = np.meshgrid(xs, ys)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    values = np.exp(-0.5 * ((u / sig_major) ** 2 + (v / sig_minor) ** 2))
    img = values.reshape(size, sub, size, sub).sum(axis=(1, 3))
    return img / img.sum()


class GaussianPsf(Psf):
    """A constant, optionally elliptical, Gaussian PSF.

    Parameters
    ----------
    sigma : float
        Gaussian width along the major axis, pixels.
    size : int, optional
        Odd kernel size in pixels; default ``2 * ceil(5 * sigma) + 1`` (at least 11).
    axis_ratio : float
        Minor over major axis, in (0, 1].
    theta_deg : float
        Position angle of the major axis from +x towards +y, degrees.
    """

    is_constant = True

    def __init__(
        self, sigma: float, size: int | None = None, axis_ratio: float = 1.0, theta_deg: float = 0.0
    ) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise PsfError(f"GaussianPsf sigma must be a positive number of pixels, got {sigma!r}")
        if not (0 < axis_ratio <= 1):
            raise PsfError(f"GaussianPsf axis_ratio must be in (0, 1], got {axis_ratio!r}")
        if size is None:
            size = max(11, 2 * math.ceil(5 * sigma) + 1)
        if int(size) != size or size < 3 or size % 2 == 0:
            raise PsfError(f"GaussianPsf size must be an odd integer >= 3, got {size!r}")
        self.sigma = float(sigma)
        self.size = int(size)
        self.axis_ratio = float(axis_ratio)
        self.theta_deg = float(theta_deg)
        self._image = _readonly(_gaussian_stamp(self.size, self.sigma, self.axis_ratio, self.theta_deg))

    @classmethod
    def from_fwhm(cls, fwhm: float, size: int | None = None) -> GaussianPsf:
        """Round Gaussian with the given FWHM in pixels."""
        return cls(fwhm / SIGMA_TO_FWHM, size=size)

    def image(self, x: float, y: float) -> np.ndarray:
        return self._image

    def fwhm(self, x: float, y: float) -> float:
        """Geometric-mean FWHM ``2.3548 * sigma * sqrt(axis_ratio)`` in pixels."""
        return SIGMA_TO_FWHM * self.sigma * math.sqrt(self.axis_ratio)

    def shifted_image(self, x: float, y: float) -> tuple[np.ndarray, int, int]:
        ix, iy = int(round(x)), int(round(y))
        stamp = _gaussian_stamp(self.size, self.sigma, self.axis_ratio, self.theta_deg, x - ix, y - iy)
        half = self.size // 2
        return stamp, ix - half, iy - half

    def _params(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "size": self.size,
            "axis_ratio": self.axis_ratio,
            "theta_deg": self.theta_deg,
        }

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> GaussianPsf:
        return cls(**params)

    def __repr__(self) -> str:
        return f"GaussianPsf(sigma={self.sigma:.4g}, size={self.size}, axis_ratio={self.axis_ratio:.3g})"


class ImagePsf(Psf):
    """A constant PSF given as one kernel image (odd-sized, finite, summing to 1)."""

    is_constant = True

    def __init__(self, image: np.ndarray) -> None:
        self._image = _readonly(_validate_kernel(image, "ImagePsf"))
        self._fwhm: float | None = None

    @classmethod
    def normalized(cls, image: np.ndarray) -> ImagePsf:
        """Build from an image of any positive sum, normalizing it to 1."""
        arr = np.asarray(image, dtype=np.float64)
        total = float(arr.sum())
        if not (math.isfinite(total) and total > 0):
            raise PsfError(f"ImagePsf.normalized: image sum must be positive and finite, got {total}")
        return cls(arr / total)

    def image(self, x: float, y: float) -> np.ndarray:
        return self._image

    def fwhm(self, x: float, y: float) -> float:
        if self._fwhm is None:
            self._fwhm = measure_fwhm(self._image)
        return self._fwhm

    def _params(self) -> dict[str, Any]:
        return {"image": encode_array(self._image)}

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> ImagePsf:
        return cls(decode_array(params["image"], field="ImagePsf.image"))


class GridPsf(Psf):
    """A spatially varying PSF: kernel images on a rectangular grid of positions.

    The kernel at ``(x, y)`` is the bilinear interpolation of the four surrounding grid images
    (clamped to the grid outside it), which keeps it normalized.

    Parameters
    ----------
    images : numpy.ndarray
        Array of shape ``(ny, nx, k, k)``: the kernel image at ``(x_nodes[i], y_nodes[j])`` is
        ``images[j, i]``; each must be normalized and odd-sized.
    x_nodes, y_nodes : sequence of float
        Strictly increasing grid positions in the parent frame, pixels.
    """

    def __init__(self, images: np.ndarray, x_nodes: Sequence[float], y_nodes: Sequence[float]) -> None:
        imgs = np.asarray(images, dtype=np.float64)
        xs = np.asarray(x_nodes, dtype=np.float64)
        ys = np.asarray(y_nodes, dtype=np.float64)
        if imgs.ndim != 4 or imgs.shape[:2] != (ys.size, xs.size):
            raise PsfError(
                f"GridPsf images must have shape (len(y_nodes), len(x_nodes), k, k) = "
                f"({ys.size}, {xs.size}, k, k), got {imgs.shape}"
            )
        for name, nodes in (("x_nodes", xs), ("y_nodes", ys)):
            if nodes.size < 1 or not np.all(np.isfinite(nodes)) or np.any(np.diff(nodes) <= 0):
                raise PsfError(f"GridPsf {name} must be finite and strictly increasing, got {nodes}")
        for j in range(ys.size):
            for i in range(xs.size):
                _validate_kernel(imgs[j, i], f"GridPsf image at node (x={xs[i]:g}, y={ys[j]:g})")
        self._images = _readonly(imgs)
        self._x = _readonly(xs)
        self._y = _readonly(ys)

    @staticmethod
    def _weights(nodes: np.ndarray, value: float) -> tuple[int, int, float]:
        if nodes.size == 1 or value <= nodes[0]:
            return 0, 0, 0.0
        if value >= nodes[-1]:
            last = nodes.size - 1
            return last, last, 0.0
        hi = int(np.searchsorted(nodes, value, side="right"))
        lo = hi - 1
        return lo, hi, (value - nodes[lo]) / (nodes[hi] - nodes[lo])

    def image(self, x: float, y: float) -> np.ndarray:
        i0, i1, fx = self._weights(self._x, float(x))
        j0, j1, fy = self._weights(self._y, float(y))
        imgs = self._images
        out = (
            (1 - fx) * (1 - fy) * imgs[j0, i0]
            + fx * (1 - fy) * imgs[j0, i1]
            + (1 - fx) * fy * imgs[j1, i0]
            + fx * fy * imgs[j1, i1]
        )
        return _readonly(out)

    @property
    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Grid positions ``(x_nodes, y_nodes)``, pixels."""
        return self._x, self._y

    def _params(self) -> dict[str, Any]:
        return {
            "images": encode_array(self._images),
            "x_nodes": self._x.tolist(),
            "y_nodes": self._y.tolist(),
        }

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> GridPsf:
        return cls(decode_array(params["images"], field="GridPsf.images"), params["x_nodes"], params["y_nodes"])


def polynomial_terms(order: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``x**i * y**j`` with ``i + j <= order``, in graded order."""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


class PolynomialPsf(Psf):
    """A PSFEx-like spatially varying PSF: component images weighted by polynomials in position.

    ``image(x, y) = normalize(sum_k P_k(u, v) * components[k])`` where ``u, v`` are ``x, y``
    scaled to ``[-1, 1]`` over ``bbox`` and ``P_k`` is a polynomial of total degree ``order`` with
    coefficients ``coefficients[k]`` for the terms of :func:`polynomial_terms`.

    Parameters
    ----------
    components : numpy.ndarray
        Shape ``(n_components, k, k)``, odd ``k``.
    coefficients : numpy.ndarray
        Shape ``(n_components, n_terms)``.
    bbox : Box
        Region over which positions are normalized, parent-frame pixels.
    order : int
        Total polynomial degree.
    """

    def __init__(self, components: np.ndarray, coefficients: np.ndarray, bbox: Box, order: int) -> None:
        comps = np.asarray(components, dtype=np.float64)
        coeffs = np.asarray(coefficients, dtype=np.float64)
        terms = polynomial_terms(int(order))
        if comps.ndim != 3 or comps.shape[1] % 2 == 0 or comps.shape[2] % 2 == 0:
            raise PsfError(f"PolynomialPsf components must have shape (n, k, k) with odd k, got {comps.shape}")
        if coeffs.shape != (comps.shape[0], len(terms)):
            raise PsfError(
                f"PolynomialPsf coefficients must have shape ({comps.shape[0]}, {len(terms)}) for "
                f"order {order}, got {coeffs.shape}"
            )
        if not (np.all(np.isfinite(comps)) and np.all(np.isfinite(coeffs))):
            raise PsfError("PolynomialPsf components and coefficients must be finite")
        if bbox.is_empty:
            raise PsfError("PolynomialPsf bbox must not be empty")
        self._components = _readonly(comps)
        self._coefficients = _readonly(coeffs)
        self.bbox = bbox
        self.order = int(order)
        self._terms = terms

    def _weights(self, x: float, y: float) -> np.ndarray:
        u = 2.0 * (x - self.bbox.x0) / max(self.bbox.width - 1, 1) - 1.0
        v = 2.0 * (y - self.bbox.y0) / max(self.bbox.height - 1, 1) - 1.0
        basis = np.array([u**i * v**j for i, j in self._terms])
        return self._coefficients @ basis

    def image(self, x: float, y: float) -> np.ndarray:
        img = np.tensordot(self._weights(float(x), float(y)), self._components, axes=1)
        total = img.sum()
        if not (math.isfinite(total) and total > 0):
            raise PsfError(f"PolynomialPsf at ({x:g}, {y:g}) has non-positive sum {total:g}")
        return _readonly(img / total)

    def _params(self) -> dict[str, Any]:
        return {
            "components": encode_array(self._components),
            "coefficients": encode_array(self._coefficients),
            "bbox": self.bbox.to_list(),
            "order": self.order,
        }

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> PolynomialPsf:
        return cls(
            decode_array(params["components"], field="PolynomialPsf.components"),
            decode_array(params["coefficients"], field="PolynomialPsf.coefficients"),
            Box.from_list(params["bbox"]),
            params["order"],
        )


_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


@dataclass(frozen=True)
class CoaddPsfInput:
    """One input of a :class:`CoaddPsf`.

    Attributes
    ----------
    psf : Psf
        The input exposure's PSF, in the input's pixel frame.
    weight : float
        Coaddition weight (> 0).
    bbox : Box
        Coadd-frame pixels this input contributes to.
    transform : tuple of tuple of float
        Affine map from coadd-frame to input-frame pixels, ``[[a, b, c], [d, e, f]]`` meaning
        ``x_in = a x + b y + c``, ``y_in = d x + e y + f`` (the local linearization of the two WCSs).
    """

    psf: Psf
    weight: float
    bbox: Box
    transform: tuple[tuple[float, float, float], tuple[float, float, float]] = field(default=_IDENTITY)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise PsfError(f"CoaddPsfInput weight must be positive, got {self.weight!r}")
        t = np.asarray(self.transform, dtype=np.float64)
        if t.shape != (2, 3) or not np.all(np.isfinite(t)):
            raise PsfError(f"CoaddPsfInput transform must be a finite 2x3 matrix, got {self.transform!r}")
        if abs(np.linalg.det(t[:, :2])) < 1e-12:
            raise PsfError("CoaddPsfInput transform is singular")
        object.__setattr__(self, "transform", tuple(tuple(float(v) for v in row) for row in t))


class CoaddPsf(Psf):
    """The PSF of a coadd: the weighted mean of its inputs' PSFs, each mapped to the coadd frame.

    At ``(x, y)`` only the inputs whose ``bbox`` contains the position contribute (as in LSST's
    CoaddPsf).  Each input kernel is resampled through the linear part of its transform (cubic
    spline) when that differs from the identity, so rotated or rescaled inputs are handled.
    """

    def __init__(self, inputs: Sequence[CoaddPsfInput]) -> None:
        if not inputs:
            raise PsfError("CoaddPsf needs at least one input")
        self.inputs: tuple[CoaddPsfInput, ...] = tuple(inputs)

    def average_position(self) -> tuple[float, float]:
        """Weighted mean of the inputs' bbox centres (pixels): a position where the PSF is defined."""
        w = np.array([inp.weight for inp in self.inputs])
        cx = np.array([inp.bbox.center[0] for inp in self.inputs])
        cy = np.array([inp.bbox.center[1] for inp in self.inputs])
        return float((w * cx).sum() / w.sum()), float((w * cy).sum() / w.sum())

    @staticmethod
    def _to_coadd_frame(kernel: np.ndarray, transform: tuple) -> np.ndarray:
        lin = np.asarray(transform, dtype=np.float64)[:, :2]
        if np.allclose(lin, np.eye(2), atol=1e-9):
            return kernel
        # Output pixel offset u (coadd frame) samples the input kernel at offset lin @ u.
        # ndimage works in (row, col) = (y, x) order, so swap axes of the matrix.
        matrix = lin[::-1, ::-1]
        centre = (np.asarray(kernel.shape, dtype=np.float64) - 1) / 2.0
        offset = centre - matrix @ centre
        out = ndimage.affine_transform(kernel, matrix, offset=offset, order=3, mode="constant")
        total = out.sum()
        return out / total if total > 0 else out

    def image(self, x: float, y: float) -> np.ndarray:
        kernels: list[np.ndarray] = []
        weights: list[float] = []
        for inp in self.inputs:
            if not inp.bbox.contains_point(x, y):
                continue
            (a, b, c), (d, e, f) = inp.transform
            xin, yin = a * x + b * y + c, d * x + e * y + f
            kernels.append(self._to_coadd_frame(inp.psf.image(xin, yin), inp.transform))
            weights.append(inp.weight)
        if not kernels:
            ax, ay = self.average_position()
            raise PsfError(
                f"CoaddPsf has no input covering ({x:g}, {y:g}); it is defined inside its inputs' "
                f"boxes, e.g. at the average position ({ax:.1f}, {ay:.1f})"
            )
        size_y = max(k.shape[0] for k in kernels)
        size_x = max(k.shape[1] for k in kernels)
        out = np.zeros((size_y, size_x))
        for kernel, weight in zip(kernels, weights, strict=True):
            oy = (size_y - kernel.shape[0]) // 2
            ox = (size_x - kernel.shape[1]) // 2
            out[oy : oy + kernel.shape[0], ox : ox + kernel.shape[1]] += weight * kernel
        return _readonly(out / out.sum())

    def _params(self) -> dict[str, Any]:
        return {
            "inputs": [
                {
                    "psf": inp.psf.to_dict(),
                    "weight": inp.weight,
                    "bbox": inp.bbox.to_list(),
                    "transform": [list(row) for row in inp.transform],
                }
                for inp in self.inputs
            ]
        }

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> CoaddPsf:
        return cls(
            [
                CoaddPsfInput(
                    psf=psf_from_dict(item["psf"]),
                    weight=float(item["weight"]),
                    bbox=Box.from_list(item["bbox"]),
                    transform=tuple(tuple(row) for row in item["transform"]),
                )
                for item in params["inputs"]
            ]
        )
