// Token-bucket batching (see bucket.h and uniter_fast/data/batching.py for the semantics).
#include "bucket.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace uniter_fast {

void shuffle(int64_t* a, int64_t n, SplitMix64& rng) {
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(a[i], a[j]);
  }
}

namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

int64_t saturating_add(int64_t a, int64_t b) { return b > kInt64Max - a ? kInt64Max : a + b; }

// Does a group of `group` tokens fit beside `used` tokens under `budget`? (No overflow: every
// operand is non-negative.)
bool fits(int64_t used, int64_t group, int64_t budget) {
  return group <= budget && used <= budget - group;
}

void check_options(const BucketOptions& o) {
  if (o.max_tokens < 1 || o.bucket_size < 1 || o.size_multiple < 1) {
    throw std::invalid_argument(
        "bucketing: max_tokens, bucket_size and size_multiple must be >= 1, got " +
        std::to_string(o.max_tokens) + ", " + std::to_string(o.bucket_size) + ", " +
        std::to_string(o.size_multiple));
  }
}

class BatchWriter {
 public:
  explicit BatchWriter(Batches& out) : out_(out) { out_.offsets.assign(1, 0); }
  void emit(const std::vector<int64_t>& batch) {
    out_.indices.insert(out_.indices.end(), batch.begin(), batch.end());
    out_.offsets.push_back(static_cast<int64_t>(out_.indices.size()));
  }

 private:
  Batches& out_;
};

// The authors' loop over one sorted bucket: the budget is max_len x (samples in the batch), with
// max_len the longest sample seen so far in the bucket. It is never reset when a batch closes
// (the reference's behaviour, kept): the bucket is sorted longest first, so max_len is the
// bucket's longest sample for every batch of the bucket.
void fill_padded(const int64_t* lengths, const int64_t* bucket, int64_t size,
                 const BucketOptions& o, BatchWriter& writer) {
  int64_t max_len = 0;
  std::vector<int64_t> batch;
  for (int64_t g = 0, g_end = 0; g < size; g = g_end) {
    g_end = g + std::min(o.size_multiple, size - g);
    int64_t group_max = 0;
    for (int64_t k = g; k < g_end; ++k) group_max = std::max(group_max, lengths[bucket[k]]);
    max_len = std::max(max_len, group_max);
    // max_len * (len(batch) + size_multiple) > max_tokens, without overflow.
    const int64_t room = o.max_tokens / max_len;
    if (o.size_multiple > room - static_cast<int64_t>(batch.size())) {
      // The reference starts the next batch with this group unchecked; sorted longest first it
      // always fits, unsorted it may not, so its own length is checked too.
      const int64_t too_long = batch.empty() ? max_len : group_max;
      if (batch.empty() || o.size_multiple > o.max_tokens / group_max) {
        throw std::invalid_argument(
            "bucketing: max_tokens " + std::to_string(o.max_tokens) + " cannot hold " +
            std::to_string(o.size_multiple) + " samples of length " + std::to_string(too_long) +
            " (max_tokens too small / max_seq_len too long)");
      }
      writer.emit(batch);
      batch.assign(bucket + g, bucket + g_end);
    } else {
      batch.insert(batch.end(), bucket + g, bucket + g_end);
    }
  }
  if (!o.drop_last && !batch.empty()) writer.emit(batch);
}

// Packed: the budget is the sum of the real lengths. Groups of size_multiple are added while
// they fit; a group that does not fit closes the batch and opens the next; a group larger than
// the whole budget is split into single samples that fill batches in order, and a single
// sample larger than the budget is a batch of its own.
void fill_packed(const int64_t* lengths, const int64_t* bucket, int64_t size,
                 const BucketOptions& o, BatchWriter& writer) {
  const int64_t budget = o.max_tokens;
  std::vector<int64_t> batch;
  int64_t used = 0;
  for (int64_t g = 0, g_end = 0; g < size; g = g_end) {
    g_end = g + std::min(o.size_multiple, size - g);
    int64_t group = 0;
    for (int64_t k = g; k < g_end; ++k) group = saturating_add(group, lengths[bucket[k]]);
    if (fits(used, group, budget)) {
      batch.insert(batch.end(), bucket + g, bucket + g_end);
      used += group;
      continue;
    }
    if (!batch.empty()) {
      writer.emit(batch);
      batch.clear();
      used = 0;
    }
    if (group <= budget) {
      batch.assign(bucket + g, bucket + g_end);
      used = group;
      continue;
    }
    for (int64_t k = g; k < g_end; ++k) {
      const int64_t len = lengths[bucket[k]];
      if (!fits(used, len, budget) && !batch.empty()) {
        writer.emit(batch);
        batch.clear();
        used = 0;
      }
      batch.push_back(bucket[k]);
      used = saturating_add(used, len);
    }
  }
  if (!o.drop_last && !batch.empty()) writer.emit(batch);
}

}  // namespace

Batches bucket_batches(const int64_t* lengths, int64_t n, const int64_t* order,
                       const BucketOptions& o) {
  check_options(o);
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0) {
      throw std::invalid_argument("bucketing: lengths[" + std::to_string(i) + "] is " +
                                  std::to_string(lengths[i]) + "; every length must be positive");
    }
  }
  SplitMix64 rng(o.seed);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  if (order == nullptr) {
    std::iota(ids.begin(), ids.end(), int64_t{0});
    shuffle(ids.data(), n, rng);
  } else {
    std::vector<bool> seen(static_cast<size_t>(n), false);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = order[i];
      if (v < 0 || v >= n || seen[static_cast<size_t>(v)]) {
        throw std::invalid_argument("bucketing: order is not a permutation of 0.." +
                                    std::to_string(n - 1) + " (order[" + std::to_string(i) +
                                    "] = " + std::to_string(v) + ")");
      }
      seen[static_cast<size_t>(v)] = true;
      ids[static_cast<size_t>(i)] = v;
    }
  }

  Batches in_order;
  BatchWriter writer(in_order);
  for (int64_t s = 0, size = 0; s < n; s += size) {
    int64_t* bucket = ids.data() + s;
    size = std::min(o.bucket_size, n - s);
    // Longest first; stable, so equal lengths keep their shuffled order (Python's sorted).
    if (o.sort_by_length) {
      std::stable_sort(bucket, bucket + size,
                       [lengths](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    }
    if (o.mode == BucketMode::Padded) {
      fill_padded(lengths, bucket, size, o, writer);
    } else {
      fill_packed(lengths, bucket, size, o, writer);
    }
  }
  if (!o.shuffle_batches) return in_order;

  const auto count = static_cast<int64_t>(in_order.offsets.size()) - 1;
  std::vector<int64_t> perm(static_cast<size_t>(count));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  shuffle(perm.data(), count, rng);
  Batches out;
  out.offsets.reserve(in_order.offsets.size());
  out.indices.reserve(in_order.indices.size());
  out.offsets.push_back(0);
  for (const int64_t k : perm) {
    const auto begin = in_order.indices.begin() + in_order.offsets[static_cast<size_t>(k)];
    const auto end = in_order.indices.begin() + in_order.offsets[static_cast<size_t>(k) + 1];
    out.indices.insert(out.indices.end(), begin, end);
    out.offsets.push_back(static_cast<int64_t>(out.indices.size()));
  }
  return out;
}

}  // namespace uniter_fast
