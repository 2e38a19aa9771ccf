"""The device of a process and accelerate's Accelerator, shared by training and extraction."""

from __future__ import annotations

import os

import torch

from pipeline.errors import GenddError


def train_device(cpu: bool) -> torch.device:
    """The device a training process will use (before accelerate is set up): its local GPU, else the CPU."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def make_accelerator(mixed_precision: str, cpu: bool, **kwargs: object):
    """accelerate's Accelerator, its refusals (e.g. fp16 without a GPU) as one line that names the fix."""
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)
    except (ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GenddError(f"accelerate refused --mixed-precision {mixed_precision} (cpu={cpu}): {first}") from err


def pin_cpu_threads(threads: int) -> None:
    """Run torch, BLAS and OpenMP on `threads` CPU threads (0: the libraries' own defaults, usually every core).
    Float sums on the CPU depend on the thread count, so a pinned count makes a CPU run's weights and metrics the
    same on every machine and in every shell."""
    if threads <= 0:
        return
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # for libraries loaded later (scikit-learn's OpenMP) and subprocesses
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # the BLAS and OpenMP libraries loaded by now (numpy's)
