"""Decode-step latency of the megakernel on one GPU, checked first, then timed.

For each model config and batch: random weights at a realistic scale and a KV cache holding
``--context`` tokens of random history per request (ragged: +7 per row), one decode step through
(1) the megakernel, replayed from a CUDA graph, and (2) the reference executor on the GPU in float32
(``layers`` order), which is the correctness reference. Prints relative logits error, greedy
agreement, step time, and the weight + KV bytes per step as a fraction of the read roof measured in
this run (``vllm_mpk.bench.read_roof``: a read-only stream over 4 GiB).
A mixture-of-experts step counts only the experts its router chose (each distinct expert once per
layer), so its fraction of the roof is its step time against the active-weight floor.

    python benchmarks/megakernel_step.py --models qwen3-0.6b qwen3-8b --batches 1 8

``--prefetch 192:1 96:2 0:0 48:1,rmsnorm_linear_silu_mul=0`` also times each case under those L2
prefetch policies (KiB of a tile's weights asked of L2 : how many tasks ahead, then caps of their
own for some linear op kinds), on the same kernel (a policy is launch data), and checks that each
gives logits bit-identical to the default's. ``--kv-pool-blocks N`` draws the requests' pages at
random from N pages per layer, as vLLM's block pool does (the default keeps each request's pages
adjacent; on an H100 the two timed the same). Each case is timed after a 64 MB
write through L2; ``--after-lm-head-gemm`` also times it after a GEMM of lm_head's shape, the L2
state vLLM's ``compute_logits`` leaves between steps.

Under torchrun (one process per GPU) each rank times its tensor-parallel shard instead: the step
with its in-kernel all-reduces, per-rank bandwidth of its weight shard, the profiler summary (rank
0) and with ``--trace`` one trace per rank. Correctness at TP>1 is the GPU tests' job.

    torchrun --nproc-per-node 2 benchmarks/megakernel_step.py --models llama-3.1-8b --batches 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

from vllm_mpk.bench.read_roof import read_roof_tbps
from vllm_mpk.codegen.tables import PrefetchPolicy
from vllm_mpk.demo import weight_bytes
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.step_state import contiguous_block_tables, step_inputs
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.catalog import resolve_model
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import expected_shapes, random_weights
from vllm_mpk.runtime.megakernel import Megakernel, build_kernels
from vllm_mpk.runtime.profiler import summary, task_spans, write_trace
from vllm_mpk.runtime.timing import graph_replay_us


def spec_of(name: str, layers: int | None) -> ModelSpec:
    spec = resolve_model(name).spec  # a shipped config's name or a model directory
    return spec.with_layers(layers) if layers else spec


def build(spec: ModelSpec, batch: int, context: int, device: str, weights=None, workers: int = 132,
          kv_splits: int | None = None, world: int = 1, rank: int = 0, pool_blocks: int | None = None):
    """Rank ``rank`` of ``world``'s decode step; ``weights`` (TP-local shapes) default to empty ones;
    ``kv_splits`` None: the decoder's per-plan choice (``auto_kv_splits``). ``pool_blocks``: each
    layer's cache holds that many pages and the requests' pages are drawn at random from them, as
    in vLLM's pool; None: just the pages the requests need, each request's adjacent."""
    local = spec.shard(world)
    max_seq = context + 8 * batch + 16
    blocks = contiguous_block_tables(batch, max_seq, 16, device)
    if pool_blocks is not None:
        if pool_blocks < blocks.numel():
            raise ValueError(f"--kv-pool-blocks {pool_blocks} is below the {blocks.numel()} pages the requests need")
        pages = torch.randperm(pool_blocks, generator=torch.Generator().manual_seed(0))[:blocks.numel()]
        blocks = pages.to(device=device, dtype=torch.int32).view(blocks.shape)
    if weights is None:
        weights = {k: torch.empty(s, dtype=torch.bfloat16, device=device) for k, s in expected_shapes(local).items()}
    caches = allocate_kv_caches(local, pool_blocks or int(blocks.numel()), 16, device=device)
    model = build_decoder(spec, weights, caches, DecodeOptions(max_batch=batch, max_seq_len=max_seq,
                                                               num_workers=workers, kv_splits=kv_splits,
                                                               world_size=world, rank=rank))
    step = torch.tensor([context + 7 * b for b in range(batch)], device=device)
    tokens = torch.randint(0, spec.vocab_size, (batch, max_seq), device=device)
    inputs = step_inputs(step, tokens, blocks, 16).as_dict()
    tensors = {**model.kernel.attached, **inputs}
    return model, tensors, caches


def profiled_spans(plan, tensors, batch: int, prefetch: PrefetchPolicy):
    """The task spans of the last of three launches of a profiled copy of the kernel."""
    profiled = Megakernel(plan, tensors, profile=True, prefetch=prefetch)
    for _ in range(3):
        profiled.launch(batch)
    torch.cuda.synchronize()
    profiled.check()
    return task_spans(plan, profiled.profile)


def time_and_profile(plan, tensors, mk: Megakernel, batch: int, trace_path: Path | None, show: bool) -> float:
    """Median µs of ``mk``'s step replayed from a CUDA graph; then three launches of a profiled
    copy, whose per-op summary is printed (``show``) and trace written (``trace_path``)."""
    us = graph_replay_us(lambda: mk.launch(batch))
    mk.check()
    spans = profiled_spans(plan, tensors, batch, mk.prefetch)
    if show:
        print(summary(plan, spans), flush=True)
    if trace_path is not None:
        write_trace(plan, spans, trace_path)
    return us


def write_l2_sweep(device: str, nbytes: int = 64 << 20) -> None:
    """Write ``nbytes`` through L2. Leaves L2 in the state the step benchmark times in: on an H100
    a cuBLAS GEMM of lm_head's shape left the bs8 step 1.5-2% slower until a write of 32 MB or
    more (reads did not restore it)."""
    torch.zeros(nbytes, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)


def step_us_after_lm_head_gemm(spec: ModelSpec, mk: Megakernel, batch: int) -> float:
    """Step µs after one cuBLAS GEMM of lm_head's shape ([batch, hidden] x [hidden, vocab], what
    vLLM's ``compute_logits`` runs between two steps), i.e. in the L2 state vLLM leaves; then the
    benchmark's state is restored (``write_l2_sweep``)."""
    device = mk.device
    head = torch.randn(spec.vocab_size, spec.hidden_size, dtype=torch.bfloat16, device=device)
    x = torch.randn(batch, spec.hidden_size, dtype=torch.bfloat16, device=device)
    x @ head.T
    torch.cuda.synchronize(device)
    us = graph_replay_us(lambda: mk.launch(batch))
    del head
    write_l2_sweep(device)
    return us


