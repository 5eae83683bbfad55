"""Building and launching the CUDA C++ kernels, and the device, stream and SM count every launch needs.

The kernels' sources are the files under `cuda/`, shipped with the package and compiled at run time by
NVRTC through torch (`torch.cuda._compile_kernel`), once per device and variant (`built`). A program is
its pieces joined, each after a blank line: first the histogram key of `abs_hist_keys` (`cuda/key.cuh`)
after the #defines of the constants it reads, then a kernel's own pieces (`cuda/bf16.cuh`, a prelude of
#defines for a variant, the kernel's `.cu` file). Launches go straight to the driver (`launch`), on the
current stream of the tensors' device, read as Triton's launcher reads it (`stream_of`).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Any

import torch

from maxact_card.kernels.encoding import FINE_BIAS, HIST_BINS, HIST_NONFINITE, HIST_OVERFLOW

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels run on Triton's CPU interpreter (fixed when this module is imported)."""


def cuda_source(name: str) -> str:
    """The text of `cuda/<name>`, as installed with the package."""
    return (resources.files("maxact_card.kernels") / "cuda" / name).read_text(encoding="utf-8")


def program(*pieces: str) -> str:
    """One program's source from its pieces (whole lines), each after a blank line."""
    return "".join("\n" + piece for piece in pieces)


def _key_source() -> str:
    """The piece every program starts with: the histogram key of `abs_hist_keys` from the 15 magnitude bits
    of a bf16, after the #defines of the constants it reads."""
    defines = (f"#define NBINS {HIST_BINS}\n#define FINE_BIAS {FINE_BIAS}\n#define OVERFLOW {HIST_OVERFLOW}\n"
               f"#define NONFINITE {HIST_NONFINITE}\n")
    return program(defines, cuda_source("key.cuh"))


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def compile_kernel(index: int, source: str, name: str) -> Any:
    """NVRTC-compile `source` (after the shared key prelude) and load kernel `name` on CUDA device `index`."""
    with torch.cuda.device(index):
        bind_context(index)
        return torch.cuda._compile_kernel(_key_source() + source, name)


def bind_context(index: int) -> None:
    """Make device `index`'s primary context current on the calling thread where none is.

    The CUDA runtime makes it current on a thread's first runtime call that needs a context (an
    allocation, a launch); `torch.cuda.device` calls nothing where the thread's device is already
    `index`, the default. A thread that only builds kernels then makes driver calls alone, and
    loading a module there fails for want of a context (CUDA_ERROR_INVALID_CONTEXT), which turned
    the CUDA scan off for the whole run when the builds moved to background threads. Where the
    driver cannot be asked, nothing is done: the load fails as before and is handled there."""
    try:
        driver = torch.cuda._utils._get_gpu_runtime_library()
        current = ctypes.c_void_p()
        if driver.cuCtxGetCurrent(ctypes.byref(current)) != 0 or current.value:
            return
        device, context = ctypes.c_int(), ctypes.c_void_p()
        if driver.cuDeviceGet(ctypes.byref(device), index) != 0:
            return
        # kept, not released: this thread uses the context until the process ends, and a release
        # could destroy a primary context that the runtime has not yet retained itself
        if driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) != 0:
            return
        driver.cuCtxSetCurrent(context)
    except Exception:  # noqa: BLE001 - see the docstring
        return


_building = threading.Lock()  # guards each table's "pending" builds; never held while one builds
_prebuilding = threading.local()  # `on` while a `prebuild` job runs on this thread


def built(table: dict[str, Any], key: Any, build: Callable[[], Any]) -> Any:
    """`table`'s entry for `key`, built on first use; None once any build has failed (no NVRTC, an old
    torch), which leaves the work to the Triton kernels for the rest of the process.

    Safe from several threads (`prebuild` compiles beside the main thread): a key is built once, and
    a caller that finds it being built waits for that build. A build may ask for other keys. A build
    that fails on a `prebuild` thread turns nothing off: whoever asks next builds it again, in its
    own thread, and only a failure there is final."""
    while True:
        if table["failed"]:
            return None
        entry = table["kernels"].get(key)
        if entry is not None:
            return entry
        with _building:
            entry = table["kernels"].get(key)
            if entry is not None or table["failed"]:
                return entry
            pending = table.setdefault("pending", {})
            waiting = pending.get(key)
            if waiting is None:
                mine: Future[Any] = Future()
                pending[key] = mine
                break
        waiting.result()  # then look again: built, failed, or given up on a prebuild thread
    try:
        entry = build()
    except Exception:  # noqa: BLE001 - see the docstring
        entry = None
        if not getattr(_prebuilding, "on", False):
            table["failed"] = True
    else:
        table["kernels"][key] = entry
    finally:
        with _building:
            del pending[key]
        mine.set_result(entry)
    return entry


