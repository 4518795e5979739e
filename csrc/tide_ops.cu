// CUDA kernels for TIDE's exit path. Schemas are defined in Python (vllm_tide/ops/__init__.py, library
// "tide"); this file registers CUDA implementations with the same semantics as ops/reference.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

#define TIDE_CHECK_CUDA() C10_CUDA_KERNEL_LAUNCH_CHECK()

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

template <typename V> __device__ __forceinline__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// ----------------------------------------------------------------------------- fused router scoring
// One block scores TOKN tokens in one launch: RMSNorm in fp32, rounded to the model dtype like the
// model's own norm, kept in shared memory; then each warp takes rows of the down-projection and reads
// them once from global memory with 16-byte loads for all TOKN tokens; SiLU and the up-projection are
// folded into a per-warp partial sum, and the block finishes with sigmoid, threshold and active mask.
// TOKN is chosen per call so that small batches still spread over many multiprocessors, and each lane
// keeps UNROLL 16-byte loads in flight. When there are still fewer token blocks than multiprocessors
// (small batches, decode), the down-projection is also split over blocks, by columns (chunks of the
// hidden dimension) and rows (bottleneck units), so that at one token ~64 multiprocessors read the 2 MB
// of a D=4096 router instead of one: each block then writes its partial dot products to a scratch
// [column chunks, N, B] and router_finish_kernel adds them up and applies SiLU, the up-projection,
// sigmoid, threshold and mask. Unsplit (larger batches), one block finishes its tokens itself.
constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;
constexpr int UNROLL = 4;
constexpr size_t ROUTER_SMEM_LIMIT = 160 * 1024;

