# The C declarations of the compiled core, batched_fn._batchcore (its Python
# types are in _batchcore.pyi): the .pxd of its parts in src/batchcore, in the
# floor order of src/batchcore/_batchcore.pyx.  It sits here, in the package
# directory, because that is where Cython looks for the .pxd of a module named
# batched_fn._batchcore; setup.py puts src/batchcore on the include path.
include "_errors.pxd"
include "_request.pxd"
include "_aio.pxd"
include "_delivery.pxd"
include "_deadlines.pxd"
include "_scheduler.pxd"
include "_keys.pxd"
include "_admission.pxd"
