"""STS evaluation of a SentenceTransformer with sentence-transformers' own ``EmbeddingSimilarityEvaluator``
(cosine Spearman), on any file in the STS-B format."""

from __future__ import annotations

from .data import read_stsb


def sts_evaluator(path, name: str, batch_size: int = 128):
    """An evaluator for ``path``; called on a model it returns ``{f"{name}_spearman_cosine": ...}`` and the
    other similarity functions' scores (in [−1, 1])."""
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, SimilarityFunction

    sents1, sents2, scores = read_stsb(path)
    return EmbeddingSimilarityEvaluator(sents1, sents2, [s / 5.0 for s in scores], batch_size=batch_size,
                                        main_similarity=SimilarityFunction.COSINE, name=name,
                                        show_progress_bar=False)
