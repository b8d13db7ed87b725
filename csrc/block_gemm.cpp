// Packing and parallel drivers shared by the block-sparse kernels (see block_gemm.h).
#include "block_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

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

// Temporaries of a call (packed activations and gradients, transposed blocks) run to several
// MB at training batch sizes. From at::empty each is a fresh mapping of glibc's malloc, faulted
// in page by page on first touch at every call; kept per calling thread and grown as needed,
// they are faulted in once. One slot per temporary that is alive at the same time as another.
enum ScratchSlot { kScratchFirst, kScratchSecond, kNumScratchSlots };

float* scratch_floats(ScratchSlot slot, int64_t n) {
  thread_local at::Tensor buffers[kNumScratchSlots];
  at::Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.numel() < n) buf = at::empty({std::max<int64_t>(n, 1)}, at::kFloat);
  return buf.data_ptr<float>();
}

// One scratch panel per thread; at::parallel_for tasks learn their thread from get_thread_num.
template <typename TW>
void run_spmm(const KernelTable& kt,
              void (*spmm)(const SpmmArgsT<TW>&, float*, int64_t, int64_t),
              const SpmmArgsT<TW>& a, int64_t items, int64_t grain) {
  const int64_t panel = std::max<int64_t>(
      spmm_ws_floats(a.a_cols, a.depth_block, kt.panel_rows, std::is_same<TW, bf16>::value), 1);
  at::Tensor ws = at::empty({at::get_num_threads(), panel}, at::kFloat);
  float* wp = ws.data_ptr<float>();
  at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
    spmm(a, wp + at::get_thread_num() * panel, b, e);
  });
}

// out [rows, out_cols] = act(A @ blocks + bias) over the CSR `offsets`/`idx` (ids: position of each
// stored block in `panel`, nullptr = identity), blocks of depth x width elements of type TW.
template <typename TW>
void run_block_product(const KernelTable& kt,
                       void (*spmm)(const SpmmArgsT<TW>&, float*, int64_t, int64_t),
                       const at::Tensor& A, const TW* panel, int64_t nnzb, int64_t depth,
                       int64_t width, const int64_t* offsets, const int64_t* idx,
                       const int64_t* ids, int64_t num_out_blocks, const float* bias, int relu,
                       at::Tensor& out) {
  SpmmArgsT<TW> a;
  a.a = A.data_ptr<float>();
  a.rows = A.size(0);
  a.a_cols = A.size(1);
  a.panel = panel;
  a.depth_block = depth;
  a.width_block = width;
  a.panel_stride = depth * width;
  a.ldp = width;
  a.offsets = offsets;
  a.idx = idx;
  a.ids = ids;
  a.num_out_blocks = num_out_blocks;
  a.bias = bias;
  a.relu = relu;
  a.out = out.data_ptr<float>();
  a.out_cols = out.size(1);
  const int64_t items = ceil_panels(a.rows, kt.panel_rows) * num_out_blocks;
  // A partial panel of bf16 blocks computes only its rows (the serving form's small batches).
  const int64_t panel_rows = std::is_same<TW, bf16>::value
                                 ? std::min<int64_t>(a.rows, kt.panel_rows) : kt.panel_rows;
  const double per_item = static_cast<double>(panel_rows) * a.panel_stride *
                          static_cast<double>(nnzb) /
                          static_cast<double>(std::max<int64_t>(num_out_blocks, 1));
  run_spmm(kt, spmm, a, items, grain_for(per_item));
}

// a [rows][cols] -> [ceil(cols/w)][rows][w], zero-padded past cols: block column c of a with
// its rows contiguous; in this thread's scratch `slot`, valid until the slot's next use.
const float* pack_block_columns(const at::Tensor& a, int64_t w, ScratchSlot slot) {
  const int64_t rows = a.size(0), cols = a.size(1), C = (cols + w - 1) / w;
  const float* src = a.data_ptr<float>();
  float* dst = scratch_floats(slot, C * rows * w);
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
  return dst;
}

}  // namespace

at::Tensor transpose_blocks(const KernelTable& kt, const at::Tensor& values) {
  const int64_t nnzb = values.size(0), bn = values.size(1), bk = values.size(2);
  // In this thread's scratch: the caller's product reads it before anything reuses the slot.
  float* dst = scratch_floats(kScratchFirst, nnzb * bk * bn);
  at::Tensor out = at::from_blob(dst, {nnzb, bk, bn}, values.options());
  const float* src = values.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskCopies / std::max<int64_t>(bn * bk, 1));
  at::parallel_for(0, nnzb, grain, [&](int64_t j0, int64_t j1) {
    kt.transpose_blocks(src, dst, bn, bk, j0, j1);
  });
  return out;
}

