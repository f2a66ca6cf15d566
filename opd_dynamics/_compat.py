"""The import paths of 0.1's flat layout, kept working for one release (each import warns once).

`opd_dynamics.checkpoints`, `.series`, `.engine`, … are served by thin proxy modules whose attributes are
looked up in the modules that now hold them; nothing is copied, so every name is the object itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module → the modules that hold its names now (looked up in order)
MOVED: dict[str, tuple[str, ...]] = {
    "checkpoints": ("opd_dynamics.io.model_dir", "opd_dynamics.io.reader", "opd_dynamics.io.formats"),
    "lora": ("opd_dynamics.io.lora",),
    "series": ("opd_dynamics.io.series",),
    "naming": ("opd_dynamics.io.naming",),
    "writer": ("opd_dynamics.io.writer",),
    "clickutil": ("opd_dynamics.io.cli",),
    "memory": ("opd_dynamics.numerics",),
    "deltas": ("opd_dynamics.analysis.deltas",),
    "report": ("opd_dynamics.analysis.report",),
    "engine": ("opd_dynamics.analysis.options", "opd_dynamics.analysis.executors", "opd_dynamics.analysis.tensor",
               "opd_dynamics.analysis.readers", "opd_dynamics.analysis.caches"),
    "html_report": ("opd_dynamics.plotting.html",),
    "plotting_cli": ("opd_dynamics.plotting.cli",),
    "demo": ("opd_dynamics.lab.demo",),
    "metrics": ("opd_dynamics.analysis.metrics",),
}
#: old packages whose submodules moved with them (one moved elsewhere: MOVED above wins)
MOVED_PACKAGES = {"metrics": "opd_dynamics.analysis.metrics"}
MOVED.update({"metrics.fused": ("opd_dynamics.numerics.fused",),
              "metrics._kernels": ("opd_dynamics.numerics._kernels",)})
#: names that were renamed as they moved: old module → {old name: (module, new name)}
RENAMED: dict[str, dict[str, tuple[str, str]]] = {
    "deltas": {"float_dtype": ("opd_dynamics.numerics", "update_dtype")},
    "metrics.norms": {"dot64": ("opd_dynamics.numerics", "dot"), "sum_squares64": ("opd_dynamics.numerics", "fro2")},
    "plotting_cli": {"plot_cmd": ("opd_dynamics.plotting.cli", "plot"),
                     "report_cmd": ("opd_dynamics.plotting.cli", "report")},
    "demo": {"demo_cmd": ("opd_dynamics.lab.cli", "demo")},
}
_PREFIX = "opd_dynamics."


def targets(fullname: str) -> tuple[str, ...] | None:
    """The modules now holding what ``fullname`` (an old path) held, or None for a path that did not move."""
    if not fullname.startswith(_PREFIX):
        return None
    rest = fullname[len(_PREFIX):]
    if rest in MOVED:
        return MOVED[rest]
    head, _, tail = rest.partition(".")
    if head in MOVED_PACKAGES and tail:
        return (f"{MOVED_PACKAGES[head]}.{tail}",)
    return None


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if targets(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname[len(_PREFIX):] in MOVED_PACKAGES)

    def create_module(self, spec):
        new = targets(spec.name)
        warnings.warn(f"{spec.name} has moved to {' / '.join(new)}; the old path works for one release "
                      "(see docs/ARCHITECTURE.md)", DeprecationWarning, stacklevel=2)
        mods = [importlib.import_module(m) for m in new]
        proxy = types.ModuleType(spec.name, f"Moved to {', '.join(new)}.")

        renamed = RENAMED.get(spec.name[len(_PREFIX):], {})

        def __getattr__(name: str):
            if name in renamed:
                module, new_name = renamed[name]
                return getattr(importlib.import_module(module), new_name)
            for m in mods:
                if hasattr(m, name):
                    return getattr(m, name)
            raise AttributeError(f"module {spec.name!r} (now {', '.join(new)}) has no attribute {name!r}")

        proxy.__getattr__ = __getattr__  # type: ignore[attr-defined]
        return proxy

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Serve the old paths (idempotent)."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())  # before the path finder, which would load a moved file twice
