"""The optional compiled helpers; everything else is in setup.cfg.

Each extension is ``optional``: a machine without a C compiler or Python headers gets
reprobuild without it, and the pure Python code does the same work (same bytes).
``scripts/setup.sh`` builds them in place. Add further hot loops as entries of
:data:`NATIVE_EXTENSIONS` (one C file each, next to the Python module that uses it).
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"]
NATIVE_EXTENSIONS = [
    Extension(module, [source], extra_compile_args=COMPILE_ARGS, libraries=libraries,
              optional=True)
    for module, source, libraries in (
        ("reprobuild.images._tarpack", "reprobuild/images/_tarpack.c", []),  # tar writer
        ("reprobuild.trees._tarscan", "reprobuild/trees/_tarscan.c", []),  # tar reader
        ("reprobuild.trees._dirscan", "reprobuild/trees/_dirscan.c", []),  # directory walk
        # squashfs gzip blocks; libz's header comes with python3-dev (zlib1g-dev)
        ("reprobuild.images.squashfs._blockpack", "reprobuild/images/squashfs/_blockpack.c",
         ["z"]),
    )
]

setup(ext_modules=NATIVE_EXTENSIONS)