void forward_spmm(const KernelTable& kt, const at::Tensor& x, const at::Tensor& wt,
                  const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                  const float* bias, int relu, at::Tensor& y) {
  run_block_product(kt, kt.spmm, x, wt.data_ptr<float>(), wt.size(0), wt.size(1), wt.size(2),
                    row_offsets, col_indices, nullptr, R, bias, relu, y);
}

void forward_spmm_bf16(const KernelTable& kt, const at::Tensor& x, const at::Tensor& wt,
                       const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                       const float* bias, int relu, at::Tensor& y) {
  static_assert(sizeof(at::BFloat16) == sizeof(bf16), "bf16 must be at::BFloat16's layout");
  run_block_product(kt, kt.spmm_bf16, x,
                    reinterpret_cast<const bf16*>(wt.data_ptr<at::BFloat16>()), wt.size(0),
                    wt.size(1), wt.size(2), row_offsets, col_indices, nullptr, R, bias, relu, y);
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
  run_block_product(kt, kt.spmm, g, values.data_ptr<float>(), values.size(0), values.size(1),
                    values.size(2), t_offsets, t_rows, t_ids, C, nullptr, 0, dx);
}

void backward_weight_sddmm(const KernelTable& kt, const at::Tensor& g, const at::Tensor& x,
                           const int64_t* block_row, const int64_t* block_col, int64_t nnzb,
                           int64_t bn, int64_t bk, at::Tensor& dv) {
  SddmmArgs a;
  a.g = pack_block_columns(g, bn, kScratchFirst);
  a.x = pack_block_columns(x, bk, kScratchSecond);
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

void quantize_rows(const QKernelTable& qt, const at::Tensor& x, at::Tensor& qx, at::Tensor& sx) {
  const int64_t B = x.size(0), K = x.size(1);
  const float* src = x.data_ptr<float>();
  int8_t* q = qx.data_ptr<int8_t>();
  float* s = sx.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskCopies / std::max<int64_t>(K, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) s[b] = qt.quantize_row(src + b * K, K, q + b * K);
  });
}

void forward_int8(const QKernelTable& qt, const at::Tensor& x, const at::Tensor& w,
                  const float* sw, int64_t bn, int64_t bk, const int64_t* row_offsets,
                  const int64_t* col_indices, int64_t R, const float* bias, int relu,
                  at::Tensor& y) {
  QArgs a;
  a.x = x.data_ptr<float>();
  a.rows = x.size(0);
  a.K = x.size(1);
  // A panel row covers every group of the last block column (zero past K).
  const int64_t C = ceil_panels(a.K, bk);
  a.ldx = std::max<int64_t>(a.K, C == 0 ? 0 : (C - 1) * bk + w.size(1) * kQGroup);
  a.w = w.data_ptr<int8_t>();
  a.sw = sw;
  a.bn = bn;
  a.bk = bk;
  a.groups = w.size(1);
  a.bn16 = w.size(2);
  a.N = y.size(1);
  a.offsets = row_offsets;
  a.idx = col_indices;
  a.num_out_blocks = R;
  a.bias = bias;
  a.relu = relu;
  a.out = y.data_ptr<float>();
  const int64_t panels = ceil_panels(a.rows, qt.panel_rows);
  const int64_t ws_bytes = qspmm_ws_bytes(a.ldx, qt.panel_rows, qt.act_bytes);
  at::Tensor ws = at::empty({at::get_num_threads(), ws_bytes}, at::kByte);
  uint8_t* wp = ws.data_ptr<uint8_t>();
  const double per_item = static_cast<double>(qt.panel_rows) * a.bn16 * a.groups * kQGroup *
                          static_cast<double>(w.size(0)) /
                          static_cast<double>(std::max<int64_t>(R, 1));
  at::parallel_for(0, panels * R, grain_for(per_item), [&](int64_t b, int64_t e) {
    qt.qspmm(a, wp + at::get_thread_num() * ws_bytes, b, e);
  });
}

at::Tensor expand_rows(const int64_t* offsets, int64_t R, int64_t nnzb) {
  at::Tensor rows = at::empty({nnzb}, at::kLong);
  int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = offsets[i]; j < offsets[i + 1]; ++j) r[j] = i;
  return rows;
}

}  // namespace adsparse
