"""python -m bench: run the benchmark suite on the device at hand and write the report.

Prints the table and writes bench/results/<device>-<date>/ (results.json, results.csv,
README-table.md, speedup.png, tflops_vs_size.png). See bench/NOTES.md for what is measured.
"""

import argparse
import os
import sys
import time

import torch

from bench import environment, plots, report, timing
from bench.runner import RunOptions, run_suite

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Default allowance for compiling torch.compile baselines (seconds of first calls); --full lifts it.
DEFAULT_COMPILE_BUDGET_S = {"cuda": 150.0, "cpu": 90.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (auto: CUDA if present, else CPU)")
    p.add_argument("--full", action="store_true",
                   help="every workload and precision for the device, max-autotune on, no compile budget")
    p.add_argument("--tiny", action="store_true", help="toy sizes with the same structure (harness tests)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed calls per variant (1: one warm-up and one timed call); default adaptive")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile baseline")
    p.add_argument("--max-autotune", action="store_true",
                   help="add torch.compile(mode='max-autotune') (long compiles; on with --full)")
    p.add_argument("--compile-budget", type=float, default=None, metavar="S",
                   help="seconds of compiling after which compile baselines are skipped "
                        "(default 150 on CUDA, 90 on CPU, none with --full)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop starting new variants after S seconds (the rest reported as skipped)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only cases whose id contains TEXT (repeatable), e.g. seed-model")
    p.add_argument("--dtype", action="append", default=[], choices=("fp32", "tf32", "fp16", "bf16"),
                   help="restrict precisions (repeatable)")
    p.add_argument("--no-cudagraph", action="store_true",
                   help="skip the CUDA-graph timing of launch-bound cases")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>-<date>)")
    p.add_argument("--date", default=None, help="date in the folder name (default today)")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 keeps a shared CPU's timings "
                        "from stalling on descheduled worker threads")
    p.add_argument("--quiet", action="store_true", help="no per-variant progress lines")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> RunOptions:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.rounds == 1 or args.tiny and args.rounds is None:
        tim = timing.TimingOptions.single_round()
    elif args.rounds:
        tim = timing.TimingOptions(min_reps=args.rounds, max_reps=args.rounds, target_s=0.0)
    else:
        tim = timing.TimingOptions()
    budget = args.compile_budget
    if budget is None and not args.full:
        budget = DEFAULT_COMPILE_BUDGET_S[device]
    return RunOptions(
        device=device, full=args.full, tiny=args.tiny, compile=not args.no_compile,
        max_autotune=args.max_autotune or args.full, compile_budget_s=budget,
        time_budget_s=args.time_budget, only=args.only, dtypes=args.dtype,
        cudagraph=not args.no_cudagraph, epoch_reps=5 if device == "cuda" else 3,
        peak_size=64 if args.tiny else (8192 if device == "cuda" else 2048), timing=tim)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = options_from(args)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    date = args.date or environment.today()
    slug = environment.device_slug(environment.device_info(torch.device(opts.device)))
    out_dir = args.out or os.path.join(RESULTS_ROOT, f"{slug}-{date}")

    def save_partial(partial: dict) -> None:  # a killed run still leaves what it measured
        report.write_results({**partial, "date": date}, out_dir, date)

    results = run_suite(opts, log=log, on_progress=save_partial)
    results["date"] = date
    written = report.write_results(results, out_dir, date)  # JSON first: plots may fail
    if args.no_plots:
        pngs, why = [], "--no-plots"
    else:
        pngs, why = plots.write_plots(results, out_dir)
    results["plots"], results["plots_skipped"] = [os.path.basename(p) for p in pngs], why
    written = report.write_results(results, out_dir, date)
    print()
    for title, sub in report.grouped(results):
        print(title)
        print(report.text_table(report.table_rows(sub)))
        print()
    print(report.peak_line(results))
    print(f"fastmlp path: {results['fastmlp_path']}")
    errors = [f"{r['id']} {n}: {e['reason']}" for r in results["records"]
              for n, e in r["variants"].items() if e["status"] == "error"]
    if errors:
        print(f"{len(errors)} variant(s) failed (details in results.json):")
        for line in errors:
            print("  " + line)
    if why:
        print(f"plots: {why}")
    print(f"wrote {out_dir}: {', '.join(sorted(os.path.basename(p) for p in [*written.values(), *pngs]))}"
          f" in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
