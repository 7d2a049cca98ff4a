"""The trainer's speed switches and its step timer, on the CPU: what each one does, not how fast it is."""

import gc
import time
import weakref
from pathlib import Path

import pytest
import torch

from sd_lora.config import SdpKernel, TrainerConfig
from sd_lora.devices import CpuBackend
from sd_lora.errors import UserError
from sd_lora.model import sdp_kernel_order
from sd_lora.timing import Timer, scheduled_gc


class Cycle:
    """An object only the cycle collector can free."""

    def __init__(self):
        self.me = self


def cyclic_garbage() -> weakref.ref:
    return weakref.ref(Cycle())


def test_timer_measures_each_step_after_skip_steps(monkeypatch):
    now = [100.0]  # a clock the test moves: exact step times, no sleeping on a busy machine
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    timer = Timer(skip_steps=2, backend=CpuBackend())
    pauses = [1.0, 1.0, 0.02, 0.06, 0.02]  # steps 1..5: 1 and 2 untimed
    for pause in pauses:
        now[0] += pause
        timer.step()
    timer.stop()
    assert timer.timed_steps == 3
    assert timer.step_seconds == pytest.approx(pauses[2:])
    assert timer.step_stats() == pytest.approx({"median": 0.02, "p90": 0.06, "max": 0.06})
    assert timer.seconds_per_step() == pytest.approx(0.1 / 3)  # the mean carries the slow step, the median not


def test_timer_p90_is_the_nearest_rank():
    timer = Timer(skip_steps=0, backend=CpuBackend())
    timer.step_seconds = [float(i) for i in range(1, 11)]  # ten steps of 1..10 s
    assert timer.step_stats() == {"median": 5.5, "p90": 9.0, "max": 10.0}
    timer.step_seconds = [float(i) for i in range(1, 41)]
    assert timer.step_stats()["p90"] == 36.0


def test_timer_reads_marks_in_pieces_without_losing_a_step():
    timer = Timer(skip_steps=0, backend=CpuBackend())
    for step in range(1, 8):
        timer.step()
        if step % 3 == 0:
            timer.read_marks()  # as the loop does at each logging step
    timer.stop()
    assert len(timer.step_seconds) == 7 == timer.timed_steps  # skip_steps=0: the first step is timed too


def test_timer_without_step_marks_reports_no_per_step_times():
    class NoMarks(CpuBackend):
        def step_mark(self):
            return None  # a device without timing events (torch.gcu without Event)

    timer = Timer(skip_steps=1, backend=NoMarks())
    for _ in range(3):
        timer.step()
    timer.stop()
    assert timer.step_stats() == {"median": None, "p90": None, "max": None}
    assert timer.seconds_per_step() is not None  # the mean stays


def test_scheduled_gc_collects_at_chosen_steps_only_and_restores_the_collector():
    assert gc.isenabled()
    with scheduled_gc(3) as after_step:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        first = cyclic_garbage()
        after_step(1)  # the first step: a full collection, then what survives is frozen
        assert first() is None
        garbage = cyclic_garbage()
        for _ in range(5000):  # more allocations than Python's thresholds: no automatic collection now
            Cycle()
        after_step(2)
        assert garbage() is not None
        after_step(3)
        assert garbage() is None
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_scheduled_gc_off_leaves_python_alone():
    with scheduled_gc(None) as after_step:
        assert gc.isenabled()
        after_step(1)
    assert gc.isenabled()


def test_scheduled_gc_restores_the_collector_after_an_error():
    with pytest.raises(RuntimeError):
        with scheduled_gc(2):
            raise RuntimeError("a failed step")
    assert gc.isenabled() and gc.get_freeze_count() == 0


priority = getattr(torch._C, "_get_sdp_priority_order", None)  # torch's own view of the order (private)


@pytest.mark.skipif(priority is None, reason="this torch does not expose the sdp priority order")
@pytest.mark.parametrize("kernel,backend", [(SdpKernel.cudnn, "CUDNN_ATTENTION"), (SdpKernel.flash, "FLASH_ATTENTION"),
                                            (SdpKernel.efficient, "EFFICIENT_ATTENTION"), (SdpKernel.math, "MATH")])
