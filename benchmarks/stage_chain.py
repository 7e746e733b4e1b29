"""The cost of one dependent stage: a chain of near-empty stages, each waiting for the one before.

A decode step is a chain of dependent stages (per layer: QKV, attention, o_proj, gate_up, down);
at 0.6-1B parameters their fixed cost, not the weight bytes, sets the step time. This times a
megakernel whose only work is such a chain, so what it measures is the hand-off itself: the
producer's signal, the consumer's gate and the least work a stage can do.

- ``rmsnorm``: one task per stage (RMSNorm of a ``[batch, 256]`` row block, two L2 round trips).
- ``linear``: 16 tiles per stage on 16 workers (a ``[256, 256]`` weight, 8 KiB each), every tile
  of a stage waiting for all of the previous stage's: the fan-in of a real layer's stages.

The per-stage cost is the slope of the step time over the chain's length (short and long chains
timed in the same run), so the launch and the first stage's start drop out. Tasks are placed
round-robin, so consecutive stages run on different SMs, as in a model.

    python benchmarks/stage_chain.py --batches 1 8
"""

from __future__ import annotations

import argparse

import torch

from vllm_mpk import PersistentKernel
from vllm_mpk.runtime.megakernel import Megakernel, build_kernels
from vllm_mpk.runtime.timing import graph_replay_us

WIDTH = 256  # the narrowest row a linear tile reduces over
BLOCK = (256, 1, 1)
LINEAR_TILES = 16


def chain(kind: str, stages: int, batch: int, workers: int, device: str) -> tuple[PersistentKernel, dict]:
    """A kernel of ``stages`` dependent ``kind`` stages and its tensors."""
    mpk = PersistentKernel(num_workers=workers, max_batch=batch, max_seq_len=16, schedule="round_robin")
    x = mpk.attach_input(torch.randn(batch, WIDTH, device=device).to(torch.bfloat16), "x0")
    norm = mpk.attach_input(torch.ones(WIDTH, device=device, dtype=torch.bfloat16), "norm")
    weight = mpk.attach_input((torch.randn(WIDTH, WIDTH, device=device) * WIDTH ** -0.5).to(torch.bfloat16), "w")
    for s in range(stages):
        y = mpk.new_tensor((batch, WIDTH), torch.bfloat16, f"x{s + 1}")
        if kind == "rmsnorm":
            mpk.rmsnorm_layer(x, norm, y, (1, 1, 1), BLOCK, name=f"stage{s}")
        else:
            mpk.linear_layer(x, weight, y, (LINEAR_TILES, 1, 1), BLOCK, name=f"stage{s}")
        x = y
    mpk.compile()
    return mpk, {**mpk.attached, **mpk.step_buffers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", choices=("rmsnorm", "linear"), default=["rmsnorm", "linear"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--stages", nargs=2, type=int, default=[8, 136], metavar=("SHORT", "LONG"))
    p.add_argument("--workers", type=int, default=132)
    args = p.parse_args()
    short, long = args.stages
    cases = [(k, b, n) for k in args.kinds for b in args.batches for n in (short, long)]
    built = {case: chain(case[0], case[2], case[1], args.workers, "cuda") for case in cases}
    build_kernels([(mpk.plan, tensors) for mpk, tensors in built.values()])
    times = {}
    for (kind, batch, n), (mpk, tensors) in built.items():
        kernel = Megakernel(mpk.plan, tensors)
        times[kind, batch, n] = graph_replay_us(lambda k=kernel, b=batch: k.launch(b))
        kernel.check()
    print(f"{torch.cuda.get_device_name()}, {args.workers} workers, chains of {short} and {long} stages")
    print(f"{'stage':8} {'bs':>3} {f'{short} stages us':>15} {f'{long} stages us':>15} {'per stage us':>13}")
    for kind in args.kinds:
        for b in args.batches:
            a, z = times[kind, b, short], times[kind, b, long]
            print(f"{kind:8} {b:>3} {a:15.1f} {z:15.1f} {(z - a) / (long - short):13.2f}")


if __name__ == "__main__":
    main()
