"""featurescribe: label neural-network features with LLM explanations scored by simulation.

The public API is the names in `__all__`; every other module is internal and may move.

`featurescribe.harvest` and `featurescribe.export` are the functions of the API, not the
internal packages of the same names: import from those as `from featurescribe.export import
neuronpedia`, never as `import featurescribe.export.neuronpedia as ...`.
"""

__version__ = "0.1.0"

# the internal packages load first, so that the functions below are what these names stay bound to
import featurescribe.export  # noqa: E402,F401  isort: skip
import featurescribe.harvest  # noqa: E402,F401  isort: skip

from featurescribe.api import export, harvest, label, open  # noqa: E402
from featurescribe.database import Database, Feature, Labels, SearchResults  # noqa: E402
from featurescribe.errors import (BadOption, DatabaseLocked, FeaturescribeError, MissingDependency,  # noqa: E402
                                  NoDatabase, NoEmbeddings, PrefectServerGone, PrefectUnreachable,
                                  SchemaTooNew,
                                  SQLFailed, UnknownFeature, UnknownSource)
from featurescribe.export.command import ExportOptions, ExportResult  # noqa: E402
from featurescribe.flows.label_options import LabelOptions  # noqa: E402
from featurescribe.flows.label_run import LabelSummary  # noqa: E402
from featurescribe.frames import Table  # noqa: E402
from featurescribe.harvest.harvester import HarvestResult  # noqa: E402
from featurescribe.harvest.options import HarvestOptions  # noqa: E402

__all__ = [
    "__version__",
    # operations
    "open", "harvest", "label", "export",
    # the database handle and what it returns
    "Database", "Feature", "Table", "Labels", "SearchResults",
    # options (one declaration each, shared with the command line) and result records
    "HarvestOptions", "LabelOptions", "ExportOptions", "HarvestResult", "LabelSummary", "ExportResult",
    # errors, one class per kind
    "FeaturescribeError", "BadOption", "DatabaseLocked", "MissingDependency", "NoDatabase", "NoEmbeddings",
    "PrefectServerGone", "PrefectUnreachable", "SchemaTooNew", "SQLFailed", "UnknownFeature", "UnknownSource",
]
