// Token-bucket batching: the authors' TokenBucketSampler, seeded with a specified generator.
//
// The Python reference (`token_bucket_batches_reference` in uniter_fast/data/batching.py) states
// the same algorithm line by line, generator included; the tests compare the two exactly.
#pragma once

#include <cstdint>
#include <vector>

namespace uniter_fast {

// SplitMix64 (Steele, Lea and Flood 2014; the constants of Vigna's reference code). Chosen for
// being a few lines that any language reproduces bit for bit, so a seed means the same batches
// on every platform and in the Python reference.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  // Uniform in [0, bound) for bound >= 1, without modulo bias: draws below 2^64 mod bound are
  // rejected, so the accepted range is a whole number of copies of [0, bound).
  uint64_t below(uint64_t bound) {
    const uint64_t threshold = (0 - bound) % bound;
    for (;;) {
      const uint64_t x = next();
      if (x >= threshold) return x % bound;
    }
  }

 private:
  uint64_t state_;
};

// Fisher-Yates from the back, as Python's random.shuffle: for i = n-1 .. 1, swap a[i] with
// a[below(i + 1)].
void shuffle(int64_t* a, int64_t n, SplitMix64& rng);

enum class BucketMode : uint8_t { Padded, Packed };

struct BucketOptions {
  int64_t max_tokens = 0;
  int64_t bucket_size = 0;
  int64_t size_multiple = 0;
  bool drop_last = false;
  BucketMode mode = BucketMode::Padded;
  uint64_t seed = 0;
  bool shuffle_batches = true;
  bool sort_by_length = true;  // false: fill in shuffled order (no length buckets)
};

// Batches as CSR: batch k is indices[offsets[k] : offsets[k + 1]].
struct Batches {
  std::vector<int64_t> offsets;
  std::vector<int64_t> indices;
};

// `lengths[n]` > 0. `order`: an explicit permutation of 0..n-1 replacing the first shuffle, or
// null. Throws std::invalid_argument on bad input (non-positive length, a non-permutation,
// options < 1, a padded-mode budget too small for one group). Python-free; see batching.py for
// the semantics in full.
Batches bucket_batches(const int64_t* lengths, int64_t n, const int64_t* order,
                       const BucketOptions& options);

}  // namespace uniter_fast
