// The packing kernel: one pass over the examples writes every output buffer (see pack.h).
#include "pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace uniter_fast {
namespace {

// n integers of dtype `t` to int64, as NumPy's astype(int64) (uint64 wraps around).
void ints_to_i64(const void* src, DType t, int64_t* dst, int64_t n) {
  if (t == DType::I64) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(int64_t));
    return;
  }
  with_int_type(t, [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<int64_t>(s[j]);
  });
}

// n floats of dtype `t` to float32, as NumPy's astype(float32): exact from float16,
// round-to-nearest-even from float64.
void floats_to_f32(const void* src, DType t, float* dst, int64_t n) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(s[j]);
      return;
    }
    case DType::F64: {
      const double* s = static_cast<const double*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]);
      return;
    }
    default: throw std::logic_error("pack: float dtype expected");
  }
}

// n floats into an output of dtype `out_t`. The output is float16 only when every input is
// (the plan's rule), so float16 out is always a raw copy of the bits.
void copy_floats(const void* src, DType src_t, void* dst, DType out_t, int64_t n) {
  if (out_t == DType::F16) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(uint16_t));
  } else {
    floats_to_f32(src, src_t, static_cast<float*>(dst), n);
  }
}

// 1 + argmax of row[1:c]: NumPy's argmax rules (the first maximum wins; a NaN is the maximum,
// the first one wins), so the label matches `1 + soft[:, 1:].argmax(1)` on the same data.
int64_t mrc_label_f32(const float* row, int64_t c) {
  int64_t best = 1;
  float top = row[1];
  if (std::isnan(top)) return best;
  for (int64_t j = 2; j < c; ++j) {
    const float v = row[j];
    if (!(v <= top)) {  // true for a NaN too
      top = v;
      best = j;
      if (std::isnan(v)) break;
    }
  }
  return best;
}

// The same over float16 bits, compared by value (half_order_key) without converting.
int64_t mrc_label_f16_scalar(const uint16_t* row, int64_t c) {
  if (half_is_nan(row[1])) return 1;
  int64_t best = 1;
  int32_t top = half_order_key(row[1]);
  for (int64_t j = 2; j < c; ++j) {
    if (half_is_nan(row[j])) return j;
    const int32_t key = half_order_key(row[j]);
    if (key > top) {
      top = key;
      best = j;
    }
  }
  return best;
}

// The same result from branch-free passes over 16-bit lanes, which the compiler vectorises (8
// lanes on baseline x86-64): the scalar loop costs about 1 ns per class, 2 ms per mrckl batch of
// 256 pairs, as much as copying the batch. The row sits in L1 after its copy. Keys and class
// indices fit in int16 for rows of up to 32767 classes (1601 in UNITER); wider rows go scalar.
int64_t mrc_label_f16(const uint16_t* row, int64_t c) {
  if (c > std::numeric_limits<int16_t>::max()) return mrc_label_f16_scalar(row, c);
  const auto n = static_cast<int16_t>(c);
  int16_t any_nan = 0;
  int16_t top = std::numeric_limits<int16_t>::min();  // below every key (keys >= -0x7fff)
  for (int16_t j = 1; j < n; ++j) {
    const uint16_t h = row[j];
    const uint16_t magnitude = h & 0x7fff;
    any_nan |= static_cast<int16_t>(magnitude > 0x7c00);
    const auto sign = static_cast<int16_t>(-(h >> 15));  // 0 or -1
    const auto key = static_cast<int16_t>((magnitude ^ sign) - sign);  // half_order_key
    top = key > top ? key : top;
  }
  if (any_nan) return mrc_label_f16_scalar(row, c);  // the first NaN wins
  // The first class holding the maximum, as a min-reduction spelled with selects (GCC 12
  // vectorises this form, not std::min's).
  int16_t first = n;
  for (int16_t j = 1; j < n; ++j) {
    const uint16_t h = row[j];
    const auto sign = static_cast<int16_t>(-(h >> 15));
    const auto key = static_cast<int16_t>(((h & 0x7fff) ^ sign) - sign);
    const int16_t candidate = key == top ? j : n;
    first = candidate < first ? candidate : first;
  }
  return first;
}

}  // namespace

