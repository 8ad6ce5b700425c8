"""NCCL's device rule on a CPU machine, for the processes of a test run (PYTHONPATH=tests/nccl_emulation).

NCCL serves CUDA tensors only: a collective on a CPU tensor fails with "No backend type associated with device
type cpu", so a GPU run stops where a CPU test with gloo passes. Here every process group the scripts create with
gloo is made instead with a backend that, like NCCL, serves one device type that is not the CPU: torch's "lazy"
device, which computes on the CPU. Its collectives refuse tensors of any other device with NCCL's message and run
the others through gloo on copies. DistributedDataParallel keeps a plain gloo group: it communicates on the model's
device, which in a real run is the GPU NCCL serves, and torch is not under test.
"""
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions, AllreduceOptions, BarrierOptions, ReduceOp

DEVICE = "lazy"
_real_init = dist.init_process_group
_ddp_group = []


class _Done(dist._Work):
    def __init__(self, result):
        super().__init__()
        self.future = torch.futures.Future()
        self.future.set_result(result)

    def wait(self, timeout=None):
        return True

    def get_future(self):
        return self.future


class LazyOnlyGroup(dist.ProcessGroup):
    """A process group that serves tensors of the lazy device alone, as NCCL serves CUDA tensors alone."""

    def __init__(self, gloo, rank, world_size):
        super().__init__(rank, world_size)
        self.gloo = gloo

    def getBackendName(self):
        return "lazyonly"

    @staticmethod
    def _check(tensors):
        for t in tensors:
            if t.device.type != DEVICE:
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")

    def allreduce(self, tensors, opts=AllreduceOptions()):
        self._check(tensors)
        assert opts.reduceOp == ReduceOp.SUM, "only sums are emulated"
        for t in tensors:
            host = t.cpu()
            self.gloo.allreduce([host]).wait()
            t.copy_(host)
        return _Done(tensors)

    def allgather(self, output_lists, tensors, opts=AllgatherOptions()):
        self._check(tensors)
        for outputs in output_lists:
            self._check(outputs)
        hosts = [[o.cpu() for o in outputs] for outputs in output_lists]
        self.gloo.allgather(hosts, [t.cpu() for t in tensors]).wait()
        for outputs, host in zip(output_lists, hosts):
            for o, h in zip(outputs, host):
                o.copy_(h)
        return _Done(output_lists)

    def barrier(self, opts=BarrierOptions()):
        self.gloo.barrier().wait()
        return _Done([])


def _create(store, rank, world_size, timeout):
    import torch._lazy.ts_backend
    torch._lazy.ts_backend.init()
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("lazyonly", store), rank, world_size, timeout)
    return LazyOnlyGroup(gloo, rank, world_size)


dist.Backend.register_backend("lazyonly", _create, devices=[DEVICE])


def _init_process_group(backend=None, *args, **kwargs):
    if backend == "gloo":
        backend = f"{DEVICE}:lazyonly"
        print("nccl emulation: the process group serves lazy tensors only", flush=True)
    _real_init(backend, *args, **kwargs)
    _ddp_group.append(dist.new_group(backend="gloo"))


dist.init_process_group = _init_process_group
_real_ddp_init = torch.nn.parallel.DistributedDataParallel.__init__


def _ddp_init(self, module, *args, process_group=None, **kwargs):
    _real_ddp_init(self, module, *args, process_group=process_group or _ddp_group[-1], **kwargs)


torch.nn.parallel.DistributedDataParallel.__init__ = _ddp_init
