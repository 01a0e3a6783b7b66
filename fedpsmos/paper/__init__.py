"""The paper's tables (CSV, Markdown, LaTeX) and figures, from the metrics the workflow wrote.

Tables: :mod:`~fedpsmos.paper.results` (a model's results per block of sites),
:mod:`~fedpsmos.paper.paired_tests` (paired Wilcoxon tests), :mod:`~fedpsmos.paper.table_format` (CSV,
Markdown, LaTeX), :mod:`~fedpsmos.paper.tables` (Tables 2-6). Figures: :mod:`~fedpsmos.paper.plotting`
(what they share), :mod:`~fedpsmos.paper.figures` (Dice per organ, federated curves, all figures written),
:mod:`~fedpsmos.paper.training_curves`, :mod:`~fedpsmos.paper.qualitative` (paper Fig. 2). Model names:
:mod:`~fedpsmos.paper.models`.
"""

from fedpsmos.paper.models import model_name, parse_model_id

__all__ = ["model_name", "parse_model_id"]
