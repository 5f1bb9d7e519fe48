// linear_token_logprobs (CPU): token_logprobs of logits = hidden @ weight.T (+ bias) without ever
// forming the (N, V) logits, forward and backward.
//
//   forward:  for each vocabulary chunk c (kVocabChunk columns) and row block r (kRowBlock rows):
//               L = hidden[r] @ weight[c].T + bias[c]          (at::mm into one reused buffer)
//               merge the row statistics (max, sum exp, first argmax) of L into each row's state,
//               and pick up x_label when the label falls in c;
//             then lse = max + log(sum), logprob = x_label - lse.
//   backward: recompute L per chunk, turn it in place into G = a * onehot + (h - a) * exp(L - lse)
//             (a = grad of logprob, h = grad of lse), then
//               grad_hidden[r] += G @ weight[c];  grad_weight[c] += G.T @ hidden[r];
//               grad_bias[c] += sum_rows(G).
//   with_grad: for a mean loss the per-row weights a are known up front, so whole-row blocks get
//             logits -> stats -> G in place -> grad_hidden, grad_weight in one pass: three
//             matmuls in all, as with materialised logits, instead of four.
//   logit map: with scale != 1 or softcap > 0 the row passes see z = scale * L, then
//             softcap * tanh(z / softcap) (Granite, Cohere, Gemma-2/3), computed in fp32 into a
//             per-thread row scratch (the logits in L stay as the matmul rounded them), and G
//             gains the chain factor scale * (1 - tanh^2) before the matmuls.
//   output_mask (backward, with_grad): which of grad_hidden, grad_weight, grad_bias are wanted;
//             the others are neither allocated nor computed (a frozen lm_head saves the
//             G.T @ hidden matmul and its (V, D) buffer).
// Ignored rows are dropped before any matmul (prompt tokens cost nothing) and get zero gradient.
//
// Memory: one kRowBlock x kVocabChunk buffer (16 MiB in fp32) plus O(N) row state, instead of the
// (N, V) logits (805 MB for N = 4096, V = 49152) that matmul + cross_entropy writes, rereads, and
// keeps for backward along with its gradient. Time: the matmuls dominate (one in forward, three in
// backward: the recomputation is the price of not storing the logits); the row passes read each
// chunk from cache-warm memory right after the matmul wrote it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../logprob_checks.h"
#include "logprob_row.h"

