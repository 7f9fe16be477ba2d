"""Dispatch modes that record the ops a call runs: how tests show a forward or training step is CUDA-graph capturable,
or that a backward launches no fills."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['OpRecorder', 'HostSyncRecorder']


class OpRecorder(TorchDispatchMode):
    """Records every aten op (overload) that runs under it, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class HostSyncRecorder(OpRecorder):
    """The ops that copy a tensor's value to the host: what .item(), bool(), float() and .tolist() run."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
               torch.ops.aten.equal.default}

    @property
    def calls(self):
        return [func for func in self.ops if func in self.SYNCING]
