"""Build of the optional native parts; everything else is in pyproject.toml.

- ``vipsnorm._kernel``, the colour kernel (``vipsnorm._native``): without a C compiler the install goes
  on without it, and the methods run as chains of libvips operations, with the same results.
- ``vipsnorm._jpegtiles``, direct windows of JPEG-tiled slides (``vipsnorm.io.jpeg_tiles``): needs
  libjpeg-turbo's headers (Debian: ``libjpeg62-turbo-dev``); without them patches are read through
  libvips, with the same pixels.
"""

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
        ),
        Extension(
            "vipsnorm._jpegtiles",
            sources=["src/vipsnorm/_jpegtiles.c"],
            optional=True,
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
            libraries=["jpeg"],
        ),
    ]
)
