// Shared by the packer and the bucketer: element types, float16 bits, bounds-checked sizes.
//
// Nothing here knows about Python or torch: the kernels are plain loops over raw buffers, so
// they can run with the GIL released.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace uniter_fast {

// Element types the packer reads (NumPy's kind + item size; native byte order only, the
// Python side converts anything else before a kernel sees it).
enum class DType : uint8_t { Bool, I8, I16, I32, I64, U8, U16, U32, U64, F16, F32, F64, Other };

inline bool is_integer(DType t) { return t >= DType::I8 && t <= DType::U64; }
inline bool is_float(DType t) { return t == DType::F16 || t == DType::F32 || t == DType::F64; }

inline int item_size(DType t) {
  switch (t) {
    case DType::Bool:
    case DType::I8:
    case DType::U8:
      return 1;
    case DType::I16:
    case DType::U16:
    case DType::F16:
      return 2;
    case DType::I32:
    case DType::U32:
    case DType::F32:
      return 4;
    case DType::I64:
    case DType::U64:
    case DType::F64:
      return 8;
    default:
      return 0;
  }
}

// NumPy's name for the type, for error messages and for the Python side's allocations.
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Bool: return "bool";
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    case DType::U16: return "uint16";
    case DType::U32: return "uint32";
    case DType::U64: return "uint64";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    default: return "unsupported";
  }
}

// Calls f(T{}) with T the C++ type of integer dtype `t`.
template <typename F>
void with_int_type(DType t, F&& f) {
  switch (t) {
    case DType::I8: f(int8_t{}); break;
    case DType::I16: f(int16_t{}); break;
    case DType::I32: f(int32_t{}); break;
    case DType::I64: f(int64_t{}); break;
    case DType::U8: f(uint8_t{}); break;
    case DType::U16: f(uint16_t{}); break;
    case DType::U32: f(uint32_t{}); break;
    case DType::U64: f(uint64_t{}); break;
    // Callers admit integer types only; reaching this is a bug in the caller, not bad input.
    default: throw std::logic_error("uniter_fast._C: integer dtype expected");
  }
}

// IEEE binary16 -> binary32, bit-exact with NumPy's npy_halfbits_to_floatbits: subnormals are
// renormalised, infinities kept, NaN payloads shifted into place (not quietened).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = h & 0x7c00u;
  const uint32_t mant = h & 0x03ffu;
  uint32_t bits;
  if (exp == 0x7c00u) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in binary32 (a normal number there).
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, sizeof(bits));
    bits |= sign;
  } else {
    bits = sign | ((static_cast<uint32_t>(h & 0x7fffu) + 0x1c000u) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline bool half_is_nan(uint16_t h) { return (h & 0x7fffu) > 0x7c00u; }

// A key that orders non-NaN binary16 values as their real values do (-0 and +0 compare equal):
// argmax over float16 data without converting it.
inline int32_t half_order_key(uint16_t h) {
  const int32_t magnitude = h & 0x7fff;
  return (h & 0x8000u) ? -magnitude : magnitude;
}

// Overflow-checked arithmetic on non-negative sizes computed from user input.
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  if (b > std::numeric_limits<int64_t>::max() - a) {
    throw std::invalid_argument(std::string(what) + ": size overflows int64");
  }
  return a + b;
}

inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) {
    throw std::invalid_argument(std::string(what) + ": size overflows int64");
  }
  return a * b;
}

}  // namespace uniter_fast
