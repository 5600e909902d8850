"""The ``kvforge`` command line: generate, chat, inspect, convert, bench, eval, calibrate,
medusa-train.

Exit codes: 0 success, 1 model or runtime error (one-line message; ``--debug`` shows the
traceback), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import cli_fit as fit
from . import cli_serve as serve_cli
from .errors import ConfigError, Error


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all)")
    p.add_argument("--kv-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--activations", choices=("float32", "int8"), default="float32",
                   help="int8: faster, approximate decode steps (default: exact float32)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--streaming-llm", nargs=2, type=int, metavar=("SINK", "WINDOW"),
                   help="evict with StreamingLLM: keep SINK first tokens and a WINDOW")
    _press_args(p)


def _press_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--press", default=None, metavar="NAME",
                   help="compress the KV cache with a press: streaming_llm, knorm, snapkv, "
                        "tova, expected_attention, observed_attention, keydiff, pyramidkv, "
                        "h2o, lazy_eviction, kvzip, duo_attention, or adakv-NAME")
    p.add_argument("--compression-ratio", type=float, default=None,
                   help="fraction of the prompt's KV cache the press drops, in [0, 1)")
    p.add_argument("--budget-tokens", type=int, default=None,
                   help="tokens per head the press keeps (instead of --compression-ratio)")
    p.add_argument("--press-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a press argument, e.g. window_size=32 (repeatable)")
    p.add_argument("--attention", default=None, metavar="SPEC", help=ATTENTION_HELP)


ATTENTION_HELP = ("attention variant NAME[:KEY=VALUE,...]: dense, top_k:k=64, "
                  "quest:token_budget=512, loki:rank=16,top_k=0.25 (after kvforge calibrate), "
                  "hsr:eps=1e-3, hsr:top_k=64, hsr:threshold=2")


def _speculative(args: argparse.Namespace) -> Any:
    spec = getattr(args, "speculative", None)
    if spec is None:
        if getattr(args, "acceptance", None):
            raise ConfigError("--acceptance needs --speculative")
        return None
    from dataclasses import replace

    from .spec import parse

    rule = args.acceptance or ("greedy" if args.temperature == 0 else "lossless")
    return replace(parse(spec), acceptance=rule)


def _attention(args: argparse.Namespace) -> Any:
    from .attention import parse

    return parse(args.attention) if getattr(args, "attention", None) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvforge", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt, streaming")
    g.add_argument("prompt", nargs="?", default="What is the capital of France?")
    g.add_argument("--raw", action="store_true",
                   help="use the prompt as is instead of wrapping it in the chat template")
    _model_args(g)
    _sampling_args(g)
    g.add_argument("--speculative", default=None, metavar="DRAFTER",
                   help="speculative decoding with a drafter: prompt-lookup, "
                        "hierarchy[:HISTORY.json] (kept across runs), medusa[:PATH] (after "
                        "kvforge medusa-train), self:K (the first K layers), draft:PATH (a "
                        "model of the same vocabulary)")
    g.add_argument("--acceptance", choices=("greedy", "typical", "lossless"), default=None,
                   help="speculative acceptance rule (default: greedy at temperature 0, "
                        "else lossless)")
    c = sub.add_parser("chat", help="interactive chat (empty line or Ctrl-D to quit)")
    c.add_argument("--system", default=None, help="system message")
    _model_args(c)
    _sampling_args(c)
    i = sub.add_parser("inspect", help="config, tensor formats, parameters, KV bytes per token")
    i.add_argument("model", nargs="?", default=None)
    b = sub.add_parser("bench", help="prefill and decode tokens/s on this machine")
    _model_args(b)
    b.add_argument("--prefill", type=int, nargs="*", default=[512, 2048],
                   help="prompt lengths to time (default 512 2048)")
    b.add_argument("--contexts", type=int, nargs="*", default=[128, 2048, 7000],
                   help="context lengths to time decode at (default 128 2048 7000)")
    b.add_argument("--steps", type=int, default=32, help="decode steps per context")
    b.add_argument("--plot", metavar="PNG", help="save decode tok/s vs context (matplotlib)")
    b.add_argument("--batch", type=int, nargs="*", default=[], metavar="SEQS",
                   help="also time batched decode of SEQS sequences at each context")
    b.add_argument("--tree", type=int, nargs="*", default=[], metavar="NODES",
                   help="also time verifying a speculation tree of NODES tokens at each context")
    _press_args(b)
    e = sub.add_parser("eval", help="fidelity of presses against dense on real text")
    _model_args(e)
    e.add_argument("--press", action="append", default=[], metavar="NAME",
                   help="a press to evaluate (repeatable; default: every press by name)")
    e.add_argument("--press-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument for every evaluated press (repeatable)")
    e.add_argument("--attention", action="append", default=[], metavar="SPEC",
                   help=ATTENTION_HELP + " (repeatable; alone: evaluated without a press; "
                        "with --press: every press under every variant)")
    e.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    e.add_argument("--context", type=int, default=1024, help="teacher-forcing context tokens")
    e.add_argument("--continuation", type=int, default=128, help="teacher-forced tokens")
    e.add_argument("--passkey", type=int, nargs="*", default=[2048, 4096, 8192],
                   help="passkey context lengths (none to skip)")
    e.add_argument("--trials", type=int, default=3, help="passkeys per length")
    e.add_argument("--out", default="kvforge-eval", help="folder for eval.json/csv/png")
    fit.add_parsers(sub, _model_args)
    serve_cli.add_parser(sub, _model_args)
    v = sub.add_parser("convert", help="write a Hugging Face folder from a GGUF file or folder")
    v.add_argument("source")
    v.add_argument("out_dir")
    return parser


def _llm(args: argparse.Namespace, num_blocks: int | None = None) -> Any:
    from . import LLM, KVCacheConfig

    kv = KVCacheConfig(block_size=args.block_size, dtype=args.kv_dtype, num_blocks=num_blocks)
    return LLM(args.model, n_threads=args.threads, activations=args.activations, kv=kv)


def _params(args: argparse.Namespace) -> Any:
    from . import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop))


def _press(args: argparse.Namespace) -> Any:
    from .presses import StreamingLLM

    if args.streaming_llm and args.press:
        raise ConfigError("give either --streaming-llm or --press")
    if args.streaming_llm:
        return StreamingLLM(*args.streaming_llm)
    return press_from_args(args)


def press_from_args(args: argparse.Namespace) -> Any:
    """The press of ``--press NAME --compression-ratio R --press-arg K=V ...``, or None."""
    from .presses import by_name

    if args.press is None:
        if args.compression_ratio is not None or args.budget_tokens is not None or args.press_arg:
            raise ConfigError("--compression-ratio, --budget-tokens and --press-arg need --press")
        return None
    kwargs: dict[str, Any] = {}
    if args.compression_ratio is not None:
        kwargs["compression_ratio"] = args.compression_ratio
    if args.budget_tokens is not None:
        kwargs["budget_tokens"] = args.budget_tokens
    kwargs.update(_press_arg_kwargs(args.press_arg))
    return by_name(args.press, **kwargs)


def _press_arg_kwargs(items: list[str]) -> dict[str, Any]:
    """``--press-arg KEY=VALUE`` items as keyword arguments."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--press-arg {item!r}: expected KEY=VALUE")
        kwargs[key] = _number(value)
    return kwargs


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise ConfigError(f"press argument value {text!r} is not a number")


