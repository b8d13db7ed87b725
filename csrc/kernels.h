// The vector kernels' interface: plain structs of raw pointers and one table of function
// pointers per instruction set. The ISA translation units (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_scalar.cpp) include no ATen header, so code compiled for AVX-512 can never be merged
// by the linker into a function that an AVX2-only CPU runs (ODR across target flags).
// The drivers (bsr_linear.cpp, masked_linear.cpp) validate, allocate, pack and parallelise.
#pragma once
#include <algorithm>  // std::fill in qkernels_impl.h, which each ISA unit includes in a namespace
#include <cstdint>
#include <limits>

namespace adsparse {

// bfloat16 as the kernels see it: the upper 16 bits of a float32 (same layout as at::BFloat16,
// which the ISA units cannot include). Widening is a 16-bit shift, so every ISA can read it.
struct bf16 {
  uint16_t bits;
};

// out[b, c] for one block-column of out = act(sum over the stored blocks of that block-column of
// A[b, a_off : a_off + depth] @ panel_block + bias). Used by the forward (A = x, panel = W^T
// blocks [bk][bn], block-columns of out = block rows of W) and by the input gradient (A = dy,
// panel = W blocks [bn][bk] through the transposed index). TW is the element type of the packed
// blocks (float, or bf16 for the serving form: widened to float as they are loaded, or on
// AVX512_BF16 multiplied by k-pairs with A rounded to bf16; A is float and the accumulation fp32
// either way).
template <typename TW>
struct SpmmArgsT {
  const float* a;              // A [rows][a_cols]; each task packs its panels of MR rows itself
  int64_t rows;                // rows of A and out (the batch)
  int64_t a_cols;              // columns of A
  const TW* panel;             // packed blocks
  int64_t panel_stride;        // elements per block in `panel`
  int64_t ldp;                 // elements between consecutive depth rows of a block
  int64_t depth_block;         // block extent along A's columns
  int64_t width_block;         // block extent along out's columns
  const int64_t* offsets;      // CSR over out block-columns: [num_out_blocks + 1]
  const int64_t* idx;          // block index along A's columns, per stored block
  const int64_t* ids;          // position of each stored block in `panel` (nullptr = identity)
  int64_t num_out_blocks;      // block-columns of out
  const float* bias;           // [out_cols] or nullptr
  int relu;                    // 1: fuse max(0, .)
  float* out;                  // [rows][out_cols]
  int64_t out_cols;
};
using SpmmArgs = SpmmArgsT<float>;

// dv[j] = dy[:, rows(j)]^T @ x[:, cols(j)] for every stored block j (sampled dense-dense).
// dy and x come packed by block: the batch then streams sequentially through each block's
// operands (in [B][N] layout every batch row of a block is a new page, which the hardware
// prefetchers do not follow, and the kernel waits on L3 for each row).
struct SddmmArgs {
  const float* g;              // dy packed [ceil(N/bn)][B][bn], zero-padded past N
  const float* x;              // x packed [ceil(K/bk)][B][bk], zero-padded past K
  int64_t B, N, K, bn, bk;
  const int64_t* block_row;    // block row of each stored block
  const int64_t* block_col;    // block column of each stored block
  float* dv;                   // [nnzb][bn][bk]
};

// y[b, :] for small B: a block-sparse matrix-vector product reading blocks [bn][bk] in place.
struct GemvArgs {
  const float* x;              // [B][K]
  int64_t B, K, N, bn, bk;
  const float* values;         // [nnzb][bn][bk]
  const int64_t* offsets;      // row_offsets
  const int64_t* idx;          // col_indices
  const float* bias;           // [N] or nullptr
  int relu;
  float* y;                    // [B][N]
};

// out[b] = [bottom[b], <v_i, v_j> for every pair] of the vectors v_0 = bottom[b] and
// v_{f+1} = tables[f][ids[b, f]]: the DLRM's pairwise-dot interaction read straight from the
// embedding tables (no stacked [B, F+1, d] copy, no Gram matrix in memory). The driver checked
// every id and planned the tiles of the Gram matrix for the kernel's tile shape
// (KernelTable::interact_tile): each tile is its first row and column, then one output slot per
// entry in row-major order (-1: an entry no pair asks for).
constexpr int64_t kMaxInteractVectors = 1024;  // F + 1 at most (the kernel's pointer array)

struct InteractArgs {
  const float* bottom;         // [B][d]
  int64_t B, d, F;
  const float* const* tables;  // F table bases, each [rows_f][d]
  const int64_t* ids;          // [B][F], ids[b, f] < rows_f
  const int64_t* tiles;        // [ntiles][2 + rows * cols]
  int64_t ntiles;
  int64_t padded;              // vectors the tiles index (>= F + 1; the extra ones read bottom)
  const int64_t* repeats;      // [nrepeats][2]: (dst, src), a pair asked for again copies src
  int64_t nrepeats;
  int64_t P;
  float* out;                  // [B][d + P]
};

struct KernelTable {
  const char* name;
  int panel_rows;  // MR: rows of A per packed panel for spmm
  int interact_tile[2];  // rows x columns of the Gram-matrix tiles `interact` computes
  // Each runs items [begin, end): spmm items are (panel, out block-column) pairs, panel-major;
  // sddmm items are stored blocks; gemv items are block rows of W.
  // `ws` is the calling thread's scratch of a_cols * MR floats for one packed panel.
  void (*spmm)(const SpmmArgs&, float* ws, int64_t begin, int64_t end);
  // The same product over bf16 blocks (the serving form; the same body, another instantiation).
  void (*spmm_bf16)(const SpmmArgsT<bf16>&, float* ws, int64_t begin, int64_t end);
  void (*sddmm)(const SddmmArgs&, int64_t begin, int64_t end);
  void (*gemv)(const GemvArgs&, int64_t begin, int64_t end);
  // Blocks [begin, end) of src [nnzb][bn][bk] -> dst [nnzb][bk][bn].
  void (*transpose_blocks)(const float* src, float* dst, int64_t bn, int64_t bk, int64_t begin,
                           int64_t end);
  // Rows [begin, end) of the interaction.
  void (*interact)(const InteractArgs&, int64_t begin, int64_t end);
};

const KernelTable& kernels_scalar();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
// AVX-512 with AVX512_BF16: the AVX-512 kernels, and spmm_bf16 on VDPBF16PS (k-pairs).
const KernelTable& kernels_avx512_bf16();

// Floats of one thread's spmm scratch: the packed panel (a_cols x MR floats) and, for bf16
// blocks, room for the same panel as bf16 k-pairs per block column (ceil(depth / 2) pairs of
// each, 32 bits a pair: the panel of the VDPBF16PS kernel; unused by the widening kernels).
inline int64_t spmm_ws_floats(int64_t a_cols, int64_t depth, int64_t mr, bool bf16_blocks) {
  const int64_t cols = depth > 0 ? (a_cols + depth - 1) / depth : 0;
  return a_cols * mr + (bf16_blocks ? cols * ((depth + 1) / 2) * mr : 0);
}

// ---------------------------------------------------------------- int8 serving form
// Weights of an int8 block-sparse layer, packed once when the layer is quantized:
// [nnzb][ceil(bk/4)][bn16][4] int8, where bn16 = bn rounded up to 16 (zero columns) and each
// group of 4 consecutive k of a column is contiguous (the operand layout of VPDPBUSD, and of
// VPMADDWD after widening to int16). Padding (k >= bk, columns >= bn) is zero.
constexpr int64_t kQGroup = 4;    // k per group
constexpr int64_t kQColPad = 16;  // columns rounded up to this

// Rows whose largest magnitude is below this quantize to zero (scale 0): 127 / amax would
// overflow fp32 below ~3.7e-37, and such a row adds at most K * 1e-30 * max|W| to the output.
constexpr float kQuantTinyRow = 1e-30f;

// y[b, n] = act(sx[b] * sw[n] * sum_k qx[b, k] * qw[n, k] + bias[n]), int32 accumulation, where
// qx[b] = round(x[b] * 127 / max|x[b]|) and sx[b] = max|x[b]| / 127: each task quantizes the rows
// of its panels as it packs them (QKernelTable::quantize_row), so no quantized copy of x is
// allocated or written (at B = 2048, K = 1024: 2 MB, freshly mapped pages at every call).
struct QArgs {
  const float* x;              // fp32 activations [rows][K]
  int64_t rows, K;
  int64_t ldx;                 // row length of a packed panel: >= K, covers every block's groups
  const int8_t* w;             // packed weights (layout above)
  const float* sw;             // [N] weight scale of each output channel
  int64_t bn, bk, bn16, groups;  // groups = ceil(bk / 4)
  int64_t N;
  const int64_t* offsets;      // row_offsets [R + 1]
  const int64_t* idx;          // col_indices [nnzb]
  int64_t num_out_blocks;      // R
  const float* bias;           // [N] or nullptr
  int relu;
  float* out;                  // [rows][N]
};

// One thread's qspmm scratch: the panel [mr][ldx] of activations (act_bytes each), from byte
// 0; the panel's row scales [mr] (fp32) from qspmm_panel_bytes, rounded up to 4 bytes; one
// quantized row [ldx] (int8) after them. The whole is rounded up to cache lines, so the threads'
// scratches stay aligned and apart.
inline int64_t qspmm_panel_bytes(int64_t ldx, int64_t mr, int64_t act_bytes) {
  return (mr * ldx * act_bytes + 3) / 4 * 4;
}
inline int64_t qspmm_ws_bytes(int64_t ldx, int64_t mr, int64_t act_bytes) {
  return (qspmm_panel_bytes(ldx, mr, act_bytes) + mr * 4 + ldx + 63) / 64 * 64;
}

struct QKernelTable {
  const char* name;
  int panel_rows;         // MR: rows of x per panel
  int act_bytes;          // bytes per activation in the per-thread panel (int16 or uint8)
  // Items [begin, end) are (panel, block row) pairs, panel-major; `ws` is the calling thread's
  // scratch of qspmm_ws_bytes(ldx, panel_rows, act_bytes) bytes.
  void (*qspmm)(const QArgs&, void* ws, int64_t begin, int64_t end);
  // One row's symmetric quantization: q[k] = round_half_even(x[k] * (127 / amax)), amax =
  // max|x[k]|, the multiply rounded to fp32 first (never fused), so every ISA gives the same
  // bytes; returns the scale amax / 127. A row below kQuantTinyRow gets scale 0 and zeros, a
  // row holding inf or NaN scale NaN (its outputs are NaN) and zeros.
  float (*quantize_row)(const float* x, int64_t n, int8_t* q);
};

const QKernelTable& qkernels_scalar();
const QKernelTable& qkernels_avx2();
const QKernelTable& qkernels_avx512_vnni();

}  // namespace adsparse
