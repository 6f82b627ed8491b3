"""The Triton kernels of the ops (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Nothing here is imported until a Triton kernel is first called: importing
``triton`` fixes its interpreter mode for the life of the process (see
``mas_kernels._backend``). Each module holds the ``@triton.jit`` kernels of
one op family and a plain Python launcher with the op's signature:

* ``abs_outer``: the tiled ``|a|^T |b|`` of ``abs_outer_accumulate_``;
* ``multi_tensor``: ``abs_accumulate_`` and ``penalty_grad_`` over many
  tensors in one launch per dtype group, through the address tables of
  ``_table``.

float64: a call with a float64 tensor runs the op's PyTorch path (the same
formula in float64 arithmetic). The kernels here are built around float32
accumulation (tensor-core or FMA tiles, 128-bit accesses, the compile audit);
float64 serves float64 models and exactness tests, where the fused kernels'
speed buys nothing and a second family of fp64 kernels would have to be
tuned and audited for it.
"""
