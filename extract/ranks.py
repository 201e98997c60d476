"""The processes of one extraction job, from accelerate: one process when launched plainly, N under
`accelerate launch` (or torchrun / SLURM with accelerate's environment). Everything here is trivial in
a single process, so the extraction code has no `if distributed:` branches."""

from __future__ import annotations

import os
from functools import cached_property

# A launcher (accelerate launch, torchrun, mpirun) announces itself with these; without any, this is
# a plain single process, known without importing torch and accelerate (a cache hit needs neither).
LAUNCHER_VARIABLES = (
    "WORLD_SIZE",
    "LOCAL_RANK",
    "RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "MV2_COMM_WORLD_SIZE",
)
# `accelerate launch` (any backend, TPUs included) and SageMaker set variables with these prefixes:
# there, accelerate itself says how many processes there are.
LAUNCHER_PREFIXES = ("ACCELERATE_", "SM_", "XRT_", "PJRT_")


def process_group_backend(gpus: int, local_processes: int) -> str | None:
    """The backend the job's processes talk over; None: accelerate's choice (NCCL on GPUs, gloo on
    CPUs). NCCL refuses two ranks on one GPU, so processes that share GPUs (more of them on a node
    than GPUs, e.g. `accelerate launch --num_processes 2` on one card; accelerate then gives rank i
    GPU i mod the count) use gloo: ranks here exchange only small Python objects (the plan, the
    counts), never tensors, so gloo costs nothing."""
    return "gloo" if 0 < gpus < local_processes else None


class Ranks:
    @cached_property
    def _state(self):
        import torch
        from accelerate import PartialState

        gpus = torch.cuda.device_count()  # 0 without CUDA
        # torchrun (under accelerate launch) says how many processes share this node.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        backend = process_group_backend(gpus, local)
        # cpu=True lets CPU-only processes form a gloo group (accelerate's MULTI_CPU).
        return PartialState(cpu=not gpus, **({"backend": backend} if backend else {}))

    @cached_property
    def _alone(self) -> bool:
        return not any(
            name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES) for name in os.environ
        )

    @property
    def count(self) -> int:
        return 1 if self._alone else self._state.num_processes

    @property
    def index(self) -> int:
        return 0 if self._alone else self._state.process_index

    @property
    def is_main(self) -> bool:
        return self._alone or self._state.is_main_process

    @property
    def is_local_main(self) -> bool:
        return self._alone or self._state.is_local_main_process

    @property
    def device(self) -> str:
        return str(self._state.device)  # this process's GPU under a launcher, else cuda or cpu

    def barrier(self) -> None:
        if self.count == 1:
            return
        if self._state.backend == "gloo" and self._state.device.type == "cuda":
            import torch.distributed

            # accelerate's barrier names this rank's GPU by its local index, a GPU that does not
            # exist where ranks share GPUs; gloo's barrier needs none.
            torch.distributed.barrier()
        else:
            self._state.wait_for_everyone()

    def broadcast(self, obj):
        """The main process's `obj` on every process."""
        if self.count == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.count == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])
