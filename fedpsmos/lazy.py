"""Package names that load their module on first use (PEP 562 module ``__getattr__``).

A package's ``__init__`` that imported every submodule would make each workflow job pay for the heaviest of
them: a training job that needs only the metrics would import pandas, one that reads a case file would
import SimpleITK and scipy's resampling. Each rule's job is a new Python process, so that cost is paid per
job (README.md, "Tests").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package`` that loads ``name`` from its submodule ``modules[name]``."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(import_module(f"{package}.{modules[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
