// AVX-512 kernels (16 floats per vector). Compiled for this target by the pragma below, not by
// -march flags, so the library still loads on CPUs without AVX-512; cpu_isa.cpp only calls this
// table after checking the CPU's features.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2")
// GCC 12's avx512fintrin.h builds several intrinsics on `__m512 __Y = __Y;` (an intentionally
// undefined pass-through operand), which -W(maybe-)uninitialized reports at every inlined use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace adsparse {
namespace {

#include "vec_avx512.h"

using Vec = VecAvx512;
constexpr const char* kIsaName = "avx512";

#include "kernels_impl.h"

}  // namespace

const KernelTable& kernels_avx512() { return kTable; }

}  // namespace adsparse
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // x86
