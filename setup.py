"""The optional compiled helpers; everything else is in setup.cfg.

Each extension is ``optional``: a machine without a C compiler or Python headers gets
reprobuild without it, and the pure Python code does the same work (same bytes).
``scripts/setup.sh`` builds them in place. Add further hot loops as entries of
:data:`NATIVE_EXTENSIONS` (one C file each, next to the Python module that uses it).
"""

from setuptools import Extension, setup

NATIVE_EXTENSIONS = [
    Extension("reprobuild.images._tarpack", ["reprobuild/images/_tarpack.c"],
              extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
              optional=True),
]

setup(ext_modules=NATIVE_EXTENSIONS)
