// Small helpers over at::vec shared by the CPU kernels: float32 vector loads/stores from float32 or
// bfloat16 memory, and the planning of work items over a tensor list (with frozen rows skipped).
//
// The build defines CPU_CAPABILITY_AVX512 / CPU_CAPABILITY_AVX2 together with matching -m flags
// (setup.py picks the host's level), so Vectorized<float> is a real SIMD register here; without
// them at::vec falls back to scalar code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../ops.h"

namespace pyfast::cpu {

using Vec = at::vec::Vectorized<float>;
using at::BFloat16;

inline Vec vload(const float* p) { return Vec::loadu(p); }
inline Vec vload(const BFloat16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
inline void vstore(float* p, const Vec& v) { v.store(p); }
inline void vstore(BFloat16* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // 16 lanes -> 16 bf16 (round to nearest even) in registers, one 256-bit store.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#else
  float f[Vec::size()];
  v.store(f);
  for (int i = 0; i < Vec::size(); ++i) p[i] = BFloat16(f[i]);
#endif
}

// Scalar twins (round-to-nearest-even for bfloat16, as c10::BFloat16 does).
inline float sload(const float* p) { return *p; }
inline float sload(const BFloat16* p) { return static_cast<float>(*p); }
inline void sstore(float* p, float v) { *p = v; }
inline void sstore(BFloat16* p, float v) { *p = BFloat16(v); }

// Frozen/trainable flags of Vec::size() consecutive mask bytes: 0 = all frozen, 1 = all
// trainable, 2 = mixed. Bool tensors hold exactly 0 or 1 per byte; uint8 masks are normalised
// by the caller's `!= 0` tests on the mixed path.
inline int mask_block_state(const uint8_t* m) {
  constexpr int n = Vec::size();
  bool any = false, all = true;
  for (int i = 0; i < n; ++i) {
    any |= m[i] != 0;
    all &= m[i] != 0;
  }
  return all ? 1 : (any ? 2 : 0);
}

// Lane mask (all bits set where trainable) for a mixed block.
inline Vec lane_mask(const uint8_t* m) {
  alignas(64) uint32_t bits[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) bits[i] = m[i] ? 0xFFFFFFFFu : 0u;
  float f[Vec::size()];
  std::memcpy(f, bits, sizeof(f));
  return Vec::loadu(f);
}

// One unit of parallel work: elements [begin, end) of tensor `t`. `emask` points at the
// per-element mask of that tensor (nullptr when every element in range is trainable).
struct WorkItem {
  int64_t t;
  int64_t begin;
  int64_t end;
  const uint8_t* emask;
};

// Splits every tensor into items of about `chunk` elements. Rows that a per-row mask freezes are
// left out entirely, so a mostly frozen embedding costs almost nothing; per-element masks travel
// with the item. Ranges start on multiples of Vec::size() where rows allow it.
inline std::vector<WorkItem> plan_work(const char* op, at::TensorList tensors,
                                       const OptTensorList& masks, int64_t chunk = 1 << 16) {
  std::vector<WorkItem> items;
  auto add_range = [&](int64_t t, int64_t b, int64_t e, const uint8_t* em) {
    for (int64_t s = b; s < e; s += chunk) items.push_back({t, s, std::min(e, s + chunk), em});
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& x = tensors[i];
    const int64_t n = x.numel();
    if (n == 0) continue;
    const MaskKind kind =
        masks.size() == 0 ? MaskKind::kNone : check_mask(op, i, masks.get(i), x);
    if (kind == MaskKind::kNone) {
      add_range(static_cast<int64_t>(i), 0, n, nullptr);
    } else if (kind == MaskKind::kElement) {
      add_range(static_cast<int64_t>(i), 0, n,
                static_cast<const uint8_t*>(masks.get(i)->data_ptr()));
    } else {
      const at::Tensor m = *masks.get(i);
      const uint8_t* rows = static_cast<const uint8_t*>(m.data_ptr());
      const int64_t nrows = m.size(0), row = n / nrows;
      // Merge runs of consecutive trainable rows into ranges.
      for (int64_t r = 0; r < nrows;) {
        if (!rows[r]) {
          ++r;
          continue;
        }
        int64_t e = r;
        while (e < nrows && rows[e]) ++e;
        add_range(static_cast<int64_t>(i), r * row, e * row, nullptr);
        r = e;
      }
    }
  }
  return items;
}

}  // namespace pyfast::cpu
