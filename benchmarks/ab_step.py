"""Kernel trees timed against each other in one run: ``benchmarks/megakernel_step.py`` of each
tree, tree after tree for ``--rounds`` rounds on the same GPU, so that a drift of the card's speed
falls on all of them alike; then per case (model, batch) each tree's step times, their median and
its ratio to the first tree's median. A tree is a checkout (or an exported commit) laid out like
this one (``vllm_mpk/``, ``csrc/``, ``benchmarks/``); each runs with its own package first on
PYTHONPATH, so each builds and loads its own kernels (the JIT cache keys them by their sources).

    git worktree add /tmp/branch attention-dynamic-splits
    python benchmarks/ab_step.py --tree main=. --tree split=/tmp/branch --rounds 2 -- \\
        --models qwen3-0.6b --batches 1 8 --context 8192 --kv-splits 16

Everything after ``--`` goes to every tree's ``megakernel_step.py``; ``--tree-args NAME "ARGS"``
adds arguments for one tree only, so that one checkout can also be timed against itself under
other options (``--tree split=/tmp/branch --tree split16=/tmp/branch --tree-args split16
"--kv-splits 16 --kv-split-positions 256"``). The rows, one per tree, round and case, go to
``$OUT/ab_step.jsonl`` (``--out`` elsewhere), each run's log beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

STEP = Path("benchmarks") / "megakernel_step.py"


def tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not (Path(path) / STEP).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH of a checkout holding {STEP}, got {text!r}")
    return name, Path(path).resolve()


def run_tree(name: str, root: Path, step_args: list[str], out: Path, timeout_s: float) -> list[dict]:
    """One ``megakernel_step.py`` run of the tree at ``root``; its rows, or one error row."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OUT": str(out)}
    log = out / "log.txt"
    with log.open("w") as f:
        try:
            rc = subprocess.run([sys.executable, str(root / STEP), *step_args], cwd=root, env=env, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout_s:g} s"
    rows_file = out / "megakernel_step.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    if rc != 0 or not rows:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return [{"tree": name, "error": f"exit {rc}: {tail[0]} (log: {log})"}]
    return [{"tree": name, **r} for r in rows]


def case_of(row: dict) -> str:
    return f"{row['model']} {row['layers']}x{row['hidden']} bs{row['batch']}"


def table(rows: list[dict], names: list[str]) -> str:
    """Per case: each tree's step times in round order and [median], then the median's ratio to the
    first tree's."""
    times: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if "error" not in r:
            times.setdefault(case_of(r), {}).setdefault(r["tree"], []).append(r["step_us"])
    lines = [f"{'case':32} " + " ".join(f"{n + ' (us)':>24}" for n in names) +
             "".join(f" {n + '/' + names[0]:>14}" for n in names[1:])]
    for case, by_tree in times.items():
        mid = {n: statistics.median(by_tree[n]) for n in names if by_tree.get(n)}
        cells = [f"{', '.join(f'{t:.0f}' for t in by_tree[n])} [{mid[n]:.0f}]" if n in mid else "n/a" for n in names]
        ratios = [f"{mid[n] / mid[names[0]]:.3f}" if n in mid and names[0] in mid else "n/a" for n in names[1:]]
        lines.append(f"{case:32} " + " ".join(f"{c:>24}" for c in cells) + "".join(f" {r:>14}" for r in ratios))
    lines += [f"FAILED {r['tree']} round {r['round']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, step_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=tree, action="append", required=True, metavar="NAME=PATH",
                   help="a checkout to time; the first is the baseline of the ratios")
    p.add_argument("--tree-args", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                   help="more megakernel_step.py arguments for that tree only, as one shell-quoted string")
    p.add_argument("--rounds", type=int, default=2, help="runs of every tree, alternating (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per megakernel_step.py run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "ab_step")))
    args = p.parse_args(ours)
    names = [n for n, _ in args.tree]
    if len(set(names)) != len(names) or args.rounds < 1:
        p.error("give each --tree a name of its own, and --rounds of at least 1")
    extra = {name: shlex.split(text) for name, text in args.tree_args}
    if unknown := sorted(set(extra) - set(names)):
        p.error(f"--tree-args for {', '.join(unknown)}, which no --tree names")
    rows = []
    for r in range(args.rounds):
        for name, root in args.tree:
            for row in run_tree(name, root, [*step_args, *extra.get(name, [])], args.out / f"{name}-{r}",
                                args.timeout):
                rows.append({**row, "round": r})
                print(json.dumps({k: row.get(k) for k in ("tree", "model", "batch", "step_us", "error") if k in row}),
                      flush=True)
    with open(args.out / "ab_step.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print("\n" + table(rows, names))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
