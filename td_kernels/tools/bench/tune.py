"""``td-kernels tune``: what ``backend="auto"`` should pick on a card, from its op benchmark.

Reads the CSV that ``td-kernels bench`` wrote on one device (bench/results/<card>/bench.csv) and,
per targeting kind (weight, nm, unit), ranks our providers, the backends and their selection
variants (``triton``, ``triton:sampled``, ``native``, ``native:fused``, ``reference``), by their
**fwd+bwd** time, what a training step pays:

* a *group* is one (shape, dtype, mask, rates) of that kind; in each, a provider's time is
  divided by the group's best time (1.0 = the fastest there);
* a provider's score is the geometric mean of those ratios over every group (so each shape and
  dtype counts alike, whatever its size); a provider missing from a group is not ranked (it says
  so), since its score would cover other shapes than its rivals';
* the lowest score wins; ``variant`` is the part after ``:`` (None for a plain backend: its
  default).

It prints, per kind, each provider's score, its wins and its worst ratio. ``--write`` records the
winners in ``td_kernels/_measured.py`` under the card's name (``_registry.card_name``), replacing
that card's entry: ``backend="auto"`` then takes them on that card. Yardsticks (clone, dropout,
torch-kthvalue) are never candidates. Reads only the CSV: no device is needed, so a session
tunes a GPU's results on its own machine.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import math
import pprint
import sys
from pathlib import Path

from ... import _measured
from ..._registry import KINDS, card_slug, known_backends
from .common import read_csv, text_table

__all__ = ["score", "entry", "write_entry", "main"]

GROUP = ("shape", "dtype", "mask", "drop_rate", "targ_rate")


def _split(provider: str):
    """``"native:fused"`` -> ``("native", "fused")``; ``"triton"`` -> ``("triton", None)``."""
    backend, _, variant = provider.partition(":")
    return backend, variant or None


def score(rows: list, kind: str) -> list:
    """``[(provider, score, wins, groups, worst)]`` best first, for ``kind``'s fwd+bwd rows of our
    providers; providers missing from some group come last with score None."""
    times: dict = {}
    for r in rows:
        if r["op"] == kind and r["mode"] == "fwd+bwd" and _split(r["provider"])[0] in known_backends():
            ms = float(r["ms"])
            if not ms > 0 or math.isinf(ms):
                raise ValueError(f"row {r['provider']} {kind} {r['shape']} {r['dtype']}: ms must be a positive "
                                 f"time, got {r['ms']!r}")
            times.setdefault(tuple(r[c] for c in GROUP), {})[r["provider"]] = ms
    providers = sorted({p for g in times.values() for p in g})
    out = []
    for p in providers:
        ratios = [g[p] / min(g.values()) for g in times.values() if p in g]
        wins = sum(g[p] == min(g.values()) for g in times.values() if p in g)
        complete = len(ratios) == len(times)
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if complete else None
        out.append((p, geo, wins, len(ratios), max(ratios)))
    return sorted(out, key=lambda t: (t[1] is None, t[1] if t[1] is not None else 0.0, t[0]))


def entry(rows: list, source: str) -> tuple[str, dict]:
    """``(card, entry)`` for ``_measured.CARDS`` from one device's benchmark rows."""
    names = sorted({r["device_name"] for r in rows})
    if len(names) != 1:
        raise ValueError(f"the CSV must hold one device's rows (got {names or 'none'}): pass --card NAME")
    first = rows[0]
    choices = {}
    for kind in KINDS:
        ranked = [t for t in score(rows, kind) if t[1] is not None]
        if not ranked:
            continue
        best = ranked[0]
        backend, variant = _split(best[0])
        choices[kind] = {"backend": backend, "variant": variant, "score": round(best[1], 4), "wins": best[2],
                         "groups": best[3], "next": ranked[1][0] if len(ranked) > 1 else None,
                         "next_score": round(ranked[1][1], 4) if len(ranked) > 1 else None}
    if not choices:
        raise ValueError("the CSV has no fwd+bwd rows of our backends: run `td-kernels bench` with fwd+bwd in --modes")
    return card_slug(names[0]), {
        "device_type": first["device_type"], "device_name": names[0], "torch": first.get("torch", ""),
        "triton": first.get("triton", ""), "git_commit": first.get("git_commit", ""),
        "measured": max(r.get("timestamp", "") for r in rows), "source": source,
        "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "choices": choices}


def write_entry(card: str, value: dict, path: Path = Path(_measured.__file__)) -> None:
    """Replace ``card``'s entry of ``CARDS`` in ``path`` (the module's text up to ``CARDS`` kept)."""
    text = path.read_text()
    head, sep, tail = text.partition("\nCARDS: dict = ")
    if not sep:
        raise ValueError(f"{path}: no `CARDS: dict = ` line to replace")
    cards = ast.literal_eval(tail)
    cards[card] = value
    path.write_text(f"{head}{sep}{pprint.pformat(cards, width=110, sort_dicts=True)}\n")


def report(rows: list) -> str:
    lines = ["fwd+bwd time per (shape, dtype, mask, rates) group over the group's best: score = their geometric "
             "mean (1 = always fastest; '-': not measured in every group), wins = groups where it was fastest, "
             "worst = its largest ratio", ""]
    table = [(kind, p, "-" if s is None else f"{s:.3f}", f"{w}/{n}", f"{worst:.2f}")
             for kind in KINDS for p, s, w, n, worst in score(rows, kind)]
    return "\n".join(lines + [text_table(("kind", "provider", "score", "wins", "worst"), table, 2), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="td-kernels tune", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="the op benchmark's CSV of one device (bench/results/<card>/bench.csv)")
    p.add_argument("--card", default=None, help="use only the rows of this device_name (a CSV of several devices)")
    p.add_argument("--write", action="store_true",
                   help=f"record the winners for backend='auto' in {Path(_measured.__file__).name} (replacing "
                        "this card's entry)")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        p.error(f"csv: no such file: {args.csv}")
    rows = read_csv(args.csv)
    missing = [c for c in ("device_name", "op", "mode", "provider", "ms", *GROUP) if rows and c not in rows[0]]
    if missing:
        p.error(f"csv: {args.csv} is not an op benchmark CSV (no column {', '.join(missing)})")
    if args.card is not None:
        rows = [r for r in rows if r["device_name"] == args.card]
    try:
        card, value = entry(rows, str(args.csv))
    except ValueError as e:
        p.error(str(e))
    print(report(rows))
    print(f"backend='auto' on {card} ({value['device_name']}):")
    for kind, c in value["choices"].items():
        rival = "no rival measured in every group" if c["next"] is None else f"next: {c['next']} {c['next_score']:.3f}"
        print(f"  {kind}: {c['backend']}{'' if c['variant'] is None else ':' + c['variant']} "
              f"(score {c['score']:.3f}, fastest in {c['wins']} of {c['groups']} groups; {rival})")
    if args.write:
        write_entry(card, value)
        print(f"written to {_measured.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
