"""The model code against Transformers' own for each family it runs (tiny random models
saved as Hugging Face folders, float32 on CPU), and the configs and folders it refuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpu_worker.attention import AttentionMetadata, KVCache, TorchPagedAttention
from gpu_worker.model import LlamaModel, load_config, load_weights
from gpu_worker.ops import TorchOps
from tandem import models
from tests.gpu_worker.test_model_kernels import metadata

SHAPE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6}
PROMPT = 40


def save_hf_model(family: str, folder, **extra) -> torch.nn.Module:
    """A random model of ``family`` (every weight perturbed, norms included, so that each
    one shows in the logits) saved as a safetensors folder."""
    import transformers

    config = getattr(transformers, f"{family}Config")(**SHAPE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def tandem_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    config = load_config(folder)
    model = LlamaModel(config, load_weights(folder, torch.float32, "cpu"), torch.float32,
                       "cpu", ops=TorchOps())
    s = model.shape
    cache = KVCache(s.num_layers, 8, 16, s.num_kv_heads, s.head_dim, torch.float32,
                    torch.device("cpu"))
    fields, _ = metadata([0], [len(ids)], [[1, 2, 3, 4]], "cpu")
    with torch.inference_mode():
        return model.forward(ids, AttentionMetadata(**fields),
                             TorchPagedAttention(cache, s.head_dim**-0.5), None)


@pytest.mark.parametrize(("family", "extra"), [
    ("Llama", {}), ("Llama", {"tie_word_embeddings": True}), ("Mistral", {}),
    ("Qwen2", {}), ("Qwen3", {})])
def test_logits_match_transformers(tmp_path, family, extra):
    hf = save_hf_model(family, tmp_path, **extra)
    ids = torch.randint(0, SHAPE["vocab_size"], (PROMPT,),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    torch.testing.assert_close(tandem_logits(tmp_path, ids), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("family", "extra", "match"), [
    ("Gemma", {}, "model_type 'gemma' is not supported"),
    ("Llama", {"mlp_bias": True}, "mlp_bias"),
    ("Llama", {"attention_bias": True}, "o_proj.bias"),  # the O product takes no bias
])
def test_architectures_it_would_run_wrong_are_refused(tmp_path, family, extra, match):
    save_hf_model(family, tmp_path, **extra)
    with pytest.raises(ValueError, match=match):
        tandem_logits(tmp_path, torch.zeros(4, dtype=torch.long))


def test_weights_left_over_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model("Llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="q_norm"):
        tandem_logits(tmp_path, torch.zeros(4, dtype=torch.long))


def test_only_the_indexed_shards_load(tmp_path):
    """A folder that also holds its weights in another file (Mistral's
    consolidated.safetensors) loads them once: the index's shards, else model*."""
    save_hf_model("Mistral", tmp_path)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "consolidated.safetensors")
    from safetensors.torch import load_file, save_file

    other = {f"other.{k}": v for k, v in load_file(tmp_path / "model.safetensors").items()}
    save_file(other, tmp_path / "consolidated.safetensors", metadata={"format": "pt"})
    names = set(load_weights(tmp_path, torch.float32, "cpu"))
    assert names and not any(n.startswith("other.") for n in names)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    assert set(load_weights(tmp_path, torch.float32, "cpu")) == names


@pytest.mark.parametrize(("extra", "expected"), [
    ({"model_type": "mistral", "sliding_window": 256}, 256),
    ({"model_type": "mistral", "sliding_window": None}, 512),
    ({"model_type": "qwen2", "sliding_window": 128, "use_sliding_window": False}, 512),
    ({"model_type": "qwen2", "sliding_window": 128, "use_sliding_window": True}, 128)])
def test_a_sliding_window_caps_the_context(tmp_path, extra, expected):
    from tokenizer_svc.tokenization import ModelTokenizer

    source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
    shutil.copytree(source.folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(max_position_embeddings=512, **extra)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelTokenizer(tmp_path, None).max_context == expected
    with pytest.raises(ValueError, match="exceeds"):
        ModelTokenizer(tmp_path, expected + 1)
