// The first task of a multi-step plan: the decoding state moves on by one step (the CUDA form of
// vllm_mpk/graph/ops/begin_step.py). One thread per request row: take in the previous step's greedy
// token if the row was decoded (write it after the prompt, move on, retire at the end or on EOS),
// then derive this step's inputs (token id, position, sequence length, KV slot) from the state.
// Its wait on the argmax is for the previous step (encoded in the record; events.cuh).
#pragma once
#include "common.cuh"

namespace mpk {

// BeginStepArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/begin_step.py.

template <int NT>
__device__ void begin_step_task(const TaskContext& c) {
  const int64_t* sampled = c.ptr<const int64_t>(BeginStepArgs::kSampled);
  int64_t* step = c.ptr<int64_t>(BeginStepArgs::kStep);
  int64_t* tokens = c.ptr<int64_t>(BeginStepArgs::kTokens);
  const int64_t* prompt_lens = c.ptr<const int64_t>(BeginStepArgs::kPromptLens);
  const int64_t* end = c.ptr<const int64_t>(BeginStepArgs::kEnd);
  int32_t* pending = c.ptr<int32_t>(BeginStepArgs::kPending);
  const int64_t eos = *c.ptr<const int64_t>(BeginStepArgs::kEos);
  const int32_t* tables = c.ptr<const int32_t>(BeginStepArgs::kTables);
  int32_t* input_ids = c.ptr<int32_t>(BeginStepArgs::kInputIds);
  int64_t* positions = c.ptr<int64_t>(BeginStepArgs::kPositions);
  int32_t* seq_lens = c.ptr<int32_t>(BeginStepArgs::kSeqLens);
  int64_t* slots = c.ptr<int64_t>(BeginStepArgs::kSlots);
  const int64_t width = c.arg(BeginStepArgs::kWidth), token_stride = c.arg(BeginStepArgs::kTokenStride);
  const int table_stride = c.arg(BeginStepArgs::kTableStride), page = c.arg(BeginStepArgs::kPage);
  for (int b = threadIdx.x; b < c.num_tokens; b += NT) {
    int64_t s = step[b];
    if (pending[b] && s >= 0) {
      const int64_t next = s + 1, token = sampled[b];
      const bool generating = next >= prompt_lens[b] && next < width;
      if (generating) tokens[b * token_stride + next] = token;
      s = next >= end[b] || (eos >= 0 && generating && token == eos) ? -1 : next;
      step[b] = s;
    }
    const bool active = s >= 0;
    const int64_t pos = active ? s : 0;
    input_ids[b] = active ? static_cast<int32_t>(tokens[b * token_stride + pos]) : 0;
    positions[b] = pos;
    seq_lens[b] = active ? static_cast<int32_t>(pos + 1) : 0;
    slots[b] = active ? static_cast<int64_t>(tables[(int64_t)b * table_stride + pos / page]) * page + pos % page : -1;
    pending[b] = active;
  }
}

}  // namespace mpk
