"""RMSNorm with an optional fused residual add: ``h = x + residual; out = rmsnorm(h)``, and ``h``
written to ``residual_output`` (vLLM's fused residual RMSNorm). Tiles own whole rows, because
the row statistics need every column."""

from __future__ import annotations

from vllm_mpk.graph.ir import Access, Op, split_even
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    Env,
    OpDef,
    Tile,
    expect_dtype,
    expect_positive,
    expect_rank,
    expect_shape,
    expect_tiles,
    layer_error,
    rms_normalize,
    store,
)


class RMSNorm(OpDef):
    kind = "rmsnorm"
    opcode = 2
    required_inputs = ("input", "weight")
    optional_inputs = ("residual",)
    optional_outputs = ("residual_output",)

    def check(self, op: Op) -> None:
        x, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        expect_rank(op, "input", x, 2)
        expect_dtype(op, "input", x, FLOAT_DTYPES)
        expect_shape(op, "weight", w, (x.shape[1],))
        expect_shape(op, "output", out, x.shape)
        if ("residual" in op.inputs) != ("residual_output" in op.outputs):
            raise layer_error(op, "residual and residual_output must be given together")
        if "residual" in op.inputs:
            expect_shape(op, "residual", op.inputs["residual"], x.shape)
            expect_shape(op, "residual_output", op.outputs["residual_output"], x.shape)
        expect_positive(op, "eps")
        expect_tiles(op, x.shape[0], f"{x.shape[0]} rows")

    def lower(self, op: Op) -> list[Tile]:
        x = op.inputs["input"]
        tiles = []
        for r0, r1 in split_even(x.shape[0], op.num_tiles):
            box = ((r0, r1), (0, x.shape[1]))
            reads = [Access(x.name, box), Access(op.inputs["weight"].name, op.inputs["weight"].full_box)]
            writes = [Access(op.outputs["output"].name, box)]
            if "residual" in op.inputs:
                reads.append(Access(op.inputs["residual"].name, box))
                writes.append(Access(op.outputs["residual_output"].name, box))
            nbytes = (len(reads) + len(writes) - 1) * (r1 - r0) * x.shape[1] * x.dtype.itemsize
            tiles.append(Tile(tuple(reads), tuple(writes), nbytes, {"row_start": r0, "row_end": r1}))
        return tiles

    def _run_rows(self, op: Op, env: Env, r0: int, r1: int) -> None:
        r1 = min(r1, env.num_tokens)
        if r0 >= r1:
            return
        h = env[op.inputs["input"].name][r0:r1].float()
        if "residual" in op.inputs:
            h = h + env[op.inputs["residual"].name][r0:r1].float()
            store(env[op.outputs["residual_output"].name][r0:r1], h)
        out = rms_normalize(h, env[op.inputs["weight"].name], op.attrs["eps"])
        store(env[op.outputs["output"].name][r0:r1], out)

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        self._run_rows(op, env, params["row_start"], params["row_end"])

    def reference(self, op: Op, env: Env) -> None:
        self._run_rows(op, env, 0, env.num_tokens)
