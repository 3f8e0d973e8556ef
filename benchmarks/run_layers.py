"""Time single 3x3 conv layers against the int8 peers: ``python -m benchmarks.run_layers --help``.

Example::

    python -m benchmarks.run_layers --shapes 64@56 128@28 --threads 1 2 --repeat 20 \\
        --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import sys

from . import peers


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run :func:`benchmarks.peers.run_benchmark`, print/write the report.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0; 1 with ``--strict`` when a row is invalid or errored.
    """
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_layers", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(peers.DEFAULT_SHAPES), help="C@H, C@HxW or CxK@H")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--impls", nargs="+", default=None, help=f"default: all of {peers.registered_impls()}")
    ap.add_argument("--exclude", nargs="+", default=[], help="drop these implementations")
    ap.add_argument("--repeat", type=int, default=20, help="samples per row (before the budget)")
    ap.add_argument("--budget", type=float, default=15.0, help="seconds of timed rounds per shape x threads")
    ap.add_argument("--gap", type=float, default=2e-3, help="sleep before each sample, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="host",
                    help="target preset of our rows (host = host-avx2; best: the best one for this CPU)")
    ap.add_argument("--spin", action="store_true", help="keep the runtimes' default spin-waiting threads")
    ap.add_argument("--time-invalid", action="store_true", help="also time rows that fail the SQNR check")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any row is invalid or errored")
    ap.add_argument("--json", default=None, help="write the full result (samples included) here")
    ap.add_argument("--markdown", default=None, help="write the Markdown report here")
    args = ap.parse_args(argv)
    peers.set_wait_policy(passive=not args.spin)
    from tvm_winoq.errors import TargetError

    try:
        peers.set_preset(args.preset)
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    impls = [n for n in (args.impls or peers.registered_impls()) if n not in set(args.exclude)]
    if problem := peers.unknown_impls_message(impls):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    result = peers.run_benchmark(args.shapes, args.threads, impls, repeat=args.repeat, budget_s=args.budget,
                                 seed=args.seed, gap_s=args.gap, time_invalid=args.time_invalid)
    peers.save_results(result, args.json, args.markdown)
    print(peers.to_markdown(result))
    bad = [r for r in result["rows"] if r["status"] in ("invalid", "error")]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