// Four consecutive elements of the staged input (aligned to 4 elements) as floats, in one load where
// the type allows: float4 for fp32, 8 bytes for fp16/bf16; double (also dispatched) element by element.
template <typename T> __device__ __forceinline__ void load4(const T* p, float* o) {
  if constexpr (std::is_same_v<T, float>) {
    float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  } else if constexpr (sizeof(T) == 2) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = to_f(h[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = to_f(p[k]);
  }
}

template <typename T, int TOKN, bool SPLIT>
__global__ void __launch_bounds__(THREADS) router_score_kernel(const T* __restrict__ x, const float* __restrict__ norm_w, float eps,
                                    const float* __restrict__ w1, const float* __restrict__ b1,
                                    const float* __restrict__ w2, const float* __restrict__ b2, float threshold,
                                    const bool* __restrict__ active, float* __restrict__ score,
                                    bool* __restrict__ exit_mask, int n, int d, int b, bool vec,
                                    int chunk, int rows_per, float* __restrict__ part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* z = reinterpret_cast<T*>(smem_raw);                   // [TOKN][chunk], this block's columns of the input
  __shared__ float rstd[TOKN];
  __shared__ float partial[TOKN][WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t0 = blockIdx.x * TOKN, nv = min(TOKN, n - t0);
  const int c0 = blockIdx.y * chunk, cl = min(chunk, d - c0);        // columns [c0, c0 + cl)
  const int j0 = blockIdx.z * rows_per, j1 = min(b, j0 + rows_per);  // rows [j0, j1)

  for (int t = warp; t < nv; t += WARPS) {                 // 1/rms per token
    float s = 0.f;
    for (int i = lane; i < d; i += 32) { float v = to_f(x[(size_t)(t0 + t) * d + i]); s += v * v; }
    s = warp_sum(s);
    if (lane == 0) rstd[t] = rsqrtf(s / d + eps);
  }
  __syncthreads();
  for (int e = tid; e < nv * cl; e += THREADS) {
    int t = e / cl, i = e - t * cl;
    z[t * chunk + i] = from_f<T>(to_f(x[(size_t)(t0 + t) * d + c0 + i]) * rstd[t] * norm_w[c0 + i]);
  }
  __syncthreads();

  float contrib[TOKN];
#pragma unroll
  for (int t = 0; t < TOKN; ++t) contrib[t] = 0.f;
  for (int j = j0 + warp; j < j1; j += WARPS) {
    const float* row = w1 + (size_t)j * d + c0;
    float acc[TOKN];
#pragma unroll
    for (int t = 0; t < TOKN; ++t) acc[t] = 0.f;
    if (vec) {
      for (int i0 = lane * 4; i0 < cl; i0 += 128 * UNROLL) {
        float4 w[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {     // issue all loads first, then use them
          const int i = i0 + u * 128;
          w[u] = i < cl ? __ldg(reinterpret_cast<const float4*>(row + i)) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int i = i0 + u * 128;
          if (i >= cl) break;
#pragma unroll
          for (int t = 0; t < TOKN; ++t) {
            if (t < nv) {
              float zz[4];
              load4(z + t * chunk + i, zz);
              acc[t] += w[u].x * zz[0] + w[u].y * zz[1] + w[u].z * zz[2] + w[u].w * zz[3];
            }
          }
        }
      }
    } else {
      for (int i0 = lane; i0 < cl; i0 += 32 * UNROLL) {
        float w[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int i = i0 + u * 32;
          w[u] = i < cl ? __ldg(row + i) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int i = i0 + u * 32;
          if (i >= cl) break;
#pragma unroll
          for (int t = 0; t < TOKN; ++t)
            if (t < nv) acc[t] += w[u] * to_f(z[t * chunk + i]);
        }
      }
    }
    if constexpr (SPLIT) {                     // partial dot products, finished by router_finish_kernel
#pragma unroll
      for (int t = 0; t < TOKN; ++t) {
        if (t < nv) {
          const float s = warp_sum(acc[t]);
          if (lane == 0) part[((size_t)blockIdx.y * n + t0 + t) * b + j] = s;
        }
      }
      continue;
    }
    const float bj = b1[j], wj = w2[j];
#pragma unroll
    for (int t = 0; t < TOKN; ++t) {
      if (t < nv) {
        float h = warp_sum(acc[t]) + bj;
        contrib[t] += h / (1.f + __expf(-h)) * wj;
      }
    }
  }
  if constexpr (SPLIT) return;
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < TOKN; ++t)
      if (t < nv) partial[t][warp] = contrib[t];
  }
  __syncthreads();
  if (tid < nv) {
    float s = b2[0];
#pragma unroll
    for (int q = 0; q < WARPS; ++q) s += partial[tid][q];
    float p = 1.f / (1.f + expf(-s));
    score[t0 + tid] = p;
    exit_mask[t0 + tid] = active[t0 + tid] && p > threshold;
  }
}

// Finishes a split router product: one warp per token adds the partial dot products (column chunks, or
// the cuBLAS path's three weight parts), then applies SiLU, the up-projection, sigmoid, threshold and mask.
// Partial sum q of token t, unit j is part[q * split_stride + t * row_stride + j] (split kernels write
// [splits, rows, B]; the cuBLAS path writes [N, 3 * B]).
__global__ void router_finish_kernel(const float* __restrict__ part, int splits, size_t split_stride,
                                     size_t row_stride, const float* __restrict__ b1,
                                     const float* __restrict__ w2, const float* __restrict__ b2, float threshold,
                                     const bool* __restrict__ active, float* __restrict__ score,
                                     bool* __restrict__ exit_mask, int n, int b) {
  const int t = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (t >= n) return;                          // uniform over the warp, so warp_sum below has every lane
  float c = 0.f;
  for (int j = lane; j < b; j += 32) {
    float h = b1[j];
    // unrolled so that the chunks' loads can all be in flight before the adds (same order, same result);
    // measured on an H200 it moved a one-token call only from 13.0 to 12.4 us (docs/MEASUREMENTS.md)
#pragma unroll 8
    for (int q = 0; q < splits; ++q) h += part[q * split_stride + t * row_stride + j];
    c += h / (1.f + __expf(-h)) * w2[j];
  }
  c = warp_sum(c);
  if (lane == 0) {
    const float p = 1.f / (1.f + expf(-(c + b2[0])));
    score[t] = p;
    exit_mask[t] = active[t] && p > threshold;
  }
}

int multiprocessor_count(int device) {
  static int cached[64] = {0};
  if (device < 64 && cached[device]) return cached[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device] = sms;
  return sms;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory. cudaFuncSetAttribute is a driver call, so
// it is made once per kernel, device and size rather than on every launch (the op runs every step).
template <typename K> void allow_dynamic_smem(K* kernel, size_t bytes, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  const std::lock_guard<std::mutex> lock(mu);
  size_t& have = allowed[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= have) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  have = bytes;
}

template <typename T, int TOKN>
void launch_router(const at::Tensor& x, const at::Tensor& nw, double eps, const at::Tensor& W1, const at::Tensor& B1,
                   const at::Tensor& W2, const at::Tensor& B2, double threshold, const at::Tensor& act,
                   at::Tensor& score, at::Tensor& ex) {
  const int n = x.size(0), d = x.size(1), b = W1.size(0);
  // 16-byte loads of W1 rows (and 8/16-byte loads of the staged input) need d % 4 == 0 and an aligned W1;
  // a W1 that is a view into a larger tensor may not be, and takes the scalar path.
  const bool vec = d % 4 == 0 && reinterpret_cast<uintptr_t>(W1.data_ptr()) % 16 == 0;
  const int token_blocks = (n + TOKN - 1) / TOKN, sms = multiprocessor_count(x.get_device());
  // Fewer token blocks than multiprocessors: split the down-projection too, into column chunks of at
  // least one full pass of a warp's loads (a multiple of 4, so 16-byte loads stay aligned) and row
  // groups of about one row per warp, until the blocks cover the multiprocessors.
  // (router_score_cuda only picks more than one token per block when the token blocks would outnumber
  // the multiprocessors, so only TOKN == 1 ever splits, and only it is compiled with the split path)
  int col_splits = 1, row_splits = 1;
  if (TOKN == 1 && token_blocks < sms) {
    col_splits = std::max(1, std::min((d + 128 * UNROLL - 1) / (128 * UNROLL), sms / token_blocks));
    row_splits = std::max(1, std::min((b + WARPS - 1) / WARPS, sms / (token_blocks * col_splits)));
  }
  const int chunk = ((d + col_splits - 1) / col_splits + 3) / 4 * 4;
  col_splits = (d + chunk - 1) / chunk;          // no empty chunk after rounding up
  const int rows_per = (b + row_splits - 1) / row_splits;
  row_splits = (b + rows_per - 1) / rows_per;
  const bool split = col_splits * row_splits > 1;
  at::Tensor part;
  if (split) part = at::empty({col_splits, n, b}, x.options().dtype(at::kFloat));
  const size_t smem = (size_t)TOKN * chunk * sizeof(T);
  auto kernel = split ? router_score_kernel<T, TOKN, TOKN == 1> : router_score_kernel<T, TOKN, false>;
  if (smem > 48 * 1024) allow_dynamic_smem(kernel, smem, x.get_device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(token_blocks, col_splits, row_splits), THREADS, smem, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), nw.data_ptr<float>(), (float)eps, W1.data_ptr<float>(),
      B1.data_ptr<float>(), W2.data_ptr<float>(), B2.data_ptr<float>(), (float)threshold, act.data_ptr<bool>(),
      score.data_ptr<float>(), ex.data_ptr<bool>(), n, d, b, vec, chunk, rows_per,
      split ? part.data_ptr<float>() : nullptr);
  if (split)
    router_finish_kernel<<<(n + 7) / 8, 256, 0, stream>>>(part.data_ptr<float>(), col_splits, (size_t)n * b, b,
                                                          B1.data_ptr<float>(),
                                                          W2.data_ptr<float>(), B2.data_ptr<float>(), (float)threshold,
                                                          act.data_ptr<bool>(), score.data_ptr<float>(),
                                                          ex.data_ptr<bool>(), n, b);
}

// ----------------------------------------------------------------------------- router scoring through cuBLAS
// The down-projection of many tokens is an ordinary matrix product, which cuBLAS runs near the tensor
// cores' peak; what is left is memory-bound and small. So: one kernel writes the model's norm output
// (rounded to its dtype, as the model does) in bf16, one splits the fp32 weights into bf16, cuBLAS
// multiplies with fp32 accumulation and output (torch.mm's out_dtype), and router_finish_kernel does the rest.
// Exact splits keep the twin's fp32 accuracy on bf16 tensor cores: each fp32 weight is hi + mid + lo,
// three bf16 of 8 significant bits each (every remainder is exact in fp32, and the third holds what is
// left exactly), and a fp16 norm output (11 bits) is hi + lo in bf16; bf16 products are exact in fp32, so
// the only rounding is cuBLAS's fp32 accumulation, as in the twin's fp32 matmul. The product is
// [N, NZ * D] x [NZ * D, 3 * B] (NZ = 1 for bf16, 2 for fp16: both input parts meet every weight part).
// Only fp16/bf16 inputs with D % 8 == 0 and a 16-byte aligned x take this path.
constexpr int NORM_THREADS = 256;

// One block per token: 1/rms over the row, then the norm output rounded to T, then its bf16 parts,
// written to z[t] = [hi (D) | lo (D, fp16 only)].
template <typename T, int NZ>
__global__ void __launch_bounds__(NORM_THREADS) router_norm_bf16_kernel(const T* __restrict__ x,
                                    const float* __restrict__ norm_w, float eps, at::BFloat16* __restrict__ z, int d) {
  constexpr int VEC = 8;                         // 16-byte loads of 8 fp16/bf16
  __shared__ float red[NORM_THREADS / 32];
  const T* row = x + (size_t)blockIdx.x * d;
  float s = 0.f;
  for (int i = threadIdx.x * VEC; i < d; i += NORM_THREADS * VEC) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + i);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) { const float v = to_f(h[k]); s += v * v; }
  }
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int w = 0; w < NORM_THREADS / 32; ++w) tot += red[w];
  const float rstd = rsqrtf(tot / d + eps);
  at::BFloat16* out = z + (size_t)blockIdx.x * NZ * d;
  for (int i = threadIdx.x * VEC; i < d; i += NORM_THREADS * VEC) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + i);   // again: the row is in L1/L2 by now
    const T* h = reinterpret_cast<const T*>(&u);
    uint4 hi_u, lo_u;
    at::BFloat16* hi = reinterpret_cast<at::BFloat16*>(&hi_u);
    at::BFloat16* lo = reinterpret_cast<at::BFloat16*>(&lo_u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = to_f(from_f<T>(to_f(h[k]) * rstd * norm_w[i + k]));
      hi[k] = at::BFloat16(v);
      if constexpr (NZ == 2) lo[k] = at::BFloat16(isfinite(v) ? v - static_cast<float>(hi[k]) : 0.f);   // inf - inf
    }
    *reinterpret_cast<uint4*>(out + i) = hi_u;
    if constexpr (NZ == 2) *reinterpret_cast<uint4*>(out + d + i) = lo_u;
  }
}

