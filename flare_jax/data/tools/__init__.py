"""Transfer-data tooling: score documents under the seed model, select by score and dedup with
mixtures, and self-distill responses from the seed model (``flare data score|select|self-distill``).
"""

from flare_jax.data.tools.dedup import NearDuplicateIndex, exact_key, normalise
from flare_jax.data.tools.distill import GenerationSettings, parse_prompt, self_distill
from flare_jax.data.tools.report import SelectionReport, SourceReport
from flare_jax.data.tools.score import DocumentScorer, default_scores_path, score_file
from flare_jax.data.tools.select import Condition, SourceSpec, select

__all__ = [
    "Condition",
    "DocumentScorer",
    "GenerationSettings",
    "NearDuplicateIndex",
    "SelectionReport",
    "SourceReport",
    "SourceSpec",
    "default_scores_path",
    "exact_key",
    "normalise",
    "parse_prompt",
    "score_file",
    "select",
    "self_distill",
]
