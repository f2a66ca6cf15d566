"""The 0.1 import paths keep working for one release (each warns), and give the very objects of the new layout."""

from __future__ import annotations

import importlib
import sys

import pytest

OLD_TO_NEW = [
    ("opd_dynamics.checkpoints", "ModelDir", "opd_dynamics.io.model_dir"),
    ("opd_dynamics.checkpoints", "open_model", "opd_dynamics.io.formats"),
    ("opd_dynamics.series", "CheckpointSeries", "opd_dynamics.io.series"),
    ("opd_dynamics.naming", "parse_name", "opd_dynamics.io.naming"),
    ("opd_dynamics.writer", "write_model", "opd_dynamics.io.writer"),
    ("opd_dynamics.lora", "LoraAdapter", "opd_dynamics.io.lora"),
    ("opd_dynamics.deltas", "plan_series", "opd_dynamics.analysis.deltas"),
    ("opd_dynamics.report", "Report", "opd_dynamics.analysis.report"),
    ("opd_dynamics.engine", "AnalysisOptions", "opd_dynamics.analysis.options"),
    ("opd_dynamics.engine", "execute", "opd_dynamics.analysis.executors"),
    ("opd_dynamics.memory", "upcast", "opd_dynamics.numerics"),
    ("opd_dynamics.metrics.spectrum", "decompose", "opd_dynamics.analysis.metrics.spectrum"),
    ("opd_dynamics.html_report", "render_html", "opd_dynamics.plotting.html"),
    ("opd_dynamics.demo", "run_demo", "opd_dynamics.lab.demo"),
    ("opd_dynamics.metrics.fused", "fused_dot", "opd_dynamics.numerics.fused"),
]
RENAMED = [("opd_dynamics.deltas", "float_dtype", "opd_dynamics.numerics", "update_dtype"),
           ("opd_dynamics.metrics.norms", "dot64", "opd_dynamics.numerics", "dot"),
           ("opd_dynamics.plotting_cli", "plot_cmd", "opd_dynamics.plotting.cli", "plot"),
           ("opd_dynamics.demo", "demo_cmd", "opd_dynamics.lab.cli", "demo")]


@pytest.mark.parametrize("old, name, new, new_name", RENAMED)
def test_renamed_names_are_served_under_their_old_names(old, name, new, new_name):
    import opd_dynamics  # noqa: F401

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), new_name)


@pytest.mark.parametrize("old, name, new", OLD_TO_NEW)
def test_old_import_paths_warn_and_give_the_same_objects(old, name, new):
    import opd_dynamics  # noqa: F401  (installs the old paths)

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="has moved to"):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="has no attribute"):
        mod.no_such_name  # noqa: B018


def test_unmoved_paths_are_not_served():
    import opd_dynamics  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("opd_dynamics.no_such_module")
