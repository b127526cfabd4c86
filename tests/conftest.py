"""Shared test settings.

One torch thread: the models in tests are tiny, and on a small shared machine a second thread
costs far more in synchronisation than it gains (measured: a tiny matmul 10 ms with 2 threads,
0.1 ms with 1, on the 2-core CI machine under load).
"""

import torch

torch.set_num_threads(1)
