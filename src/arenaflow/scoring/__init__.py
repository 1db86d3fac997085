"""Scoring: prompt token ids -> N x 3 label probabilities. engines (vLLM logprobs, vLLM classify,
transformers), scorer (`Scorer`: one engine started once; `predict`: rows -> probabilities, swap-TTA,
the calibrator; the engine fallback), parallel (one engine process per GPU group), ray_actors (Scorers
in Ray Data actors across a cluster), shards (resumable shard scoring for infer and datagen's teacher)."""

from .engines import ScoringError, label_probabilities, three_token_probs
from .scorer import (ENGINE_FALLBACKS, ScoreResult, Scorer, engine_for, keep_torch_threads, open_scorer, predict,
                     score, score_rows, swap_average)
from .shards import ShardPredictor, predict_in_shards

__all__ = ["ENGINE_FALLBACKS", "ScoreResult", "Scorer", "ScoringError", "ShardPredictor", "engine_for",
           "keep_torch_threads", "label_probabilities", "open_scorer", "predict", "predict_in_shards", "score",
           "score_rows", "swap_average", "three_token_probs"]