// w [B, D] fp32 -> ws [3][B][NZ * D] bf16: hi, mid, lo with hi + mid + lo == w exactly, each repeated NZ
// times along the row so that it meets each part of the input.
template <int NZ>
__global__ void router_split_weights_kernel(const float* __restrict__ w, at::BFloat16* __restrict__ ws, int b, int d) {
  const size_t total = (size_t)b * d, plane = total * NZ;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
    const size_t j = e / d, i = e - j * d;
    const float v = w[e];
    const at::BFloat16 hi(v);
    const float r = v - static_cast<float>(hi);
    const at::BFloat16 mid(r);
    const at::BFloat16 lo(r - static_cast<float>(mid));
#pragma unroll
    for (int c = 0; c < NZ; ++c) {
      const size_t o = j * NZ * d + (size_t)c * d + i;
      ws[o] = hi;
      ws[plane + o] = mid;
      ws[2 * plane + o] = lo;
    }
  }
}

template <typename T>
bool try_router_cublas(const at::Tensor& x, const at::Tensor& nw, double eps, const at::Tensor& W1,
                       const at::Tensor& B1, const at::Tensor& W2, const at::Tensor& B2, double threshold,
                       const at::Tensor& act, at::Tensor& score, at::Tensor& ex) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    const int n = x.size(0), d = x.size(1), b = W1.size(0);
    if (d % 8 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) return false;
    constexpr int NZ = std::is_same_v<T, at::Half> ? 2 : 1;
    const auto bf16 = x.options().dtype(at::kBFloat16);
    auto z = at::empty({n, NZ * d}, bf16);
    auto ws = at::empty({3 * b, NZ * d}, bf16);
    auto stream = c10::cuda::getCurrentCUDAStream();
    router_norm_bf16_kernel<T, NZ><<<n, NORM_THREADS, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), nw.data_ptr<float>(), (float)eps,
        z.data_ptr<at::BFloat16>(), d);
    TIDE_CHECK_CUDA();
    const int blocks = std::min<int64_t>(((int64_t)b * d + 255) / 256, 8 * multiprocessor_count(x.get_device()));
    router_split_weights_kernel<NZ><<<blocks, 256, 0, stream>>>(W1.data_ptr<float>(), ws.data_ptr<at::BFloat16>(), b, d);
    TIDE_CHECK_CUDA();
    const auto part = at::mm(z, ws.t(), at::kFloat);           // [N, 3 * B]: the three weight parts' products
    router_finish_kernel<<<(n + 7) / 8, 256, 0, stream>>>(part.data_ptr<float>(), 3, b, 3 * (size_t)b,
                                                          B1.data_ptr<float>(), W2.data_ptr<float>(),
                                                          B2.data_ptr<float>(), (float)threshold,
                                                          act.data_ptr<bool>(), score.data_ptr<float>(),
                                                          ex.data_ptr<bool>(), n, b);
    return true;
  }
}

