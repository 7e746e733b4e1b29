"""The first layer of a multi-step plan: the decoding state moves on by one step on the GPU.

For each request row ``b < num_tokens``: if ``pending[b]``, the previous step's greedy token
``sampled[b]`` is taken in (``step_state.advance``: written after the prompt, the row moves one
position on, and retires at ``end[b]`` or on the token ``eos[0]`` unless it is negative); then the
step inputs (``input_ids``, ``positions``, ``seq_lens``, ``slot_mapping``) are derived from ``step`` and ``tokens``
(``step_state.step_inputs``), and ``pending[b]`` says whether this step decodes the row. All
operands are attached tensors updated in place; ``sampled`` is read one step behind (it is the
argmax of the step before), so the host starts a generation with ``pending`` all zero and takes in
the last step's tokens itself after the launch.
"""

from __future__ import annotations

import torch

from vllm_mpk.graph.ir import Access, Op
from vllm_mpk.graph.ops.base import Env, OpDef, Tile, expect_dtype, expect_shape, expect_tiles, layer_error
from vllm_mpk.graph.step_state import advance, step_inputs

STATE = ("step", "tokens", "prompt_lens", "end", "pending", "eos")
STEP_INPUTS = ("input_ids", "positions", "seq_lens", "slot_mapping")
DTYPES = {"sampled": torch.int64, "step": torch.int64, "tokens": torch.int64, "prompt_lens": torch.int64,
          "end": torch.int64, "pending": torch.int32, "eos": torch.int64, "block_tables": torch.int32,
          "input_ids": torch.int32, "positions": torch.int64, "seq_lens": torch.int32, "slot_mapping": torch.int64}


class BeginStep(OpDef):
    kind = "begin_step"
    opcode = 13
    required_inputs = ("sampled", *STATE, "block_tables", *STEP_INPUTS)
    required_outputs = ()

    def check(self, op: Op) -> None:
        batch = op.inputs["step"].shape[0]
        for role, dtype in DTYPES.items():
            expect_dtype(op, role, op.inputs[role], (dtype,))
            if role not in ("tokens", "block_tables", "eos"):
                expect_shape(op, role, op.inputs[role], (batch,))
        expect_shape(op, "eos", op.inputs["eos"], (1,))
        expect_shape(op, "tokens", op.inputs["tokens"], (batch, op.inputs["tokens"].shape[1]))
        expect_shape(op, "block_tables", op.inputs["block_tables"], (batch, op.inputs["block_tables"].shape[1]))
        if op.attrs.get("page_size", 0) < 1:
            raise layer_error(op, f"page_size must be positive, got {op.attrs.get('page_size')}")
        expect_tiles(op, 1, "the whole batch in one task")

    def lower(self, op: Op) -> list[Tile]:
        def access(role: str, previous_step: bool = False) -> Access:
            t = op.inputs[role]
            return Access(t.name, t.full_box, previous_step)

        reads = (access("sampled", previous_step=True), *(access(r) for r in (*STATE, "block_tables")))
        writes = tuple(access(r) for r in ("step", "tokens", "pending", *STEP_INPUTS))
        return [Tile(reads, writes, 0)]

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        self.reference(op, env)

    def reference(self, op: Op, env: Env) -> None:
        n = env.num_tokens
        t = {role: env[handle.name][:n] for role, handle in op.inputs.items()}
        held = t["pending"].bool()
        step = torch.where(held, t["step"], -1)  # advance() moves only the rows the last step decoded
        eos = int(env[op.inputs["eos"].name][0])
        advance(step, t["tokens"], t["sampled"], t["prompt_lens"], t["end"], eos_token_id=eos if eos >= 0 else None)
        t["step"].copy_(torch.where(held, step, t["step"]))
        inputs = step_inputs(t["step"], t["tokens"], t["block_tables"], op.attrs["page_size"]).as_dict()
        for role in STEP_INPUTS:
            t[role].copy_(inputs[role])
        t["pending"].copy_((t["step"] >= 0).to(torch.int32))
