"""The standalone decoding state, for the host side: defined below the graph layer in
``graph/step_state.py`` (the begin_step op computes it too); named here for the runtime's users."""

from vllm_mpk.graph.step_state import STEP_INPUT_NAMES, StepInputs, advance, contiguous_block_tables, step_inputs

__all__ = ["STEP_INPUT_NAMES", "StepInputs", "advance", "contiguous_block_tables", "step_inputs"]
