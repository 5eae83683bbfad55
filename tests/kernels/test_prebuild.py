"""The CUDA kernels are built ahead of the first batch, side by side on background threads: each
kernel once however many threads ask for it, and the variants the sites' updates will launch."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")

from maxact_card.kernels import nvrtc, update
from maxact_card.measure import loop
from tests import factory


def _table() -> dict[str, Any]:
    return {"kernels": {}, "failed": False}


def test_a_kernel_asked_for_by_several_threads_at_once_is_built_once() -> None:
    table, calls, release = _table(), [], threading.Event()

    def build() -> str:
        calls.append(threading.get_ident())
        release.wait(5)
        return "kernel"

    with ThreadPoolExecutor(4) as pool:
        asked = [pool.submit(nvrtc.built, table, "k", build) for _ in range(4)]
        time.sleep(0.2)  # every thread is in built() while the first one builds
        release.set()
        assert [f.result(5) for f in asked] == ["kernel"] * 4
    assert len(calls) == 1
    assert table["kernels"] == {"k": "kernel"} and table["pending"] == {}


def test_a_failed_build_answers_its_waiters_with_none_and_turns_the_table_off() -> None:
    table, release = _table(), threading.Event()

    def build() -> str:
        release.wait(5)
        raise RuntimeError("no NVRTC here")

    with ThreadPoolExecutor(3) as pool:
        asked = [pool.submit(nvrtc.built, table, "k", build) for _ in range(3)]
        time.sleep(0.2)
        release.set()
        assert [f.result(5) for f in asked] == [None] * 3
    assert table["failed"] and table["pending"] == {}
    assert nvrtc.built(table, "other", lambda: "never built") is None


def test_a_build_may_ask_for_another_kernel_of_its_table() -> None:
    table = _table()
    outer = nvrtc.built(table, "fold", lambda: ("fold", nvrtc.built(table, "plain", lambda: "plain")))
    assert outer == ("fold", "plain") and set(table["kernels"]) == {"fold", "plain"}


def test_a_build_that_fails_on_a_prebuild_thread_turns_nothing_off() -> None:
    # a background thread can fail where the thread that launches would not (no CUDA context there)
    table, threads = _table(), []

    def build() -> str:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            raise RuntimeError("CUDA_ERROR_INVALID_CONTEXT")
        return "kernel"

    [job] = nvrtc.prebuild([lambda: nvrtc.built(table, "k", build)])
    assert job.result(5) is None
    assert not table["failed"] and table["kernels"] == {} and table["pending"] == {}
    assert nvrtc.built(table, "k", build) == "kernel"  # asked again: built again, here
    assert threads[0].startswith("maxact-build") and threads[1] == threading.current_thread().name


def test_whoever_waits_on_a_failing_prebuild_builds_the_kernel_itself() -> None:
    table, started, release, threads = _table(), threading.Event(), threading.Event(), []

    def build() -> str:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            started.set()
            release.wait(5)
            raise RuntimeError("CUDA_ERROR_INVALID_CONTEXT")
        return "kernel"

    nvrtc.prebuild([lambda: nvrtc.built(table, "k", build)])
    assert started.wait(5)
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(nvrtc.built, table, "k", build)
        time.sleep(0.2)  # the waiter is in built(), waiting on the prebuild
        release.set()
        assert waiter.result(5) == "kernel"
    assert len(threads) == 2 and not table["failed"]


class _Driver:
    """The CUDA driver calls `bind_context` makes, answered as a thread with no current context
    (or with one) would have them answered (the methods carry the driver's names)."""

    def __init__(self, current: int) -> None:
        self.current, self.calls = current, []

    def cuCtxGetCurrent(self, out: Any) -> int:
        out._obj.value = self.current
        return 0

    def cuDeviceGet(self, out: Any, ordinal: int) -> int:
        self.calls.append(("device", ordinal))
        out._obj.value = 100 + ordinal
        return 0

    def cuDevicePrimaryCtxRetain(self, out: Any, device: Any) -> int:
        self.calls.append(("retain", device.value))
        out._obj.value = 0xC0
        return 0

    def cuCtxSetCurrent(self, context: Any) -> int:
        self.calls.append(("set", context.value))
        return 0


def test_a_building_thread_without_a_context_gets_the_devices_primary_one(monkeypatch: pytest.MonkeyPatch) -> None:
    none_yet = _Driver(current=0)
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_runtime_library", lambda: none_yet)
    nvrtc.bind_context(1)
    assert none_yet.calls == [("device", 1), ("retain", 101), ("set", 0xC0)]
    bound = _Driver(current=0xAB)  # the runtime made one current already: left as it is
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_runtime_library", lambda: bound)
    nvrtc.bind_context(1)
    assert bound.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_kernel_builds_on_a_thread_that_never_touched_the_gpu() -> None:
    torch.empty(1, device="cuda")  # the main thread's context, as the CLI's is by then
    built: list[object] = []
    thread = threading.Thread(target=lambda: built.append(nvrtc.compile_kernel(
        0, nvrtc.program(nvrtc.cuda_source("histogram.cu")), "maxact_abs_hist_bf16")))
    thread.start()
    thread.join(60)
    assert built and getattr(built[0], "func", None) is not None


def _asked(monkeypatch: pytest.MonkeyPatch, device: str, sites: list[tuple[int, bool, bool, int]]) -> list[object]:
    asked: list[object] = []

    def scan_kernel(dev: torch.device, shape: Any, massive: bool, n_rows: int, *, gated: bool, fold: bool) -> None:
        asked.append((shape.group, shape.rows, shape.vec, massive, gated, fold))

    monkeypatch.setattr(update, "cuda_scan_kernel", scan_kernel)
    monkeypatch.setattr(update, "row_medians_kernel", lambda dev: asked.append("row_medians"))
    monkeypatch.setattr(nvrtc, "prebuild", lambda jobs: [job() for job in jobs])  # in line, in order
    update.prebuild(torch.device(device), sites)
    return asked


def test_prebuild_asks_once_for_each_variant_the_updates_will_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    sites = [(4096, True, False, 16), (4096, True, False, 16), (4096, False, False, 16), (12288, False, True, 16),
             (12288, False, False, 16), (4096, False, False, 32), (100, False, False, 16)]
    assert _asked(monkeypatch, "cuda", sites) == [
        (128, 2, 4, True, False, True),  # a residual: massive, the scan folds its top-16
        (128, 2, 4, False, False, True),
        (512, 1, 3, False, True, True),  # a SwiGLU gate, read by the gated scan: finer rows
        (256, 1, 6, False, False, True),
        (128, 2, 4, False, False, False),  # a top-32 is folded by Triton after the scan
        "row_medians",  # what every massive site's update launches, whatever its width
    ]  # the 100-wide rows go to the Triton scan: nothing to build
    assert _asked(monkeypatch, "cpu", sites) == []
    monkeypatch.setenv("MAXACT_CARD_CUDA_SCAN", "0")
    assert _asked(monkeypatch, "cuda", sites) == []


def test_the_loop_asks_for_the_kernels_of_a_bf16_models_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[torch.device, list[tuple[int, bool, bool, int]]]] = []
    monkeypatch.setattr(loop, "prebuild_kernels", lambda device, sites: asked.append((device, sites)))
    model = factory.build_model("llama")
    loop.prepare(model, [[1, 5, 6, 7]], device=torch.device("cpu"))
    assert asked == []  # float32: the CUDA kernels take bf16 alone
    measurement = loop.prepare(model.to(torch.bfloat16), [[1, 5, 6, 7]], device=torch.device("cpu"))
    [(device, sites)] = asked
    stats = measurement.stats
    assert device == torch.device("cpu") and len(sites) == len(measurement.site_map.sites)
    by_site = dict(zip((s.name for s in measurement.site_map.sites), sites))
    assert by_site["blocks.0.hook_resid_post"] == (stats["blocks.0.hook_resid_post"].width, True, False, 16)
    assert by_site["blocks.1.mlp.hook_pre"] == (stats["blocks.1.mlp.hook_pre"].width, False, True, 16)
    assert by_site["blocks.1.mlp.hook_post"][1:] == (False, False, 16)
    monkeypatch.setenv("MAXACT_CARD_GATED", "0")
    asked.clear()
    loop.prepare(model, [[1, 5, 6, 7]], device=torch.device("cpu"))
    assert not any(gated for _, _, gated, _ in asked[0][1])


def test_the_compilers_libraries_are_read_through_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libcublas.so.13"):
        (lib / name).write_bytes(b"\x7fELF" + bytes(1000))
    maps = tmp_path / "maps"
    maps.write_text(f"7f00-7f10 r-xp 00000000 08:01 42 {lib / 'libnvrtc.so.13'}\n"
                    "7f20-7f30 r-xp 00000000 00:00 0 [vdso]\n", encoding="utf-8")
    monkeypatch.setattr(nvrtc, "_MAPS", str(maps))
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_rtc_library", lambda: None)
    # the library the process mapped and the builtins beside it, which NVRTC loads as it compiles
    assert nvrtc.page_in_compiler() == [str(lib / "libnvrtc-builtins.so.13.0"), str(lib / "libnvrtc.so.13")]

    def no_nvrtc() -> None:
        raise OSError("libnvrtc.so: cannot open shared object file")

    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_rtc_library", no_nvrtc)
    assert nvrtc.page_in_compiler() == []  # a CPU build of torch: nothing to read, nothing raised
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_rtc_library", lambda: None)
    monkeypatch.setattr(nvrtc, "_MAPS", str(tmp_path / "no-proc"))
    assert nvrtc.page_in_compiler() == []
