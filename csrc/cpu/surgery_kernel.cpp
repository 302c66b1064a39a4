// CPU kernels of the pssr ops: one thread per image (at::parallel_for over the batch), the
// image's scores kept in a thread-local row that stays in L1/L2 between the two passes.
//   pass 1  read grad once -> scores (+ the float64 sum of the finite ones, or the radix select)
//   pass 2  scores -> mask row; read x once -> write x_surgered and the mask once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../surgery_math.h"

namespace pssr {
namespace {

// GCC/Clang on x86-64 compile the hot loops once per ISA and pick one at load time, so that a
// portable build still runs AVX2/AVX-512 code (no -march=native).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PSSR_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PSSR_CPU_CLONES
#endif

// ---- pass 1: scores ---------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int kC, Reduce kReduce>
void score_row_impl(const scalar_t* g, int64_t hw, int channels, acc_t* out) {
  const int C = kC > 0 ? kC : channels;
  for (int64_t p = 0; p < hw; ++p) {
    PixelScore<acc_t> ps;
    for (int c = 0; c < C; ++c) ps.add(static_cast<acc_t>(g[c * hw + p]));
    out[p] = ps.finish(kReduce);
  }
}

// The common cases get their own (vectorizable) instantiations; other C take the generic loop.
template <typename scalar_t, typename acc_t, Reduce kReduce>
PSSR_CPU_CLONES void score_row_reduce(const scalar_t* g, int64_t hw, int channels, acc_t* out) {
  switch (channels) {
    case 1: return score_row_impl<scalar_t, acc_t, 1, kReduce>(g, hw, channels, out);
    case 3: return score_row_impl<scalar_t, acc_t, 3, kReduce>(g, hw, channels, out);
    default: return score_row_impl<scalar_t, acc_t, 0, kReduce>(g, hw, channels, out);
  }
}

template <typename scalar_t, typename acc_t>
void score_row(const scalar_t* g, int64_t hw, int channels, Reduce reduce, acc_t* out) {
  if (reduce == Reduce::Max) {
    score_row_reduce<scalar_t, acc_t, Reduce::Max>(g, hw, channels, out);
  } else {
    score_row_reduce<scalar_t, acc_t, Reduce::Sum>(g, hw, channels, out);
  }
}

// Float64 sum and count of the finite scores. Any order is allowed (tau is compared in float64,
// §9), so the float32 case splits the sum over vector lanes.
template <typename acc_t>
inline void add_finite_scalar(const acc_t* s, int64_t n, double& sum, int64_t& count) {
  for (int64_t p = 0; p < n; ++p) {
    const bool finite = is_finite_score(s[p]);
    sum += finite ? static_cast<double>(s[p]) : 0.0;
    count += finite;
  }
}

template <typename acc_t>
PSSR_CPU_CLONES void finite_sum(const acc_t* s, int64_t n, double* sum_out, int64_t* count_out) {
  double sum = 0.0;
  int64_t count = 0;
  add_finite_scalar(s, n, sum, count);
  *sum_out = sum;
  *count_out = count;
}

#if defined(__GNUC__)
// float32 scores, the hot case: 8 scores per step, widened into two 4 x float64 accumulators and
// masked by a compare of the bits (GCC/Clang vector extensions; each target clone gets its ISA).
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

template <>
PSSR_CPU_CLONES void finite_sum<float>(const float* s, int64_t n, double* sum_out, int64_t* count_out) {
  const int32_t inf = static_cast<int32_t>(ScoreBits<float>::kInf);  // scores are >= 0: signed compare is fine
  const i32x4 inf_bits = {inf, inf, inf, inf};
  f64x4 acc0 = {0.0, 0.0, 0.0, 0.0}, acc1 = acc0;
  i32x4 finite_lanes = {0, 0, 0, 0};  // -1 per finite score
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    f32x4 a, b;
    memcpy(&a, s + p, sizeof(a));
    memcpy(&b, s + p + 4, sizeof(b));
    const i32x4 fa = (i32x4)a < inf_bits;
    const i32x4 fb = (i32x4)b < inf_bits;
    acc0 += (f64x4)((i64x4)__builtin_convertvector(a, f64x4) & __builtin_convertvector(fa, i64x4));
    acc1 += (f64x4)((i64x4)__builtin_convertvector(b, f64x4) & __builtin_convertvector(fb, i64x4));
    finite_lanes += fa + fb;
  }
  const f64x4 acc = acc0 + acc1;
  double sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  int64_t count = -(int64_t(finite_lanes[0]) + finite_lanes[1] + finite_lanes[2] + finite_lanes[3]);
  add_finite_scalar(s + p, n - p, sum, count);
  *sum_out = sum;
  *count_out = count;
}
#endif

// ---- pass 2: masks ----------------------------------------------------------------------

template <typename acc_t>
PSSR_CPU_CLONES void mean_mask_row(const acc_t* s, int64_t n, acc_t threshold, bool* mask) {
  for (int64_t p = 0; p < n; ++p) mask[p] = s[p] > threshold;
}

// The k-th largest key by the shared radix select: pass 0 histograms the whole row, later
// passes only the candidates that still match the prefix (gathered into `cand`).
template <typename acc_t, int kBits>
RadixState<acc_t, kBits> topk_select(const acc_t* s, int64_t n, int64_t k,
                                     std::vector<typename ScoreBits<acc_t>::type>& cand,
                                     std::vector<int64_t>& hist) {
  using bits_t = typename ScoreBits<acc_t>::type;
  RadixState<acc_t, kBits> st;
  st.need = k;
  cand.resize(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) cand[p] = to_bits(s[p]);
  int64_t m = n;
  for (int p = 0; p < radix_passes<acc_t, kBits>(); ++p) {
    const RadixPass<acc_t, kBits> pass(p);
    // Four interleaved sub-histograms: scores crowd into a few digits (pass 0 sees mostly the
    // exponent), and one counter incremented back to back waits on its own store every time.
    const int bins = pass.bins();
    std::fill(hist.begin(), hist.begin() + 4 * bins, int64_t(0));
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      for (int j = 0; j < 4; ++j) hist[j * bins + pass.digit(cand[i + j])] += 1;
    }
    for (; i < m; ++i) hist[pass.digit(cand[i])] += 1;
    for (int b = 0; b < bins; ++b) hist[b] += hist[bins + b] + hist[2 * bins + b] + hist[3 * bins + b];
    int64_t above = 0;
    int d = pass.bins() - 1;
    while (above + hist[d] < st.need) above += hist[d--];  // need >= 1 keeps d >= 0
    st.take_digit(pass, d, above);
    int64_t kept = 0;
    for (int64_t i = 0; i < m; ++i) {  // branch-free compaction: the test is a coin flip
      const bits_t key = cand[i];
      cand[kept] = key;
      kept += pass.digit(key) == d;
    }
    m = kept;
  }
  return st;
}

