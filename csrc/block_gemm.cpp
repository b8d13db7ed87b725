// Packing and parallel drivers shared by the block-sparse kernels (see block_gemm.h).
#include "block_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace adsparse {
namespace {

// Smallest task worth a thread: about 3 us of FMAs on one core. Below it the fork/join of a
// parallel region (and, on a busy machine, waiting for the second thread) costs more than it
// saves; a B=1 product at density 0.1 then runs on one thread.
constexpr double kMinTaskFmas = 131072.0;
constexpr int64_t kMinTaskCopies = 32768;

int64_t grain_for(double fmas_per_item) {
  if (fmas_per_item <= 0) return 1 << 30;
  return std::max<int64_t>(1, static_cast<int64_t>(kMinTaskFmas / fmas_per_item));
}

}  // namespace

at::Tensor pack_panels(const KernelTable& kt, const at::Tensor& a) {
  const int64_t rows = a.size(0), cols = a.size(1), mr = kt.panel_rows;
  const int64_t P = (rows + mr - 1) / mr;
  at::Tensor out = at::empty({P, cols, mr}, a.options());
  const float* src = a.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskCopies / std::max<int64_t>(1, mr * cols));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    kt.pack_panels(src, rows, cols, dst, p0, p1);
  });
  return out;
}

at::Tensor transpose_blocks(const KernelTable& kt, const at::Tensor& values) {
  const int64_t nnzb = values.size(0), bn = values.size(1), bk = values.size(2);
  at::Tensor out = at::empty({nnzb, bk, bn}, values.options());
  const float* src = values.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskCopies / std::max<int64_t>(bn * bk, 1));
  at::parallel_for(0, nnzb, grain, [&](int64_t j0, int64_t j1) {
    kt.transpose_blocks(src, dst, bn, bk, j0, j1);
  });
  return out;
}

void forward_spmm(const KernelTable& kt, const at::Tensor& x, const at::Tensor& wt,
                  const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                  const float* bias, int relu, at::Tensor& y) {
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor xp = pack_panels(kt, x);
  SpmmArgs a;
  a.ap = xp.data_ptr<float>();
  a.rows = B;
  a.a_cols = K;
  a.panel = wt.data_ptr<float>();
  a.depth_block = wt.size(1);
  a.width_block = wt.size(2);
  a.panel_stride = a.depth_block * a.width_block;
  a.ldp = a.width_block;
  a.offsets = row_offsets;
  a.idx = col_indices;
  a.ids = nullptr;
  a.num_out_blocks = R;
  a.bias = bias;
  a.relu = relu;
  a.out = y.data_ptr<float>();
  a.out_cols = y.size(1);
  const int64_t items = xp.size(0) * R;
  const double per_item = static_cast<double>(kt.panel_rows) * a.panel_stride *
                          static_cast<double>(wt.size(0)) /
                          static_cast<double>(std::max<int64_t>(R, 1));
  at::parallel_for(0, items, grain_for(per_item), [&](int64_t b, int64_t e) { kt.spmm(a, b, e); });
}

void forward_gemv(const KernelTable& kt, const at::Tensor& x, const at::Tensor& values,
                  const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                  const float* bias, int relu, at::Tensor& y) {
  GemvArgs a;
  a.x = x.data_ptr<float>();
  a.B = x.size(0);
  a.K = x.size(1);
  a.N = y.size(1);
  a.bn = values.size(1);
  a.bk = values.size(2);
  a.values = values.data_ptr<float>();
  a.offsets = row_offsets;
  a.idx = col_indices;
  a.bias = bias;
  a.relu = relu;
  a.y = y.data_ptr<float>();
  const double per_row = static_cast<double>(a.B) * a.bn * a.bk *
                         static_cast<double>(values.size(0)) /
                         static_cast<double>(std::max<int64_t>(R, 1));
  at::parallel_for(0, R, grain_for(per_row), [&](int64_t b, int64_t e) { kt.gemv(a, b, e); });
}

void backward_input_spmm(const KernelTable& kt, const at::Tensor& g, const at::Tensor& values,
                         const int64_t* t_offsets, const int64_t* t_rows, const int64_t* t_ids,
                         int64_t C, at::Tensor& dx) {
  const int64_t B = g.size(0), N = g.size(1);
  at::Tensor gp = pack_panels(kt, g);
  SpmmArgs a;
  a.ap = gp.data_ptr<float>();
  a.rows = B;
  a.a_cols = N;
  a.panel = values.data_ptr<float>();
  a.depth_block = values.size(1);
  a.width_block = values.size(2);
  a.panel_stride = a.depth_block * a.width_block;
  a.ldp = a.width_block;
  a.offsets = t_offsets;
  a.idx = t_rows;
  a.ids = t_ids;
  a.num_out_blocks = C;
  a.bias = nullptr;
  a.relu = 0;
  a.out = dx.data_ptr<float>();
  a.out_cols = dx.size(1);
  const int64_t items = gp.size(0) * C;
  const double per_item = static_cast<double>(kt.panel_rows) * a.panel_stride *
                          static_cast<double>(values.size(0)) /
                          static_cast<double>(std::max<int64_t>(C, 1));
  at::parallel_for(0, items, grain_for(per_item), [&](int64_t b, int64_t e) { kt.spmm(a, b, e); });
}

void backward_weight_sddmm(const KernelTable& kt, const at::Tensor& g, const at::Tensor& x,
                           const int64_t* block_row, const int64_t* block_col, int64_t nnzb,
                           int64_t bn, int64_t bk, at::Tensor& dv) {
  SddmmArgs a;
  a.g = g.data_ptr<float>();
  a.x = x.data_ptr<float>();
  a.B = g.size(0);
  a.N = g.size(1);
  a.K = x.size(1);
  a.bn = bn;
  a.bk = bk;
  a.block_row = block_row;
  a.block_col = block_col;
  a.dv = dv.data_ptr<float>();
  at::parallel_for(0, nnzb, grain_for(static_cast<double>(a.B) * bn * bk),
                   [&](int64_t b, int64_t e) { kt.sddmm(a, b, e); });
}

at::Tensor expand_rows(const int64_t* offsets, int64_t R, int64_t nnzb) {
  at::Tensor rows = at::empty({nnzb}, at::kLong);
  int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = offsets[i]; j < offsets[i + 1]; ++j) r[j] = i;
  return rows;
}

}  // namespace adsparse
