// trie_attention (CPU, forward): softmax attention over one unpadded row that holds prefix tries
// in depth-first order, with the visibility rule taken from the layout itself:
//
//   query i sees key j  <=>  j <= i < end[j]      (j is i or one of i's ancestors)
//
// end[t] is where the subtree of position t ends (exclusive). out[i, h] = sum_j p_ij v_j over the
// visible j, p = softmax_j(scale * q_i . k_j), keys and values of head h / (H / KV) (grouped-query
// attention without copying keys per query head).
//
// Work: the row splits into runs, maximal chains in which each position's parent is the one
// before it (a run start's parent is elsewhere or absent). Every position of a run [a, b) sees
// the same ancestors outside the run, plus a .. itself. A work item is up to kQBlock positions
// of a run, for one key/value head: its rows are those positions for each query head of the
// group; its keys are the ancestors' ranges, the run's earlier positions, then its own positions
// (causal). Keys stream through in chunks with an online softmax (running max and sum per row),
// so no score matrix larger than one chunk exists, and only visible keys are ever computed:
// the cost is the sum over queries of their ancestor counts, not the square of the row.
//
// Layout inside an item: Q^T (dim x rows), scores chunk-major (keys x rows), so the max, the
// exps and the sums run across rows in SIMD lanes, and key / value rows are read in place from
// the (1, KV, T, D) tensors (no gathering). Items go to threads from one atomic counter, the
// most expensive first. float32 math; bfloat16 inputs are converted to float32 first.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "vec_utils.h"