def test_sdp_kernel_order_puts_the_kernel_first_and_keeps_the_others(kernel, backend):
    from torch.nn.attention import SDPBackend

    before = list(priority())
    with sdp_kernel_order(kernel):
        order = list(priority())
        assert order[0] == getattr(SDPBackend, backend).value
        # a preference: every kernel torch had stays available as a fallback
        assert set(before) <= set(order)  # OVERRIDEABLE too: a device plug-in's own kernel
        q = torch.randn(1, 2, 8, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # runs, whatever the first choice
    assert list(priority()) == before


def test_sdp_priority_order_names_torchs_order():
    from sd_lora.model import sdp_priority_order

    if priority is None:
        assert sdp_priority_order() is None
        return
    before = sdp_priority_order()
    assert len(before) == len(priority()) and "MATH" in before
    with sdp_kernel_order(SdpKernel.efficient):
        assert sdp_priority_order()[:2] == ["EFFICIENT_ATTENTION", "FLASH_ATTENTION"]
    with sdp_kernel_order(SdpKernel.auto):  # nothing set
        assert sdp_priority_order() == before


class GcState(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return {"enabled": gc.isenabled(), "index": index}


def test_loader_workers_collect_garbage_while_the_trainer_holds_it():
    from sd_lora.data import build_dataloader

    loader = build_dataloader(GcState(), batch_size=1, num_workers=1, seed=0,
                              collate_fn=lambda items: items[0])
    with scheduled_gc(10):
        seen = [item["enabled"] for item in loader]  # the worker is forked here, with the collector off
        assert not gc.isenabled()
    assert seen == [True, True]


def test_profile_steps_past_the_run_is_refused_before_work():
    from sd_lora.config import TrainerConfig
    from sd_lora.errors import UserError

    with pytest.raises(UserError, match=r"trainer.profile_steps=5 is invalid: with trainer.skip_steps=2 it would "
                                        r"profile up to optimizer step 7, past trainer.max_train_steps=6"):
        TrainerConfig(max_train_steps=6, skip_steps=2, profile_steps=5)
    assert TrainerConfig(max_train_steps=6, skip_steps=2, profile_steps=4).profile_steps == 4
    assert TrainerConfig(max_train_steps=None, skip_steps=2, profile_steps=50).profile_steps == 50  # epochs: warned at the end


def test_trace_summary_counts_overlapping_kernels_once_and_sorts_them_by_kind():
    from sd_lora.timing import kernel_category, trace_summary

    def kernel(name, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        {"cat": "user_annotation", "name": "ProfilerStep#3", "ts": 0, "dur": 1000},
        {"cat": "user_annotation", "name": "ProfilerStep#4", "ts": 1000, "dur": 3000},
        {"cat": "gpu_user_annotation", "name": "ProfilerStep#4", "ts": 1100, "dur": 3000},  # the same step, device side
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 100, 400),   # 100-500
        kernel("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", 300, 400),  # 300-700, overlaps
        kernel("triton_poi_fused_add_mul_0", 2000, 100),                                    # 2000-2100
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 4000, "dur": 100},  # 4000-4100
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host work: not device time
    ]}
    s = trace_summary(trace)
    assert s["steps"] == 2 and s["host_ms_per_step"] == 2.0
    assert s["device_span_ms_per_step"] == (4100 - 100) / 1000 / 2
    assert s["device_busy_ms_per_step"] == (600 + 100 + 100) / 1000 / 2  # 100-700 once, not 800
    assert s["device_busy_fraction"] == 800 / 4000
    assert set(s["by_kind"]) == {"attention", "convolution", "fused (Inductor)", "copy, fill"}
    assert s["by_kind"]["attention"]["ms_per_step"] == 0.2
    assert kernel_category("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert kernel_category("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "matmul"
    # Inductor's kernels are named after the ops they fuse, which may read like another kind
    assert kernel_category("triton_poi_fused__to_copy_convolution_native_group_norm_0") == "fused (Inductor)"
    assert kernel_category("triton_poi_fused_convert_element_type_1") == "fused (Inductor)"
    assert kernel_category("sm90_xmma_dgrad_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kernel_category("void at::native::elementwise_kernel<128, 4>") == "other"
    # names as the 2026-12-02 H200 profile of perf=throughput gave them (docs/profile-h200-2026-12-02-*.txt)
    assert kernel_category("void cudnn::fusion::compute_dot_do_o_specialized<false>(void") == "attention"
    assert kernel_category("void cudnn::fusion::convert_dq_to_16bits<false>(void") == "attention"
    assert kernel_category("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "matmul"
    # on the CPU there is no device time: only the host's
    cpu = trace_summary({"traceEvents": trace["traceEvents"][:2]})
    assert cpu["device_busy_fraction"] is None and cpu["host_ms_per_step"] == 2.0


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graphs_with_gradient_accumulation_are_refused_on_cuda(mode):
    """CUDA graphs overwrite the first micro-batch's gradient before the second is added (pytorch#169545):
    the combination is refused before any work, naming both settings and the fixes."""
    from sd_lora.speed import check_cuda_graphs

    t = TrainerConfig(compile=True, compile_mode=mode, gradient_accumulation_steps=2)
    with pytest.raises(UserError, match=rf"trainer.compile_mode={mode} records CUDA graphs.*"
                                        r"trainer.gradient_accumulation_steps=2.*trainer.compile_mode=null"):
        check_cuda_graphs(t, "cuda")
    check_cuda_graphs(t, "cpu")  # no CUDA graphs on the CPU or a GCU: nothing to refuse
    check_cuda_graphs(t, "gcu")
    for fine in (TrainerConfig(compile=True, compile_mode=mode, gradient_accumulation_steps=1),
                 TrainerConfig(compile=True, compile_mode="max-autotune-no-cudagraphs", gradient_accumulation_steps=2),
                 TrainerConfig(compile=True, compile_mode=None, gradient_accumulation_steps=2),
                 TrainerConfig(compile=False, compile_mode=mode, gradient_accumulation_steps=2)):
        check_cuda_graphs(fine, "cuda")


def test_trainer_compile_compiles_the_u_net_and_leaves_a_trained_text_encoder_eager(tiny_model_path):
    """accelerate compiles every module it prepares; a compiled text encoder beside the compiled U-Net crashed
    under CUDA graphs on an H200, so prepare_trained compiles the U-Net alone (torch.compile is lazy: nothing
    compiles here) and gives accelerate's switch back for whatever it prepares later."""
    from accelerate.utils import DynamoBackend
    from torch._dynamo.eval_frame import OptimizedModule

    from sd_lora.config import Config, DatasetConfig, LoraSettings, ModelConfig, OptimizerConfig
    from sd_lora.devices import build_backend
    from sd_lora.families import family_of
    from sd_lora.model import add_lora, add_text_lora, load_components
    from sd_lora.train import build_accelerator, prepare_trained

    lora = LoraSettings(train_text_encoder=True)
    cfg = Config(model=ModelConfig(pretrained_model_name_or_path=str(tiny_model_path), lora=lora),
                 dataset=DatasetConfig(path="d"), optimizer=OptimizerConfig(),
                 trainer=TrainerConfig(compile=True, max_train_steps=2))
    backend = build_backend("cpu")
    accelerator = build_accelerator(cfg, backend, Path("unused"))
    comps = load_components(cfg.model, tiny_model_path)
    params = {"unet": add_lora(comps.unet, cfg.model.attention, lora),
              "text_encoder": add_text_lora(comps.text_encoders, lora)}
    comps.text_trained = True
    length = type("Length", (), {"max_train_steps": 2})()
    trained, _, _ = prepare_trained(cfg, accelerator, family_of(cfg.model), comps, params, length, backend)
    assert list(trained) == ["unet", "text_encoder"]  # the order checkpoints were always saved in
    assert isinstance(trained["unet"], OptimizedModule)
    assert not isinstance(trained["text_encoder"], OptimizedModule)
    assert accelerator.state.dynamo_plugin.backend == DynamoBackend.INDUCTOR


def test_each_run_in_one_process_gets_its_own_precision_and_compile_switch():
    """A Hydra sweep runs its jobs in one process; accelerate would keep the first job's state (its compile
    switch silently, its precision with an error)."""
    from accelerate.utils import DynamoBackend

    from sd_lora.config import Config, DatasetConfig, MixedPrecision, ModelConfig, PrecisionConfig
    from sd_lora.devices import build_backend
    from sd_lora.train import build_accelerator

    def accelerator(compile: bool, precision: MixedPrecision):
        cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                     precision=PrecisionConfig(mixed_precision=precision), trainer=TrainerConfig(compile=compile))
        return build_accelerator(cfg, build_backend("cpu"), Path("unused"))

    first = accelerator(False, MixedPrecision.no)
    assert first.state.dynamo_plugin.backend == DynamoBackend.NO
    second = accelerator(True, MixedPrecision.bf16)
    assert second.state.dynamo_plugin.backend == DynamoBackend.INDUCTOR and second.mixed_precision == "bf16"


def test_auto_compile_mode_records_cuda_graphs_only_where_they_were_measured_and_are_right():
    """perf=throughput's compile_mode=auto: CUDA graphs on CUDA with one micro-batch per step and the cache;
    torch.compile's default mode without the cache (not measured), under accumulation (wrong gradients,
    pytorch#169545) and on other devices; an explicit mode is kept as it is."""
    from sd_lora.speed import check_cuda_graphs, compile_mode_for

    auto = TrainerConfig(compile=True, compile_mode="auto")
    assert compile_mode_for(auto, "cuda") == "reduce-overhead"
    assert compile_mode_for(auto, "cuda", cached=False) is None  # the VAE encoder runs in the step: not measured
    assert compile_mode_for(auto, "cpu") is None and compile_mode_for(auto, "gcu") is None
    accumulating = TrainerConfig(compile=True, compile_mode="auto", gradient_accumulation_steps=4)
    assert compile_mode_for(accumulating, "cuda") is None
    check_cuda_graphs(accumulating, "cuda")  # auto never asks for what check_cuda_graphs refuses
    for mode in (None, "reduce-overhead", "max-autotune-no-cudagraphs"):
        assert compile_mode_for(TrainerConfig(compile=True, compile_mode=mode), "cuda") == mode
