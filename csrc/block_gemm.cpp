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

int64_t ceil_panels(int64_t rows, int64_t mr) { return (rows + mr - 1) / mr; }

// One scratch panel per thread; at::parallel_for tasks learn their thread from get_thread_num.
void run_spmm(const KernelTable& kt, const SpmmArgs& a, int64_t items, int64_t grain) {
  const int64_t panel = std::max<int64_t>(a.a_cols * kt.panel_rows, 1);
  at::Tensor ws = at::empty({at::get_num_threads(), panel}, at::kFloat);
  float* wp = ws.data_ptr<float>();
  at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
    kt.spmm(a, wp + at::get_thread_num() * panel, b, e);
  });
}

// a [rows][cols] -> [ceil(cols/w)][rows][w], zero-padded past cols: block column c of a with
// its rows contiguous.
at::Tensor pack_block_columns(const at::Tensor& a, int64_t w) {
  const int64_t rows = a.size(0), cols = a.size(1), C = (cols + w - 1) / w;
  at::Tensor out = at::empty({C, rows, w}, a.options());
  const float* src = a.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskCopies / std::max<int64_t>(rows * w, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t cv = std::min(w, cols - c * w);
      for (int64_t r = 0; r < rows; ++r) {
        const float* s = src + r * cols + c * w;
        float* d = dst + (c * rows + r) * w;
        std::copy(s, s + cv, d);
        std::fill(d + cv, d + w, 0.0f);
      }
    }
  });
  return out;
}

}  // namespace

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
  SpmmArgs a;
  a.a = x.data_ptr<float>();
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
  const int64_t items = ceil_panels(B, kt.panel_rows) * R;
  const double per_item = static_cast<double>(kt.panel_rows) * a.panel_stride *
                          static_cast<double>(wt.size(0)) /
                          static_cast<double>(std::max<int64_t>(R, 1));
  run_spmm(kt, a, items, grain_for(per_item));
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
  SpmmArgs a;
  a.a = g.data_ptr<float>();
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
  const int64_t items = ceil_panels(B, kt.panel_rows) * C;
  const double per_item = static_cast<double>(kt.panel_rows) * a.panel_stride *
                          static_cast<double>(values.size(0)) /
                          static_cast<double>(std::max<int64_t>(C, 1));
  run_spmm(kt, a, items, grain_for(per_item));
}

void backward_weight_sddmm(const KernelTable& kt, const at::Tensor& g, const at::Tensor& x,
                           const int64_t* block_row, const int64_t* block_col, int64_t nnzb,
                           int64_t bn, int64_t bk, at::Tensor& dv) {
  const at::Tensor gp = pack_block_columns(g, bn), xp = pack_block_columns(x, bk);
  SddmmArgs a;
  a.g = gp.data_ptr<float>();
  a.x = xp.data_ptr<float>();
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
