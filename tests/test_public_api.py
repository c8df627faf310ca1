"""The public API's surface: the names a notebook relies on stay, the Python keyword arguments
and the command-line options come from one declaration each, and the package ships its types."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import featurescribe as fs

ROOT = Path(__file__).resolve().parent.parent

# Removing or renaming any of these breaks users' notebooks: add names freely, never drop one.
PUBLIC = {
    "__version__", "open", "harvest", "label", "export",
    "Database", "Feature", "Table", "Labels", "SearchResults",
    "HarvestOptions", "LabelOptions", "ExportOptions", "HarvestResult", "LabelSummary", "ExportResult",
    "FeaturescribeError", "BadOption", "DatabaseLocked", "MissingDependency", "NoDatabase", "NoEmbeddings",
    "SchemaTooNew", "SQLFailed", "UnknownFeature", "UnknownSource",
}
METHODS = {
    "Database": {"sources", "labels", "features", "feature", "search", "sql"},
    "Table": {"to_arrow", "to_pandas", "to_polars", "to_dicts", "columns", "_repr_html_"},
    "Feature": {"best", "stats", "explanations", "examples", "windows", "histogram", "_repr_html_"},
}
OPERATIONS = {"harvest": "HarvestOptions", "label": "LabelOptions", "export": "ExportOptions"}


def test_no_public_name_disappears():
    missing = sorted(PUBLIC - set(fs.__all__))
    assert not missing, f"public names gone from featurescribe.__all__: {missing}"
    for name in fs.__all__:
        assert getattr(fs, name) is not None, name
    for cls, names in METHODS.items():
        obj = getattr(fs, cls)
        members = set(dir(obj)) | ({f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set())
        assert names <= members, (cls, names - members)


def test_the_operations_are_functions_not_the_internal_packages():
    import featurescribe.export.neuronpedia  # noqa: F401 - a later import of an internal module
    import featurescribe.harvest.sae  # noqa: F401

    for name in ("open", "harvest", "label", "export"):
        assert inspect.isfunction(getattr(fs, name)), name


def test_keyword_arguments_are_the_option_declarations():
    for op, cls_name in OPERATIONS.items():
        params = inspect.signature(getattr(fs, op)).parameters
        assert list(params)[0] == "db"
        fields = [f.name for f in dataclasses.fields(getattr(fs, cls_name))]
        assert list(params)[1:] == fields, op
        for f in dataclasses.fields(getattr(fs, cls_name)):
            assert f.name in getattr(fs, cls_name).__doc__, (cls_name, f.name)  # the reference lists it


def test_command_line_options_are_the_same_declarations():
    from featurescribe.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for op, cls_name in OPERATIONS.items():
        dests = {a.dest for a in sub.choices[op]._actions} - {"help", "db", "lock_timeout"}  # every command has these
        on_cli = {f.name for f in dataclasses.fields(getattr(fs, cls_name)) if f.metadata.get("cli", True)}
        assert dests == on_cli, (op, dests ^ on_cli)


def test_the_package_ships_its_type_hints():
    assert (ROOT / "featurescribe" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()
    hints = inspect.signature(fs.Database.feature).parameters
    assert all(p.annotation is not inspect.Parameter.empty for n, p in hints.items() if n != "self")


def test_the_cli_reference_names_every_command():
    from featurescribe.cli import command_table

    page = (ROOT / "docs" / "cli.md").read_text()
    missing = [c.name for c in command_table() if f"| `{c.name}` |" not in page]
    assert not missing, f"docs/cli.md lacks {missing}"
