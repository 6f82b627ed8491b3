"""Programs that use ``mas_kernels`` the way a user would, with the dependencies a user would add.

* :mod:`examples.split_mnist` (with :mod:`examples.mnist_data`): the README's
  main job, continual learning on real MNIST digits, fine-tuning vs MAS
  (``make demo``, or ``python -m examples.split_mnist`` from the repository root).
* ``examples/ddp_mas.py``: MAS under DistributedDataParallel
  (``torchrun --nproc_per_node=2 examples/ddp_mas.py``).

A package (this file) so that the tests can import them; none of it is
installed with ``mas_kernels``.
"""
