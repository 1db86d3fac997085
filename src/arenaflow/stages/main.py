"""`arenaflow main`: every stage as a nested MLflow run (mlflow's multistep workflow pattern), a step reused
when its inputs (step_identity.py) are those of a finished run of it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow

from ..calibration import check_method
from ..recipe import Recipe
from ..step_identity import changed, code_version, step_inputs, step_key
from . import registry
from .runs import stage_run


def project_root() -> Path:
    here = Path.cwd()
    return here if (here / "MLproject").exists() else Path(__file__).resolve().parents[3]  # src/arenaflow/stages/main.py


STEP_KEY_TAG, STEP_INPUTS_TAG = "arenaflow.step_key", "arenaflow.step_inputs"


def _step(entry_point: str, parameters: dict, inputs: dict[str, str], experiment_id: str):
    """Reuse a FINISHED run of the entry point whose inputs (step_identity: recipe sections, file contents,
    upstream steps, code) are the same, else run it as a child run; the decision and why are printed and
    tagged on the parent (`step_<entry point>`) and the child keeps its inputs for the next `main`."""
    client = mlflow.MlflowClient()
    key = step_key(inputs)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
                              order_by=["attributes.start_time DESC"])
    finished = [r for r in runs if r.info.status == "FINISHED" and STEP_KEY_TAG in r.data.tags]
    same = next((r for r in finished if r.data.tags[STEP_KEY_TAG] == key), None)
    if same is not None:
        print(f"main: reusing {entry_point} run {same.info.run_id} (same inputs, step key {key})")
        mlflow.set_tag(f"step_{entry_point}", f"{same.info.run_id} reused: same inputs ({key})")
        return same, key
    if finished:
        what = changed(inputs, json.loads(finished[0].data.tags.get(STEP_INPUTS_TAG, "{}")))
        reason = f"changed since run {finished[0].info.run_id}: {', '.join(what)}"
    else:
        reason = "no finished run of it in this experiment"
    print(f"main: running {entry_point} ({reason})")
    submitted = mlflow.run(str(project_root()), entry_point=entry_point, parameters=parameters,
                           env_manager="local", experiment_id=experiment_id, synchronous=True)
    client.set_tag(submitted.run_id, STEP_KEY_TAG, key)
    client.set_tag(submitted.run_id, STEP_INPUTS_TAG, json.dumps(inputs, sort_keys=True))
    mlflow.set_tag(f"step_{entry_point}", f"{submitted.run_id} ran: {reason}"[:5000])
    return client.get_run(submitted.run_id), key


def run(recipe: Recipe, overrides: list[str] | None = None, infer_input: str = "data/sample_test.csv") -> None:
    """datagen -> finetune -> quantize -> evaluate -> promote -> infer, each a nested MLflow run; a step
    whose inputs are unchanged since a finished run of it is reused (`_step`)."""
    check_method(recipe.calibration.method)  # before finetuning, not after
    common = {"recipe": recipe.path or "", "overrides": " ".join(overrides or [])}
    root = project_root()
    files = [root / f for f in [*recipe.data.files, *([recipe.generate.prompts_file] if recipe.generate.prompts_file else [])]]
    with stage_run(recipe, "main") as parent:
        experiment_id, code = parent.info.experiment_id, code_version()
        mlflow.set_tag("code_version", code)

        def step(entry_point: str, parameters: dict, upstream: dict, step_files=()):
            inputs = step_inputs(entry_point, recipe, upstream=upstream, files=list(step_files), code=code)
            return _step(entry_point, {**common, **parameters}, inputs, experiment_id)

        teacher = recipe.generate.teacher
        labels_with_champion = "label" in recipe.generate.modes and teacher.startswith("models:/") and "@" in teacher
        datagen_run, datagen_key = step("datagen", {"input": ""}, {"teacher": registry.alias_version(
            *registry.parse_models_uri(teacher)[:2]) or "none"} if labels_with_champion else {}, files)
        data = f"runs:/{datagen_run.info.run_id}/data"
        finetune_run, finetune_key = step("finetune", {"data": data}, {"datagen": datagen_key})
        quantize_run, quantize_key = step("quantize", {"data": data, "adapter": f"runs:/{finetune_run.info.run_id}/adapter"},
                                          {"datagen": datagen_key, "finetune": finetune_key})
        version = quantize_run.data.tags["registered_version"]
        model_uri = f"models:/{recipe.registry.model_name}/{version}"
        evaluate_run, evaluate_key = step("evaluate", {"input": data, "model": model_uri},
                                          {"datagen": datagen_key, "quantize": quantize_key})
        promote_run, promote_key = step("promote", {"version": version}, {"evaluate": evaluate_key})
        output = str(Path(tempfile.gettempdir()) / f"arenaflow-main-{parent.info.run_id}.csv")
        infer_run, _ = step("infer", {"input": infer_input, "model": "", "output": output}, {"promote": promote_key},
                            [root / infer_input])
        ft, ev = finetune_run.data.metrics, evaluate_run.data.metrics
        mlflow.log_metrics({
            "base_log_loss": ft["base_log_loss"], "finetuned_log_loss": ft["log_loss"],
            "merged_log_loss": quantize_run.data.metrics["merged_log_loss"],
            "log_loss": ev["log_loss"], "accuracy": ev["accuracy"],
            "length_baseline_log_loss": ev["length_baseline_log_loss"],
            "class_prior_log_loss": ev["class_prior_log_loss"],
            "quant_log_loss_delta": quantize_run.data.metrics["quant_log_loss_delta"],
            "samples_per_s": infer_run.data.metrics.get("samples_per_s", float("nan")),
        })
        mlflow.set_tags({"registered_version": version, "promotion": promote_run.data.tags.get("decision", ""),
                         "calibration_choice": quantize_run.data.tags.get("calibration_choice", "")})
        print(f"main: base zero-shot log_loss {ft['base_log_loss']:.4f} -> finetuned {ft['log_loss']:.4f} -> "
              f"{recipe.quant.scheme} {ev['log_loss']:.4f} (length baseline {ev['length_baseline_log_loss']:.4f}); "
              f"{recipe.registry.model_name} v{version}: {promote_run.data.tags.get('decision', '')}")
