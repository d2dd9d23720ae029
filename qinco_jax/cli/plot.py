"""Plot and tabulate the --json results of search_ivf.py / search_2stage.py: 1-recall@1
against milliseconds per query, before and after QINCo re-ranking, with the Pareto front
of each (the paper's Figure 3).

    python search/plot_results.py --json runs/demo/search.json --db synthetic --png runs/demo/pareto.png
"""

from __future__ import annotations

from qinco_jax import cli
from qinco_jax.search import report


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="results file written by search_ivf.py --json")
    p.add_argument("--png", default="", help="write the recall / time plot here (PNG)")
    p.add_argument("--nq", type=int, default=0, help="number of queries the times are for "
                   "(default: read from the results, else from --db)")
    p.add_argument("--db", default="", help="data set the queries came from (to count them)")
    p.add_argument("--title", default="", help="plot title")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    results = report.load_results(args.json)
    nq = args.nq or report.queries_in(results)
    if not nq and args.db:
        from qinco_jax.data.datasets import get_dataset

        nq = get_dataset(args.db).nq
    if not nq:
        raise cli.UsageError("cannot tell how many queries were timed: give --nq or --db")
    print(report.format_table(results, nq))
    if args.png:
        report.plot_recall_vs_time(results, nq, args.png, args.title)
        print(f"plot written to {args.png}")


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
