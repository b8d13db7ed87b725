"""Triton kernels of the adsparse ops (the CUDA backend; CPU tensors via TRITON_INTERPRET=1).

Each public function has exactly the signature of the op schema of the same name in
csrc/registration.cpp, so python/adsparse/ops.py registers it as that op's kernel.
"""
