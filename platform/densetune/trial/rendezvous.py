"""torch.distributed's rendezvous for a trial's Ray Train workers, its store listening on one address only.

Ray Train's own setup (TorchConfig) has rank 0 start torch's TCPStore, whose server listens on every interface of the
machine: on a laptop, a port open to the network for as long as a trial runs. Here rank 0 binds the store's socket to
the address Ray Train would name as the master (the node's address: 127.0.0.1 under the local Ray a study starts, the
node's own address on a cluster, where the other nodes' workers must reach it) and hands the bound socket to the store
(`master_listen_fd`); the other ranks connect to it, and every rank joins the process group on that store.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

# rank 0's listening socket: bound in one call to the worker, served by the store from the next, and held here for the
# worker's life, since the socket object closes its descriptor when it is collected
_listening: Optional[socket.socket] = None


class BoundTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store listens on the master's address only."""

    @property
    def backend_cls(self) -> type:
        return _BoundBackend


class _BoundBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        if worker_group.get_resources_per_worker().get("GPU", 0) > 0:
            ray.get(worker_group.execute_async(require_cuda))
        address, port = worker_group.execute_single(0, bind_store_socket)
        ray.get([
            worker_group.execute_single_async(
                rank, join_process_group, backend=backend_config.backend, world_rank=rank, world_size=len(worker_group),
                address=address, port=port, timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])


def require_cuda() -> None:
    """On a worker that was given GPUs: fail at once, in one line, where torch finds none (a CPU build of torch, a
    driver that does not match it), rather than in NCCL's set-up, or by training on the CPU."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the trial asks for GPUs, but torch on its worker's node ({ray.util.get_node_ip_address()}) sees none "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}): install a CUDA build of torch on the GPU nodes, "
            "or train on CPUs (--no-use-gpu)"
        )


def bind_store_socket() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's address and a free port, kept for the store."""
    global _listening
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    _listening = socket.socket(family, socket.SOCK_STREAM)
    _listening.bind((address, 0))
    _listening.listen(128)
    return address, _listening.getsockname()[1]


def join_process_group(
    backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: float
) -> None:
    """Rank 0 serves the store on the socket bind_store_socket left; every rank joins the process group through it."""
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(address, port, world_size, True, timeout, master_listen_fd=_listening.fileno())
    else:
        store = dist.TCPStore(address, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)
