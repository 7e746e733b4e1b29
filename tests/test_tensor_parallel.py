"""Tensor-parallel plans on the CPU: every shipped config shards at TP 2, 4 and 8 into plans that
validate, and ranks simulated together (graph/ranks.py) decode what the unsharded model decodes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_QWEN3, TINY_QWEN3_MOE, config_paths, meta_weights, model_spec
from vllm_mpk.graph.ranks import SimulatedRanks
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.step_state import contiguous_block_tables, step_inputs
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import random_weights, shard_weights

BATCH, MAX_SEQ, PAGE = 3, 64, 16
WIDER_QWEN3 = {**TINY_QWEN3, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
               "num_key_value_heads": 4, "head_dim": 64}


# every shipped config at TP 2, 4 and 8 where its KV heads divide (qwen3-30b-a3b has 4: refused at 8, below)
SHARDINGS = [(name, world) for name in sorted(config_paths()) for world in (2, 4, 8)
             if model_spec(name, 1).num_kv_heads % world == 0]


@pytest.mark.parametrize("name,world_size", SHARDINGS)
def test_shipped_configs_shard_into_valid_plans(name, world_size):
    spec = model_spec(name, 2)
    local = spec.shard(world_size)
    for rank in (0, world_size - 1):
        caches = allocate_kv_caches(local, 8, PAGE, device="meta")
        model = build_decoder(spec, meta_weights(local), caches,
                              DecodeOptions(max_batch=4, max_seq_len=MAX_SEQ, world_size=world_size, rank=rank))
        kinds = [op.kind for op in model.plan.ops]
        assert kinds.count("allreduce") == 1 + 2 * spec.num_layers  # embedding, o_proj and down_proj sums
        residual_adds = sum("residual" in op.inputs for op in model.plan.ops)  # o_proj and the MLP's down
        assert residual_adds == (2 * spec.num_layers if rank == 0 else 0)  # the residual is added once
        attention = next(op for op in model.plan.ops if op.kind == "attention")
        assert attention.attrs["num_kv_heads"] == spec.num_kv_heads // world_size


def test_sizes_that_do_not_divide_are_refused():
    spec = model_spec("qwen3-0.6b", 1)
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide the attention heads"):
        spec.shard(3)
    with pytest.raises(ValueError, match=r"tensor parallel size 8 does not divide the KV heads \(4\)"):
        model_spec("qwen3-30b-a3b", 1).shard(8)


def decode_step(config: dict, world_size: int, order: str, seed: int = 0):
    """(unsharded logits and tokens, the ranks' gathered logits and every rank's tokens)."""
    spec = ModelSpec.from_hf_config(config)
    weights = random_weights(spec, seed=seed, dtype=torch.float32, std=0.05)
    blocks = contiguous_block_tables(BATCH, MAX_SEQ, PAGE)
    history = torch.randint(0, spec.vocab_size, (BATCH, MAX_SEQ), generator=torch.Generator().manual_seed(seed))
    inputs = step_inputs(torch.tensor([40, 17, 5]), history, blocks, PAGE).as_dict()

    def build(world: int, rank: int, full_caches: list[torch.Tensor]):
        local = spec.shard(world)
        caches = [c[:, rank * local.num_kv_heads:(rank + 1) * local.num_kv_heads].clone() for c in full_caches]
        model = build_decoder(spec, shard_weights(spec, weights, world, rank), caches,
                              DecodeOptions(max_batch=BATCH, max_seq_len=MAX_SEQ, page_size=PAGE, num_workers=5,
                                            world_size=world, rank=rank))
        return model, {**model.kernel.attached, **inputs}

    full_caches = [torch.randn(c.shape) for c in allocate_kv_caches(spec, int(blocks.numel()), PAGE,
                                                                       dtype=torch.float32)]
    whole, whole_inputs = build(1, 0, full_caches)
    reference = ReferenceExecutor(whole.plan, whole_inputs)
    reference.run_step(BATCH, order="layers")
    ranks = [build(world_size, r, full_caches) for r in range(world_size)]
    simulated = SimulatedRanks([m.plan for m, _ in ranks], [i for _, i in ranks])
    simulated.run_step(BATCH, order=order, seed=seed)
    logits = torch.cat([r.tensors["logits"][:BATCH] for r in simulated.ranks], dim=1)
    tokens = [r.tensors["tokens"][:BATCH] for r in simulated.ranks]
    return reference.tensors["logits"][:BATCH], reference.tensors["tokens"][:BATCH], logits, tokens


@pytest.mark.parametrize("config,world_size", [(TINY_QWEN3, 2), (WIDER_QWEN3, 4), (TINY_QWEN3_MOE, 2)],
                         ids=["tiny-tp2", "wider-tp4", "moe-tp2"])
@pytest.mark.parametrize("order", ["random", "layers"])
def test_simulated_ranks_match_the_unsharded_model(config, world_size, order):
    want_logits, want_tokens, logits, tokens = decode_step(config, world_size, order)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    for rank_tokens in tokens:  # every rank agrees on the token
        assert torch.equal(rank_tokens, want_tokens)


def test_collectives_must_wait_for_every_rank(monkeypatch):
    """Without the cross-rank condition, some interleaving reads another rank's unwritten (NaN)
    input: the simulation does exercise the ordering that the GPU's signals must provide."""
    monkeypatch.setattr(SimulatedRanks, "_collective_ready", lambda self, rank, tid, done: True)
    outcomes = [decode_step(TINY_QWEN3, 2, "random", seed)[2] for seed in range(3)]
    assert any(logits.isnan().any() for logits in outcomes)


def test_cli_plan_prints_every_rank(capsys):
    from vllm_mpk.cli import main

    assert main(["plan", "--model", "qwen3-0.6b", "--layers", "1", "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "rank 0 of 2" in out and "rank 1 of 2" in out and "\nlinear " in out
    assert main(["plan", "--model", "qwen3-0.6b", "--layers", "1", "--tensor-parallel-size", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", sorted(config_paths()))
def test_every_rank_queues_the_same_tiles(name, world_size):
    """On the GPU a collective tile waits for the same tile on every rank: the ranks' queues must
    hold the same tiles in the same order, else two ranks could each wait on a tile the other has
    queued behind its own wait (the single-rank deadlock check would not see it)."""
    spec = model_spec(name, 2)
    local = spec.shard(world_size)
    queues = []
    for rank in (0, world_size - 1):
        caches = allocate_kv_caches(local, 8, PAGE, device="meta")
        plan = build_decoder(spec, meta_weights(local), caches, DecodeOptions(
            max_batch=4, max_seq_len=MAX_SEQ, world_size=world_size, rank=rank)).plan
        queues.append([[(plan.tasks[t].op.name, plan.tasks[t].tile) for t in q] for q in plan.queues])
    assert queues[0] == queues[1]