// ----------------------------------------------------------------------------- router kernel choice
// Auto: cuBLAS from this many tokens. H200, D=4096, B=128, bf16 (2026-11-30, benchmarks/ops_bench.py):
// device time CUDA cores 17 / 22 / 36 / 58 us at 16 / 32 / 128 / 256 tokens, cuBLAS 19-22 throughout;
// per call (host work included) CUDA cores 27 / 32 / 45 / 67 us, cuBLAS 50 (three more launches and
// the GEMM's dispatch). From 128 tokens cuBLAS saves more device time than it adds host time.
constexpr int ROUTER_CUBLAS_MIN_TOKENS = 128;

// Which kernel router_score uses. TIDE_ROUTER_KERNEL (read on every call, so tests and benchmarks can
// force one) is "cuda_cores" or "cublas"; unset or "auto" picks by token count. cuBLAS forced on a call
// it cannot take (fp32 input, D % 8 != 0, unaligned x) falls back to the CUDA-core kernel.
enum class RouterKernel { kAuto, kCudaCores, kCublas };

RouterKernel router_kernel_setting() {
  const char* v = std::getenv("TIDE_ROUTER_KERNEL");
  if (!v || !*v || !std::strcmp(v, "auto")) return RouterKernel::kAuto;
  if (!std::strcmp(v, "cuda_cores")) return RouterKernel::kCudaCores;
  if (!std::strcmp(v, "cublas")) return RouterKernel::kCublas;
  TORCH_CHECK(false, "TIDE_ROUTER_KERNEL is '", v, "': set it to auto, cuda_cores or cublas, or unset it.");
}