class _PrefillBar:
    """A tqdm bar over a long prompt's prefill: off when stderr is not a terminal (tqdm's
    ``disable=None``), when ``KVFORGE_DISABLE_PROGRESS_BARS`` is set, or for short prompts."""

    MIN_TOKENS = 512

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total < self.MIN_TOKENS or os.environ.get("KVFORGE_DISABLE_PROGRESS_BARS"):
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="prefill", disable=None, leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stream(llm: Any, prompt: Any, args: argparse.Namespace, session: Any = None) -> str:
    bar = _PrefillBar()
    if session is None:
        chunks = llm.generate(prompt, _params(args), press=_press(args),
                              attention=_attention(args), stream=True,
                              progress=bar, speculative=_speculative(args))
    else:
        chunks = llm.chat(prompt, _params(args), session=session, stream=True, progress=bar)
    try:
        text = _print_chunks(chunks)
    finally:
        bar.close()
    return "".join(text)


def _print_chunks(chunks: Any) -> list[str]:
    text = []
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
        text.append(chunk.text)
        if chunk.stats is not None:
            s = chunk.stats
            cached = f", {s.cached_prompt_tokens} cached" if s.cached_prompt_tokens else ""
            spec = (f" | speculative: {s.accepted_tokens}/{s.draft_tokens} drafts accepted, "
                    f"{s.mean_acceptance_length:.2f} per step" if s.verify_steps else "")
            print(f"\n[prefill {s.prompt_tokens} tok{cached} at {s.prefill_tok_s:.1f} tok/s | "
                  f"decode {s.generated_tokens} tok at {s.decode_tok_s:.1f} tok/s{spec} | "
                  f"finish: {chunk.finish_reason}]", file=sys.stderr, flush=True)
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    prompt = args.prompt
    if not args.raw and llm._loaded.chat_template:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(llm, prompt, args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Each turn prefills only the new tokens: the session keeps the conversation's cache."""
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with llm.session(press=_press(args), attention=_attention(args)) as session:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            reply = _stream(llm, messages, args, session=session)
            messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_model import describe

    print(describe(args.model))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .config import sequence_blocks

    llm = _llm(args)
    if args.batch:
        # Room for the largest batch at the longest context (pages are committed on use).
        cfg, longest = llm.config, max(args.contexts, default=0) + args.steps
        per_seq = sequence_blocks(cfg, args.block_size, longest)
        llm = _llm(args, num_blocks=max(per_seq * max(args.batch), llm.kv_stats()["total_blocks"]))
    press, attention = press_from_args(args), _attention(args)
    rows = bench.run(llm, args.prefill, args.contexts, args.steps, press, attention)
    fits = [c for c in args.contexts if c + args.steps < llm.max_context]
    rows += [bench.batch_row(llm, n, c, args.steps) for c in fits for n in args.batch]
    rows += [bench.tree_row(llm, n, c) for c in fits for n in args.tree]
    print(f"model: {llm._loaded.path}  threads: {llm.n_threads}  "
          f"KV: {llm.kv_config.dtype}" + (f"  press: {press}" if press is not None else "")
          + (f"  attention: {attention}" if attention is not None else ""))
    print(bench.table(rows))
    if args.plot:
        try:
            print(f"plot: {bench.plot(rows, args.plot)}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)",
                  file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import eval as ev
    from .attention import parse
    from .presses import BY_NAME

    kwargs = _press_arg_kwargs(args.press_arg)
    variants = [(spec, parse(spec)) for spec in args.attention]
    names = args.press or ([] if variants else [n for n in BY_NAME if n != "streaming_llm"] + [
        "streaming_llm", "adakv-expected_attention"])

    def maker(name: str) -> Any:
        return lambda r: ev.ratio_press(name, r, args.context, **kwargs)

    for name in names:
        maker(name)(0.5)  # a bad name or argument fails before any work
    if not names:
        configs = [ev.Config(spec, lambda r: None, var) for spec, var in variants]
        ratios = [0.0]
    else:
        configs = [ev.Config(f"{n}+{spec}" if spec else n, maker(n), var)
                   for n in names for spec, var in (variants or [("", None)])]
        ratios = args.ratios
    llm = _llm(args)
    rows = ev.evaluate(llm, configs, ratios,
                       context=args.context, continuation=args.continuation,
                       passkey_lengths=args.passkey, trials=args.trials)
    print(ev.table(rows))
    for kind, path in ev.write(rows, args.out).items():
        print(f"{kind}: {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .loader.convert import convert_to_hf

    out = convert_to_hf(args.source, args.out_dir)
    print(f"wrote {out}")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "inspect": cmd_inspect,
            "convert": cmd_convert, "bench": cmd_bench, "eval": cmd_eval,
            "calibrate": fit.cmd_calibrate, "medusa-train": fit.cmd_medusa_train,
            "serve": serve_cli.cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (Error, OSError) as e:
        if args.debug:
            raise
        print(f"kvforge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
