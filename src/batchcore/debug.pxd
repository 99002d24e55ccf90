# Exposes the compile-time switches of debug.h to Cython.
cdef extern from "debug.h":
    bint BATCHCORE_DEBUG
    const char *BATCHCORE_FLAVOUR
