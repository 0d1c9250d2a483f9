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
* the lowest score wins, ties going to the priority order (the backend ``auto`` takes unmeasured,
  then a backend's default variant); a winner other than that default must beat it by
  ``MARGIN`` (3%), else the default is kept: one timing round on a GPU is not enough to move
  ``auto`` for less;
* ``variant`` is the part after ``:``; a plain provider records its backend's default variant by
  name (the first of ``Backend.variants[kind]``), so that ``auto`` passes it explicitly.

Rows it refuses: a time that is not a positive finite number, and two rows of one provider in one
group (CSVs of several runs or devices: ``--card`` picks one device).

It prints, per kind, each provider's score, its wins and its worst ratio. ``--write`` records the
winners in ``td_kernels/_measured.py`` (or ``--into``) under the card's name
(``_registry.card_name``), replacing that card's entry: ``backend="auto"`` then takes them on that
card. GPU cards only: on a CPU the native kernels are the one compiled backend. Yardsticks (clone,
dropout, torch-kthvalue) are never candidates. Reads only the CSV: no device is needed, so a
session tunes a GPU's results on its own machine.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import math
import os
import pprint
import sys
from pathlib import Path

from ... import _measured, _registry
from ..._registry import KINDS, card_slug, known_backends
from .common import read_csv, text_table

__all__ = ["score", "entry", "write_entry", "main", "MARGIN"]

GROUP = ("shape", "dtype", "mask", "drop_rate", "targ_rate")
# A choice other than the priority order's (the backend "auto" takes unmeasured, with its default
# variant) must be this much faster (score ratio), else the default stays: the GPU run times one
# round, and a win inside the noise would move auto for nothing.
MARGIN = 0.03


def _split(provider: str):
    """``"native:fused"`` -> ``("native", "fused")``; ``"triton"`` -> ``("triton", None)``."""
    backend, _, variant = provider.partition(":")
    return backend, variant or None


def _ms(r: dict, kind: str) -> float:
    where = f"row {r['provider']} {kind} {r['mode']} {r['shape']} {r['dtype']} {r['mask']}"
    try:
        ms = float(r["ms"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: ms must be a number, got {r['ms']!r}") from None
    if not (ms > 0 and math.isfinite(ms)):
        raise ValueError(f"{where}: ms must be a positive finite time, got {r['ms']!r}")
    return ms


def score(rows: list, kind: str) -> list:
    """``[(provider, score, wins, groups, worst)]`` best first, for ``kind``'s fwd+bwd rows of our
    providers; providers missing from some group come last with score None. Ties go to the
    priority order (``_priority``)."""
    times: dict = {}
    for r in rows:
        if r["op"] == kind and r["mode"] == "fwd+bwd" and _split(r["provider"])[0] in known_backends():
            key = tuple(r[c] for c in GROUP)
            group = times.setdefault(key, {})
            if r["provider"] in group:
                raise ValueError(f"two fwd+bwd rows of {r['provider']} for {kind} {dict(zip(GROUP, key))}: "
                                 "the CSV mixes runs (pass --card, or one run's CSV)")
            group[r["provider"]] = _ms(r, kind)
    device_type = rows[0]["device_type"] if rows else "cuda"
    out = []
    for p in sorted({p for g in times.values() for p in g}):
        ratios = [g[p] / min(g.values()) for g in times.values() if p in g]
        wins = sum(g[p] == min(g.values()) for g in times.values() if p in g)
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if len(ratios) == len(times) else None
        out.append((p, geo, wins, len(ratios), max(ratios)))
    return sorted(out, key=lambda t: (t[1] is None, t[1] or 0.0, _priority(t[0], kind, device_type)))


def _priority(provider: str, kind: str, device_type: str) -> tuple:
    """Sort key of the priority order: the backend "auto" would take unmeasured first, a
    backend's default variant before its others."""
    backend, variant = _split(provider)
    b = _registry._BACKENDS.get(backend)
    rank = -b.priority.get(device_type, -1) if b is not None else 0
    default = b.variants.get(kind, (None,))[0] if b is not None and b.variants.get(kind) else None
    return rank, variant not in (None, default), provider


def _variant(backend: str, variant, kind: str):
    """The variant to record: a plain provider ran its backend's default (the first of its
    variants), recorded by name so that auto passes it explicitly; a variant this library's
    backend does not have is refused."""
    b = _registry._BACKENDS.get(backend)
    variants = b.variants.get(kind, ()) if b is not None else ()
    if variant is None:
        return variants[0] if variants else None
    if b is not None and variant not in variants:
        raise ValueError(f"provider {backend}:{variant}: backend {backend!r} has no {kind} variant {variant!r} "
                         f"(it has {variants or 'none'})")
    return variant


def entry(rows: list, source: str) -> tuple[str, dict]:
    """``(card, entry)`` for ``_measured.CARDS`` from one device's benchmark rows."""
    if not rows:
        raise ValueError("the CSV has no rows")
    names = sorted({r["device_name"] for r in rows})
    if len(names) != 1:
        raise ValueError(f"the CSV holds several devices' rows ({', '.join(names)}): pass --card NAME")
    choices = {}
    for kind in KINDS:
        ranked = [t for t in score(rows, kind) if t[1] is not None]
        if not ranked:
            continue
        best = ranked[0]
        default = min(ranked, key=lambda t: _priority(t[0], kind, rows[0]["device_type"]))
        if best[0] != default[0] and best[1] * (1 + MARGIN) > default[1]:
            best = default  # not clearly faster than what auto takes anyway
        rival = next((t for t in ranked if t[0] != best[0]), None)
        backend, variant = _split(best[0])
        choices[kind] = {"backend": backend, "variant": _variant(backend, variant, kind), "provider": best[0],
                         "score": round(best[1], 4), "wins": best[2], "groups": best[3],
                         "next": rival and rival[0], "next_score": rival and round(rival[1], 4)}
    if not choices:
        raise ValueError("the CSV has no fwd+bwd rows of our backends: run `td-kernels bench` with fwd+bwd in --modes")
    first = rows[0]
    return card_slug(names[0]), {
        "device_type": first["device_type"], "device_name": names[0], "torch": first.get("torch", ""),
        "triton": first.get("triton", ""), "git_commit": first.get("git_commit", ""),
        "measured": max(r.get("timestamp", "") for r in rows), "source": source,
        "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "choices": choices}


def write_entry(card: str, value: dict, path=None) -> Path:
    """Replace ``card``'s entry of ``CARDS`` in ``path`` (default: the installed ``_measured.py``),
    the module's text up to ``CARDS`` kept; the new text is checked to read back before it
    replaces the file (a broken table would stop ``import td_kernels``)."""
    path = Path(path if path is not None else _measured.__file__)
    head, sep, tail = path.read_text().partition("\nCARDS: dict = ")
    if not sep:
        raise ValueError(f"{path}: no `CARDS: dict = ` line to replace")
    cards = ast.literal_eval(tail)
    cards[card] = value
    literal = pprint.pformat(cards, width=110, sort_dicts=True)
    try:
        same = ast.literal_eval(literal) == cards
    except (ValueError, SyntaxError):  # e.g. inf or nan, which pprint writes as bare names
        same = False
    if not same:
        raise ValueError(f"card {card!r}'s entry does not read back as a Python literal: {value!r}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{head}{sep}{literal}\n")
    os.replace(tmp, path)
    return path


def report(rows: list) -> str:
    lines = ["fwd+bwd time per (shape, dtype, mask, rates) group over the group's best: score = their geometric "
             "mean (1 = always fastest; '-': not measured in every group), wins = groups where it was fastest, "
             "worst = its largest ratio", ""]
    table = [(kind, p, "-" if s is None else f"{s:.3f}", f"{w}/{n}", f"{worst:.2f}")
             for kind in KINDS for p, s, w, n, worst in score(rows, kind)]
    return "\n".join(lines + [text_table(("kind", "provider", "score", "wins", "worst"), table, 2), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="td-kernels tune",
        description="What backend='auto' should take on a card: rank the backends and their selection variants per "
                    "targeting kind by fwd+bwd time in the card's op benchmark (td-kernels bench --out DIR wrote "
                    f"DIR/bench.csv); --write records the winners. A rival must beat the priority order's choice by "
                    f"{MARGIN:.0%}. See td_kernels/tools/bench/tune.py and the README's Backends section.")
    p.add_argument("csv", type=Path, help="the op benchmark's CSV of one device (bench/results/<card>/bench.csv)")
    p.add_argument("--card", default=None,
                   help="use only this device's rows, by device_name or its slug (a CSV of several devices)")
    p.add_argument("--write", action="store_true",
                   help="record the winners for backend='auto' in td_kernels/_measured.py (replacing this card's "
                        "entry); GPU cards only")
    p.add_argument("--into", type=Path, default=None,
                   help=f"with --write: the table to write (default: the installed {_measured.__file__})")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        p.error(f"csv: no such file: {args.csv}")
    rows = read_csv(args.csv)
    missing = [c for c in ("device_type", "device_name", "op", "mode", "provider", "ms", *GROUP)
               if rows and c not in rows[0]]
    if missing:
        p.error(f"csv: {args.csv} is not an op benchmark CSV (no column {', '.join(missing)})")
    if args.card is not None:
        names = sorted({r["device_name"] for r in rows})
        rows = [r for r in rows if args.card in (r["device_name"], card_slug(r["device_name"]))]
        if not rows:
            p.error(f"--card: no rows of {args.card!r} in {args.csv} (it has: {', '.join(names) or 'no rows'})")
    try:
        card, value = entry(rows, str(args.csv))
    except ValueError as e:
        p.error(str(e))
    print(report(rows))
    print(f"backend='auto' on {card} ({value['device_name']}; a choice other than the priority order's must be "
          f"{MARGIN:.0%} faster):")
    for kind, c in value["choices"].items():
        rival = "no rival measured in every group" if c["next"] is None else f"next: {c['next']} {c['next_score']:.3f}"
        print(f"  {kind}: {c['backend']}{'' if c['variant'] is None else ':' + c['variant']} "
              f"(score {c['score']:.3f}, fastest in {c['wins']} of {c['groups']} groups; {rival})")
    if args.write:
        if value["device_type"] != "cuda":
            p.error(f"--write: {value['device_type']} rows: the table is for GPU cards (on a CPU the native "
                    "kernels are the one compiled backend, and auto already takes them)")
        print(f"written to {write_entry(card, value, args.into)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
