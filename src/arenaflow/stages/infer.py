"""`arenaflow infer`: the Kaggle submission from the champion, in resumable shards."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import mlflow
import pandas as pd

from ..data import read_prepared
from ..metrics import speed_metrics
from ..models import checkpoint_digest
from ..plan import planned_speed
from ..recipe import Recipe
from ..scoring import ShardPredictor, open_scorer, predict, predict_in_shards
from .datasets import fetch_artifacts, log_rows_dataset
from .registry import resolve_model_ref
from .runs import checkpoint_precision, stage_run


def run(recipe: Recipe, input: str, output: str = "submission.csv", model: str = "") -> Path:
    """Kaggle submission (id, winner_model_a, winner_model_b, winner_tie) from the champion.

    Rows are scored in shards of `engine.shard_rows`, each saved as it finishes next to the output
    (`<output>.shards/`, shards.run_shards): a killed run started again with the same arguments scores
    only the missing shards and writes the identical file.
    """
    ref = resolve_model_ref(model, recipe)
    rows = read_prepared(fetch_artifacts(input))
    output_path = Path(output)
    shard_root = output_path.with_name(output_path.name + ".shards")
    with stage_run(recipe, "infer", model=ref.uri,
                   precision=checkpoint_precision(ref.checkpoint, recipe.engine.dtype)) as run:
        dataset = log_rows_dataset(rows, source=input, name="infer-input", context="inference")
        manifest = {"input": str(input), "input_digest": dataset.digest, "rows": len(rows), "model": ref.uri,
                    "version": ref.version, "checkpoint_sha256": checkpoint_digest(ref.checkpoint),  # not its path
                    "calibration": ref.calibrator.to_dict(),
                    "prompt": dataclasses.asdict(recipe.prompt), "engine": dataclasses.asdict(recipe.engine)}
        # The engine is started by the first shard that needs one (on Ray: one run over every row left).
        shard_predict = ShardPredictor(lambda: open_scorer(ref.checkpoint, recipe), rows, recipe.engine.swap_tta,
                                       calibrator=ref.calibrator, predict=predict)
        try:
            probs, spent = predict_in_shards(shard_predict, shard_root, manifest, recipe.engine.shard_rows,
                                             "infer shards")
        finally:
            if shard_predict.scorer is not None:
                shard_predict.scorer.close()
        submission = pd.DataFrame({"id": rows["id"], "winner_model_a": probs[:, 0],
                                   "winner_model_b": probs[:, 1], "winner_tie": probs[:, 2]})
        output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = output_path.with_name(output_path.name + ".tmp")
        submission.to_csv(tmp_out, index=False)
        tmp_out.rename(output_path)
        scored = spent["rows"]
        figures = {"rows": float(len(rows)), "rows_scored_this_run": float(scored),
                   "rows_resumed": float(len(rows) - scored)}
        if scored:
            figures.update(speed_metrics(scored, spent["seconds"], spent["tokens"],
                                         shard_predict.scorer.startup_seconds))
            prompts = scored * (2 if recipe.engine.swap_tta else 1)
            figures.update(planned_speed(ref.checkpoint, recipe.engine, prompts, spent["tokens"], scored))
        mlflow.log_metrics(figures)
        mlflow.set_tag("model_version", ref.version or "")
        mlflow.log_artifact(str(output_path))
        shutil.rmtree(shard_root)
        print(f"infer: wrote {output_path} ({len(rows)} rows, {scored} scored now, "
              f"{len(rows) - scored} resumed) with {ref.uri} (run {run.info.run_id})")
        return output_path