// Rows below this many pixels use 8-bit digits: clearing 2048 bins per pass would cost more
// than the row itself.
constexpr int64_t kWideDigitMinPixels = 16384;

template <typename acc_t, int kBits>
void topk_mask_row_with(const acc_t* s, int64_t n, int64_t k, bool* mask,
                        std::vector<typename ScoreBits<acc_t>::type>& cand, std::vector<int64_t>& hist) {
  const RadixState<acc_t, kBits> st = topk_select<acc_t, kBits>(s, n, k, cand, hist);
  int64_t equal_seen = 0;
  for (int64_t p = 0; p < n; ++p) {
    const auto key = to_bits(s[p]);
    mask[p] = topk_removes(key, st.prefix, equal_seen, st.need);
    equal_seen += key == st.prefix;
  }
}

template <typename acc_t>
void topk_mask_row(const acc_t* s, int64_t n, int64_t k, bool* mask,
                   std::vector<typename ScoreBits<acc_t>::type>& cand, std::vector<int64_t>& hist) {
  if (k == 0) {
    std::fill(mask, mask + n, false);
  } else if (n < kWideDigitMinPixels) {
    topk_mask_row_with<acc_t, 8>(s, n, k, mask, cand, hist);
  } else {
    topk_mask_row_with<acc_t, kRadixBits>(s, n, k, mask, cand, hist);
  }
}