_MAPS = "/proc/self/maps"  # where Linux lists the files this process has mapped


def page_in_compiler() -> list[str]:
    """Read NVRTC's libraries (about 230 MB with CUDA 13) once, front to back, into the page cache;
    return the paths read.

    On a machine that has not compiled since it started they are on disk only, and the compiler
    faults them in a page at a time as it runs: with the page cache dropped, each of a Qwen3 model's
    scan variants took 0.6 to 0.7 s to compile on an H100 machine, against 0.04 s after one
    sequential read of the libraries (0.33 s). Linux only (the loaded library is found in
    /proc/self/maps, the builtins it loads are its neighbours); elsewhere, or where anything
    fails, nothing is read."""
    try:
        torch.cuda._utils._get_gpu_rtc_library()
        with open(_MAPS, encoding="utf-8") as maps:
            loaded = {line.split()[-1] for line in maps if "nvrtc" in line}
    except Exception:  # noqa: BLE001 - no NVRTC, no /proc: the compiler pages itself in as before
        return []
    paths = {found for path in loaded if path.startswith("/")
             for found in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc*"))}
    read = []
    for path in sorted(paths):
        try:
            with open(path, "rb") as library:
                while library.read(16 << 20):
                    pass
        except OSError:
            continue
        read.append(path)
    return read


_prebuilder: dict[str, ThreadPoolExecutor] = {}


def prebuild(jobs: list[Callable[[], object]]) -> list[Future[object]]:
    """Run `jobs` (calls that build kernels through `built`) on background threads and return at once.

    The CLI starts one such job before the model loads (`page_in_compiler`, then a first kernel)
    and one per kernel variant once the sites are known, so that the compiles overlap the loading
    and the loop's set-up instead of holding up the first batch; whoever needs a kernel still
    being built waits for it in `built`."""
    executor = _prebuilder.get("pool")
    if executor is None:
        executor = _prebuilder["pool"] = ThreadPoolExecutor(max_workers=8, thread_name_prefix="maxact-build")
    return [executor.submit(_quietly, job) for job in jobs]


def _quietly(job: Callable[[], object]) -> object:
    _prebuilding.on = True
    try:
        return job()
    except Exception:  # noqa: BLE001 - a build that fails here fails again, and is handled, where it is used
        return None
    finally:
        _prebuilding.on = False


def driver_function(table: dict[str, Any], device: torch.device, files: tuple[str, ...], name: str) -> Any:
    """The driver handle of NVRTC kernel `name` from the program of `cuda/` `files`, loaded on `device`
    once (`built`), or None where it cannot be built or torch gives no handle to launch it with."""
    index = device_index(device)
    kernel = built(table, index, lambda: compile_kernel(index, program(*map(cuda_source, files)), name))
    return getattr(kernel, "func", None)


_sm_count: dict[int, int] = {}
_driver: dict[str, Any] = {}


def sms(device: torch.device) -> int:
    index = device_index(device)
    count = _sm_count.get(index)
    if count is None:
        count = _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def launch(func: Any, grid: int, block: int, stream: int, values: tuple[Any, ...]) -> None:
    """cuLaunchKernel on a 1-D grid with the ctypes `values` as arguments. The driver library and its
    function are looked up once: torch's helper opens the library anew on every call, which costs more
    host time than the launch."""
    cu_launch = _driver.get("launch")
    if cu_launch is None:
        cu_launch = torch.cuda._utils._get_gpu_runtime_library().cuLaunchKernel
        cu_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [ctypes.c_uint, ctypes.c_void_p,
                                                                         ctypes.c_void_p, ctypes.c_void_p]
        cu_launch.restype = ctypes.c_int
        _driver["launch"] = cu_launch
    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    status = cu_launch(func, grid, 1, 1, block, 1, 1, 0, stream, params, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernel returned {status}")


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds of torch


def stream_of(device: torch.device) -> int:
    """The handle of `device`'s current stream (0 off CUDA): scratch is kept per stream. Read raw, as
    Triton's launcher reads it: `torch.cuda.current_stream` builds a Stream object, 9 us per call."""
    if device.type != "cuda":
        return 0
    if _RAW_STREAM is not None:
        return int(_RAW_STREAM(device_index(device)))
    return torch.cuda.current_stream(device).cuda_stream


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current device: a model sharded over GPUs updates sites on others.
    Nothing to switch (the common case) costs no context manager of torch's."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
