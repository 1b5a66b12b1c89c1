"""Lazy public names of a package (PEP 562), shared by the project's package ``__init__`` modules.

A package lists ``name -> defining module`` and exposes the names without importing the modules
until one is used, so light consumers (``butler --help``, ``pipetask --help``, worker start-up)
do not pay for numpy, astropy, zarr, lark or networkx.  Nothing here imports more than the
standard library.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["attach"]


def attach(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Module-level ``__getattr__``, ``__dir__`` and ``__all__`` for ``package``'s lazy names.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    names : mapping
        Public name -> the module that defines it.

    Returns
    -------
    __getattr__, __dir__, __all__
        Assign them at the package's module level.  A name is imported on first access and then
        cached in the package's namespace.
    """
    lazy = dict(names)

    def __getattr__(name: str) -> Any:  # noqa: N807 - the PEP 562 hook
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:  # noqa: N807 - the PEP 562 hook
        return sorted(set(vars(sys.modules[package])) | set(lazy))

    return __getattr__, __dir__, sorted(lazy)
