"""Build of the optional native colour kernel (``vipsnorm._native``); everything else is in
pyproject.toml. Without a C compiler the install goes on without the kernel, and the methods run as
chains of libvips operations, with the same results."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vipsnorm._kernel",
            sources=["src/vipsnorm/_kernel.c"],
            optional=True,
            # IEEE arithmetic step for step, as libvips' operations do it (no fused multiply-adds)
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            libraries=["m"],
        )
    ]
)
