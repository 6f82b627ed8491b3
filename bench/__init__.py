r"""The benchmarks: the ops against the peers' way and against the physical bound, side by side in one run.

``python -m bench [--quick] [--json PATH] [--plot PATH] [--txt PATH]`` from the
repository root (``make bench`` writes ``bench/results/cpu.{json,png,txt}``);
``pytest bench/`` times the same cases under pytest-benchmark. The benchmarks
are a user of ``mas_kernels``, not part of it, so they live outside the package:

* :mod:`bench.harness`: what a case is, how its implementations are timed
  (``measure``), the statistics (``summarize``, ``ratio``), the machine.
* :mod:`bench.cases`: the cases (inputs built once, implementations side by
  side) and ``plan``, the list the CLI runs.
* :mod:`bench.report`: the table, the JSON and the plot.
* :mod:`bench.__main__`: the command line.

Every case builds its inputs once, then times all its implementations in
interleaved rounds (round r runs them in a rotated order), so a machine whose
load changes during the run slows every implementation alike. Each row
reports the median time with the 20% and 80% quantiles, and two ratios of
times (lower is better):

* ``ratio_to_bound``: ``seconds / seconds of the bound``. Elementwise ops are
  bound by memory: the bound is ``Tensor.copy_`` of a buffer such that the copy
  reads and writes the same number of bytes as the op moves (penalty+grad in
  fp32: read p, anchor, Omega, grad, write grad = 20 bytes per element, so a
  copy reading 10 and writing 10 bytes per element). Matmul-like ops are
  bound by compute: the bound is the plain matmul (or plain convolution
  weight-gradient) of the same shape and dtype.
* ``ratio_to_baseline``: ``seconds / seconds of the baseline``, the way users
  do it today: the Avalanche-style loop for the penalty (a loss term per
  parameter, autograd for the gradient), ``omega.addmm_(|a|^T, |b|)`` for the
  importance, unfold+einsum for conv importance, the per-tensor PyTorch loop
  for ``abs_accumulate_``, the step without MAS for end-to-end rows
  (``(ratio - 1) * 100`` is the overhead in %).

The sections: penalty+grad over a ResNet-50-like parameter list (161 tensors,
25.6M elements, and the same list at 1/8..1/2 width for the throughput
curve), fp32 and bf16 parameters; ``abs_accumulate_`` over the same list;
``abs_outer_accumulate_`` (Linear importance) and the conv rule; end to end,
a training step of an MLP and a small CNN with and without the MAS penalty,
and inference with online local importance against plain inference.
``--quick`` runs smaller sizes and fewer rounds (well under a minute on two
cores) and skips ``torch.compile``.
"""
