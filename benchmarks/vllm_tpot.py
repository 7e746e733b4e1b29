"""Time per output token of vLLM 0.26, stock and with ``--model-impl mpk``, on random weights.

For each model and batch: ``batch`` prompts of ``--prompt-len`` random token ids, greedy, EOS
ignored; TPOT = (time to generate N tokens - time to generate 1) / (N - 1), median of
``--repeats``. One vLLM engine per (model, impl), kept alive across batches. Prints a table and
writes JSON lines to ``$OUT/vllm_tpot.jsonl`` (or /tmp).

    python benchmarks/vllm_tpot.py --models qwen3-0.6b qwen3-8b --impls vllm mpk --batches 1 8 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from vllm_mpk.models.catalog import resolve_model, shipped_config


def model_dir(name: str, root: Path) -> Path:
    """A directory holding only the shipped config.json: vLLM loads it with dummy weights."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(shipped_config(name)))
    return d


def tpot_ms(llm, batch: int, prompt_len: int, new_tokens: int, repeats: int, vocab: int) -> float:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [(7 * b + 13 * i) % vocab for i in range(prompt_len)]} for b in range(batch)]

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    run(new_tokens)  # warm-up
    samples = [(run(new_tokens) - run(1)) / (new_tokens - 1) * 1e3 for _ in range(repeats)]
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"])
    p.add_argument("--impls", nargs="+", default=["vllm"], help="model_impl values, e.g. vllm mpk")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=257)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from vllm import LLM

    out = Path(os.environ.get("OUT", "/tmp")) / "vllm_tpot.jsonl"
    root = Path(tempfile.mkdtemp(prefix="vllm_tpot_"))
    rows = []
    for name in args.models:
        vocab = resolve_model(name).spec.vocab_size
        for impl in args.impls:
            llm = LLM(model=str(model_dir(name, root)), model_impl=impl, load_format="dummy",
                      skip_tokenizer_init=True, max_model_len=args.prompt_len + args.new_tokens + 16,
                      max_num_seqs=max(args.batches), gpu_memory_utilization=0.85,
                      compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})
            for batch in args.batches:
                ms = tpot_ms(llm, batch, args.prompt_len, args.new_tokens, args.repeats, vocab)
                rows.append({"model": name, "impl": impl, "batch": batch, "tpot_ms": ms})
                with out.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(rows[-1], flush=True)
            del llm
            gc.collect()
    print(f"\n{'model':14} {'impl':6} {'bs':>3} {'TPOT ms':>8}")
    for r in rows:
        print(f"{r['model']:14} {r['impl']:6} {r['batch']:>3} {r['tpot_ms']:8.3f}")


if __name__ == "__main__":
    main()
