// token_logprobs (CPU): per-token log p(label), is-argmax flag and logsumexp from logits, and the
// matching backward.
//
//   lse_i      = log sum_j exp(x_ij)                       (online max / sum-exp, fp32 accumulate)
//   logprob_i  = x_i,label_i - lse_i ;  is_argmax_i = (label_i == first argmax_j x_ij)
//   backward:  dx_ij = g_i * (onehot_ij - p_ij) + h_i * p_ij,  p_ij = exp(x_ij - lse_i)
//              (g: grad of logprob, h: grad of lse; softmax recomputed, never stored)
// Rows whose label is ignore_index give logprob 0, is_argmax false, lse 0 and zero gradient.
//
// Bytes per element: forward reads each logit once (4 B fp32 / 2 B bf16) and writes 12-16 B per
// *row*; backward reads x once and writes dx once. log_softmax + gather + argmax moves a full
// (N, V) fp32 intermediate (write + two reads) and reads x twice more; cross_entropy still writes
// and rereads the log-softmax. Fused, the op runs at about the speed of one read of the logits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../logprob_checks.h"
#include "logprob_row.h"

namespace pyfast {

namespace {

constexpr const char* kFwd = "token_logprobs";
constexpr const char* kBwd = "token_logprobs_backward";

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits_in,
                                                                  const at::Tensor& labels_in,
                                                                  int64_t ignore_index) {
  using namespace cpu;
  const at::Tensor logits = check_logits_labels(kFwd, logits_in, labels_in);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  check_label_range(kFwd, labels, V, ignore_index);
  const auto acc_dt = acc_dtype(logits.scalar_type());
  at::Tensor logprobs = at::empty({N}, logits.options().dtype(acc_dt));
  at::Tensor is_argmax = at::empty({N}, logits.options().dtype(at::kBool));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc_dt));
  if (N == 0) return {logprobs, is_argmax, lse};
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  bool* am = is_argmax.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "token_logprobs_cpu", [&] {
    using acc_t = typename StatsOf<scalar_t>::acc;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* lp = logprobs.data_ptr<acc_t>();
    acc_t* ls = lse.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (lab[i] == ignore_index) {
          lp[i] = 0;
          ls[i] = 0;
          am[i] = false;
          continue;
        }
        const scalar_t* row = x + i * ld;
        score_row(row, V, lab[i], ls[i], lp[i], am[i]);
      }
    });
  });
  return {logprobs, is_argmax, lse};
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logprobs,
                                       const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& logits_in, const at::Tensor& labels_in,
                                       const at::Tensor& lse_in, int64_t ignore_index) {
  using namespace cpu;
  const at::Tensor logits = check_logits_labels(kBwd, logits_in, labels_in);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  check_label_range(kBwd, labels, V, ignore_index);
  const auto acc_dt = acc_dtype(logits.scalar_type());
  auto check_row_vec = [&](const char* arg, const at::Tensor& t) {
    return check_row_vector(kBwd, arg, t, N, logits.device(), acc_dt);
  };
  const at::Tensor g = check_row_vec("grad_logprobs", grad_logprobs);
  const at::Tensor lse = check_row_vec("lse", lse_in);
  const bool has_h = grad_lse.has_value() && grad_lse->defined();
  const at::Tensor h = has_h ? check_row_vec("grad_lse", *grad_lse) : at::Tensor();
  at::Tensor grad = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad;
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    using acc_t = typename StatsOf<scalar_t>::acc;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* hp = has_h ? h.const_data_ptr<acc_t>() : nullptr;
    const acc_t* lp = lse.const_data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* out = gx + i * V;
        if (lab[i] == ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        const acc_t a = gp[i];
        const acc_t coef = (hp ? hp[i] : acc_t(0)) - a;
        row_grad(x + i * ld, out, V, lp[i], coef, lab[i], a);
      }
    });
  });
  return grad;
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("token_logprobs", &pyfast::token_logprobs_cpu);
  m.impl("token_logprobs_backward", &pyfast::token_logprobs_backward_cpu);
}
