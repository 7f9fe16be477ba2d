"""A dispatch mode that records host syncs: how tests show a forward or training step is CUDA-graph capturable."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['HostSyncRecorder']


class HostSyncRecorder(TorchDispatchMode):
    """Records the ops that copy a tensor's value to the host: what .item(), bool(), float() and .tolist() run."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
               torch.ops.aten.equal.default}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.calls.append(func)
        return func(*args, **(kwargs or {}))
