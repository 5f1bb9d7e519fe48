// Multi-tensor apply: one kernel launch walks many tensors (pyfast's own implementation).
//
// Host side: each op describes its tensors as MtaTensor entries (DEPTH data pointers per tensor,
// e.g. param/grad/exp_avg/exp_avg_sq, plus an optional trainable mask). pack_tensor_lists() cuts
// the list into TensorListMeta structs of at most kMaxTensors tensors (about 4 KB, passed by value
// as a __grid_constant__ kernel argument); each struct is one launch.
//
// Device side: every tensor is split into chunks of kChunk elements; the chunks of all tensors
// in a launch are numbered consecutively (chunk_end holds the running totals). A persistent grid
// of at most (resident blocks per SM x SMs) blocks of kBlock threads strides over the chunk
// numbers, so a launch costs the same whether it holds 1 huge tensor or 96 small ones. Within a
// chunk each thread handles W consecutive elements per access (16-byte loads when the tensor's
// pointers are 16-byte aligned; an element-at-a-time path otherwise and for the last < W
// elements of a tensor).
//
// Masks (true = trainable; bool or uint8, any non-zero byte): per element (MaskKind::kElement:
// the W mask bytes of a vector in one load) or per row of dim 0 (MaskKind::kRow: the row of each
// vector is computed, with a 32-bit division for rows shorter than a chunk, and its one flag
// byte read). A vector's trainable lanes are known before any tensor data is read, so vectors
// wholly inside frozen rows are never read nor written. No host sync anywhere: masks are only
// read on the device. A Body functor supplies the per-vector work:
//   static constexpr int kW;                              lanes per vector (4 or 8)
//   static constexpr bool kBatchLoads;                    unroll full chunks (read-only bodies)
//   template <class Meta> void begin(const Meta&, int t); load tensor t's pointers
//   void vec(int64_t i, uint32_t act);                    elements [i, i + kW); bit j of act set
//                                                         = lane j is to be processed
//   void one(int64_t i);                                  element i alone
//   void end_chunk();
// kOnFrozen selects which lanes are "to be processed": the trainable ones (optimizer, norm) or
// the frozen ones (grad_mask_).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../ops.h"

