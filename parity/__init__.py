"""Framework-free parity checking: compare artifact outputs with reference outputs, judge them against
tolerances, and write reports (JSON per parity/SCHEMA.md, Markdown, JUnit XML, a terminal table).

parity.compare and parity.report import only the standard library and numpy, so the edge agent can carry
this package to a device that has numpy and the LiteRT interpreter only. parity.plots needs matplotlib and
is not imported here.
"""
from .compare import (DEFAULT_TOLERANCES, FORMATS, KIND_NAMES, VARIANTS, Comparison, ParityRecord, Tolerance,
                      artifact_label, compare, describe_discrimination, discrimination, tolerance_for)
from .report import SCHEMA_VERSION, ParityReport, merge_reports, print_table

__all__ = [
    "DEFAULT_TOLERANCES", "FORMATS", "KIND_NAMES", "VARIANTS", "Comparison", "ParityRecord", "Tolerance",
    "artifact_label", "compare", "describe_discrimination", "discrimination", "tolerance_for",
    "SCHEMA_VERSION", "ParityReport", "merge_reports", "print_table",
]
