"""The benchmark scripts. Installed as ``adsparse.benchmarks`` (setup.py maps this folder), so
``adsparse bench kernels|serving|quality`` works from a wheel as from a checkout; each script
still runs on its own: ``python benchmarks/bench_kernels.py``."""
