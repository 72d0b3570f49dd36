"""The build's one compiled part; everything else is in pyproject.toml.

models/packed/'s attention kernel for short rows: plain C called through ctypes (no
Python API), compiled at install. Where it cannot be (no C compiler), the install goes on
without it and the packed pass uses torch's operations instead; tests/test_packed.py fails
where the CPU could have run it and it was not built.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "models._packed_attention",
            sources=["models/_packed_attention.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