void pack_examples(Task task, const std::vector<ExampleRef>& examples, const PackSizes& sizes,
                   const PackOutputs& out) {
  const int64_t dim = sizes.img_dim;
  const int64_t classes = sizes.label_dim;
  const int64_t pad_len = sizes.pad_len;
  const int64_t rows = sizes.rows;
  const bool mlm = task == Task::MLM;
  const bool mrm = is_mrm(task);
  const bool soft = has_soft_targets(task);
  const size_t feat_row_bytes = static_cast<size_t>(dim) * item_size(sizes.feat_out);
  const size_t soft_row_bytes = static_cast<size_t>(classes) * item_size(sizes.soft_out);
  char* const feat_out = static_cast<char*>(out.img_feat);
  char* const mrfr_out = static_cast<char*>(out.mrfr_target);
  char* const soft_out = static_cast<char*>(out.mrc_soft_target);

  int64_t row = 0;  // first packed row of sequence b
  int64_t t = 0;    // first text token of sequence b, over the batch
  int64_t r = 0;    // first region of sequence b, over the batch
  int64_t m = 0;    // MLM targets written so far
  int64_t q = 0;    // masked regions written so far
  for (size_t b = 0; b < examples.size(); ++b) {
    const ExampleRef& ex = examples[b];
    const int64_t tl = ex.txt_len;
    const int64_t il = ex.img_len;
    const int64_t seq = tl + il;
    const int64_t start = row;
    out.cu_seqlens[b] = static_cast<int32_t>(start);  // plan.cpp checked N fits in int32
    out.txt_len[b] = tl;
    out.img_len[b] = il;

    // Text: ids, position in the caption, packed row; MLM targets in batch-major order.
    ints_to_i64(ex.input_ids, ex.ids_dtype, out.input_ids + t, tl);
    for (int64_t j = 0; j < tl; ++j) {
      out.txt_pos[t + j] = j;
      out.txt_dest[t + j] = start + j;
    }
    if (mlm) {
      with_int_type(ex.labels_dtype, [&](auto tag) {
        using T = decltype(tag);
        const T* labels = static_cast<const T*>(ex.txt_labels);
        for (int64_t j = 0; j < tl; ++j) {
          const int64_t label = static_cast<int64_t>(labels[j]);
          if (label != -1) {
            out.mlm_index[m] = start + j;
            out.mlm_labels[m] = label;
            ++m;
          }
        }
      });
    }

    // Regions: packed row, boxes, features (masked rows zeroed, their targets taken first).
    const int64_t img_start = start + tl;
    for (int64_t k = 0; k < il; ++k) out.img_dest[r + k] = img_start + k;
    floats_to_f32(ex.img_loc, ex.loc_dtype, out.img_loc + r * 7, il * 7);
    const char* feat_in = static_cast<const char*>(ex.img_feat);
    const size_t in_row_bytes = static_cast<size_t>(dim) * item_size(ex.feat_dtype);
    char* feat_dst = feat_out + static_cast<size_t>(r) * feat_row_bytes;
    if (!mrm) {
      std::memset(out.img_masked + r, 0, static_cast<size_t>(il));
      copy_floats(feat_in, ex.feat_dtype, feat_dst, sizes.feat_out, il * dim);
    } else {
      const uint8_t* mask = ex.img_mask;
      const size_t soft_in_row_bytes = static_cast<size_t>(classes) * item_size(ex.soft_dtype);
      int64_t k = 0;
      while (k < il) {
        if (!mask[k]) {
          // A run of unmasked rows is one contiguous copy.
          int64_t end = k;
          while (end < il && !mask[end]) ++end;
          std::memset(out.img_masked + r + k, 0, static_cast<size_t>(end - k));
          copy_floats(feat_in + k * in_row_bytes, ex.feat_dtype, feat_dst + k * feat_row_bytes,
                      sizes.feat_out, (end - k) * dim);
          k = end;
          continue;
        }
        out.img_masked[r + k] = 1;
        out.mrm_index[q] = img_start + k;
        if (soft) {
          char* dst = soft_out + static_cast<size_t>(q) * soft_row_bytes;
          copy_floats(static_cast<const char*>(ex.soft_labels) + k * soft_in_row_bytes,
                      ex.soft_dtype, dst, sizes.soft_out, classes);
          out.mrc_label[q] =
              sizes.soft_out == DType::F16
                  ? mrc_label_f16(reinterpret_cast<const uint16_t*>(dst), classes)
                  : mrc_label_f32(reinterpret_cast<const float*>(dst), classes);
        } else {
          copy_floats(feat_in + k * in_row_bytes, ex.feat_dtype,
                      mrfr_out + static_cast<size_t>(q) * feat_row_bytes, sizes.feat_out, dim);
        }
        std::memset(feat_dst + k * feat_row_bytes, 0, feat_row_bytes);
        ++q;
        ++k;
      }
    }

    // Padded view: row b holds its packed rows, then N (one past the last row) as padding.
    int64_t* pad_row = out.pad_index + static_cast<int64_t>(b) * pad_len;
    const int64_t flat = static_cast<int64_t>(b) * pad_len;
    for (int64_t l = 0; l < seq; ++l) {
      pad_row[l] = start + l;
      out.unpad_index[start + l] = flat + l;
    }
    std::fill(pad_row + seq, pad_row + pad_len, rows);

    if (out.itm_target != nullptr) out.itm_target[b] = ex.itm_target;
    row += seq;
    t += tl;
    r += il;
  }
  out.cu_seqlens[examples.size()] = static_cast<int32_t>(rows);
}

}  // namespace uniter_fast
