"""Device backends.

cpu runs for real here; cuda runs for real where a GPU is present and otherwise checks its refusal.
No GCU exists here and torch_gcu is not on any public registry: the gcu tests are API-contract
tests against a stand-in `torch_gcu` module and `torch.gcu` namespace that answer like the
documented torch_gcu 2.x API (../shared/gcu.md) and record each call. They prove which torch_gcu
functions the backend calls and how it refuses what it cannot use; they do not claim GCU ran.
"""

import sys
import types

import pytest
import torch

from sd_lora.devices import CpuBackend, CudaBackend, GcuBackend, build_backend
from sd_lora.errors import UserError


class RecordingGcu(types.SimpleNamespace):
    """Stand-in for torch_gcu 2.x's `torch.gcu` namespace: answers like the documented API, records calls."""

    def __init__(self, bf16=True, available=True):
        super().__init__()
        self.calls = []
        answers = {
            "is_available": available, "device_count": 2, "is_bf16_supported": bf16, "current_device": 0,
            "get_device_name": "Enflame GCU (stand-in)", "max_memory_allocated": 12345, "memory_allocated": 100,
            "synchronize": None, "reset_peak_memory_stats": None, "manual_seed": None, "manual_seed_all": None,
            "set_device": None, "empty_cache": None, "_is_in_bad_fork": False,
        }
        for name, answer in answers.items():
            setattr(self, name, self._recorder(name, answer))

    def _recorder(self, name, answer):
        def call(*args, **kwargs):
            self.calls.append((name, args))
            return answer

        return call

    def called(self, name):
        return [args for n, args in self.calls if n == name]


@pytest.fixture
def fake_gcu(monkeypatch):
    """Install a torch_gcu 2.x stand-in (module + transfer_to_gcu + torch.gcu) for one test."""

    def install(**kwargs):
        module = types.ModuleType("torch_gcu")
        module.__version__ = "2.3.0-standin"
        transfer = types.ModuleType("torch_gcu.transfer_to_gcu")
        module.transfer_to_gcu = transfer
        namespace = RecordingGcu(**kwargs)
        monkeypatch.setitem(sys.modules, "torch_gcu", module)
        monkeypatch.setitem(sys.modules, "torch_gcu.transfer_to_gcu", transfer)
        torch.gcu = namespace
        torch.get_device_module.cache_clear()
        # torch_gcu 2.x registers the PrivateUse1 backend under the name "gcu" on import; irreversible in a process
        if torch._C._get_privateuse1_backend_name() != "gcu":
            torch.utils.rename_privateuse1_backend("gcu")
        return namespace, transfer

    yield install
    # What stays for the rest of the process is what torch sees with torch_gcu installed and no GCU: a "gcu"
    # backend whose module reports no device. Without a module, torch.accelerator (which every optimizer step
    # asks) fails on the renamed backend, and the tests after this one would too.
    torch.gcu = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)
    torch.get_device_module.cache_clear()


def test_gcu_backend_calls_the_documented_torch_gcu_functions(fake_gcu):
    """API contract: each interface call reaches its torch.gcu (2.x) counterpart."""
    gcu, _ = fake_gcu()
    backend = GcuBackend(transfer_to_gcu=True)
    backend.check("fp16")
    assert backend.is_available() and gcu.called("is_available")
    assert backend.device_count() == 2
    assert backend.device(1) == torch.device("gcu", 1)
    backend.manual_seed_all(7)
    assert (7,) in gcu.called("manual_seed_all")
    backend.synchronize()
    assert gcu.called("synchronize")
    backend.reset_peak_memory()
    assert gcu.called("reset_peak_memory_stats")
    assert backend.max_memory_allocated() == 12345 and gcu.called("max_memory_allocated")
    assert backend.capabilities().bf16 is True and gcu.called("is_bf16_supported")
    assert backend.device_name() == "Enflame GCU (stand-in)"
    assert backend.dist_backend == "eccl" and backend.visible_devices_env == "TOPS_VISIBLE_DEVICES"
    assert backend.needs_grad_scaler(torch.float16) and not backend.needs_grad_scaler(torch.bfloat16)


def test_gcu_step_marks_only_where_torch_gcu_has_events(fake_gcu):
    """torch.gcu.Event is not among the calls gcu.md documents: per-step times exist only if it does."""
    from sd_lora.devices import EventMark

    gcu, _ = fake_gcu()
    assert GcuBackend(transfer_to_gcu=True).step_mark() is None

    class Event:  # what torch.cuda.Event offers, as a torch_gcu that has one would
        def __init__(self, enable_timing=False):
            self.enable_timing, self.recorded = enable_timing, False

        def record(self):
            self.recorded = True

    gcu.Event = Event
    mark = GcuBackend(transfer_to_gcu=True).step_mark()
    assert isinstance(mark, EventMark) and mark.event.enable_timing and mark.event.recorded


