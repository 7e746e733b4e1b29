"""``benchmarks/ab_step.py`` against fake trees: each tree's ``benchmarks/megakernel_step.py``
notes when it ran and writes rows of its own step time, so the alternation, the medians, the
ratios and a failing tree can be checked without a GPU."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_step.py"
_spec = importlib.util.spec_from_file_location("ab_step", PATH)
assert _spec is not None and _spec.loader is not None
ab_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_step)

# A tree's step benchmark: its step time is the tree's STEP_US plus the call's index, per batch.
FAKE_STEP = """\
    import json, os, sys
    from pathlib import Path
    here = Path(__file__).resolve().parents[1]
    order = here.parent / "order.txt"
    calls = len(order.read_text().splitlines()) if order.exists() else 0
    with order.open("a") as f:
        f.write(here.name + "\\n")
    if (here / "FAIL").exists():
        print("RuntimeError: this kernel does not build")
        sys.exit(1)
    base = float((here / "STEP_US").read_text())
    last = len(sys.argv) - 1 - sys.argv[::-1].index("--batches")  # a later option wins, as in argparse
    batches = [int(b) for b in sys.argv[last + 1:]]
    with open(Path(os.environ["OUT"]) / "megakernel_step.jsonl", "w") as log:
        for b in batches:
            log.write(json.dumps({"model": "Qwen3ForCausalLM", "layers": 28, "hidden": 1024, "batch": b,
                                  "step_us": base + b + calls}) + "\\n")
"""


def make_tree(root: Path, name: str, step_us: float, fail: bool = False) -> Path:
    tree = root / name
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "benchmarks" / "megakernel_step.py").write_text(textwrap.dedent(FAKE_STEP))
    (tree / "STEP_US").write_text(str(step_us))
    if fail:
        (tree / "FAIL").write_text("")
    return tree


def test_trees_alternate_and_the_table_gives_medians_and_ratios(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b = make_tree(tmp_path, "a", 1000), make_tree(tmp_path, "b", 1100)
    out = tmp_path / "out"
    assert ab_step.main(["--tree", f"base={a}", "--tree", f"change={b}", "--rounds", "2", "--out", str(out),
                         "--", "--batches", "1", "8"]) == 0
    assert (tmp_path / "order.txt").read_text().split() == ["a", "b", "a", "b"]
    rows = [json.loads(line) for line in (out / "ab_step.jsonl").read_text().splitlines()]
    assert [(r["tree"], r["round"], r["batch"], r["step_us"]) for r in rows] == [
        ("base", 0, 1, 1001), ("base", 0, 8, 1008), ("change", 0, 1, 1102), ("change", 0, 8, 1109),
        ("base", 1, 1, 1003), ("base", 1, 8, 1010), ("change", 1, 1, 1104), ("change", 1, 8, 1111)]
    text = capsys.readouterr().out
    assert "Qwen3ForCausalLM 28x1024 bs1" in text and "1001, 1003 [1002]" in text and "1102, 1104 [1103]" in text
    assert f"{1103 / 1002:.3f}" in text


def test_a_failing_tree_is_reported_and_the_others_still_run(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    a, b = make_tree(tmp_path, "a", 1000), make_tree(tmp_path, "b", 0, fail=True)
    assert ab_step.main(["--tree", f"base={a}", "--tree", f"broken={b}", "--rounds", "1", "--out",
                         str(tmp_path / "out"), "--", "--batches", "1"]) == 1
    text = capsys.readouterr().out
    assert "FAILED broken round 0: exit 1: RuntimeError: this kernel does not build" in text
    assert "1001 [1001]" in text and "n/a" in text


def test_one_tree_against_itself_under_other_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_tree(tmp_path, "a", 1000)
    assert ab_step.main(["--tree", f"base={a}", "--tree", f"wide={a}", "--tree-args", "wide", "--batches 1 8",
                         "--rounds", "1", "--out", str(tmp_path / "out"), "--", "--batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "bs8" in text and text.count("Qwen3ForCausalLM 28x1024 bs1") == 1  # one case row each, batch 8 from wide only
    with pytest.raises(SystemExit):
        ab_step.main(["--tree", f"base={a}", "--tree-args", "other", "--batches 8"])


def test_a_tree_without_the_step_benchmark_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stop:
        ab_step.main(["--tree", f"x={tmp_path}", "--", "--batches", "1"])
    assert stop.value.code == 2
