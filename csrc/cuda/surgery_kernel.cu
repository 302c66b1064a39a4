// CUDA kernels of the pssr ops. The per-pixel math (score, threshold, radix digits, tie rule)
// is the shared header's, so the CPU build tests the same rules on every CI run.
//
//   score_kernel       grid (chunks, B): reads grad once, writes the fp32/fp64 score map and,
//                      in mean mode, one (float64 sum, count) partial per block
//   mean_apply_kernel  grid (chunks, B): tau from the partials (fixed order: deterministic),
//                      then reads score + x, writes x_surgered and the mask
//   topk_apply_kernel  one 512-thread block per image: MSB-first radix select of the k-th score over the
//                      image's score map (L2-resident), then the same streaming apply with a
//                      block-wide scan that ranks equal scores by flat index
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../surgery_math.h"

namespace pssr {
namespace {

constexpr int kThreads = 256;         // streaming kernels
constexpr int kSelectThreads = 512;   // topk: one block per image (1024 spilled registers)
constexpr int kMaxChunks = 64;        // blocks per image in the streaming kernels
constexpr int kMaxGridY = 65535;

struct Launch {
  dim3 grid;
  int chunks;
};

Launch streaming_launch(int64_t batch, int64_t hw) {
  const int64_t chunks = std::min<int64_t>(kMaxChunks, std::max<int64_t>(1, (hw + kThreads - 1) / kThreads));
  const int64_t grid_y = std::min<int64_t>(batch, kMaxGridY);
  return {dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(grid_y)), static_cast<int>(chunks)};
}

template <typename scalar_t, typename acc_t, bool kWithSum>
__global__ void __launch_bounds__(kThreads)
score_kernel(const scalar_t* __restrict__ grad, int64_t batch, int64_t channels, int64_t hw, Reduce reduce,
             acc_t* __restrict__ score, double* __restrict__ partial_sum, int64_t* __restrict__ partial_count) {
  using SumReduce = cub::BlockReduce<double, kThreads>;
  using CountReduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename SumReduce::TempStorage sum_tmp;
  __shared__ typename CountReduce::TempStorage count_tmp;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const scalar_t* g = grad + b * channels * hw;
    acc_t* s = score + b * hw;
    double sum = 0.0;
    long long count = 0;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < hw;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      PixelScore<acc_t> ps;
      for (int64_t c = 0; c < channels; ++c) ps.add(static_cast<acc_t>(g[c * hw + p]));
      const acc_t v = ps.finish(reduce);
      s[p] = v;
      if (kWithSum && is_finite_score(v)) {
        sum += static_cast<double>(v);
        ++count;
      }
    }
    if (kWithSum) {
      const double block_sum = SumReduce(sum_tmp).Sum(sum);
      const long long block_count = CountReduce(count_tmp).Sum(count);
      if (threadIdx.x == 0) {
        partial_sum[b * gridDim.x + blockIdx.x] = block_sum;
        partial_count[b * gridDim.x + blockIdx.x] = block_count;
      }
      __syncthreads();  // temp storage is reused by the next image
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
mean_apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ score,
                  const double* __restrict__ partial_sum, const int64_t* __restrict__ partial_count,
                  double alpha, scalar_t fill, int64_t batch, int64_t channels, int64_t hw,
                  scalar_t* __restrict__ out, bool* __restrict__ mask) {
  __shared__ acc_t threshold;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (threadIdx.x == 0) {
      double sum = 0.0;
      int64_t count = 0;
      for (unsigned i = 0; i < gridDim.x; ++i) {
        sum += partial_sum[b * gridDim.x + i];
        count += partial_count[b * gridDim.x + i];
      }
      threshold = threshold_in_score_type<acc_t>(mean_threshold(sum, count, alpha));
    }
    __syncthreads();
    const acc_t thr = threshold;
    const acc_t* s = score + b * hw;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < hw;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const bool m = s[p] > thr;
      mask[b * hw + p] = m;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = (b * channels + c) * hw + p;
        out[i] = m ? fill : x[i];
      }
    }
    __syncthreads();  // `threshold` is rewritten for the next image
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSelectThreads)
topk_apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ score, int64_t k, scalar_t fill,
                  int64_t channels, int64_t hw, scalar_t* __restrict__ out, bool* __restrict__ mask) {
  using bits_t = typename ScoreBits<acc_t>::type;
  using Scan = cub::BlockScan<long long, kSelectThreads>;
  constexpr int kBinsPerThread = (kRadixBins + kSelectThreads - 1) / kSelectThreads;
  __shared__ unsigned int hist[kRadixBins];
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int chosen_digit;
  __shared__ long long chosen_above;

  const int64_t b = blockIdx.x;
  const acc_t* s = score + b * hw;
  const int tid = threadIdx.x;

  // Every thread keeps the same selection state; the shared digit keeps them in step.
  RadixState<acc_t> st;
  st.need = k;
  bits_t kth = std::numeric_limits<bits_t>::max();  // k == 0: no key is above or equal to it
  if (k > 0) {
    for (int p_index = 0; p_index < radix_passes<acc_t>(); ++p_index) {
      const RadixPass<acc_t> pass(p_index);
      const int bins = pass.bins();
      for (int i = tid; i < bins; i += kSelectThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t p = tid; p < hw; p += kSelectThreads) {
        const bits_t key = to_bits(s[p]);
        if (st.matches(key)) atomicAdd(&hist[pass.digit(key)], 1u);
      }
      __syncthreads();
      // Keys above each bin, scanning the bins from the highest digit down.
      long long mine = 0;
      for (int j = 0; j < kBinsPerThread; ++j) {
        const int bin = bins - 1 - (tid * kBinsPerThread + j);
        if (bin >= 0) mine += hist[bin];
      }
      long long above;
      Scan(scan_tmp).ExclusiveSum(mine, above);
      for (int j = 0; j < kBinsPerThread; ++j) {
        const int bin = bins - 1 - (tid * kBinsPerThread + j);
        if (bin < 0) break;
        const long long h = hist[bin];
        if (above < st.need && above + h >= st.need) {
          chosen_digit = bin;
          chosen_above = above;
        }
        above += h;
      }
      __syncthreads();
      st.take_digit(pass, chosen_digit, chosen_above);
      __syncthreads();  // hist and the chosen digit are rewritten by the next pass
    }
    kth = st.prefix;
  }

  long long equal_before_tile = 0;
  for (int64_t base = 0; base < hw; base += kSelectThreads) {
    const int64_t p = base + tid;
    const bool valid = p < hw;
    const bits_t key = valid ? to_bits(s[p]) : bits_t(0);
    const long long is_equal = (valid && key == kth) ? 1 : 0;
    long long rank, tile_equal;
    Scan(scan_tmp).ExclusiveSum(is_equal, rank, tile_equal);
    if (valid) {
      const bool m = topk_removes(key, kth, equal_before_tile + rank, st.need);
      mask[b * hw + p] = m;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = (b * channels + c) * hw + p;
        out[i] = m ? fill : x[i];
      }
    }
    equal_before_tile += tile_equal;
    __syncthreads();  // scan_tmp is reused by the next tile
  }
}

