"""``kvforge inspect``: what a model file holds, without building the engine."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .loader import default_model_path, load_model


def describe(path: Any = None) -> str:
    """A readable report: config, tensor formats, parameter count, KV bytes per token."""
    m = load_model(default_model_path() if path is None else path)
    cfg = m.config
    params = sum(int(np.prod(t.shape)) for t in m.tensors.values())
    nbytes = sum(t.data.nbytes for t in m.tensors.values())
    formats = Counter(t.fmt for t in m.tensors.values())
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    lines = [f"model: {m.path} ({m.source})"]
    lines += [f"  {k}: {v}" for k, v in cfg.to_dict().items()]
    lines.append("tensor formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(formats.items())))
    lines.append(f"parameters: {params:,} ({nbytes / 2**20:.1f} MiB stored)")
    lines.append(f"KV bytes per token: {per_token * 4:,} (float32), {per_token * 2:,} (float16)")
    lines.append(f"chat template: {'yes' if m.chat_template else 'no'}; add BOS: {m.add_bos}")
    return "\n".join(lines)
