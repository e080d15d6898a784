"""Package names imported on first use (PEP 562), so light imports (a config, `--help`) skip torch and open_clip."""

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: name -> the attribute of the submodule `exports[name]` names."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    return __getattr__


def resolve(reference: str) -> Any:
    """The object a ``"package.module:attribute"`` reference names (registries list objects this way, light)."""
    module, _, attribute = reference.partition(":")
    return getattr(import_module(module), attribute)