namespace pyfast {

namespace {

constexpr const char* kFwd = "linear_token_logprobs";
constexpr const char* kBwd = "linear_token_logprobs_backward";
// Square-ish chunks: every at::mm call packs both of its operands, so the packing traffic
// relative to the flops goes as 1/kVocabChunk + 1/kRowBlock; 2048 x 2048 measured within a few
// percent of one unchunked matmul here, while 128 x 49152 (whole rows) was 1.5x slower.
constexpr int64_t kVocabChunk = 2048;
constexpr int64_t kRowBlock = 2048;
// Logits per row block of the fused forward+gradient pass (whole rows): 32 MiB in fp32, 170 rows
// of a 49152 vocabulary (4.2% of the logits of N = 4096 rows). Each block re-packs the weight for
// two matmuls and rewrites grad_weight once, so fewer, taller blocks move fewer bytes;
// pyfast.ops.linear_cross_entropy takes this path only when the block is <= 5% of the logits.
constexpr int64_t kFullRowElems = int64_t(8) << 20;

// Rows whose label is not ignore_index, as an int64 index tensor (undefined when all are valid).
at::Tensor valid_rows(const at::Tensor& labels, int64_t ignore_index) {
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  std::vector<int64_t> idx;
  idx.reserve(labels.numel());
  for (int64_t i = 0; i < labels.numel(); ++i)
    if (lab[i] != ignore_index) idx.push_back(i);
  if (static_cast<int64_t>(idx.size()) == labels.numel()) return at::Tensor();
  return at::tensor(idx, labels.options());
}

// buf (rb, vc) = h (rb, D) @ w (vc, D).T (+ b (vc,)), in a contiguous prefix of `flat`.
at::Tensor chunk_logits(const at::Tensor& flat, const at::Tensor& h, const at::Tensor& w,
                        const at::Tensor& b) {
  at::Tensor out = flat.narrow(0, 0, h.size(0) * w.size(0)).view({h.size(0), w.size(0)});
  if (b.defined()) at::addmm_out(out, b, h, w.t());
  else at::mm_out(out, h, w.t());
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, int64_t ignore_index, double scale, double softcap) {
  using namespace cpu;
  check_linear_args(kFwd, hidden, weight, labels_in, bias_in);
  check_logit_map(kFwd, scale, softcap);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::Tensor labels_all = labels_in.contiguous();
  check_label_range(kFwd, labels_all, V, ignore_index);
  const auto acc_dt = acc_dtype(hidden.scalar_type());
  at::Tensor logprobs = at::zeros({N}, hidden.options().dtype(acc_dt));
  at::Tensor is_argmax = at::zeros({N}, hidden.options().dtype(at::kBool));
  at::Tensor lse = at::zeros({N}, hidden.options().dtype(acc_dt));
  const at::Tensor rows = valid_rows(labels_all, ignore_index);
  const at::Tensor h = rows.defined() ? hidden.index_select(0, rows) : hidden;
  const at::Tensor labels = rows.defined() ? labels_all.index_select(0, rows) : labels_all;
  const int64_t M = h.size(0);
  if (M == 0) return {logprobs, is_argmax, lse};
  const at::Tensor bias = bias_in.has_value() ? *bias_in : at::Tensor();
  const int64_t VC = std::min(V, kVocabChunk), RB = std::min(M, kRowBlock);
  const at::Tensor flat = at::empty({RB * VC}, h.options());
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  at::Tensor lp_v = at::empty({M}, logprobs.options()), lse_v = at::empty({M}, lse.options());
  at::Tensor am_v = at::empty({M}, is_argmax.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "linear_token_logprobs_cpu", [&] {
    using acc_t = typename StatsOf<scalar_t>::acc;
    using stats_t = typename StatsOf<scalar_t>::type;
    const LogitMap<acc_t> lm{static_cast<acc_t>(scale), static_cast<acc_t>(softcap)};
    std::vector<stats_t> st(M);
    std::vector<acc_t> x_label(M, 0);
    for (int64_t c0 = 0; c0 < V; c0 += VC) {
      const int64_t vc = std::min(VC, V - c0);
      const at::Tensor w = weight.narrow(0, c0, vc);
      const at::Tensor b = bias.defined() ? bias.narrow(0, c0, vc) : at::Tensor();
      for (int64_t r0 = 0; r0 < M; r0 += RB) {
        const int64_t rb = std::min(RB, M - r0);
        const at::Tensor L = chunk_logits(flat, h.narrow(0, r0, rb), w, b);
        const scalar_t* x = L.const_data_ptr<scalar_t>();
        at::parallel_for(0, rb, 1, [&](int64_t lo, int64_t hi) {
          std::vector<acc_t> z(lm.identity() ? 0 : vc);  // mapped logits of one row
          for (int64_t k = lo; k < hi; ++k) {
            const int64_t i = r0 + k;
            mapped_row_stats(x + k * vc, vc, c0, lab[i] - c0, lm, z.data(), st[i], x_label[i]);
          }
        });
      }
    }
    acc_t* lp = lp_v.data_ptr<acc_t>();
    acc_t* ls = lse_v.data_ptr<acc_t>();
    bool* am = am_v.data_ptr<bool>();
    for (int64_t i = 0; i < M; ++i) {
      ls[i] = stats_lse(st[i]);
      lp[i] = row_logprob(x_label[i], ls[i]);
      am[i] = st[i].argmax == lab[i];
    }
  });
  if (!rows.defined()) return {lp_v, am_v, lse_v};
  logprobs.index_copy_(0, rows, lp_v);
  is_argmax.index_copy_(0, rows, am_v);
  lse.index_copy_(0, rows, lse_v);
  return {logprobs, is_argmax, lse};
}

LinearGrads linear_token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& lse_in, int64_t ignore_index,
    double scale, double softcap, std::array<bool, 3> output_mask) {
  using namespace cpu;
  check_linear_args(kBwd, hidden, weight, labels_in, bias_in);
  check_logit_map(kBwd, scale, softcap);
  const int64_t N = hidden.size(0), V = weight.size(0), D = hidden.size(1);
  const at::Tensor labels_all = labels_in.contiguous();
  check_label_range(kBwd, labels_all, V, ignore_index);
  const auto dt = hidden.scalar_type();
  const auto acc_dt = acc_dtype(dt);
  auto row_vec = [&](const char* arg, const at::Tensor& t) {
    return check_row_vector(kBwd, arg, t, N, hidden.device(), acc_dt);
  };
  at::Tensor g = row_vec("grad_logprobs", grad_logprobs);
  at::Tensor lse = row_vec("lse", lse_in);
  const bool has_h = grad_lse.has_value() && grad_lse->defined();
  at::Tensor hl = has_h ? row_vec("grad_lse", *grad_lse) : at::Tensor();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? *bias_in : at::Tensor();
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  if (!need_h && !need_w && !need_b) return {std::nullopt, std::nullopt, std::nullopt};

  const at::Tensor rows = valid_rows(labels_all, ignore_index);
  const at::Tensor h = rows.defined() ? hidden.index_select(0, rows) : hidden;
  const at::Tensor labels = rows.defined() ? labels_all.index_select(0, rows) : labels_all;
  if (rows.defined()) {
    g = g.index_select(0, rows);
    lse = lse.index_select(0, rows);
    if (has_h) hl = hl.index_select(0, rows);
  }
  const int64_t M = h.size(0);
  // grad_hidden and grad_bias accumulate over vocabulary chunks: in fp32 for bf16 inputs.
  at::Tensor gh = need_h ? at::zeros({M, D}, h.options().dtype(dt == at::kBFloat16 ? acc_dt : dt))
                         : at::Tensor();
  at::Tensor grad_weight = need_w ? at::empty({V, D}, weight.options()) : at::Tensor();
  at::Tensor gb = need_b ? at::empty({V}, h.options().dtype(acc_dt)) : at::Tensor();
  std::optional<at::Tensor> grad_hidden, grad_weight_out, grad_bias;
  if (M == 0) {
    if (need_h) grad_hidden = at::zeros_like(hidden, at::MemoryFormat::Contiguous);
    if (need_w) grad_weight_out = grad_weight.zero_();
    if (need_b) grad_bias = at::zeros({V}, bias.options());
    return {grad_hidden, grad_weight_out, grad_bias};
  }
  const int64_t VC = std::min(V, kVocabChunk), RB = std::min(M, kRowBlock);
  const bool one_block = RB == M;
  const at::Tensor flat = at::empty({RB * VC}, h.options());
  // Per-chunk fp32 accumulator of grad_weight when bf16 partial products must be summed.
  at::Tensor gw_acc = (need_w && dt == at::kBFloat16 && !one_block)
                          ? at::empty({VC, D}, h.options().dtype(acc_dt))
                          : at::Tensor();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "linear_token_logprobs_bwd_cpu", [&] {
    using acc_t = typename StatsOf<scalar_t>::acc;
    const LogitMap<acc_t> lm{static_cast<acc_t>(scale), static_cast<acc_t>(softcap)};
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* hp = has_h ? hl.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lp = lse.const_data_ptr<acc_t>();
    for (int64_t c0 = 0; c0 < V; c0 += VC) {
      const int64_t vc = std::min(VC, V - c0);
      const at::Tensor w = weight.narrow(0, c0, vc);
      const at::Tensor b = has_bias ? bias.narrow(0, c0, vc) : at::Tensor();
      at::Tensor gw = need_w ? grad_weight.narrow(0, c0, vc) : at::Tensor();
      at::Tensor gw_a = gw_acc.defined() ? gw_acc.narrow(0, 0, vc) : gw;
      for (int64_t r0 = 0; r0 < M; r0 += RB) {
        const int64_t rb = std::min(RB, M - r0);
        const at::Tensor hr = h.narrow(0, r0, rb);
        at::Tensor G = chunk_logits(flat, hr, w, b);
        scalar_t* x = G.data_ptr<scalar_t>();
        at::parallel_for(0, rb, 1, [&](int64_t lo, int64_t hi) {
          std::vector<acc_t> z(lm.identity() ? 0 : vc);  // mapped logits of one row
          for (int64_t k = lo; k < hi; ++k) {
            const int64_t i = r0 + k;
            const acc_t a = gp[i];
            const acc_t coef = (hp ? hp[i] : acc_t(0)) - a;
            mapped_row_grad(x + k * vc, x + k * vc, vc, lp[i], coef, lab[i] - c0, a, lm, z.data());
          }
        });
        if (need_h) {
          at::Tensor ghr = gh.narrow(0, r0, rb);
          if (dt == at::kBFloat16) ghr.add_(at::mm(G, w));
          else ghr.addmm_(G, w);
        }
        if (need_w) {
          if (r0 == 0) {
            if (gw_a.scalar_type() == dt) at::mm_out(gw_a, G.t(), hr);
            else gw_a.copy_(at::mm(G.t(), hr));
          } else if (gw_a.scalar_type() == dt) {
            gw_a.addmm_(G.t(), hr);
          } else {
            gw_a.add_(at::mm(G.t(), hr));
          }
        }
        if (need_b) {
          at::Tensor gbc = gb.narrow(0, c0, vc);
          if (r0 == 0) at::sum_out(gbc, G, 0, false, acc_dt);
          else gbc.add_(G.sum(0, false, acc_dt));
        }
      }
      if (gw_acc.defined()) gw.copy_(gw_a);
    }
  });
  if (need_h) {
    if (rows.defined()) {
      grad_hidden =
          at::zeros({N, D}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
      grad_hidden->index_copy_(0, rows, gh.to(dt));
    } else {
      grad_hidden = gh.to(dt);
    }
  }
  if (need_w) grad_weight_out = grad_weight;
  if (need_b) grad_bias = gb.to(dt);
  return {grad_hidden, grad_weight_out, grad_bias};
}

// Forward outputs and, in the same pass, the gradient of sum(grad_logprobs * logprobs): for
// callers that know the per-row weights up front (a mean loss), so the backward's recomputation
// of the logits is saved. Row blocks span the whole vocabulary (lse must be known before the
// softmax), sized to kFullRowElems logits: 3 matmuls in all, as with materialised logits.
LinearOutputsWithGrads linear_token_logprobs_with_grad_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, int64_t ignore_index,
    const at::Tensor& grad_logprobs, double scale, double softcap,
    std::array<bool, 3> output_mask) {
  using namespace cpu;
  constexpr const char* op = "linear_token_logprobs_with_grad";
  check_linear_args(op, hidden, weight, labels_in, bias_in);
  check_logit_map(op, scale, softcap);
  const int64_t N = hidden.size(0), V = weight.size(0), D = hidden.size(1);
  const at::Tensor labels_all = labels_in.contiguous();
  check_label_range(op, labels_all, V, ignore_index);
  const auto dt = hidden.scalar_type();
  const auto acc_dt = acc_dtype(dt);
  const at::Tensor g_all = check_row_vector(op, "grad_logprobs", grad_logprobs, N, hidden.device(),
                                            acc_dt);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? *bias_in : at::Tensor();
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  const bool any_grad = need_h || need_w || need_b;

  at::Tensor logprobs = at::zeros({N}, hidden.options().dtype(acc_dt));
  at::Tensor is_argmax = at::zeros({N}, hidden.options().dtype(at::kBool));
  at::Tensor lse = at::zeros({N}, hidden.options().dtype(acc_dt));
  const at::Tensor rows = valid_rows(labels_all, ignore_index);
  const at::Tensor h = rows.defined() ? hidden.index_select(0, rows) : hidden;
  const at::Tensor labels = rows.defined() ? labels_all.index_select(0, rows) : labels_all;
  at::Tensor g = g_all;
  if (rows.defined()) g = g.index_select(0, rows);
  const int64_t M = h.size(0);
  at::Tensor gh = need_h
                      ? at::empty({M, D}, h.options().memory_format(at::MemoryFormat::Contiguous))
                      : at::Tensor();
  // grad_weight / grad_bias accumulate over row blocks: fp32 accumulators for bf16.
  at::Tensor gw = need_w ? at::zeros({V, D}, weight.options()
                                                 .dtype(dt == at::kBFloat16 ? acc_dt : dt)
                                                 .memory_format(at::MemoryFormat::Contiguous))
                         : at::Tensor();
  at::Tensor gb = need_b ? at::zeros({V}, h.options().dtype(acc_dt)) : at::Tensor();
  at::Tensor lp_v = at::empty({M}, logprobs.options()), lse_v = at::empty({M}, lse.options());
  at::Tensor am_v = at::empty({M}, is_argmax.options());
  if (M > 0) {
    const int64_t RB = std::max<int64_t>(1, std::min(M, kFullRowElems / V));
    const at::Tensor flat = at::empty({RB * V}, h.options());
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "linear_token_logprobs_with_grad_cpu", [&] {
      using acc_t = typename StatsOf<scalar_t>::acc;
      const LogitMap<acc_t> lm{static_cast<acc_t>(scale), static_cast<acc_t>(softcap)};
      const acc_t* gp = g.const_data_ptr<acc_t>();
      acc_t* lp = lp_v.data_ptr<acc_t>();
      acc_t* ls = lse_v.data_ptr<acc_t>();
      bool* am = am_v.data_ptr<bool>();
      for (int64_t r0 = 0; r0 < M; r0 += RB) {
        const int64_t rb = std::min(RB, M - r0);
        const at::Tensor hr = h.narrow(0, r0, rb);
        at::Tensor G = chunk_logits(flat, hr, weight, bias);  // (rb, V)
        scalar_t* x = G.data_ptr<scalar_t>();
        at::parallel_for(0, rb, 1, [&](int64_t lo, int64_t hi) {
          std::vector<acc_t> z(lm.identity() ? 0 : V);  // mapped logits of one row
          for (int64_t k = lo; k < hi; ++k) {
            const int64_t i = r0 + k;
            scalar_t* row = x + k * V;
            if (lm.identity()) {
              score_row(row, V, lab[i], ls[i], lp[i], am[i]);
              if (any_grad) row_grad(row, row, V, ls[i], -gp[i], lab[i], gp[i]);
            } else {
              map_row(row, z.data(), V, lm);
              score_row(static_cast<const acc_t*>(z.data()), V, lab[i], ls[i], lp[i], am[i]);
              if (any_grad) row_grad_mapped(static_cast<const acc_t*>(z.data()), row, V, ls[i],
                                            -gp[i], lab[i], gp[i], lm);
            }
          }
        });
        if (need_h) {
          at::Tensor ghr = gh.narrow(0, r0, rb);
          at::mm_out(ghr, G, weight);
        }
        if (need_w) {
          if (gw.scalar_type() == dt) gw.addmm_(G.t(), hr);
          else gw.add_(at::mm(G.t(), hr));
        }
        if (need_b) gb.add_(G.sum(0, false, acc_dt));
      }
    });
  }
  std::optional<at::Tensor> grad_hidden, grad_weight, grad_bias;
  if (need_h) grad_hidden = gh;
  if (rows.defined()) {
    if (need_h) {
      grad_hidden =
          at::zeros({N, D}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
      grad_hidden->index_copy_(0, rows, gh);
    }
    logprobs.index_copy_(0, rows, lp_v);
    is_argmax.index_copy_(0, rows, am_v);
    lse.index_copy_(0, rows, lse_v);
  } else {
    logprobs = lp_v;
    is_argmax = am_v;
    lse = lse_v;
  }
  if (need_w) grad_weight = gw.to(dt);
  if (need_b) grad_bias = gb.to(dt);
  return {logprobs, is_argmax, lse, grad_hidden, grad_weight, grad_bias};
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("linear_token_logprobs", &pyfast::linear_token_logprobs_cpu);
  m.impl("linear_token_logprobs_backward", &pyfast::linear_token_logprobs_backward_cpu);
  m.impl("linear_token_logprobs_with_grad", &pyfast::linear_token_logprobs_with_grad_cpu);
}
