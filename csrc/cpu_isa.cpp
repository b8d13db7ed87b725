// CPU feature detection and the ADSPARSE_CPU_ISA override (see cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>

namespace adsparse {

Isa best_supported_isa() {
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  static const Isa best = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma")) {
      return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return best;
}

Isa selected_isa() {
  const Isa best = best_supported_isa();
  const char* env = std::getenv("ADSPARSE_CPU_ISA");
  if (env == nullptr) return best;
  std::string value(env);
  for (char& c : value) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  Isa want;
  if (value.empty() || value == "auto") {
    return best;
  } else if (value == "avx512_bf16") {
    want = Isa::kAvx512Bf16;
  } else if (value == "avx512") {
    want = Isa::kAvx512;
  } else if (value == "avx2") {
    want = Isa::kAvx2;
  } else if (value == "scalar") {
    want = Isa::kScalar;
  } else {
    TORCH_CHECK_VALUE(false, "ADSPARSE_CPU_ISA must be one of avx512_bf16, avx512, avx2, scalar or auto, got '",
                      env, "'");
  }
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

const KernelTable& kernels_for(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512Bf16) return kernels_avx512_bf16();
  if (isa == Isa::kAvx512) return kernels_avx512();
  if (isa == Isa::kAvx2) return kernels_avx2();
#endif
  return kernels_scalar();
}

std::string selected_cpu_isa_op() { return isa_name(selected_isa()); }

bool cpu_has_avx512_vnni() {
  static const bool has = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return best_supported_isa() >= Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
  }();
  return has;
}

const QKernelTable& qkernels_for(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa >= Isa::kAvx512 && cpu_has_avx512_vnni()) return qkernels_avx512_vnni();
  if (isa >= Isa::kAvx2) return qkernels_avx2();
#endif
  return qkernels_scalar();
}

std::string selected_int8_isa_op() { return selected_qkernels().name; }

}  // namespace adsparse