namespace pyfast::cuda {

constexpr int kBlock = 256;   // threads per block
constexpr int kChunk = 8192;  // elements per chunk: a multiple of kBlock * 8
static_assert(kChunk % (kBlock * 8) == 0, "kChunk must hold whole 8-lane vectors per thread");

// TensorListMeta::flags: the MaskKind in the low bits, plus whether the vector path may be used.
constexpr uint8_t kKindBits = 3;
constexpr uint8_t kAlignedFlag = 4;
constexpr int kKindNone = static_cast<int>(MaskKind::kNone);
constexpr int kKindElement = static_cast<int>(MaskKind::kElement);
constexpr int kKindRow = static_cast<int>(MaskKind::kRow);

// Tensors per launch: as many as fit in about 4 KB of kernel arguments.
template <int DEPTH>
struct MtaCapacity {
  static constexpr int value = DEPTH >= 4 ? 48 : 96;
};

template <int DEPTH>
struct TensorListMeta {
  static constexpr int kMaxTensors = MtaCapacity<DEPTH>::value;
  void* ptr[DEPTH][kMaxTensors];
  const uint8_t* mask[kMaxTensors];  // nullptr when flags say kNone
  int64_t numel[kMaxTensors];
  int64_t row_len[kMaxTensors];      // elements per row (kRow masks)
  int64_t chunk_end[kMaxTensors];    // chunks of tensors 0..t, counted from this launch's start
  uint8_t flags[kMaxTensors];
  int32_t ntensors;
};
static_assert(sizeof(TensorListMeta<4>) <= 3584, "keep kernel arguments near 4 KB");
static_assert(sizeof(TensorListMeta<1>) <= 4000, "keep kernel arguments near 4 KB");

// ---------------------------------------------------------------------------------------------
// Scalar helpers. setup.py compiles with --use_fast_math (-ftz=true), under which even __fmul_rn
// and friends flush denormals. The CPU kernels keep denormals, so the arithmetic that must match
// them goes through explicit IEEE PTX instructions (round to nearest even, no .ftz).

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sqrt_rn(float a) {
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

// bfloat16 travels as its raw 16 bits (uint16_t), which keeps these kernels independent of
// cuda_bf16.h and of the __CUDA_NO_BFLOAT16_CONVERSIONS__ family of defines.
using bf16_bits = uint16_t;

__device__ __forceinline__ float bf16_to_float(uint32_t b) { return __uint_as_float(b << 16); }
// Round to nearest even, NaN -> 0x7FC0: bit for bit c10::BFloat16(float).
__device__ __forceinline__ uint32_t float_to_bf16(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const bf16_bits* p) { return bf16_to_float(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(bf16_bits* p, float v) {
  *p = static_cast<bf16_bits>(float_to_bf16(v));
}

// W consecutive elements, p aligned to min(16, W * sizeof(T)) bytes.
template <int W>
__device__ __forceinline__ void load_vec(const float* p, float (&o)[W]) {
  static_assert(W % 4 == 0, "fp32 vectors are whole float4s");
#pragma unroll
  for (int k = 0; k < W / 4; ++k) {
    const float4 q = reinterpret_cast<const float4*>(p)[k];
    o[4 * k] = q.x;
    o[4 * k + 1] = q.y;
    o[4 * k + 2] = q.z;
    o[4 * k + 3] = q.w;
  }
}
template <int W>
__device__ __forceinline__ void load_vec(const bf16_bits* p, float (&o)[W]) {
  static_assert(W == 4 || W == 8, "bf16 vectors are 8 or 16 bytes");
  uint32_t w[W / 2];
  if constexpr (W == 8) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  } else {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    w[0] = q.x, w[1] = q.y;
  }
#pragma unroll
  for (int k = 0; k < W / 2; ++k) {  // little endian: element 2k in the low half
    o[2 * k] = __uint_as_float(w[k] << 16);
    o[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
  }
}
template <int W>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[W]) {
#pragma unroll
  for (int k = 0; k < W / 4; ++k)
    reinterpret_cast<float4*>(p)[k] =
        make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
}
template <int W>
__device__ __forceinline__ void store_vec(bf16_bits* p, const float (&v)[W]) {
  uint32_t w[W / 2];
#pragma unroll
  for (int k = 0; k < W / 2; ++k)
    w[k] = float_to_bf16(v[2 * k]) | (float_to_bf16(v[2 * k + 1]) << 16);
  if constexpr (W == 8) {
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  }
}
// Stores only the lanes whose bit is set in act (the others stay bit-identical in memory).
template <int W, typename T>
__device__ __forceinline__ void store_lanes(T* p, const float (&v)[W], uint32_t act) {
#pragma unroll
  for (int j = 0; j < W; ++j)
    if (act & (1u << j)) store1(p + j, v[j]);
}

// ---------------------------------------------------------------------------------------------
// Masks.

// Bit j set when byte j of w is non-zero (bool masks hold 0/1; uint8 masks any non-zero value).
__device__ __forceinline__ uint32_t nonzero_bytes4(uint32_t w) {
  const uint32_t ones = __vcmpne4(w, 0u) & 0x01010101u;  // byte j -> bit 8j
  return (ones * 0x01020408u) >> 24;                      // bit 8j -> bit 24 + j, no carries
}

// Per-chunk view of one tensor's mask.
struct MaskView {
  const uint8_t* mask;
  int64_t row_len;   // kRow
  int64_t row0;      // kRow: row of the chunk's first element
  int64_t row_base;  // kRow: row0 * row_len
};

// Row of element i (inside the current chunk) and i's offset within that row. The offset from
// row_base is below kChunk + row_len: rows of at least kChunk elements leave at most one row
// boundary in a chunk (no division), shorter ones need a 32-bit division.
__device__ __forceinline__ void row_of(const MaskView& mv, int64_t i, int64_t& row, int64_t& rem) {
  const int64_t off = i - mv.row_base;
  if (mv.row_len >= kChunk) {
    const bool next = off >= mv.row_len;
    row = mv.row0 + next;
    rem = next ? off - mv.row_len : off;
  } else {
    const uint32_t o = static_cast<uint32_t>(off), len = static_cast<uint32_t>(mv.row_len);
    const uint32_t q = o / len;
    row = mv.row0 + q;
    rem = o - q * len;
  }
}

// Trainable lanes of W elements starting at offset rem of row `row`, crossing into later rows
// (rows shorter than W, or a vector on a row boundary): the rare case, kept small (a rolled
// loop rather than an out-of-line call, which would make callers spill around it).
template <int W>
__device__ __forceinline__ uint32_t row_lanes_crossing(const uint8_t* mask, int64_t row,
                                                       int64_t rem, int64_t row_len) {
  uint32_t bits = 0;
#pragma unroll 1
  for (int j = 0; j < W; ++j) {
    if (__ldg(mask + row)) bits |= 1u << j;
    if (++rem == row_len) rem = 0, ++row;
  }
  return bits;
}

// Trainable lanes of elements [i, i + W) (all inside the tensor; i a multiple of W).
template <int KIND, int W>
__device__ __forceinline__ uint32_t trainable_lanes(const MaskView& mv, int64_t i) {
  constexpr uint32_t kFull = (1u << W) - 1u;
  if constexpr (KIND == kKindElement) {
    if constexpr (W == 4) {
      return nonzero_bytes4(__ldg(reinterpret_cast<const unsigned int*>(mv.mask + i)));
    } else {
      static_assert(W == 8, "vectors are 4 or 8 lanes");
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(mv.mask + i));
      return nonzero_bytes4(w.x) | (nonzero_bytes4(w.y) << 4);
    }
  } else if constexpr (KIND == kKindRow) {
    int64_t row, rem;
    row_of(mv, i, row, rem);
    if (rem + W <= mv.row_len) return __ldg(mv.mask + row) ? kFull : 0u;  // within one row
    return row_lanes_crossing<W>(mv.mask, row, rem, mv.row_len);
  } else {
    return kFull;
  }
}

template <int KIND>
__device__ __forceinline__ bool trainable_one(const MaskView& mv, int64_t i) {
  if constexpr (KIND == kKindElement) {
    return __ldg(mv.mask + i) != 0;
  } else if constexpr (KIND == kKindRow) {
    int64_t row, rem;
    row_of(mv, i, row, rem);
    return __ldg(mv.mask + row) != 0;
  } else {
    return true;
  }
}

// ---------------------------------------------------------------------------------------------
// Device walk.

// Elements [base, base + n) of the current tensor, n <= kChunk; blockDim.x == kBlock.
template <bool kOnFrozen, int KIND, class Body>
__device__ __forceinline__ void walk_chunk(Body& body, const MaskView& mv, int64_t base, int n,
                                           bool aligned) {
  constexpr int W = Body::kW;
  constexpr uint32_t kFull = (1u << W) - 1u;
  const int tid = static_cast<int>(threadIdx.x);
  int done = 0;
  if (aligned) {
    if (Body::kBatchLoads && n == kChunk) {
      // Full chunk of a read-only body: a fixed trip count, unrolled so that the loads of all
      // its vectors can be in flight at once. (A body that stores gains nothing: its stores
      // may alias the next vector's loads.) All masks first, so that the data loads, predicated
      // on them, are not separated by mask reads.
      constexpr int kVecs = kChunk / (kBlock * W);
      uint32_t act[kVecs];
#pragma unroll
      for (int k = 0; k < kVecs; ++k) {
        act[k] = trainable_lanes<KIND, W>(mv, base + static_cast<int64_t>(k * kBlock + tid) * W);
        if (kOnFrozen) act[k] = ~act[k] & kFull;
      }
#pragma unroll
      for (int k = 0; k < kVecs; ++k)
        if (act[k] != 0) body.vec(base + static_cast<int64_t>(k * kBlock + tid) * W, act[k]);
      return;
    }
    const int nvec = n / W;
#pragma unroll 1
    for (int v = tid; v < nvec; v += kBlock) {
      const int64_t i = base + static_cast<int64_t>(v) * W;
      uint32_t act = trainable_lanes<KIND, W>(mv, i);
      if (kOnFrozen) act = ~act & kFull;
      if (act != 0) body.vec(i, act);
    }
    done = nvec * W;
  }
  for (int j = done + tid; j < n; j += kBlock) {  // unaligned tensors, and the last < W elements
    const int64_t i = base + j;
    if (trainable_one<KIND>(mv, i) != kOnFrozen) body.one(i);
  }
}

// The whole launch: this block's chunks, blockIdx.x + k * gridDim.x.
template <bool kOnFrozen, int DEPTH, class Body>
__device__ __forceinline__ void mta_run(const TensorListMeta<DEPTH>& meta, Body& body) {
  const int nt = meta.ntensors;
  const int64_t total = meta.chunk_end[nt - 1];
  int t = 0;
  int64_t first = 0;  // first chunk number of tensor t
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= meta.chunk_end[t]) first = meta.chunk_end[t++];
    const int64_t base = (c - first) * kChunk;
    const int64_t left = meta.numel[t] - base;
    const int n = left < kChunk ? static_cast<int>(left) : kChunk;
    const int flags = meta.flags[t];
    const bool aligned = (flags & kAlignedFlag) != 0;
    body.begin(meta, t);
    MaskView mv{meta.mask[t], 1, 0, 0};
    switch (flags & kKindBits) {
      case kKindRow:
        mv.row_len = meta.row_len[t];
        mv.row0 = base / mv.row_len;
        mv.row_base = mv.row0 * mv.row_len;
        walk_chunk<kOnFrozen, kKindRow>(body, mv, base, n, aligned);
        break;
      case kKindElement:
        walk_chunk<kOnFrozen, kKindElement>(body, mv, base, n, aligned);
        break;
      default:
        walk_chunk<kOnFrozen, kKindNone>(body, mv, base, n, aligned);
        break;
    }
    body.end_chunk();
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <int DEPTH>
struct MtaTensor {
  void* ptr[DEPTH];
  const uint8_t* mask;  // nullptr for kNone
  int64_t numel;
  int64_t row_len;      // kRow: numel / size(0)
  MaskKind kind;
};

// Mask `i` of `masks` for tensor `ref` (validated with check_mask); masks may be empty.
template <int DEPTH>
inline void set_mask(MtaTensor<DEPTH>& e, const char* op, size_t i, const OptTensorList& masks,
                     const at::Tensor& ref) {
  e.mask = nullptr;
  e.row_len = 1;
  e.kind = MaskKind::kNone;
  if (masks.size() == 0) return;
  const std::optional<at::Tensor> m = masks.get(i);
  e.kind = check_mask(op, i, m, ref);
  if (e.kind == MaskKind::kNone) return;
  e.mask = static_cast<const uint8_t*>(m->const_data_ptr());
  if (e.kind == MaskKind::kRow && ref.numel() > 0) e.row_len = ref.numel() / m->size(0);
}

// Cuts the tensors into launches (zero-numel tensors are dropped).
template <int DEPTH>
std::vector<TensorListMeta<DEPTH>> pack_tensor_lists(const std::vector<MtaTensor<DEPTH>>& ts) {
  using Meta = TensorListMeta<DEPTH>;
  std::vector<Meta> out;
  Meta cur;
  std::memset(&cur, 0, sizeof(cur));
  int nt = 0;
  int64_t chunks = 0;
  for (const MtaTensor<DEPTH>& e : ts) {
    if (e.numel <= 0) continue;
    bool aligned = true;
    for (int d = 0; d < DEPTH; ++d) {
      cur.ptr[d][nt] = e.ptr[d];
      aligned = aligned && reinterpret_cast<uintptr_t>(e.ptr[d]) % 16 == 0;
    }
    if (e.kind == MaskKind::kElement)  // W mask bytes per load
      aligned = aligned && reinterpret_cast<uintptr_t>(e.mask) % 8 == 0;
    cur.mask[nt] = e.mask;
    cur.numel[nt] = e.numel;
    cur.row_len[nt] = e.row_len;
    chunks += (e.numel + kChunk - 1) / kChunk;
    cur.chunk_end[nt] = chunks;
    cur.flags[nt] = static_cast<uint8_t>(static_cast<int>(e.kind) | (aligned ? kAlignedFlag : 0));
    if (++nt == Meta::kMaxTensors) {
      cur.ntensors = nt;
      out.push_back(cur);
      std::memset(&cur, 0, sizeof(cur));
      nt = 0;
      chunks = 0;
    }
  }
  if (nt > 0) {
    cur.ntensors = nt;
    out.push_back(cur);
  }
  return out;
}

template <int DEPTH>
inline int64_t total_chunks(const TensorListMeta<DEPTH>& meta) {
  return meta.chunk_end[meta.ntensors - 1];
}

// Blocks of kBlock threads that Kernel keeps resident on the current device: the persistent
// grid size. The per-SM figure is computed once per kernel.
template <auto Kernel>
int resident_blocks() {
  static const int per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kBlock, 0));
    return std::max(n, 1);
  }();
  return per_sm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

template <int DEPTH>
inline int grid_for(const TensorListMeta<DEPTH>& meta, int max_blocks) {
  return static_cast<int>(std::min<int64_t>(total_chunks(meta), max_blocks));
}

}  // namespace pyfast::cuda
