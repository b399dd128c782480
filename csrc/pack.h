// Packing a batch of examples into the flat, unpadded buffers of `uniter_fast.data.schema.Batch`.
//
// The kernel is Python-free: plan.cpp reads and validates the example dicts (holding the GIL),
// fills `PackSizes` and one `ExampleRef` per example, the caller allocates every output from the
// sizes, and `pack_examples` writes them all in one pass over the examples with the GIL released.
// The layout is the one `collate_numpy` (uniter_fast/data/collate.py) states in NumPy; the tests
// hold this kernel to it array by array.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace uniter_fast {

// PAIRS: the inputs every task shares and no pretraining target (the downstream tasks add
// theirs in Python: uniter_fast/data/downstream.py).
enum class Task : uint8_t { MLM, MRFR, MRC, MRCKL, ITM, PAIRS };

inline bool is_mrm(Task t) { return t == Task::MRFR || t == Task::MRC || t == Task::MRCKL; }
inline bool has_soft_targets(Task t) { return t == Task::MRC || t == Task::MRCKL; }

// One validated example: C-contiguous, aligned, native-endian input buffers (owned by Python
// objects the plan keeps alive) and their element types.
struct ExampleRef {
  const void* input_ids = nullptr;  // [txt_len] integer
  DType ids_dtype = DType::Other;
  int64_t txt_len = 0;
  const void* img_feat = nullptr;   // [img_len, D] float
  DType feat_dtype = DType::Other;
  int64_t img_len = 0;
  const void* img_loc = nullptr;    // [img_len, 7] float
  DType loc_dtype = DType::Other;
  const void* txt_labels = nullptr; // MLM: [txt_len] integer, -1 where not a target
  DType labels_dtype = DType::Other;
  const uint8_t* img_mask = nullptr;  // MRM: [img_len] bool (0 or non-zero bytes)
  const void* soft_labels = nullptr;  // MRC, MRC-kl: [img_len, C] float
  DType soft_dtype = DType::Other;
  int64_t itm_target = 0;            // ITM: 0 or 1
};

// Every size of the packed batch, known before anything is written.
struct PackSizes {
  int64_t batch = 0;        // B
  int64_t txt_rows = 0;     // Nt
  int64_t img_rows = 0;     // Ni
  int64_t rows = 0;         // N = Nt + Ni
  int64_t img_dim = 0;      // D
  int64_t label_dim = 0;    // C (MRC, MRC-kl)
  int64_t mlm_targets = 0;  // M
  int64_t mrm_targets = 0;  // R
  int64_t max_seqlen = 0;
  int64_t max_txt_len = 0;
  int64_t max_img_len = 0;
  int64_t pad_len = 0;      // Lpad: max_seqlen rounded up to the pad multiple
  DType feat_out = DType::F32;  // float16 when every img_feat is float16, else float32
  DType soft_out = DType::F32;  // the same rule over soft_labels
};

// Output buffers, C-contiguous, of the shapes and types in plan.cpp's output table. Pointers of
// outputs the task does not have are null.
struct PackOutputs {
  int64_t* input_ids = nullptr;     // [Nt]
  int64_t* txt_pos = nullptr;       // [Nt]
  int64_t* txt_dest = nullptr;      // [Nt]
  void* img_feat = nullptr;         // [Ni, D] feat_out
  float* img_loc = nullptr;         // [Ni, 7]
  uint8_t* img_masked = nullptr;    // [Ni] bool
  int64_t* img_dest = nullptr;      // [Ni]
  int32_t* cu_seqlens = nullptr;    // [B + 1]
  int64_t* txt_len = nullptr;       // [B]
  int64_t* img_len = nullptr;       // [B]
  int64_t* pad_index = nullptr;     // [B, Lpad]
  int64_t* unpad_index = nullptr;   // [N]
  int64_t* mlm_index = nullptr;     // [M]
  int64_t* mlm_labels = nullptr;    // [M]
  int64_t* mrm_index = nullptr;     // [R]
  void* mrfr_target = nullptr;      // [R, D] feat_out
  void* mrc_soft_target = nullptr;  // [R, C] soft_out
  int64_t* mrc_label = nullptr;     // [R]
  int64_t* itm_target = nullptr;    // [B]
};

// Writes every output of `task` in one pass over `examples`. Inputs must be as `ExampleRef`
// describes and `sizes` must be theirs (plan.cpp guarantees both); touches no Python object.
void pack_examples(Task task, const std::vector<ExampleRef>& examples, const PackSizes& sizes,
                   const PackOutputs& out);

}  // namespace uniter_fast
