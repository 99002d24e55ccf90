/* Compile-time switches.  setup.py defines them from the
   environment: BATCHCORE_DEBUG=1 turns on internal invariant checks, and
   BATCHCORE_FLAVOUR names the build ("release", "debug", "asan", "tsan"). */
#ifndef BATCHCORE_DEBUG
#define BATCHCORE_DEBUG 0
#endif
#ifndef BATCHCORE_FLAVOUR
#define BATCHCORE_FLAVOUR "release"
#endif
