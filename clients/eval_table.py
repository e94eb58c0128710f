"""One table from several `longserve eval` result files.

    longserve eval table results/nbce-n4.json results/nbce-n24-t0.json results/nbce-n24-t1.json ...

Long sweeps are run in pieces (one document count, or one trial, per run, so a
cut run loses little); this prints the table the whole sweep would have
printed. The files must hold one kind of result for one model. A record that
a later file repeats (same method and cell, same trial) replaces the earlier
one, so a cut trial re-run with --first-trial takes the place of its error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longserve.clients.longeval_tables import loss_table, passkey_table, plot_loss, plot_passkey
from longserve.clients.nbce_eval import nbce_table, plot_nbce
from longserve.clients.ruler import plot_ruler, ruler_table

AXES = {"passkey": ("lengths", "depths"), "loss": ("contexts",), "nbce": ("docs",), "ruler": ("lengths", "tasks")}  # the lists each kind's table runs over
CELL_FIELDS = {
    "passkey": ("method", "length", "depth", "trial"),
    "loss": ("method", "context"),
    "nbce": ("method", "n", "trial"),
    "ruler": ("method", "length", "task", "sample"),
}


def merge_results(results: list[dict]) -> dict:
    kinds = sorted({result["kind"] for result in results})
    if len(kinds) != 1:
        raise SystemExit(f"the files hold {' and '.join(kinds)} results; give files of one kind")
    models = sorted({result["model"] for result in results})
    if len(models) != 1:
        raise SystemExit(f"the files come from different models ({', '.join(models)}); give files of one model")
    kind = kinds[0]
    fields = CELL_FIELDS[kind]
    records: dict[tuple, dict] = {}
    for result in results:
        for record in result["records"]:
            records[tuple(record[f] for f in fields)] = record  # a later file wins
    merged = dict(results[0])
    for axis in AXES[kind]:
        merged[axis] = sorted({value for result in results for value in result[axis]})
    merged["records"] = list(records.values())
    return merged


def table_for(result: dict) -> tuple[str, object]:
    """The table text and the plot function for a result of any kind."""
    tables = {"passkey": (passkey_table, plot_passkey), "loss": (loss_table, plot_loss), "nbce": (nbce_table, plot_nbce),
              "ruler": (ruler_table, plot_ruler)}
    table, plot = tables[result["kind"]]
    return table(result), plot


def add_table_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by longserve eval passkey|loss|nbce|ruler")
    parser.add_argument("--plot", type=Path, help="also draw the merged result into this PNG")


def run_table(args: argparse.Namespace) -> None:
    results = []
    for path in args.files:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read {path}: {exc}; give JSON files written by longserve eval") from exc
        if results[-1].get("kind") not in AXES:
            raise SystemExit(f"{path} is not a longserve eval result (no kind passkey, loss, nbce or ruler)")
    merged = merge_results(results)
    table, plot = table_for(merged)
    if args.plot and merged["records"]:
        plot(merged, args.plot)
    print(table)
