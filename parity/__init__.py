"""Framework-free parity checking: compare artifact outputs with reference outputs, judge them against
tolerances, and write reports (JSON per parity/SCHEMA.md, Markdown, JUnit XML, a terminal table).

Every module here imports only the standard library and numpy, so the edge agent can carry
this package to a device that has numpy and the LiteRT interpreter only. The plots of a run's parity
live with the pipeline (pipeline/plots.py), which has matplotlib.
"""
from .compare import (DEFAULT_TOLERANCES, KIND_NAMES, VARIANTS, Comparison, ParityRecord, Tolerance,
                      artifact_label, compare, describe_discrimination, discrimination, tolerance_for)
from .report import SCHEMA_VERSION, ParityReport, merge_reports, print_table

__all__ = [
    "DEFAULT_TOLERANCES", "KIND_NAMES", "VARIANTS", "Comparison", "ParityRecord", "Tolerance",
    "artifact_label", "compare", "describe_discrimination", "discrimination", "tolerance_for",
    "SCHEMA_VERSION", "ParityReport", "merge_reports", "print_table",
]
