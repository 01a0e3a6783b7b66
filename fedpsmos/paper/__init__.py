"""The paper's tables (CSV, Markdown, LaTeX) and figures, from the metrics the workflow wrote."""

from fedpsmos.paper.models import model_name, parse_model_id

__all__ = ["model_name", "parse_model_id"]