def prefetch_policy(text: str) -> PrefetchPolicy:
    """``KIB:AHEAD[,KIND=KIB...][@landed]`` (``AHEAD`` defaults to 1; a KIND is a linear op kind with
    a cap of its own; ``@landed``: asked once the task before has its own weights, not at its start)."""
    text, at, when = text.partition("@")
    if at and when != "landed":
        raise argparse.ArgumentTypeError(f"{text}@{when}: the only timing is @landed")
    head, *kinds = text.split(",")
    kib, _, ahead = head.partition(":")
    if any("=" not in k for k in kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: each kind's cap is KIND=KIB, e.g. rmsnorm_linear_silu_mul=0")
    caps = tuple((kind, int(cap) * 1024) for kind, _, cap in (k.partition("=") for k in kinds))
    try:
        return PrefetchPolicy(int(kib) * 1024, int(ahead or 1), caps, landed=bool(at))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def policy_name(policy: PrefetchPolicy) -> str:
    return ",".join([f"{policy.cap_bytes // 1024}:{policy.ahead}",
                     *(f"{kind}={cap // 1024}" for kind, cap in policy.kind_caps)]) + ("@landed" if policy.landed else "")


def time_policies(plan, tensors, mk: Megakernel, batch: int, logits: torch.Tensor, policies,
                  trace_path: Path | None) -> dict[str, dict]:
    """Step µs under each prefetch policy, and whether its logits stay bit-identical to ``logits``
    (a prefetch is only a hint to L2), with each policy's profile summary (and trace); the
    default policy is restored afterwards."""
    default, times = mk.prefetch, {}
    for policy in policies:
        mk.set_prefetch(policy)
        mk.tensors["logits"].fill_(float("nan"))
        name = policy_name(policy)
        safe = re.sub(r"[^\w.-]", "-", name)  # a file name the device runner returns
        trace = trace_path and trace_path.with_name(f"{trace_path.stem}_prefetch{safe}.json")
        print(f"prefetch {name}:")
        us = time_and_profile(plan, tensors, mk, batch, trace, show=True)
        times[name] = {"us": us, "identical": torch.equal(mk.tensors["logits"][:batch].float(), logits)}
    mk.set_prefetch(default)
    return times


def experts_read(mk: Megakernel, batch: int) -> int | None:
    """The distinct experts the step's router chose, summed over layers (what a mixture-of-experts
    step streams of its experts); None for a dense model."""
    ids = [t for name, t in mk.tensors.items() if name.endswith(".expert_ids")]
    return sum(int(t[:batch].unique().numel()) for t in ids) if ids else None


def run_case(spec, batch, context, device, weights, log, trace_path=None, kv_splits: int | None = None,
             policies=(), pool_blocks: int | None = None, after_gemm: bool = False) -> dict:
    model, tensors, caches = build(spec, batch, context, device, weights, kv_splits=kv_splits, pool_blocks=pool_blocks)
    for c in caches:
        c.normal_(0, 1)
    t0 = time.perf_counter()
    mk = Megakernel(model.plan, tensors)
    load_s = time.perf_counter() - t0
    ref_caches = [c.clone() for c in caches]
    for out in mk.tensors.values():
        if out.dtype.is_floating_point and out.data_ptr() not in {t.data_ptr() for t in tensors.values()}:
            out.fill_(float("nan"))
    mk.launch(batch)
    torch.cuda.synchronize()
    mk.check()
    logits = mk.tensors["logits"][:batch].float().clone()
    tokens = mk.tensors["tokens"][:batch].clone()
    ref_inputs = dict(tensors)
    for i, c in enumerate(ref_caches):
        ref_inputs[f"model.layers.{i}.self_attn.attn.kv_cache"] = c
    same_rounding = ReferenceExecutor(model.plan, {**ref_inputs, **{k: c.clone() for k, c in ref_inputs.items()
                                                                  if "kv_cache" in k}})
    same_rounding.run_step(batch, order="layers")
    bf16_logits = same_rounding.tensors["logits"][:batch].float()
    rel_bf16 = float((logits - bf16_logits).norm() / bf16_logits.norm())
    del same_rounding
    ref = ReferenceExecutor(model.plan, ref_inputs, exact=True)
    ref.run_step(batch, order="layers")
    ref_logits = ref.tensors["logits"][:batch].float()
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    agree = int((tokens == ref_logits.argmax(-1)).sum())
    for b in (tokens != ref_logits.argmax(-1)).nonzero()[:, 0].tolist():
        top = ref_logits[b].topk(2)
        print(f"row {b}: megakernel token {int(tokens[b])} (its logit {float(logits[b, tokens[b]]):.4f}, "
              f"our argmax {int(logits[b].argmax())}), reference top2 {top.indices.tolist()} {top.values.tolist()}; "
              f"our logits there {logits[b, top.indices].tolist()}", flush=True)
    cache_rel = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(caches, ref_caches))
    write_l2_sweep(device)
    us = time_and_profile(model.plan, tensors, mk, batch, trace_path, show=True)
    sweep = time_policies(model.plan, tensors, mk, batch, logits, policies, trace_path)
    us_after_gemm = step_us_after_lm_head_gemm(spec, mk, batch) if after_gemm else None
    nbytes = weight_bytes(spec, weights, experts_read(mk, batch)) + sum(
        int(tensors["seq_lens"].sum()) * spec.num_kv_heads * 2 * spec.head_dim * 2 for _ in range(spec.num_layers))
    row = {"model": spec.architecture, "layers": spec.num_layers, "hidden": spec.hidden_size, "batch": batch,
           "kv_splits": model.kv_splits, "pool_blocks": pool_blocks,
           "rel_err": rel, "rel_err_same_rounding": rel_bf16, "cache_rel_err": cache_rel, "greedy_agree": f"{agree}/{batch}",
           "step_us": us, "step_us_after_gemm": us_after_gemm, "bytes": nbytes, "tbps": nbytes / us / 1e6, "load_s": load_s,
           "nan": bool(torch.isnan(logits).any()), "prefetch": sweep}
    log.write(json.dumps(row) + "\n")
    log.flush()
    return row