namespace pyfast {
namespace {

using cpu::Vec;
constexpr int64_t W = Vec::size();
constexpr int64_t kQBlock = 32;   // positions per work item
constexpr int64_t kKChunk = 128;  // keys per online-softmax step

struct Range {
  int64_t a, b;
};

struct Item {
  int64_t c, d;   // query positions c .. d - 1 (within one run)
  int64_t run;    // index of the run
  int64_t g;      // key/value head
  int64_t cost;   // rows x keys, for scheduling
};

// Row strides of a (1, heads, T, D) tensor with a contiguous last dimension.
struct View {
  const float* p;
  int64_t sh, st;  // head and position strides (elements)
  const float* row(int64_t h, int64_t t) const { return p + h * sh + t * st; }
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// scores[j][r] = sum_d qt[d][r] * key_j[d] for the chunk's keys (rows padded to rp lanes).
void chunk_scores(const float* qt, int64_t rp, int64_t D, const float* const* keys, int64_t n,
                  float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *k0 = keys[j], *k1 = keys[j + 1], *k2 = keys[j + 2], *k3 = keys[j + 3];
    int64_t r = 0;
    for (; r + 2 * W <= rp; r += 2 * W) {
      Vec a00(0.f), a01(0.f), a10(0.f), a11(0.f), a20(0.f), a21(0.f), a30(0.f), a31(0.f);
      for (int64_t d = 0; d < D; ++d) {
        const Vec q0 = Vec::loadu(qt + d * rp + r), q1 = Vec::loadu(qt + d * rp + r + W);
        const Vec b0(k0[d]), b1(k1[d]), b2(k2[d]), b3(k3[d]);
        a00 = at::vec::fmadd(q0, b0, a00);
        a01 = at::vec::fmadd(q1, b0, a01);
        a10 = at::vec::fmadd(q0, b1, a10);
        a11 = at::vec::fmadd(q1, b1, a11);
        a20 = at::vec::fmadd(q0, b2, a20);
        a21 = at::vec::fmadd(q1, b2, a21);
        a30 = at::vec::fmadd(q0, b3, a30);
        a31 = at::vec::fmadd(q1, b3, a31);
      }
      a00.store(s + j * rp + r);
      a01.store(s + j * rp + r + W);
      a10.store(s + (j + 1) * rp + r);
      a11.store(s + (j + 1) * rp + r + W);
      a20.store(s + (j + 2) * rp + r);
      a21.store(s + (j + 2) * rp + r + W);
      a30.store(s + (j + 3) * rp + r);
      a31.store(s + (j + 3) * rp + r + W);
    }
    for (; r < rp; r += W) {
      Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      for (int64_t d = 0; d < D; ++d) {
        const Vec q = Vec::loadu(qt + d * rp + r);
        a0 = at::vec::fmadd(q, Vec(k0[d]), a0);
        a1 = at::vec::fmadd(q, Vec(k1[d]), a1);
        a2 = at::vec::fmadd(q, Vec(k2[d]), a2);
        a3 = at::vec::fmadd(q, Vec(k3[d]), a3);
      }
      a0.store(s + j * rp + r);
      a1.store(s + (j + 1) * rp + r);
      a2.store(s + (j + 2) * rp + r);
      a3.store(s + (j + 3) * rp + r);
    }
  }
  for (; j < n; ++j) {
    const float* k = keys[j];
    for (int64_t r = 0; r < rp; r += W) {
      Vec a(0.f);
      for (int64_t d = 0; d < D; ++d) a = at::vec::fmadd(Vec::loadu(qt + d * rp + r), Vec(k[d]), a);
      a.store(s + j * rp + r);
    }
  }
}

// o[r][:] += sum_j p[j][r] * value_j[:] for rows r < R (o rows of D floats, dp = D rounded up).
void chunk_values(const float* p, int64_t rp, int64_t R, const float* const* vals, int64_t n,
                  int64_t D, float* o, int64_t dp) {
  const int64_t Dv = D / W * W;  // vector part of each value row
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    int64_t d = 0;
    for (; d + 2 * W <= Dv; d += 2 * W) {
      Vec c[4][2];
      for (int rr = 0; rr < 4; ++rr) {
        c[rr][0] = Vec::loadu(o + (r + rr) * dp + d);
        c[rr][1] = Vec::loadu(o + (r + rr) * dp + d + W);
      }
      for (int64_t j = 0; j < n; ++j) {
        const Vec v0 = Vec::loadu(vals[j] + d), v1 = Vec::loadu(vals[j] + d + W);
        const float* pj = p + j * rp + r;
        for (int rr = 0; rr < 4; ++rr) {
          const Vec b(pj[rr]);
          c[rr][0] = at::vec::fmadd(b, v0, c[rr][0]);
          c[rr][1] = at::vec::fmadd(b, v1, c[rr][1]);
        }
      }
      for (int rr = 0; rr < 4; ++rr) {
        c[rr][0].store(o + (r + rr) * dp + d);
        c[rr][1].store(o + (r + rr) * dp + d + W);
      }
    }
    for (; d < Dv; d += W) {
      Vec c[4];
      for (int rr = 0; rr < 4; ++rr) c[rr] = Vec::loadu(o + (r + rr) * dp + d);
      for (int64_t j = 0; j < n; ++j) {
        const Vec v = Vec::loadu(vals[j] + d);
        const float* pj = p + j * rp + r;
        for (int rr = 0; rr < 4; ++rr) c[rr] = at::vec::fmadd(Vec(pj[rr]), v, c[rr]);
      }
      for (int rr = 0; rr < 4; ++rr) c[rr].store(o + (r + rr) * dp + d);
    }
    for (; d < D; ++d)  // scalar tail of a head dim that is not a multiple of the vector width
      for (int rr = 0; rr < 4; ++rr) {
        float acc = o[(r + rr) * dp + d];
        for (int64_t j = 0; j < n; ++j) acc += p[j * rp + r + rr] * vals[j][d];
        o[(r + rr) * dp + d] = acc;
      }
  }
  for (; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) {
      float acc = o[r * dp + d];
      for (int64_t j = 0; j < n; ++j) acc += p[j * rp + r] * vals[j][d];
      o[r * dp + d] = acc;
    }
}

// Scratch of one thread, reused across its items.
struct Scratch {
  std::vector<float> qt, s, o, m, l, alpha;
  std::vector<const float*> keys, vals;
  std::vector<int64_t> pos;
};

// One item: rows r = u * G + hh (position c + u, query head g * G + hh).
void run_item(const Item& it, const std::vector<Range>& anc, const View& q, const View& k,
              const View& v, int64_t G, int64_t D, float scale, float* out, int64_t H,
              Scratch& sc) {
  const int64_t nb = it.d - it.c, R = nb * G, rp = round_up(R, W), dp = round_up(D, W);
  sc.qt.assign(D * rp, 0.f);
  for (int64_t u = 0; u < nb; ++u)
    for (int64_t hh = 0; hh < G; ++hh) {
      const float* qr = q.row(it.g * G + hh, it.c + u);
      const int64_t r = u * G + hh;
      for (int64_t d = 0; d < D; ++d) sc.qt[d * rp + r] = qr[d] * scale;
    }
  sc.o.assign(rp * dp, 0.f);
  sc.m.assign(rp, -std::numeric_limits<float>::infinity());
  sc.l.assign(rp, 0.f);
  sc.alpha.resize(rp);
  sc.s.resize(kKChunk * rp);
  // Key positions: the fully visible ones (ancestor ranges), then the item's own (causal).
  sc.pos.clear();
  for (const Range& x : anc)
    for (int64_t t = x.a; t < x.b; ++t) sc.pos.push_back(t);
  const int64_t n_full = static_cast<int64_t>(sc.pos.size());
  for (int64_t t = it.c; t < it.d; ++t) sc.pos.push_back(t);
  const int64_t n_all = static_cast<int64_t>(sc.pos.size());
  sc.keys.resize(kKChunk);
  sc.vals.resize(kKChunk);
  const Vec ninf(-std::numeric_limits<float>::infinity());
  // Chunks never mix full and own keys, so every row has a visible key in every chunk.
  for (int64_t j0 = 0; j0 < n_all;) {
    const int64_t j1 = std::min(j0 < n_full ? n_full : n_all, j0 + kKChunk), n = j1 - j0;
    for (int64_t j = 0; j < n; ++j) {
      sc.keys[j] = k.row(it.g, sc.pos[j0 + j]);
      sc.vals[j] = v.row(it.g, sc.pos[j0 + j]);
    }
    float* s = sc.s.data();
    chunk_scores(sc.qt.data(), rp, D, sc.keys.data(), n, s);
    if (j0 >= n_full)  // own key o is visible to rows of positions u >= o: rows r >= o * G
      for (int64_t j = 0; j < n; ++j) {
        const int64_t o = j0 + j - n_full;
        std::fill(s + j * rp, s + j * rp + o * G, -std::numeric_limits<float>::infinity());
      }
    for (int64_t r = 0; r < rp; r += W) {
      Vec mx = ninf;
      for (int64_t j = 0; j < n; ++j) mx = at::vec::maximum(mx, Vec::loadu(s + j * rp + r));
      const Vec m_old = Vec::loadu(sc.m.data() + r);
      const Vec m_new = at::vec::maximum(m_old, mx);
      Vec sum(0.f);
      for (int64_t j = 0; j < n; ++j) {
        const Vec e = (Vec::loadu(s + j * rp + r) - m_new).exp_u20();
        e.store(s + j * rp + r);
        sum = sum + e;
      }
      const Vec a = (m_old - m_new).exp_u20();
      a.store(sc.alpha.data() + r);
      (Vec::loadu(sc.l.data() + r) * a + sum).store(sc.l.data() + r);
      m_new.store(sc.m.data() + r);
    }
    for (int64_t r = 0; r < R; ++r) {
      const float a = sc.alpha[r];
      if (a != 1.f)
        for (int64_t d = 0; d < D; ++d) sc.o[r * dp + d] *= a;
    }
    chunk_values(s, rp, R, sc.vals.data(), n, D, sc.o.data(), dp);
    j0 = j1;
  }
  for (int64_t u = 0; u < nb; ++u)
    for (int64_t hh = 0; hh < G; ++hh) {
      const int64_t r = u * G + hh;
      const float inv = 1.f / sc.l[r];
      float* dst = out + ((it.c + u) * H + it.g * G + hh) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = sc.o[r * dp + d] * inv;
    }
}

void check_qkv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
               const at::Tensor& end) {
  constexpr const char* op = "trie_attention";
  TORCH_CHECK(query.dim() == 4 && query.size(0) == 1, op,
              ": query must be (1, heads, T, dim), got ", query.sizes());
  TORCH_CHECK(key.dim() == 4 && key.size(0) == 1 && key.size(2) == query.size(2) &&
                  key.size(3) == query.size(3),
              op, ": key must be (1, kv_heads, T, dim) with query's T and dim ", query.sizes(),
              ", got ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have key's shape ", key.sizes(),
              ", got ", value.sizes());
  TORCH_CHECK(key.size(1) > 0 && query.size(1) % key.size(1) == 0, op, ": ", query.size(1),
              " query heads are not a multiple of ", key.size(1), " key/value heads");
  for (const at::Tensor* t : {&query, &key, &value}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op,
                ": query, key and value must be float32 or bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), op,
                ": query, key and value must share one dtype, got ", query.scalar_type(),
                " and ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, ": the CPU kernel got a tensor on ", t->device());
  }
  TORCH_CHECK(end.dim() == 1 && end.size(0) == query.size(2) &&
                  end.scalar_type() == at::kLong && end.device().is_cpu(),
              op, ": end must be a CPU int64 tensor of ", query.size(2), " entries, got ",
              end.scalar_type(), " ", end.sizes(), " on ", end.device());
}

}  // namespace