std::tuple<at::Tensor, at::Tensor> router_score_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                                     const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                                     const at::Tensor& b2, double threshold, const at::Tensor& active) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "tide::router_score: x must be a contiguous [N, D] tensor");
  const int n = x.size(0), d = x.size(1);
  auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  auto nw = f32(norm_weight), W1 = f32(w1), B1 = f32(b1), W2 = f32(w2).view(-1), B2 = f32(b2).view(-1);
  auto act = active.to(at::kBool).contiguous();
  auto score = at::empty({n}, x.options().dtype(at::kFloat));
  auto ex = at::empty({n}, x.options().dtype(at::kBool));
  if (n == 0) return {score, ex};
  // tokens per block: enough blocks to fill the multiprocessors, within the shared-memory budget
  // (with fewer, launch_router splits the down-projection over blocks as well)
  const int sms = multiprocessor_count(x.get_device());
  int tokn = 1;
  while (tokn < 16 && tokn * sms < n && (size_t)(2 * tokn) * d * x.element_size() <= ROUTER_SMEM_LIMIT) tokn *= 2;
  TORCH_CHECK((size_t)d * x.element_size() <= ROUTER_SMEM_LIMIT, "tide::router_score: hidden size too large");
  RouterKernel kernel = router_kernel_setting();
  if (kernel == RouterKernel::kAuto)
    kernel = n >= ROUTER_CUBLAS_MIN_TOKENS ? RouterKernel::kCublas : RouterKernel::kCudaCores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "router_score", [&] {
    if (kernel == RouterKernel::kCublas &&
        try_router_cublas<scalar_t>(x, nw, eps, W1, B1, W2, B2, threshold, act, score, ex)) return;
    switch (tokn) {
      case 1: launch_router<scalar_t, 1>(x, nw, eps, W1, B1, W2, B2, threshold, act, score, ex); break;
      case 2: launch_router<scalar_t, 2>(x, nw, eps, W1, B1, W2, B2, threshold, act, score, ex); break;
      case 4: launch_router<scalar_t, 4>(x, nw, eps, W1, B1, W2, B2, threshold, act, score, ex); break;
      case 8: launch_router<scalar_t, 8>(x, nw, eps, W1, B1, W2, B2, threshold, act, score, ex); break;
      default: launch_router<scalar_t, 16>(x, nw, eps, W1, B1, W2, B2, threshold, act, score, ex); break;
    }
  });
  TIDE_CHECK_CUDA();
  return {score, ex};
}

