# Exposes the compile-time debug switch of debug.h to Cython.
cdef extern from "debug.h":
    bint BATCHCORE_DEBUG
