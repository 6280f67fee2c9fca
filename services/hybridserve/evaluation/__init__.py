"""`hybridserve eval`: a tenant's question set through four arms of the served platform
(base, adapter, rag, rag+adapter), scored by `hybridserve.scoring`, reported as a
table, JSON or one HTML page.

A client of the platform: it imports the SDK (client, answers, exceptions, v1) and the
scoring package, nothing of the server, so it runs on `pip install hybridserve` alone.
"""

from hybridserve.evaluation.formats import (
    FormatCheck,
    load_json_schema,
    regex_check,
    schema_check,
)
from hybridserve.evaluation.report import render_html, render_table, to_json, write_html
from hybridserve.evaluation.runner import (
    ARMS,
    EvalInputError,
    EvalResult,
    RunOptions,
    Sampling,
    Target,
    evaluate,
    parse_arms,
    resolve_target,
)

__all__ = [
    "ARMS",
    "EvalInputError",
    "EvalResult",
    "FormatCheck",
    "RunOptions",
    "Sampling",
    "Target",
    "evaluate",
    "load_json_schema",
    "parse_arms",
    "regex_check",
    "render_html",
    "render_table",
    "resolve_target",
    "schema_check",
    "to_json",
    "write_html",
]