// ----------------------------------------------------------------------------- compaction
// One block walks the rows in chunks: first counts continuing rows, then places each row with a
// block-wide scan. Stable, correct for any N, and allocates nothing beyond its outputs.
constexpr int SCAN = 1024;

__global__ void compact_kernel(const bool* __restrict__ mask, int64_t* __restrict__ order,
                               int64_t* __restrict__ count, int n) {
  using Scan = cub::BlockScan<int, SCAN>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int total_keep, base_keep, base_exit;
  if (threadIdx.x == 0) { total_keep = 0; base_keep = 0; base_exit = 0; }
  __syncthreads();
  int local = 0;
  for (int i = threadIdx.x; i < n; i += SCAN) local += !mask[i];
  __shared__ int red[SCAN / 32];
  int w = warp_sum(local);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = w;
  __syncthreads();
  if (threadIdx.x == 0) { int s = 0; for (int q = 0; q < SCAN / 32; ++q) s += red[q]; total_keep = s; }
  __syncthreads();
  const int keep_total = total_keep;
  for (int start = 0; start < n; start += SCAN) {
    int i = start + threadIdx.x;
    int keep = i < n ? !mask[i] : 0, gone = i < n ? (int)mask[i] : 0;
    int keep_pos, gone_pos, keep_sum, gone_sum;
    Scan(tmp).ExclusiveSum(keep, keep_pos, keep_sum);
    __syncthreads();
    Scan(tmp).ExclusiveSum(gone, gone_pos, gone_sum);
    if (keep) order[base_keep + keep_pos] = i;
    if (gone) order[keep_total + base_exit + gone_pos] = i;
    __syncthreads();
    if (threadIdx.x == 0) { base_keep += keep_sum; base_exit += gone_sum; }
    __syncthreads();
  }
  if (threadIdx.x == 0) count[0] = keep_total;
}

std::tuple<at::Tensor, at::Tensor> compact_cuda(const at::Tensor& exit_mask) {
  const c10::cuda::CUDAGuard guard(exit_mask.device());
  auto m = exit_mask.to(at::kBool).contiguous();
  const int n = m.size(0);
  auto order = at::empty({n}, m.options().dtype(at::kLong));
  auto count = at::empty({1}, m.options().dtype(at::kLong));
  compact_kernel<<<1, SCAN, 0, c10::cuda::getCurrentCUDAStream()>>>(m.data_ptr<bool>(), order.data_ptr<int64_t>(),
                                                                  count.data_ptr<int64_t>(), n);
  TIDE_CHECK_CUDA();
  return {order, count};
}

// ----------------------------------------------------------------------------- row scatter
template <typename T>
__global__ void scatter_rows_kernel(T* __restrict__ dst, const int64_t* __restrict__ index,
                                    const T* __restrict__ src, int rows, int cols, int64_t dst_stride) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < (int64_t)rows * cols;
       e += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = e / cols, c = e % cols;
    dst[index[r] * dst_stride + c] = src[e];
  }
}

void scatter_rows_cuda(at::Tensor dst, const at::Tensor& index, const at::Tensor& src) {
  const c10::cuda::CUDAGuard guard(dst.device());
  TORCH_CHECK(dst.dim() == 2 && dst.stride(1) == 1, "tide::scatter_rows: dst must be [R, C] with unit column stride");
  auto s = src.to(dst.scalar_type()).contiguous();
  auto idx = index.to(at::kLong).contiguous();
  const int rows = s.size(0), cols = s.size(1);
  if (rows == 0) return;
  int blocks = std::min<int64_t>(((int64_t)rows * cols + 255) / 256, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "scatter_rows", [&] {
    scatter_rows_kernel<scalar_t><<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dst.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), s.data_ptr<scalar_t>(), rows, cols, dst.stride(0));
  });
  TIDE_CHECK_CUDA();
}

