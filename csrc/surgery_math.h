// Per-pixel math of the pssr ops, shared by the CPU and CUDA kernels.
//
// Everything that decides a mask bit lives here, so that the CPU build (tested on every CI
// run against the Python reference) exercises the same code the GPU runs. The rules are the
// contract of DESIGN.md §9 and pssr/ops/reference.py:
//   score   s = max_c |g| (or the channel sum in channel order); +Inf if any channel is NaN/±Inf
//   mean    tau = alpha * (S / n) in float64 over the finite scores; removed iff s > tau
//   topk    the k highest scores; among equal scores the lower flat index goes first
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define PSSR_HD __host__ __device__ __forceinline__
#else
#define PSSR_HD inline
#endif

namespace pssr {

enum class Reduce : int { Max = 0, Sum = 1 };
enum class Mode : int { Mean = 0, TopK = 1 };

// Unsigned integer with the width of a score. For scores >= 0 (all of ours: they are absolute
// values, and -0 becomes +0) the IEEE bit pattern read as this integer is order-preserving, and
// every non-finite value (+Inf, NaN) has bits >= the bits of +Inf.
template <typename acc_t> struct ScoreBits;
template <> struct ScoreBits<float> {
  using type = uint32_t;
  static constexpr type kAbs = 0x7fffffffu;
  static constexpr type kInf = 0x7f800000u;
};
template <> struct ScoreBits<double> {
  using type = uint64_t;
  static constexpr type kAbs = 0x7fffffffffffffffull;
  static constexpr type kInf = 0x7ff0000000000000ull;
};

template <typename acc_t>
PSSR_HD typename ScoreBits<acc_t>::type to_bits(acc_t v) {
  typename ScoreBits<acc_t>::type b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename acc_t>
PSSR_HD acc_t from_bits(typename ScoreBits<acc_t>::type b) {
  acc_t v;
  memcpy(&v, &b, sizeof(v));
  return v;
}

template <typename acc_t>
PSSR_HD acc_t score_infinity() {
  return from_bits<acc_t>(ScoreBits<acc_t>::kInf);
}

// Accumulates one pixel's channels. The channel max is taken on the bit patterns of |g|, so a
// NaN channel (whose bits exceed +Inf's) can never be lost by a comparison that NaN fails.
template <typename acc_t>
struct PixelScore {
  using bits_t = typename ScoreBits<acc_t>::type;
  bits_t max_bits = 0;
  acc_t sum = acc_t(0);

  PSSR_HD void add(acc_t g) {
    const bits_t b = to_bits(g) & ScoreBits<acc_t>::kAbs;
    max_bits = b > max_bits ? b : max_bits;
    sum = sum + from_bits<acc_t>(b);
  }

  PSSR_HD acc_t finish(Reduce reduce) const {
    if (max_bits >= ScoreBits<acc_t>::kInf) return score_infinity<acc_t>();
    return reduce == Reduce::Max ? from_bits<acc_t>(max_bits) : sum;
  }
};

template <typename acc_t>
PSSR_HD bool is_finite_score(acc_t s) {
  return to_bits(s) < ScoreBits<acc_t>::kInf;
}

// tau = alpha * (S / n) with n clamped to 1, all in float64, in exactly this order.
PSSR_HD double mean_threshold(double finite_sum, int64_t finite_count, double alpha) {
  const double n = static_cast<double>(finite_count > 0 ? finite_count : 1);
  return alpha * (finite_sum / n);
}

// For a float score s and a float64 tau >= 0: (double)s > tau  <=>  s > below(tau), where
// below(tau) is the largest float <= tau. Lets kernels compare in the score's own type.
template <typename acc_t>
PSSR_HD acc_t threshold_in_score_type(double tau) {
  if (sizeof(acc_t) == sizeof(double)) return static_cast<acc_t>(tau);
  const float max_f = 3.40282346638528859812e+38f;
  if (!(tau < static_cast<double>(max_f))) {
    // tau in [FLT_MAX, DBL_MAX]: only +Inf scores are above it. tau = +Inf (alpha * mean
    // overflowed): nothing is above it, +Inf included, so keep +Inf.
    return static_cast<acc_t>(tau <= 1.7976931348623157e308 ? max_f : static_cast<float>(tau));
  }
  float t = static_cast<float>(tau);  // round to nearest
  if (static_cast<double>(t) > tau) {  // rounded up: step one float down (t > 0 here)
    t = from_bits<float>(to_bits<float>(t) - 1u);
  }
  return static_cast<acc_t>(t);
}

// --- topk: a most-significant-digit-first radix select on the score bits -----------------
// A pass looks at bits [lo, hi) of the keys whose higher bits equal the prefix found so far.

constexpr int kRadixBits = 11;  // digit width on the GPU and for large images on the CPU
constexpr int kRadixBins = 1 << kRadixBits;

template <typename acc_t, int kBits = kRadixBits>
PSSR_HD int radix_passes() {
  return (8 * static_cast<int>(sizeof(acc_t)) + kBits - 1) / kBits;
}

// Low bit of pass p (pass 0 holds the most significant bits).
template <typename acc_t, int kBits = kRadixBits>
PSSR_HD int radix_lo(int pass) {
  const int lo = 8 * static_cast<int>(sizeof(acc_t)) - kBits * (pass + 1);
  return lo > 0 ? lo : 0;
}

template <typename acc_t, int kBits = kRadixBits>
PSSR_HD int radix_width(int pass) {
  const int hi = 8 * static_cast<int>(sizeof(acc_t)) - kBits * pass;
  return hi - radix_lo<acc_t, kBits>(pass);
}

// One pass's digit: bits [lo, lo + width) of the key.
template <typename acc_t, int kBits = kRadixBits>
struct RadixPass {
  using bits_t = typename ScoreBits<acc_t>::type;
  int lo;
  bits_t digit_mask;

  PSSR_HD explicit RadixPass(int pass)
      : lo(radix_lo<acc_t, kBits>(pass)), digit_mask((bits_t(1) << radix_width<acc_t, kBits>(pass)) - 1) {}
  PSSR_HD int bins() const { return static_cast<int>(digit_mask) + 1; }
  PSSR_HD int digit(bits_t key) const { return static_cast<int>((key >> lo) & digit_mask); }
};

// Selection state: after all passes `prefix` is the k-th largest key, `need` how many of the
// keys equal to it are removed (the lowest flat indices first).
template <typename acc_t, int kBits = kRadixBits>
struct RadixState {
  using bits_t = typename ScoreBits<acc_t>::type;
  bits_t prefix = 0;
  bits_t prefix_mask = 0;
  int64_t need = 0;  // k minus the keys already known to be above the prefix

  PSSR_HD bool matches(bits_t key) const { return (key & prefix_mask) == prefix; }

  // Given this pass's digit histogram over the matching keys and `above` (how many matching
  // keys have a digit greater than `d`), fixes the digit of the k-th largest key.
  PSSR_HD void take_digit(const RadixPass<acc_t, kBits>& pass, int d, int64_t above) {
    prefix |= static_cast<bits_t>(d) << pass.lo;
    prefix_mask |= pass.digit_mask << pass.lo;
    need -= above;
  }
};

// The removal decision once the k-th key is known. `equal_rank` is the number of keys equal to
// `kth` at lower flat indices.
template <typename bits_t>
PSSR_HD bool topk_removes(bits_t key, bits_t kth, int64_t equal_rank, int64_t need) {
  return key > kth || (key == kth && equal_rank < need);
}

}  // namespace pssr
