"""The FLUX.1-Kontext inference service (see README.md). Importing the package first keeps Python's bytecode in the
compile cache directory where the interpreter would keep none (bytecode_cache.py): before any heavy import."""

from flux_kontext.bytecode_cache import keep_bytecode

keep_bytecode()