// ----------------------------------------------------------------------------- multi-layer K/V projection
// One GEMM (cuBLAS) of the un-weighted normalised state against every deeper layer's folded K/V weights,
// then one kernel for bias, k-norm and rotary over all layers and tokens.
template <typename T>
__global__ void kv_epilogue_kernel(const T* __restrict__ kv, const T* __restrict__ bias, const float* __restrict__ knorm,
                                   float knorm_eps, const float* __restrict__ cos_sin, const int64_t* __restrict__ pos,
                                   T* __restrict__ k_out, T* __restrict__ v_out, int n, int layers, int heads, int hd,
                                   int rd, bool neox) {
  extern __shared__ float row[];                  // one head of K, in fp32
  const int t = blockIdx.x, l = blockIdx.y;
  const int kvw = 2 * heads * hd;
  const T* src = kv + (size_t)t * layers * kvw + (size_t)l * kvw;
  const T* bsrc = bias ? bias + (size_t)l * kvw : nullptr;
  const float* cs = cos_sin + pos[t] * rd;
  __shared__ float red[32];
  for (int h = 0; h < heads; ++h) {
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
      float v = to_f(src[h * hd + i]);
      if (bsrc) v = to_f(from_f<T>(v + to_f(bsrc[h * hd + i])));
      row[i] = v;
    }
    __syncthreads();
    if (knorm) {
      float s = 0.f;
      for (int i = threadIdx.x; i < hd; i += blockDim.x) s += row[i] * row[i];
      s = warp_sum(s);
      if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
      __syncthreads();
      float tot = 0.f;
      for (int q = 0; q < (blockDim.x + 31) / 32; ++q) tot += red[q];
      float r = rsqrtf(tot / hd + knorm_eps);
      __syncthreads();
      for (int i = threadIdx.x; i < hd; i += blockDim.x) row[i] = to_f(from_f<T>(row[i] * r * knorm[l * hd + i]));
      __syncthreads();
    }
    T* dst = k_out + (((size_t)l * n + t) * heads + h) * hd;
    const int half = rd / 2;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
      float out = row[i];
      if (i < rd) {
        int p = neox ? (i < half ? i : i - half) : i / 2;
        float c = cs[p], s = cs[half + p];
        if (neox) out = i < half ? row[i] * c - row[i + half] * s : row[i] * c + row[i - half] * s;
        else out = (i % 2 == 0) ? row[i] * c - row[i + 1] * s : row[i] * c + row[i - 1] * s;
      }
      dst[i] = from_f<T>(out);
    }
    __syncthreads();
    T* vdst = v_out + (((size_t)l * n + t) * heads + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
      float v = to_f(src[heads * hd + h * hd + i]);
      if (bsrc) v += to_f(bsrc[heads * hd + h * hd + i]);
      vdst[i] = from_f<T>(v);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kv_project_cuda(const at::Tensor& x, const at::Tensor& w_stack,
                                                   const std::optional<at::Tensor>& bias, double eps,
                                                   const std::optional<at::Tensor>& k_norm, double k_norm_eps,
                                                   const at::Tensor& cos_sin_cache, const at::Tensor& positions,
                                                   int64_t num_layers, int64_t num_kv_heads, int64_t head_size,
                                                   int64_t rotary_dim, bool neox) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int n = x.size(0);
  auto xf = x.to(at::kFloat);
  auto u = (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  auto kv = at::matmul(u, w_stack.to(x.scalar_type()).t()).contiguous();     // [N, L*2*H*hd]
  auto k = at::empty({num_layers, n, num_kv_heads, head_size}, x.options());
  auto v = at::empty_like(k);
  if (n == 0) return {k, v};
  auto b = bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type()).contiguous()) : std::nullopt;
  auto kn = k_norm.has_value() ? std::optional<at::Tensor>(k_norm->to(at::kFloat).contiguous()) : std::nullopt;
  auto cs = cos_sin_cache.to(at::kFloat).contiguous();
  auto pos = positions.to(at::kLong).contiguous();
  dim3 grid(n, num_layers);
  int threads = std::min<int64_t>(std::max<int64_t>(32, head_size), 256);
  threads = (threads + 31) / 32 * 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kv_project", [&] {
    kv_epilogue_kernel<scalar_t><<<grid, threads, head_size * sizeof(float), c10::cuda::getCurrentCUDAStream()>>>(
        kv.data_ptr<scalar_t>(), b ? b->data_ptr<scalar_t>() : nullptr, kn ? kn->data_ptr<float>() : nullptr,
        (float)k_norm_eps, cs.data_ptr<float>(), pos.data_ptr<int64_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), n, num_layers, num_kv_heads, head_size, rotary_dim, neox);
  });
  TIDE_CHECK_CUDA();
  return {k, v};
}

// ----------------------------------------------------------------------------- paged cache write, all layers
// One launch writes every layer: each layer's K and V cache base pointers travel in the kernel's
// arguments (no host-to-device copy); all layers' caches share shape and strides
// ([blocks, block_size, H, hd] views, any strides).
constexpr int MAX_FILL_LAYERS = 128;
struct CachePointers { int64_t p[2 * MAX_FILL_LAYERS]; };

