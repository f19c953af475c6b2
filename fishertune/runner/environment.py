"""What a result records about where it was computed: git state, package versions, device."""

from __future__ import annotations

import platform
import subprocess
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("fishertune-bench", "torch", "torchvision", "timm", "numpy", "pillow", "scipy", "pydantic")


def git_state() -> dict[str, object]:
    """Commit and dirty flag of the checkout this package runs from (None outside a git clone)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def resolve_device(choice: str) -> torch.device:
    from fishertune.errors import UserError

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or run on a GPU machine")
    return torch.device(choice)


@contextmanager
def cpu_threads(n: int | None):
    """Run with ``n`` intra-op CPU threads (None: torch's default), restoring the count afterwards.

    The count decides how CPU reductions split their sums, so it changes results in the last bits, and
    the tiny randomly initialised models of the miniature amplify those bits over 400 steps (measured:
    sam-tiny freeze, GTAV -> Cityscapes mIoU 11.81 with 2 threads, 11.88 with 1; 9.90 and 11.77 under
    the previous version's training stream). The mini protocol
    therefore fixes it, so that its stored regression numbers hold on any machine with the same CPU."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs (each process
    takes GPU ``LOCAL_RANK``), gloo on the CPU. Returns ``(device, rank, world size)``; ``(device, 0, 1)``
    for a plain run."""
    import os

    from torch import distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def agree(value):
    """Process 0's ``value``, in every process of a distributed run (the value itself otherwise)."""
    from torch import distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    from torch import distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