at::Tensor saliency_score_cuda(const at::Tensor& grad_in, c10::string_view reduce_name) {
  check_image_batch("grad", grad_in);
  const Reduce reduce = parse_reduce(reduce_name);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0), C = grad.size(1), HW = grad.size(2) * grad.size(3);
  at::Tensor score = at::empty({B, grad.size(2), grad.size(3)},
                               grad.options().dtype(at::toOpMathType(grad.scalar_type())));
  if (score.numel() == 0) return score;
  const Launch launch = streaming_launch(B, HW);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pssr_saliency_score_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    score_kernel<scalar_t, acc_t, false><<<launch.grid, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), B, C, HW, reduce, score.mutable_data_ptr<acc_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return score;
}

std::tuple<at::Tensor, at::Tensor> pixel_surgery_cuda(const at::Tensor& x_in, const at::Tensor& grad_in,
                                                      double alpha, int64_t k, double fill,
                                                      c10::string_view mode_name,
                                                      c10::string_view reduce_name) {
  check_surgery_args(x_in, grad_in, alpha, k, fill);
  const Mode mode = parse_mode(mode_name);
  const Reduce reduce = parse_reduce(reduce_name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty({B, 1, H, W}, x.options().dtype(at::kBool));
  if (x.numel() == 0) return {out, mask};
  TORCH_CHECK(HW < (int64_t(1) << 31), "pssr: images of more than 2^31 pixels are not supported");
  TORCH_CHECK(mode == Mode::Mean || B <= std::numeric_limits<int>::max(), "pssr: batch too large for topk");
  const at::ScalarType score_type = at::toOpMathType(x.scalar_type());
  at::Tensor score = at::empty({B, HW}, x.options().dtype(score_type));
  const Launch launch = streaming_launch(B, HW);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pssr_pixel_surgery_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t fill_v = static_cast<scalar_t>(fill);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* sp = score.mutable_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    bool* mp = mask.mutable_data_ptr<bool>();
    if (mode == Mode::Mean) {
      at::Tensor partial_sum = at::empty({B, launch.chunks}, x.options().dtype(at::kDouble));
      at::Tensor partial_count = at::empty({B, launch.chunks}, x.options().dtype(at::kLong));
      score_kernel<scalar_t, acc_t, true><<<launch.grid, kThreads, 0, stream>>>(
          gp, B, C, HW, reduce, sp, partial_sum.mutable_data_ptr<double>(), partial_count.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mean_apply_kernel<scalar_t, acc_t><<<launch.grid, kThreads, 0, stream>>>(
          xp, sp, partial_sum.const_data_ptr<double>(), partial_count.const_data_ptr<int64_t>(), alpha, fill_v, B,
          C, HW, op, mp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      score_kernel<scalar_t, acc_t, false><<<launch.grid, kThreads, 0, stream>>>(gp, B, C, HW, reduce, sp, nullptr,
                                                                                  nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      topk_apply_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kSelectThreads, 0, stream>>>(
          xp, sp, k, fill_v, C, HW, op, mp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, mask};
}

}  // namespace
}  // namespace pssr

TORCH_LIBRARY_IMPL(pssr, CUDA, m) {
  m.impl("saliency_score", &pssr::saliency_score_cuda);
  m.impl("pixel_surgery", &pssr::pixel_surgery_cuda);
}