at::Tensor trie_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& end_in, double scale) {
  check_qkv(query, key, value, end_in);
  const int64_t H = query.size(1), KV = key.size(1), T = query.size(2), D = query.size(3);
  const int64_t G = H / KV;
  const at::Tensor end_t = end_in.contiguous();
  const int64_t* end = end_t.data_ptr<int64_t>();

  // Layout check, runs and their ancestors in one pass. `open` holds the positions whose
  // subtrees contain the current one (its ancestors), innermost last.
  std::vector<int64_t> open, run_of(T), run_start, anc_off{0};
  std::vector<Range> anc;
  for (int64_t t = 0; t < T; ++t) {
    while (!open.empty() && end[open.back()] <= t) open.pop_back();
    const int64_t limit = open.empty() ? T : end[open.back()];
    TORCH_CHECK(t < end[t] && end[t] <= limit, "trie_attention: trie layout: position ", t,
                " has subtree end ", end[t], ", which must lie in ", t + 1, "..", limit,
                " (within its ancestors' subtrees)");
    if (t == 0 || open.empty() || open.back() != t - 1) {  // a run starts: copy its ancestors
      const int64_t run = static_cast<int64_t>(run_start.size());
      if (!open.empty()) {
        const int64_t p = open.back(), pr = run_of[p];
        anc.insert(anc.end(), anc.begin() + anc_off[pr], anc.begin() + anc_off[pr + 1]);
        anc.push_back({run_start[pr], p + 1});
      }
      run_start.push_back(t);
      anc_off.push_back(static_cast<int64_t>(anc.size()));
      run_of[t] = run;
    } else {
      run_of[t] = run_of[t - 1];
    }
    open.push_back(t);
  }
  const int64_t n_runs = static_cast<int64_t>(run_start.size());

  // Work items, most expensive first.
  std::vector<Item> items;
  for (int64_t run = 0; run < n_runs; ++run) {
    const int64_t a = run_start[run], b = run + 1 < n_runs ? run_start[run + 1] : T;
    int64_t n_anc = 0;
    for (int64_t i = anc_off[run]; i < anc_off[run + 1]; ++i) n_anc += anc[i].b - anc[i].a;
    for (int64_t c = a; c < b; c += kQBlock) {
      const int64_t d = std::min(b, c + kQBlock);
      for (int64_t g = 0; g < KV; ++g) items.push_back({c, d, run, g, (d - c) * (n_anc + d - a)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });

  const bool bf16 = query.scalar_type() == at::kBFloat16;
  auto as_f32 = [&](const at::Tensor& t) {
    at::Tensor f = bf16 ? t.to(at::kFloat) : t;
    return f.stride(3) == 1 ? f : f.contiguous();
  };
  const at::Tensor qf = as_f32(query), kf = as_f32(key), vf = as_f32(value);
  const View qv{qf.data_ptr<float>(), qf.stride(1), qf.stride(2)};
  const View kv{kf.data_ptr<float>(), kf.stride(1), kf.stride(2)};
  const View vv{vf.data_ptr<float>(), vf.stride(1), vf.stride(2)};
  at::Tensor out = at::empty({1, T, H, D}, qf.options());
  float* o = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::max<int64_t>(1, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    std::vector<Range> block_anc;
    for (int64_t i = next++; i < n_items; i = next++) {
      const Item& it = items[i];
      block_anc.assign(anc.begin() + anc_off[it.run], anc.begin() + anc_off[it.run + 1]);
      if (it.c > run_start[it.run]) block_anc.push_back({run_start[it.run], it.c});
      run_item(it, block_anc, qv, kv, vv, G, D, sc, o, H, scratch);
    }
  });
  return bf16 ? out.to(at::kBFloat16) : out;
}

TORCH_LIBRARY_IMPL(pyfast, CPU, m) { m.impl("trie_attention", &trie_attention_cpu); }

}  // namespace pyfast
