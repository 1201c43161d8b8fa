"""Lazy package faces: a package names what research code imports, loading it on first use.

A face that imported its modules eagerly would make importing any one module of the
package (e.g. `jaxadapt.data.sim.simulator`) load all of them, with their heavy
dependencies (TFDS, grain); on a machine that has only jax and flax (a lent accelerator)
the light modules would then not import at all.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_face(package: str, exports: Mapping[str, str]
              ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for a package that re-exports names lazily.

    Args:
      package: the package's `__name__` (for messages).
      exports: public name -> the module that defines it, or "module:name" where the
        module calls it otherwise.

    Returns:
      (getattr, dir, all): assign them to the package's `__getattr__`, `__dir__`, `__all__`.
    """
    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = exports[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_, sorted(exports)
