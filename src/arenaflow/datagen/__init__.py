"""Training data generated with an LLM: respond, label, dedup, filter; `dataset.build_dataset` runs them.

Modules: clean (text normalisation, filter, exact and near-duplicates), respond (prompts -> responses
-> unlabelled pairs), label (teacher soft labels), engines (the vLLM engines they share), dataset (the
modes in order, metrics and output files; stages/datagen.py logs them to MLflow).

Modes (recipe `generate.modes`, combinable):
  ingest   the recipe's labelled files -> canonical rows (data.py), split by group;
  respond  prompts (the ingested train split's, or `generate.prompts_file`) -> one response per
           generator x temperature (a "variant") with vLLM `LLM.generate` on chat-template token ids;
           every pair of variants on a prompt becomes an unlabelled A/B row (label -1, model_a/model_b
           name the variant, e.g. "smollm2-135m-instruct@t0.3");
  label    rows without any label -> the teacher's P(A), P(B), P(tie) from the same three-token scorer
           as evaluate (`scoring.predict`) as soft labels p_a/p_b/p_tie, plus a hard label where the
           largest probability reaches `confidence_threshold`;
  dedup    exact (normalised text) and near-duplicate (character-shingle Jaccard) prompts, first kept;
  filter   prompt/response character bounds, an ASCII-share language check, identical A/B responses.
dedup and filter clean the prompts before generation and the generated pairs after it; with respond
off they clean the ingested rows instead. Every count is returned and logged.

Where generated rows go: the ingested rows are split by group first. Prompts for respond come from
the train side only, and a prompts-file prompt equal to a validation prompt (normalised; or near it,
with dedup) is dropped, so validation stays human-labelled and no prompt is on both sides. Generated
rows take the group of their prompt and join train before swap augmentation. Without ingest, the
generated rows themselves are split by group.

Resume: responses and teacher probabilities are computed in shards, each written atomically (temp file
+ rename) under `<work_dir>/{respond,label}/<hash of inputs and settings>/`. A killed run started
again computes only the missing shards; the table is assembled from the shards in order, so no row is
ever duplicated. Sampling seeds are per request (seed, variant, prompt, turn), not per batch.
"""

from __future__ import annotations

from ..data import DataError

GENERATED_SOURCE = "generated"


class DatagenError(DataError):
    """A generate section or input that cannot produce a dataset as asked."""
