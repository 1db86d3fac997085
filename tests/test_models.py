import json

import pytest

from arenaflow.models import ModelError, label_token_ids, load_tokenizer, publish_dir, read_config, resolve_model, temp_dir_beside


@pytest.mark.slow
def test_smollm2_resolves_to_a_plain_safetensors_checkpoint(monkeypatch):
    import transformers

    checkpoint = resolve_model("gguf:smollm2-135m-instruct")
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer is gone
    assert (checkpoint / "model.safetensors").exists()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("converted again"))
    assert resolve_model("gguf:smollm2-135m-instruct") == checkpoint  # converted once, cached


def test_label_words_are_single_distinct_tokens():
    tokenizer = load_tokenizer(resolve_model("tiny:llama"))
    ids = label_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids] == ["A", "B", "tie"]


def test_tiny_llama_is_small_and_loadable():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny:llama"))
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert model.config.head_dim == 32


def test_tokenizer_that_splits_labels_is_rejected():
    class SplittingTokenizer:
        name_or_path = "toy"

        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "tie" else [ord(text)]

    with pytest.raises(ModelError, match="encodes 'tie' as 2 tokens"):
        label_token_ids(SplittingTokenizer())


@pytest.mark.parametrize("reference, message", [
    ("gguf:unknown-model", "unknown GGUF model"),
    ("./no/such/dir", "not a local checkpoint"),
    ("", "empty model reference"),
])
def test_bad_references(reference, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(reference)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_read_config_names_the_checkpoint_it_cannot_read(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert read_config(tmp_path) == {"architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=f"{tmp_path}: no readable config.json"):
        read_config(tmp_path)
    with pytest.raises(ModelError, match="no readable config.json"):
        read_config(tmp_path / "missing")


def test_publish_dir_replaces_a_checkpoint_keeps_the_first_cache_and_refuses_other_folders(tmp_path):
    def finished(out, text):
        tmp = temp_dir_beside(out)
        (tmp / "config.json").write_text(text)
        return tmp

    out = tmp_path / "ckpt"
    publish_dir(finished(out, "1"), out, replace=False)
    publish_dir(finished(out, "2"), out, replace=False)  # a cache: the first writer's copy stays
    assert (out / "config.json").read_text() == "1"
    publish_dir(finished(out, "3"), out, replace=True)
    assert (out / "config.json").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a checkpoint directory; refusing to replace it"):
        publish_dir(finished(other, "4"), other, replace=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]


PROSE = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every evening, the keeper "
         "climbed the narrow stairs to light the lamp, and every morning he came down again to write in his logbook. "
         "He recorded the weather, the ships that passed, and anything unusual he had seen during the night. Most of "
         "the entries were short and plain: a north wind, light rain, two fishing boats heading home before dark.")


@pytest.mark.slow
def test_gemma3_270m_converts_with_a_working_tokenizer():
    """transformers 5.17 rebuilds Gemma's tokenizer from the GGUF as Unigram (4.9 nats/token on prose, twice
    the tokens); the rebuilt BPE tokenizer gives the model's real figure (2.7; SmolLM2-135M: 3.0)."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = resolve_model("gguf:gemma3-270m")
    tokenizer = load_tokenizer(checkpoint)
    assert len(set(label_token_ids(tokenizer))) == 3 and "Answer:" in tokenizer.chat_template
    ids = tokenizer(PROSE, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and ids.shape[1] < len(PROSE.split()) * 1.4  # not ~2x the words
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        nats = model(ids, labels=ids).loss.item()
    assert nats < 3.5, nats