// ---- pass 2: surgery --------------------------------------------------------------------

template <typename scalar_t>
PSSR_CPU_CLONES void blend_row(const scalar_t* __restrict__ x, const bool* __restrict__ mask_row,
                               scalar_t fill, int64_t hw, int channels, scalar_t* __restrict__ out) {
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(mask_row);
  for (int c = 0; c < channels; ++c) {
    const scalar_t* xc = x + c * hw;
    scalar_t* oc = out + c * hw;
#pragma omp simd
    for (int64_t p = 0; p < hw; ++p) oc[p] = mask[p] != 0 ? fill : xc[p];
  }
}

// Images per task: small images are batched so that a thread gets ~GRAIN_SIZE elements of work
// (waking a second thread for a few hundred pixels costs more than it saves).
int64_t images_per_task(int64_t elements_per_image) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements_per_image));
}

// ---- ops --------------------------------------------------------------------------------

at::Tensor saliency_score_cpu(const at::Tensor& grad_in, c10::string_view reduce_name) {
  check_image_batch("grad", grad_in);
  const Reduce reduce = parse_reduce(reduce_name);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  const at::ScalarType score_type = at::toOpMathType(grad.scalar_type());
  at::Tensor score = at::empty({B, H, W}, grad.options().dtype(score_type));
  if (score.numel() == 0) return score;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pssr_saliency_score", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    acc_t* s = score.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, images_per_task(C * H * W), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        score_row(g + b * C * H * W, H * W, static_cast<int>(C), reduce, s + b * H * W);
      }
    });
  });
  return score;
}

std::tuple<at::Tensor, at::Tensor> pixel_surgery_cpu(const at::Tensor& x_in, const at::Tensor& grad_in,
                                                     double alpha, int64_t k, double fill,
                                                     c10::string_view mode_name,
                                                     c10::string_view reduce_name) {
  check_surgery_args(x_in, grad_in, alpha, k, fill);
  const Mode mode = parse_mode(mode_name);
  const Reduce reduce = parse_reduce(reduce_name);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty({B, 1, H, W}, x.options().dtype(at::kBool));
  if (x.numel() == 0) return {out, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pssr_pixel_surgery", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using bits_t = typename ScoreBits<acc_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    bool* mp = mask.mutable_data_ptr<bool>();
    const scalar_t fill_v = static_cast<scalar_t>(fill);
    at::parallel_for(0, B, images_per_task(C * HW), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> scores(static_cast<size_t>(HW));
      std::vector<bits_t> cand;
      std::vector<int64_t> hist(mode == Mode::TopK ? 4 * kRadixBins : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * C * HW;
        bool* mrow = mp + b * HW;
        score_row(gp + off, HW, static_cast<int>(C), reduce, scores.data());
        if (mode == Mode::Mean) {
          double sum = 0.0;
          int64_t count = 0;
          finite_sum(scores.data(), HW, &sum, &count);
          const double tau = mean_threshold(sum, count, alpha);
          mean_mask_row(scores.data(), HW, threshold_in_score_type<acc_t>(tau), mrow);
        } else {
          topk_mask_row(scores.data(), HW, k, mrow, cand, hist);
        }
        blend_row(xp + off, mrow, fill_v, HW, static_cast<int>(C), op + off);
      }
    });
  });
  return {out, mask};
}

}  // namespace
}  // namespace pssr

TORCH_LIBRARY_IMPL(pssr, CPU, m) {
  m.impl("saliency_score", &pssr::saliency_score_cpu);
  m.impl("pixel_surgery", &pssr::pixel_surgery_cpu);
}