def run_tp_case(spec: ModelSpec, batch: int, context: int, world: int, rank: int, trace_path: Path | None,
                kv_splits: int | None = None) -> dict:
    """Time rank ``rank``'s shard (random weights at a realistic scale); every rank runs this in
    lockstep: each launch's all-reduces wait for the peers' same launch."""
    device = f"cuda:{torch.cuda.current_device()}"
    weights = random_weights(spec.shard(world), seed=rank, device=device)  # this rank's TP-local shapes
    model, tensors, caches = build(spec, batch, context, device, weights, kv_splits=kv_splits, world=world, rank=rank)
    for c in caches:
        c.normal_(0, 1)
    us = time_and_profile(model.plan, tensors, Megakernel(model.plan, tensors), batch, trace_path, show=rank == 0)
    nbytes = weight_bytes(spec.shard(world), weights)
    return {"batch": batch, "rank": rank, "world": world, "kv_splits": model.kv_splits, "step_us": us, "bytes": nbytes, "tbps": nbytes / us / 1e6}


def tp_main(args: argparse.Namespace, world: int, rank: int, out: Path) -> None:
    """One torchrun process per GPU: NVSHMEM from torchrun's group, then each case on every rank."""
    import torch.distributed as dist

    from vllm_mpk.runtime import nvshmem

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("gloo")
    nvshmem.init_from_process_group()
    bw = read_roof_tbps("cuda")
    rows = []
    for m in args.models:
        spec = spec_of(m, args.layers)
        for b in args.batches:
            trace = out / f"trace_{m}_bs{b}_tp{world}_rank{rank}.json" if args.trace else None
            row = {"name": m, **run_tp_case(spec, b, args.context, world, rank, trace, args.kv_splits)}
            gathered: list[dict | None] = [None] * world
            dist.all_gather_object(gathered, row)
            rows.append(gathered)
            torch.cuda.empty_cache()
    if rank == 0:
        print(f"\n{torch.cuda.get_device_name()} x{world}  read roof {bw:.2f} TB/s (rank 0)")
        print(f"{'model':14} {'bs':>3} {'TP':>3} {'splits':>6} {'step us (max rank)':>19} {'per rank':>24} {'TB/s/rank':>9} "
              f"{'of roof':>7}")
        for ranks in rows:
            slowest = max(ranks, key=lambda r: r["step_us"])
            per = "/".join(f"{r['step_us']:.0f}" for r in ranks)
            print(f"{slowest['name']:14} {slowest['batch']:>3} {world:>3} {slowest['kv_splits']:>6} {slowest['step_us']:19.1f} {per:>24} "
                  f"{slowest['tbps']:9.2f} {slowest['tbps'] / bw:7.0%}")
        with open(out / f"megakernel_step_tp{world}.jsonl", "w") as log:
            for ranks in rows:
                log.write(json.dumps(ranks) + "\n")
    dist.barrier()
    nvshmem.finalize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--trace", action="store_true", help="write a Perfetto trace per case under $OUT")
    p.add_argument("--kv-splits", type=int, default=None,
                   help="attention tasks per KV head and request (split KV); default auto: 2 while KV heads x "
                        "batch x 4 <= workers, else 1 (models/decoder.py:auto_kv_splits); a value forces it")
    p.add_argument("--prefetch", nargs="+", type=prefetch_policy, default=[], metavar="KIB:AHEAD[,KIND=KIB][@landed]",
                   help="also time each case under these L2 weight-prefetch policies (single GPU)")
    p.add_argument("--after-lm-head-gemm", action="store_true",
                   help="also time each step after a cuBLAS GEMM of lm_head's shape, in the L2 state vLLM's "
                        "compute_logits leaves (on an H100 it slowed the bs8 step by 1.5-2%%)")
    p.add_argument("--kv-pool-blocks", type=int, default=None, metavar="N",
                   help="pages per layer's KV cache, the requests' pages drawn at random from them like vLLM's "
                        "block pool (default: only the pages needed, each request's adjacent)")
    args = p.parse_args()
    device = "cuda"
    out = Path(os.environ.get("OUT", "/tmp"))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        tp_main(args, world, int(os.environ["RANK"]), out)
        return
    specs = {m: spec_of(m, args.layers) for m in args.models}
    # Build every kernel first, in parallel (nvcc runs as a subprocess), from meta tensors.
    jobs = [build(spec, b, args.context, "meta", kv_splits=args.kv_splits, pool_blocks=args.kv_pool_blocks)[:2]
            for spec in specs.values() for b in args.batches]
    t0 = time.perf_counter()
    build_kernels([(model.plan, tensors) for model, tensors in jobs])
    print(f"built {len(jobs)} kernels in {time.perf_counter() - t0:.0f} s", flush=True)
    bw = read_roof_tbps(device)
    rows = []
    with open(out / "megakernel_step.jsonl", "w") as log:
        for m, spec in specs.items():
            weights = random_weights(spec, device=device)
            for b in args.batches:
                trace = out / f"trace_{m}_bs{b}.json" if args.trace else None
                case = run_case(spec, b, args.context, device, weights, log, trace, args.kv_splits, args.prefetch,
                                args.kv_pool_blocks, args.after_lm_head_gemm)
                rows.append({"name": m, **case})
                print(rows[-1], flush=True)
            del weights
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}  read roof {bw:.2f} TB/s")
    print(f"{'model':14} {'bs':>3} {'splits':>6} {'err f32':>9} {'err bf16':>9} {'greedy':>7} {'step us':>9} "
          f"{'TB/s':>6} {'of roof':>7}" + (f" {'after GEMM':>10}" if args.after_lm_head_gemm else ""))
    for r in rows:
        after = f" {r['step_us_after_gemm']:10.1f}" if args.after_lm_head_gemm else ""
        print(f"{r['name']:14} {r['batch']:>3} {r['kv_splits']:>6} {r['rel_err']:9.2e} {r['rel_err_same_rounding']:9.2e} "
              f"{r['greedy_agree']:>7} {r['step_us']:9.1f} "
              f"{r['tbps']:6.2f} {r['tbps'] / bw:7.0%}{after}")
    if args.prefetch:
        print(f"\nprefetch policies (KiB:ahead), step µs and vs the default {policy_name(PrefetchPolicy())}; "
              "* = logits not bit-identical")
        for r in rows:
            cells = [f"{name} {t['us']:.0f} ({t['us'] / r['step_us'] - 1:+.1%}){'' if t['identical'] else '*'}"
                     for name, t in r["prefetch"].items()]
            print(f"{r['name']:14} {r['batch']:>3} {r['step_us']:9.1f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
