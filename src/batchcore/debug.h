/* Compile-time switch for internal invariant checks (STYLE rule 11).
   setup.py defines BATCHCORE_DEBUG=1 when the environment asks for it. */
#ifndef BATCHCORE_DEBUG
#define BATCHCORE_DEBUG 0
#endif