def test_kernel_flags_are_put_back_after_a_run():
    from sd_lora.devices import kernel_flags_kept

    def flags():
        return (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    kept = flags()
    torch.backends.cudnn.allow_tf32 = False  # torch's default is True: start from off, so a restore shows
    try:
        before = flags()
        with pytest.raises(RuntimeError):
            with kernel_flags_kept():
                CudaBackend().enable_kernel_autotune()  # flags only: no GPU needed to set them
                CudaBackend().enable_tf32()
                assert flags() == (True, True, True)
                raise RuntimeError("a failed run")
        assert flags() == before and before[2] is False
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = kept


def test_gcu_transfer_to_gcu_is_imported_when_enabled(fake_gcu):
    """API contract: the opt-in route imports torch_gcu.transfer_to_gcu (the documented redirect)."""
    _, transfer = fake_gcu()
    assert GcuBackend(transfer_to_gcu=True).enable_transfer_to_gcu() is transfer


def test_gcu_turns_transfer_on_before_accelerate_only_when_asked(fake_gcu, caplog):
    """The trainer and the launcher-started workers both call before_accelerate(); the redirect is
    switched on there (it logs so) when device.transfer_to_gcu is set, never otherwise."""
    fake_gcu()
    with caplog.at_level("INFO", logger="sd_lora.devices"):
        GcuBackend(transfer_to_gcu=False).before_accelerate()
        assert "transfer_to_gcu is on" not in caplog.text
        GcuBackend(transfer_to_gcu=True).before_accelerate()
        assert "transfer_to_gcu is on" in caplog.text


def test_gcu_without_transfer_to_gcu_is_refused(fake_gcu):
    fake_gcu()
    with pytest.raises(UserError, match="device.transfer_to_gcu=true"):
        GcuBackend(transfer_to_gcu=False).check("fp16")


def test_gcu_bf16_refused_when_the_device_reports_none(fake_gcu):
    fake_gcu(bf16=False)
    with pytest.raises(UserError, match="precision=bf16.*no bf16 support"):
        GcuBackend(transfer_to_gcu=True).check("bf16")


def test_gcu_unavailable_device_is_refused(fake_gcu, monkeypatch):
    fake_gcu(available=False)
    monkeypatch.setenv("TOPS_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="TOPS_VISIBLE_DEVICES"):
        GcuBackend(transfer_to_gcu=True).check("fp16")


def test_legacy_torch_gcu_1x_is_refused(monkeypatch):
    """API contract: the XLA-style 1.x (torch_gcu.gcu_device, no torch.gcu) is named and refused."""
    legacy = types.ModuleType("torch_gcu")
    legacy.__version__ = "1.9.0"
    legacy.gcu_device = lambda i=0: torch.device("cpu")
    legacy.is_available = lambda: True
    monkeypatch.setitem(sys.modules, "torch_gcu", legacy)
    monkeypatch.delattr(torch, "gcu", raising=False)
    with pytest.raises(UserError, match=r"1\.x.*1\.9\.0.*torch_gcu 2\.x.*TopsRider"):
        GcuBackend().check("fp16")


def test_missing_torch_gcu_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_gcu", None)  # makes `import torch_gcu` raise ImportError
    with pytest.raises(UserError, match="device=gcu needs torch_gcu.*TopsRider"):
        GcuBackend().check("fp16")


def test_auto_prefers_cuda_then_gcu_then_cpu(fake_gcu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_gcu", None)
    assert isinstance(build_backend("auto"), CpuBackend)
    fake_gcu()
    chosen = build_backend("auto")
    assert isinstance(chosen, GcuBackend) and chosen.transfer_to_gcu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(build_backend("auto"), CudaBackend)


def test_cpu_backend_for_real():
    backend = CpuBackend()
    backend.check("no")
    backend.check("bf16")
    with pytest.raises(UserError, match="precision=fp16.*precision=bf16"):
        backend.check("fp16")
    assert backend.device(0) == torch.device("cpu")
    assert backend.max_memory_allocated() > 50 * 2**20  # peak RSS of a process that imported torch
    with backend.autocast(torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    backend.manual_seed_all(3)
    a = torch.rand(3)
    backend.manual_seed_all(3)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the refusal cannot happen")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="device=cuda but torch sees no CUDA device"):
        CudaBackend().check("fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_for_real():
    backend = CudaBackend()
    backend.check("fp16")
    backend.reset_peak_memory()
    x = torch.ones(1024, 1024, device=backend.device(0))
    backend.synchronize()
    assert backend.max_memory_allocated() >= x.numel() * 4
    with backend.autocast(torch.float16):
        assert (x @ x).dtype == torch.float16


def test_no_device_specific_calls_outside_devices_py():
    """The trainer reaches devices only through the backend interface."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(p.relative_to(root))
        for p in list((root / "sd_lora").glob("*.py")) + [root / "launch.py"]
        if p.name != "devices.py" and any(s in p.read_text() for s in ("torch.cuda.", "torch.gcu.", "import torch_gcu"))
    ]
    assert offenders == []