template <typename T, bool VEC>
__global__ void kv_cache_write_kernel(const T* __restrict__ k, const T* __restrict__ v, const CachePointers ptrs,
                                      const int64_t* __restrict__ slots, int n, int layers, int heads, int hd,
                                      int block_size, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int t = blockIdx.x, l = blockIdx.y;
  const int64_t slot = slots[(size_t)l * n + t];
  if (slot < 0) return;
  const int64_t blk = slot / block_size, off = slot % block_size;
  T* kc = reinterpret_cast<T*>(ptrs.p[l]);
  T* vc = reinterpret_cast<T*>(ptrs.p[layers + l]);
  const size_t src = ((size_t)l * n + t) * heads * hd;
  if constexpr (VEC) {   // 16-byte moves: head_dim contiguous in the cache, everything 16-byte aligned
    constexpr int W = 16 / sizeof(T);
    for (int e = threadIdx.x * W; e < heads * hd; e += blockDim.x * W) {
      int h = e / hd, i = e % hd;
      int64_t o = blk * s0 + off * s1 + h * s2 + i;
      *reinterpret_cast<uint4*>(kc + o) = *reinterpret_cast<const uint4*>(k + src + e);
      *reinterpret_cast<uint4*>(vc + o) = *reinterpret_cast<const uint4*>(v + src + e);
    }
  } else {
    for (int e = threadIdx.x; e < heads * hd; e += blockDim.x) {
      int h = e / hd, i = e % hd;
      int64_t o = blk * s0 + off * s1 + h * s2 + i * s3;
      kc[o] = k[src + e];
      vc[o] = v[src + e];
    }
  }
}

void kv_cache_write_cuda(const at::Tensor& k, const at::Tensor& v, at::TensorList k_caches, at::TensorList v_caches,
                         const at::Tensor& slots) {
  const c10::cuda::CUDAGuard guard(k.device());
  const int layers = k.size(0), n = k.size(1), heads = k.size(2), hd = k.size(3);
  TORCH_CHECK((int)k_caches.size() == layers && (int)v_caches.size() == layers, "tide::kv_cache_write: one cache per layer");
  if (n == 0 || layers == 0) return;
  TORCH_CHECK(layers <= MAX_FILL_LAYERS, "tide::kv_cache_write: at most ", MAX_FILL_LAYERS, " layers per call");
  auto ref = k_caches[0];
  CachePointers table{};
  for (int l = 0; l < layers; ++l) {
    for (const auto& c : {k_caches[l], v_caches[l]})
      TORCH_CHECK(c.sizes() == ref.sizes() && c.strides() == ref.strides() && c.scalar_type() == k.scalar_type(),
                  "tide::kv_cache_write: every layer's K and V cache view must share shape, strides and dtype");
    table.p[l] = reinterpret_cast<int64_t>(k_caches[l].data_ptr());
    table.p[layers + l] = reinterpret_cast<int64_t>(v_caches[l].data_ptr());
  }
  auto kk = k.contiguous(), vv = v.to(k.scalar_type()).contiguous();
  auto sl = slots.to(at::kLong).contiguous();
  dim3 grid(n, layers);
  int threads = std::min(heads * hd, 128);
  const int64_t w = 16 / k.element_size();
  bool vec = ref.stride(3) == 1 && hd % w == 0 && ref.stride(0) % w == 0 && ref.stride(1) % w == 0 && ref.stride(2) % w == 0;
  for (int i = 0; i < 2 * layers; ++i) vec = vec && table.p[i] % 16 == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kv_cache_write", [&] {
    auto launch = [&](auto use_vec) {
      kv_cache_write_kernel<scalar_t, decltype(use_vec)::value><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          kk.data_ptr<scalar_t>(), vv.data_ptr<scalar_t>(), table, sl.data_ptr<int64_t>(), n, layers,
          heads, hd, ref.size(1), ref.stride(0), ref.stride(1), ref.stride(2), ref.stride(3));
    };
    if (vec) launch(std::true_type{}); else launch(std::false_type{});
  });
  TIDE_CHECK_CUDA();
}

}  // namespace

TORCH_LIBRARY_IMPL(tide, CUDA, m) {
  m.impl("router_score", &router_score_cuda);
  m.impl("compact", &compact_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("kv_project", &kv_project_cuda);
  m.impl("kv_cache_write", &kv_cache_write_cuda);
}
