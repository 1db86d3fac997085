"""The stages: one module per CLI verb (datagen, finetune, quantize, evaluate, promote, infer, main, bench,
plan, ui), each the verb's single door: `run(recipe, ...)` opens the stage's MLflow run, calls the
MLflow-free library modules of the package above, and logs what they return. The MLflow-facing helpers
the doors share live here too: runs (one run per stage, tracking store), registry (versions, aliases,
model references), datasets (rows in and out of MLflow), train_launch (finetune's accelerate workers
joining the stage's run)."""
