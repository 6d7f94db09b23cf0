"""``feather-export eval``: the subcommand's arguments and handler (wired into ``cli.py``).

Also runnable alone: ``python -m feather_export.cli.eval [eval options]``.
"""
from __future__ import annotations

import argparse
import shlex
import sys


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the CLI's subparsers; returns the parser."""
    from feather_export.quality.evaluate import DEFAULT_N, EvalOptions
    from feather_export.quality.evaluate_data import DATA_MAX_NEW_TOKENS

    d = EvalOptions()
    p = subparsers.add_parser(
        "eval", help="accuracy of none and every method x budget on the synthetic shapes task "
                     "or on your own data (--data)",
        description=("Answer the held-out split of the synthetic grounding task (or the items of "
                     "--data FILE.jsonl) with the unpruned model and every method x budget, through "
                     "exported ONNX artifacts and/or the PyTorch reference; print a table and write "
                     "results.json, table.txt (shapes task: also a plot and overlays)."))
    p.add_argument("--model", default=d.model,
                   help=f"checkpoint directory trained on the shapes task (default: the built-in {d.model})")
    p.add_argument("--methods", default=",".join(d.methods),
                   help="comma-separated: none,feather,fastv,fastervlm,btp (default: "
                        f"{','.join(d.methods)}; btp runs its default schedule, once)")
    p.add_argument("--budgets", help="comma-separated first-stage budgets (default: the grid's "
                   "equivalents of LLaVA-1.5's 144,64,32 of 576 tokens; 64,28,14 on a 16x16 grid)")
    p.add_argument("--schedule", action="append", metavar="METHOD=LAYER:KEEP[,LAYER:KEEP]",
                   help="also evaluate this explicit schedule (repeatable), e.g. --schedule "
                        "feather=1:136 --schedule fastv=1:26 --schedule btp=1:128,2:64,3:0 "
                        "(equal-cost comparisons; default: none)")
    p.add_argument("--n", type=int, help=f"samples: of the split (default {DEFAULT_N}), or the first "
                   "N items of --data (default: all)")
    p.add_argument("--data", metavar="FILE.jsonl",
                   help="evaluate on your own data instead of the shapes task: one JSON object per "
                        "line, {\"image\": PATH, \"question\": ..., \"answers\": [...]} (image paths "
                        "relative to the file); scores exact and contains match, with latency "
                        "(default: the shapes task)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"generation bound (default: {d.max_new_tokens} on the shapes task, "
                        f"{DATA_MAX_NEW_TOKENS} with --data)")
    p.add_argument("--engine", default="both", choices=["onnx", "reference", "both"],
                   help="answer through the exported ONNX artifacts, the PyTorch reference, or both "
                        "(and compare them)")
    p.add_argument("--split", default=d.split, choices=["test", "val"],
                   help="held-out split of the shapes task")
    p.add_argument("--seed", type=int, default=d.seed, help="task seed (default 0: the committed results)")
    p.add_argument("--out", help="directory for results.json, table.txt, accuracy_vs_budget.png, overlays/ "
                   "(default: print the table only)")
    p.add_argument("--overlays", type=int, default=d.overlays,
                   help=f"kept-token overlay examples per configuration (ONNX engine; default {d.overlays})")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads (0: library default)")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    from feather_export.quality.evaluate import (EvalOptions, evaluate, format_table,
                                                 parse_budgets, parse_engines, parse_methods,
                                                 parse_schedules)
    from feather_export.quality.evaluate_data import DATA_MAX_NEW_TOKENS, format_data_table

    max_new = {}
    if args.max_new_tokens is not None:
        max_new["max_new_tokens"] = args.max_new_tokens
    elif args.data is not None:
        max_new["max_new_tokens"] = DATA_MAX_NEW_TOKENS

    opts = EvalOptions(model=args.model, methods=parse_methods(args.methods),
                       budgets=parse_budgets(args.budgets) if args.budgets else None,
                       schedules=parse_schedules(args.schedule), n=args.n,
                       engines=parse_engines(args.engine), seed=args.seed, split=args.split,
                       out=args.out, overlays=args.overlays, threads=args.threads,
                       data=args.data, **max_new)
    results = evaluate(opts, command=command_line())
    print(format_data_table(results) if args.data else format_table(results))
    return 0


def command_line(subcommand: str = "eval") -> str:
    """The command as typed, with the program shown as ``feather-export SUBCOMMAND``."""
    argv = sys.argv[1:]
    if argv and argv[0] == subcommand:
        argv = argv[1:]
    return " ".join(["feather-export", subcommand, *(shlex.quote(a) for a in argv)])


def main(argv: list[str] | None = None) -> int:
    """``python -m feather_export.cli.eval``: the eval subcommand on its own."""
    from feather_export.errors import FeatherError

    parser = argparse.ArgumentParser(prog="python -m feather_export.cli.eval")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["eval", *argv])
    try:
        return args.func(args)
    except FeatherError as exc:
        print(f"feather-export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
