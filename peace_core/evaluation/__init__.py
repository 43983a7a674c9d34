"""Zero-shot evaluation: retrieval (R@K both ways), classification from prompt lists, reports.

Names load on first use, so that importing this package (e.g. for ``peace --help``) is cheap.
"""

from __future__ import annotations

from peace_registry.lazy import lazy_exports

_EXPORTS = {
    "RetrievalResult": "peace_core.evaluation.retrieval",
    "retrieval_metrics": "peace_core.evaluation.retrieval",
    "retrieval_from_similarity": "peace_core.evaluation.retrieval",
    "chance_recall": "peace_core.evaluation.retrieval",
    "PromptSet": "peace_core.evaluation.classification",
    "ClassificationResult": "peace_core.evaluation.classification",
    "class_embeddings": "peace_core.evaluation.classification",
    "classification_metrics": "peace_core.evaluation.classification",
    "confusion_matrix": "peace_core.evaluation.classification",
    "zero_shot_classification": "peace_core.evaluation.classification",
    "EvaluationError": "peace_core.evaluation.zero_shot",
    "EvaluationResult": "peace_core.evaluation.zero_shot",
    "embed_shards": "peace_core.evaluation.zero_shot",
    "evaluate": "peace_core.evaluation.zero_shot",
    "print_metrics": "peace_core.evaluation.report",
    "plot_confusion_matrix": "peace_core.evaluation.report",
    "plot_similarity_heatmap": "peace_core.evaluation.report",
    "plot_loss_curves": "peace_core.evaluation.report",
    "write_evaluation_report": "peace_core.evaluation.report",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
