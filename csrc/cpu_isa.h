// Run-time choice of the kernels' instruction set.
//
// The best path the CPU supports is used unless ADSPARSE_CPU_ISA=avx512_bf16|avx512|avx2|scalar
// (or auto) says otherwise. avx512_bf16 is AVX-512 on a CPU with AVX512_BF16 as well: the same
// fp32 kernels, and the bf16 serving form's spmm on VDPBF16PS (avx512 widens bf16 to fp32). The variable is read on every call (getenv is cheap next to a kernel), so a
// test can switch paths inside one process. Forcing a path the CPU lacks does not crash: the
// best supported path below the requested one runs instead (selected_cpu_isa() reports which).
// An unknown value raises ValueError naming the variable.
#pragma once
#include <string>

#include "kernels.h"

namespace adsparse {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

Isa best_supported_isa();
Isa selected_isa();
const char* isa_name(Isa isa);
const KernelTable& kernels_for(Isa isa);
inline const KernelTable& selected_kernels() { return kernels_for(selected_isa()); }

// The int8 serving kernels of a path: AVX-512 needs VNNI as well (else the AVX2 int8 kernels
// run), so `ADSPARSE_CPU_ISA=avx512` on a CPU without VNNI falls back like any forced path.
bool cpu_has_avx512_vnni();
const QKernelTable& qkernels_for(Isa isa);
inline const QKernelTable& selected_qkernels() { return qkernels_for(selected_isa()); }

// The op adsparse::selected_int8_isa() -> str: "avx512_vnni", "avx2" or "scalar".
std::string selected_int8_isa_op();

// The op adsparse::selected_cpu_isa() -> str.
std::string selected_cpu_isa_op();

}  // namespace adsparse
