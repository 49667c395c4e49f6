"""bench.py: a smoke test, and its bookkeeping and arithmetic (order of calls, ratios, resident and peak
bytes, tokens/s, MFU, targets) on stand-in functions, fake clocks and constructed times; the measurements
themselves are the benchmark's, never a test's.

    python -m pytest -q
"""

import inspect
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bench
import memory
import teamlora
from conftest import cuda_fp32_matmuls
from model import ModelArgs, Transformer
from teamlora import TeamLoRALinear


def test_quick_run_prints_every_section_with_every_variant(capsys):
    bench.main(["--quick", "--no-compile", "--threads=1"])  # compile's warm-up alone takes a minute
    out = capsys.readouterr().out
    for header in ("## 1. Layer level", "## 1b. Layer level at LLaMA-2-7B's FFN shapes", "## 2. Model level",
                   "## 3. Beyond the paper", "## 4. Prefill and decode", "## 6. Sharing the CPU",
                   "## 7. The loss on the answers only", "## 5. 7B-shaped", "## Targets"):
        assert header in out, header
    layer, model = out.split("## 2.")[0], out.split("## 2.")[1].split("## 3.")[0]
    variants = ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused")
    for variant in variants + ("LoRA, plain code",):  # a row in the table of each k (2, 4, 8)
        assert sum(line.startswith(variant + "  ") for line in layer.splitlines()) == 3, variant
    for section in (layer.split("Figure 4a")[1], model):  # a column in the summaries
        header = next(line for line in section.splitlines() if line.startswith("k  "))
        assert all(v in header for v in variants), header
    rows_and_headers = [line for line in out.splitlines() if line.startswith(("k  ", "TeamLoRA compiled", "blocks"))]
    assert not any("compiled" in line for line in rows_and_headers)  # --no-compile: no compiled variant ran
    decode = out.split("## 4.")[1].split("## 6.")[0]
    assert all(any(line.startswith(v + "  ") for line in decode.splitlines())
               for v in ("base model", "LoRA", "LoRA merged", "TeamLoRA fused"))
    sharing = out.split("## 6.")[1].split("## 7.")[0]
    assert any(line.startswith("alone") for line in sharing.splitlines())
    assert any(line.startswith("one busy neighbour") for line in sharing.splitlines())
    stack = out.split("## 5.")[1].split("## Targets")[0]  # --quick runs a tiny stack on the CPU too
    assert all(any(line.startswith(v + "  ") for line in stack.splitlines()) for v in ("LoRA", "TeamLoRA fused"))
    assert "nan" not in out.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_without_a_gpu_skips_with_one_sentence(capsys):
    bench.main(["--device=cuda"])
    out = capsys.readouterr().out.strip()
    assert out.startswith("skipped:") and "CUDA is not available" in out and len(out.splitlines()) == 1


def test_cuda_sections_run_with_train_pys_float32_matmul_setting_and_restore_it(monkeypatch, capsys):
    """--full7b's fp32 adapters on IEEE float32 matmuls would run at a CUDA-core fraction of the tensor cores'
    speed: bench.py measures what train.py runs (tf32=True), --no-tf32 the IEEE setting."""
    seen, before = [], cuda_fp32_matmuls()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(bench, "run_sections", lambda *a: seen.append(cuda_fp32_matmuls()) or [])
    threads = torch.get_num_threads()
    try:
        for flags in ([], ["--no-tf32"]):
            bench.main(["--device=cuda", "--section=cuda7b", f"--threads={threads}", *flags])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert seen == ["tf32", "ieee"] and cuda_fp32_matmuls() == before
    assert "TF32 float32 matmuls" in out and "IEEE float32 matmuls" in out


@pytest.mark.parametrize("checkpointing", [True, False])
def test_full7b_stack_checkpoints_activations_unless_told_not_to(monkeypatch, capsys, checkpointing):
    """--full7b measures the 7B recipes' setting (activation checkpointing) and, with --no-checkpointing, the same
    stack without it (no recomputed forward); here on --quick's tiny stack on the CPU."""
    built = []
    real_init = bench.Transformer.__init__
    monkeypatch.setattr(bench.Transformer, "__init__", lambda self, args, gradient_checkpointing=False:
                        built.append(gradient_checkpointing) or real_init(self, args, gradient_checkpointing))
    cfg = quick_cfg()
    times = {v: [1.0] * cfg.repeats for v in ("LoRA", "TeamLoRA fused")}
    fake_bench(monkeypatch, times, times)
    monkeypatch.setattr(bench, "model_steps", lambda *a: (None, lambda: 1000))  # a measured peak of 1000 bytes
    cfg.full7b, cfg.checkpointing = True, checkpointing
    bench.section_cuda7b(cfg, CPU, 100.0)
    assert built == [checkpointing] * 2
    out = capsys.readouterr().out
    assert f"activation checkpointing {'on' if checkpointing else 'off'}" in out
    assert re.search(r"FFN adapters r=\d+ \(TeamLoRA k=\d+\) in float32,", out)  # train.py's 7B setting: fp32
    # beside each peak, the dry run's estimate for the same setting (parameters counted here from the shapes)
    st, args = stack_shapes(out), bench.ModelArgs.from_name("tiny")
    kv = args.n_kv_heads * args.dim // args.n_heads
    n_base = st.layers * (2 * st.dim * st.dim + 2 * st.dim * kv + 3 * st.dim * st.ffn + 2 * st.dim) \
        + 2 * st.vocab * st.dim + st.dim  # every base parameter: the norms and both embeddings too
    rows = table_rows(out, list(st.adapter))
    for v, n_adapter in st.adapter.items():
        est = memory.estimate(args, n_base, n_adapter, dict(
            dtype="bfloat16", fsdp=False, max_len=st.seq, r=st.r, experts=1 if v == "LoRA" else st.k,
            eval_batch_size=1, adapter="lora" if v == "LoRA" else "teamlora", targets="w1,w2,w3",
            activation_checkpointing=checkpointing), 1, st.batch)["total"]
        assert rows[v][-1] == pytest.approx(est / 1000, abs=0.006), v


@pytest.mark.skipif(sys.platform != "linux", reason="file descriptors closed before the program starts, as `2>&-`")
def test_peak_bytes_on_the_cpu_runs_with_stderr_closed():
    """`python bench.py ... 2>&-`: quiet_stderr flushed sys.stderr, which Python leaves None for a stream closed at
    its start, and the benchmark ended at its first peak memory in an AttributeError nobody saw (exit code 1)."""
    code = ("import errors\nerrors.start_script()\nimport torch\nimport bench\n"
            "print(bench.peak_bytes(lambda: torch.ones(1000), 0, torch.device('cpu')) >= 4000)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(bench.__file__).parent, preexec_fn=lambda: os.close(2))
    assert (done.returncode, done.stdout) == (0, "True\n")


def test_the_full7b_flags_help_gives_the_dry_runs_arithmetic_for_the_stack_it_runs(capsys):
    """--help says what --full7b's step needs ("about N GiB") and what --no-checkpointing adds to it ("about N GiB
    more activations"): memory.py's arithmetic (the dry run's, which the 7B table prints over each measured peak) for
    that stack, 32 blocks of LLaMA-2-7B in bf16, micro-batch 4 x 1024, TeamLoRA 4 x 32 on the FFN. It said 60 GiB, a
    guess from before any run: the arithmetic gives 18.6, and an H200 measured 17.7."""
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    said = " ".join(capsys.readouterr().out.split())
    total = float(re.search(r"--full7b section cuda7b[^()]*\(about ([\d.]+) GiB", said).group(1))
    more = float(re.search(r"about ([\d.]+) GiB more activations", said).group(1))
    args = ModelArgs.from_name("llama2-7b", max_seq_len=1024)
    with torch.device("meta"):
        model = teamlora.inject(Transformer(args), ("w1", "w2", "w3"), r=128, experts=4, alpha=32.0)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = {on: memory.estimate(args, model.num_params() - n_train, n_train, dict(
        dtype="bfloat16", fsdp=False, max_len=1024, r=128, experts=4, eval_batch_size=1, adapter="teamlora",
        targets="w1,w2,w3", activation_checkpointing=on), 1, 4) for on in (True, False)}
    assert abs(total - est[True]["total"] / 2**30) <= 0.05 * total, (total, est[True]["total"] / 2**30)
    assert abs(more - (est[False]["activations"] - est[True]["activations"]) / 2**30) <= 0.05 * more


def test_no_checkpointing_without_full7b_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--section=cuda7b", "--no-checkpointing"])
    assert e.value.code == 2 and "--no-checkpointing applies to --full7b only" in capsys.readouterr().err


def test_gpu_check_knows_each_of_its_steps_by_name_and_refuses_others_before_writing(tmp_path):
    """gpu_check.sh OUT STEP... runs a subset (two device calls under their time limit): the names it accepts are
    the steps it has, and a wrong one stops it before anything is written."""
    script = (Path(bench.__file__).parent / "gpu_check.sh").read_text()
    steps = re.findall(r"^step (\w+) \d+ ", script, re.M)
    accepted = re.search(r"case \$name in ([\w|]+)\)", script).group(1).split("|")
    assert steps and sorted(steps) == sorted(accepted) and len(set(steps)) == len(steps)
    run = subprocess.run(["bash", str(Path(bench.__file__).parent / "gpu_check.sh"), str(tmp_path / "out"),
                          steps[0], "bench_7b"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown step 'bench_7b'" in run.stderr and not (tmp_path / "out").exists()


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--section=layer,speed"])
    assert e.value.code == 2 and "unknown section" in capsys.readouterr().err


@pytest.mark.parametrize("peak", ["nan", "-5", "0", "inf"])
def test_a_peak_tflops_that_is_not_a_positive_number_is_a_usage_error(capsys, peak):
    with pytest.raises(SystemExit) as e:
        bench.main([f"--peak_tflops={peak}", "--section=layer"])
    assert e.value.code == 2 and "--peak_tflops must be a positive number" in capsys.readouterr().err


def layer_peaks(d_in, d_out, r, k, shape):
    """Peak bytes of a LoRA and a TeamLoRA fused training step of one layer, on the same base, x and grad."""
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    x = torch.randn(*shape, d_in, requires_grad=True)
    grad_out = torch.randn(*shape, d_out)
    peak = {}
    for variant in ("LoRA", "TeamLoRA fused"):
        train, _, memory = bench.layer_steps(bench.adapt(base, variant, r, k, torch.float32), x, grad_out,
                                             torch.device("cpu"))
        train()
        peak[variant] = memory()
    return peak


@pytest.mark.parametrize("shape", [(256,), (4, 64)])
def test_fused_training_step_holds_no_second_copy_of_the_input(shape):
    """The router rides in A's GEMM, so a TeamLoRA step holds what a LoRA step holds plus the router's
    parameter-sized and (N, k) tensors: never a second (N, d_in) buffer (a reshape of x once cost one,
    8-13% more than LoRA at LLaMA-2-7B's down projection)."""
    d_in = 2048
    peak = layer_peaks(d_in, 256, 16, 4, shape)
    assert peak["TeamLoRA fused"] - peak["LoRA"] < math.prod(shape) * d_in * 4 / 2, peak  # half of x's bytes


@pytest.mark.parametrize("shape", [(64,), (4, 16)])
def test_fused_training_step_holds_only_the_routers_state_and_token_sized_tensors_more_than_lora(shape):
    """Beyond LoRA's peak, a TeamLoRA step holds the router (parameter, gradient, two AdamW moments), M's and at
    most (r + k) x N floats: never the (r + k) x d_in concatenation [A; W_r] (kept by plain autograd, it put
    LLaMA-2-7B's down projection at k = 8 at 1.03x LoRA's peak)."""
    d_in, r, k = 4096, 32, 8
    peak = layer_peaks(d_in, 64, r, k, shape)
    router_state = 4 * (k * d_in + k * k) * 4  # parameter, gradient, exp_avg, exp_avg_sq of W_r and M, float32
    assert router_state <= peak["TeamLoRA fused"] - peak["LoRA"] <= router_state + (r + k) * math.prod(shape) * 4, peak


# ----------------------------------------------------------------------------------------------------
# the arithmetic and bookkeeping of the measurements, on stand-in functions, fake clocks and constructed
# times: never a measured time

CPU = torch.device("cpu")


def test_the_plain_lora_beside_the_baseline_computes_loras_function():
    """bench.PlainLoRA, written apart from teamlora.py to check that the LoRA every ratio divides by is not a slow one,
    must compute the same function: with the same A and B, the same outputs and gradients as TeamLoRALinear(experts=1),
    and a base that stays frozen."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False).requires_grad_(False)
    ours = bench.adapt(base, "LoRA", 8, 4, torch.float32)
    plain = bench.adapt(base, "LoRA, plain code", 8, 4, torch.float32)
    with torch.no_grad():
        ours.lora_B.normal_()
        plain.lora_A.weight.copy_(ours.lora_A)
        plain.lora_B.weight.copy_(ours.lora_B)
    for mode in ("eval", "train"):  # train: the same function, as dropout is 0 below
        ours.dropout = plain.drop.p = 0.0
        x = torch.randn(6, 24, requires_grad=True)
        out, out_plain = getattr(ours, mode)()(x), getattr(plain, mode)()(x)
        torch.testing.assert_close(out_plain, out)
        g = torch.autograd.grad(out.square().sum(), (x, ours.lora_A, ours.lora_B))
        g_plain = torch.autograd.grad(out_plain.square().sum(), (x, plain.lora_A.weight, plain.lora_B.weight))
        for a, b in zip(g_plain, g):
            torch.testing.assert_close(a, b)
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_the_plain_lora_starts_as_its_base_and_drops_out_z_as_the_baseline_does():
    """A fresh PlainLoRA (B = 0) computes its base layer; in training, with dropout on, it draws the same mask over
    z = x A^T as TeamLoRALinear(experts=1) from the same seed, so the two compute the same function there too."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False).requires_grad_(False)
    ours = bench.adapt(base, "LoRA", 8, 4, torch.float32)
    plain = bench.adapt(base, "LoRA, plain code", 8, 4, torch.float32)
    x = torch.randn(6, 24)
    torch.testing.assert_close(plain.train()(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        ours.lora_B.normal_()
        plain.lora_A.weight.copy_(ours.lora_A)
        plain.lora_B.weight.copy_(ours.lora_B)
    ours.dropout = plain.drop.p = 0.5
    torch.manual_seed(1)
    out = ours.train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(plain.train()(x), out)
    assert not torch.allclose(out, ours.eval()(x))  # dropout did drop something


def quick_cfg():
    return SimpleNamespace(**bench.QUICK, quick=True, full7b=False, checkpointing=False,
                           variants=[v for v in bench.VARIANTS if v != "TeamLoRA compiled"])


def fake_bench(monkeypatch, *calls):
    """bench.bench answering its i-th call with calls[i] ({name: seconds per repeat}), never calling the fns."""
    answers = iter(calls)

    def fake(fns, repeats, device, warmup=2):
        times = next(answers)
        assert set(fns) == set(times) and all(len(t) == repeats for t in times.values())
        return {name: list(times[name]) for name in fns}
    monkeypatch.setattr(bench, "bench", fake)


def stack_shapes(out):
    """The 7B-stack section's printed shapes, and the adapter parameters they give LoRA and TeamLoRA: A (r x in)
    and B (out x r) on w1, w3 (dim -> FFN) and w2; TeamLoRA adds the router (k x in) and M (k x k) on each."""
    dim, ffn, layers, vocab, batch, seq, r, k = map(int, re.search(
        r"dim (\d+), FFN (\d+), (\d+) layers, vocab (\d+), batch (\d+) x (\d+), FFN adapters r=(\d+) "
        r"\(TeamLoRA k=(\d+)\)", out).groups())
    lora = layers * r * (3 * dim + 3 * ffn)
    adapter = {"LoRA": lora, "TeamLoRA fused": lora + layers * (k * (2 * dim + ffn) + 3 * k * k)}
    return SimpleNamespace(dim=dim, ffn=ffn, layers=layers, vocab=vocab, batch=batch, seq=seq, r=r, k=k,
                           adapter=adapter)


def table_rows(text, first_cells):
    """{first cell: the other cells as floats where they parse} of a printed table's rows."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in first_cells:
            rows[cells[0]] = [float(c) if re.fullmatch(r"-?[0-9.]+", c) else c for c in cells[1:]]
    assert set(rows) == set(first_cells), text
    return rows


@pytest.mark.parametrize("n, repeats, warmup", [(3, 6, 2), (4, 4, 1), (5, 10, 2), (4, 7, 1), (2, 1, 0)])
def test_bench_warms_every_fn_up_then_calls_each_once_per_repeat_in_balanced_orders(monkeypatch, n, repeats, warmup):
    """Every fn warmed up untimed, then once per repeat; over a cycle of repeats each fn takes each place, and
    follows each other fn, equally often: a time that depends on the call before it (caches, the allocator) is
    shared alike. A rotation (a b c d, b c d a, ...) put the same fn before each one in most repeats."""
    names, log, clock = [f"v{i}" for i in range(n)], [], iter(range(1, 1000))
    fns = {name: (lambda name=name: log.append(name)) for name in names}

    def fake_timed(fn, device):
        log.append("timed")
        fn()
        return next(clock)
    monkeypatch.setattr(bench, "timed", fake_timed)
    times = bench.bench(fns, repeats, CPU, warmup=warmup)
    assert log[:n * warmup] == [name for name in names for _ in range(warmup)]  # every fn warmed up, untimed
    timed_calls = log[n * warmup:]
    assert timed_calls[::2] == ["timed"] * (n * repeats)
    order = timed_calls[1::2]
    rounds = [order[i:i + n] for i in range(0, len(order), n)]
    assert len(rounds) == repeats and all(sorted(r) == names for r in rounds)  # each fn once per repeat
    # each fn's list holds the seconds of its own calls, in repeat order
    assert times == {name: [i + 1 for i, m in enumerate(order) if m == name] for name in names}
    cycle = 2 * n if n % 2 else n
    if repeats % cycle == 0:  # a whole number of cycles: balanced places and predecessors within each repeat
        places = Counter((name, i) for r in rounds for i, name in enumerate(r))
        before = Counter((a, b) for r in rounds for a, b in zip(r, r[1:]))
        assert set(places.values()) == {repeats // n}, places
        if n > 1:
            assert len(before) == n * (n - 1) and len(set(before.values())) == 1, before


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_timed_measures_the_call_in_seconds_on_the_cpu_clock_and_with_cuda_events(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)

    def work():
        clock.now += 0.25
    assert bench.timed(work, CPU) == pytest.approx(0.25)

    class Event:  # torch.cuda.Event on the same clock: elapsed_time in ms, only once `end` completed
        def __init__(self, enable_timing):
            assert enable_timing
            self.t, self.done = None, False

        def record(self):
            self.t = clock.now

        def synchronize(self):
            self.done = True

        def elapsed_time(self, end):
            assert end.done, "elapsed_time before the end event completed"
            return (end.t - self.t) * 1e3
    monkeypatch.setattr(bench.torch.cuda, "Event", Event)
    assert bench.timed(work, SimpleNamespace(type="cuda")) == pytest.approx(0.25)


def test_ms_ratio_and_spread_on_constructed_times():
    times = [0.001, 0.002, 0.010]
    assert bench.ms(times) == pytest.approx(2.0)  # the median, in milliseconds
    # seven repeats: ratio = the median of the per-repeat ratios (not the ratio of the medians, nor a mean);
    # middle half = the 2nd and 6th smallest of the seven ratios, the quartiles at (n + 1) / 4 and 3 (n + 1) / 4
    ref = [1.0, 2.0, 1.0, 4.0, 1.0, 2.0, 1.0]
    per_repeat = [1.2, 0.9, 3.0, 1.1, 1.05, 1.6, 2.0]
    times = [a * b for a, b in zip(per_repeat, ref)]
    assert bench.ratio(times, ref) == pytest.approx(sorted(per_repeat)[3])  # 1.2: times / ref
    assert bench.ratio(ref, times) == pytest.approx(sorted(1 / p for p in per_repeat)[3])
    assert bench.statistics.median(times) / bench.statistics.median(ref) != pytest.approx(1.2)  # the lists tell
    assert bench.spread(times, ref) == f"{sorted(per_repeat)[1]:.2f}-{sorted(per_repeat)[5]:.2f}"  # 1.05-2.00
    assert bench.spread([3.0], [2.0]) == "1.50-1.50"


def test_resident_bytes_counts_each_storage_once_and_whole():
    t = torch.zeros(1000)
    assert bench.resident_bytes(t, t[:10], t.view(10, 100)) == 4000  # views of one storage: counted once
    assert bench.resident_bytes(t[500:]) == 4000  # a view keeps all of its storage alive
    assert bench.resident_bytes(t, t[500:], t[999:]) == 4000  # views at an offset: still the one storage
    assert bench.resident_bytes(t, torch.zeros(10, dtype=torch.float64)) == 4080


def test_peak_bytes_adds_the_largest_rise_during_the_call_to_what_was_resident():
    mib = 2**20

    def step():
        a = torch.ones(4 * mib // 4)  # 4 MiB alive, then freed
        del a
        b = torch.ones(2 * mib // 4)  # then 2 MiB: the peak stays the first 4 MiB, the sum would be 6
        del b
    resident = 10**9
    rise = bench.peak_bytes(step, resident, CPU) - resident
    assert 4 * mib <= rise < 5 * mib, rise


def test_peak_bytes_counts_every_allocation_alive_at_the_peak_not_the_largest_one():
    """Two tensors alive together peak at their sum: the largest single allocation would under-count a step's peak
    (its activations are alive together until the backward frees them)."""
    mib = 2**20

    def step():
        a = torch.ones(4 * mib // 4)
        b = torch.ones(2 * mib // 4)  # both alive: 6 MiB
        del a, b
    rise = bench.peak_bytes(step, 0, CPU)
    assert 6 * mib <= rise < 7 * mib, rise


def test_peak_bytes_on_cuda_counts_from_the_allocation_before_the_call(monkeypatch):
    mem = SimpleNamespace(allocated=700, peak=5000)  # an earlier peak of 5000 must not count

    def alloc(n):
        mem.allocated += n
        mem.peak = max(mem.peak, mem.allocated)

    def step():
        alloc(300)
        alloc(-300)
        alloc(100)
    cuda = bench.torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: setattr(mem, "peak", mem.allocated))
    monkeypatch.setattr(cuda, "memory_allocated", lambda: mem.allocated)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: mem.peak)
    assert bench.peak_bytes(step, 10_000, SimpleNamespace(type="cuda")) == 10_000 + 300


def test_step_memory_counts_parameters_optimizer_state_and_inputs_as_resident(monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False).requires_grad_(False)
    x, grad_out = torch.randn(5, 16, requires_grad=True), torch.randn(5, 12)
    layer = bench.adapt(base, "TeamLoRA fused", 8, 2, torch.float32)
    train, _, memory = bench.layer_steps(layer, x, grad_out, CPU)
    train()  # AdamW's state exists from the first step on
    seen = []
    assert layer.last_omega is not None
    monkeypatch.setattr(bench, "peak_bytes", lambda fn, resident, device: seen.append(resident) or resident)
    memory()
    assert layer.last_omega is None  # dropped before the step: freed inside it, the profiler never saw it allocated
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trainable = [p for p in layer.parameters() if p.requires_grad]
    floor = nbytes(layer.parameters()) + 2 * nbytes(trainable) + nbytes([x, grad_out])  # + AdamW's two moments
    assert floor <= seen[0] <= floor + 8 * len(trainable)  # + a scalar step count per parameter


def test_model_step_memory_counts_the_tokens_and_targets_as_resident(monkeypatch):
    """A model's training step holds its token ids and its targets throughout, as a layer's holds x and grad_out."""
    torch.manual_seed(0)
    args = bench.ModelArgs.from_name("tiny", max_seq_len=8)
    model = bench.adapt_ffn(bench.Transformer(args), "TeamLoRA fused", 4, 2, torch.float32)
    tokens = torch.randint(args.vocab_size, (64, 8))
    targets = tokens.roll(-1, 1)  # a tensor of its own, as every section passes it
    train, memory = bench.model_steps(model, tokens, targets, CPU)
    train()  # AdamW's state exists from the first step on
    seen = []
    monkeypatch.setattr(bench, "peak_bytes", lambda fn, resident, device: seen.append(resident) or resident)
    memory()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    floor = nbytes(model.parameters()) + nbytes(model.buffers()) + 2 * nbytes(trainable) + nbytes([tokens, targets])
    assert floor <= seen[0] <= floor + 8 * len(trainable)  # + a scalar step count per parameter


@pytest.mark.parametrize("variant", ["LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused"])
def test_layer_training_step_is_forward_backward_adamw_and_clears_the_gradients(variant):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False).requires_grad_(False)
    x, grad_out = torch.randn(5, 16, requires_grad=True), torch.randn(5, 12)
    layer = bench.adapt(base, variant, 8, 2, torch.float32)
    modes = []
    layer.register_forward_pre_hook(lambda m, args: modes.append((m.training, torch.is_inference_mode_enabled())))
    train, infer, _ = bench.layer_steps(layer, x, grad_out, CPU)
    assert not layer.lora_B.any()  # B starts at zero: only a gradient step moves it
    layer.eval()
    train()
    assert layer.lora_B.any()  # backward and the optimizer step ran
    assert all(p.grad is None for p in layer.parameters()) and x.grad is None  # nothing accumulates into the next
    infer()
    assert modes == [(True, False), (False, True)]  # train: dropout on; inference: eval, no autograd


def test_model_training_step_is_forward_with_loss_backward_adamw_and_clears_the_gradients():
    torch.manual_seed(0)
    args = bench.ModelArgs.from_name("tiny", max_seq_len=8)
    model = bench.adapt_ffn(bench.Transformer(args), "TeamLoRA fused", 4, 2, torch.float32).eval()
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    tokens = torch.randint(args.vocab_size, (2, 8))
    train, _ = bench.model_steps(model, tokens, tokens.roll(-1, 1), CPU)
    train()
    bs = [m.lora_B for m in model.modules() if isinstance(m, bench.TeamLoRALinear)]
    assert bs and all(b.any() for b in bs)  # every zero-initialised B moved: backward from the loss, then AdamW
    assert all(p.grad is None for p in model.parameters()) and modes == [True]


def test_each_variant_gets_its_layer_class_experts_rank_and_competition():
    want = {  # variant: (class, experts, interaction matrix M, compiled)
        "LoRA": (bench.TeamLoRALinear, 1, False, False), "MoELoRA loop": (bench.MoELoRALoop, 4, False, None),
        "TeamLoRA loop": (bench.TeamLoRALoop, 4, True, False), "TeamLoRA fused": (bench.TeamLoRALinear, 4, True, False),
        "TeamLoRA compiled": (bench.TeamLoRALinear, 4, True, True)}
    assert set(want) == set(bench.VARIANTS)
    for variant, (cls, experts, has_m, compiled) in want.items():
        layer = bench.adapt(torch.nn.Linear(16, 12), variant, 8, 4, torch.float64)
        assert type(layer) is cls, variant
        assert layer.experts == experts and layer.r == 8, variant  # LoRA: one expert of the whole rank r
        assert layer.lora_A.numel() == 8 * 16 and layer.lora_A.dtype == torch.float64, variant
        assert (getattr(layer, "lora_M", None) is not None) == has_m, variant
        if compiled is not None:
            assert layer.compile == compiled, variant


def test_adapt_ffn_adapts_every_ffn_linear_and_freezes_the_rest():
    args = bench.ModelArgs.from_name("tiny", max_seq_len=8)
    model = bench.adapt_ffn(bench.Transformer(args), "TeamLoRA fused", 4, 2, torch.float64)
    adapted = {n for n, m in model.named_modules() if isinstance(m, bench.TeamLoRALinear)}
    assert adapted == {f"layers.{i}.feed_forward.{w}" for i in range(args.n_layers) for w in ("w1", "w2", "w3")}
    assert all(p.requires_grad == n.rpartition(".")[2].startswith("lora_") for n, p in model.named_parameters())
    assert all(m.lora_A.dtype == torch.float64 for n, m in model.named_modules() if n in adapted)


def test_check_meets_a_target_at_or_below_its_limit():
    targets = []
    for value in (0.99, 1.05, 1.0501, 1.2):
        bench.check(targets, f"v={value}", value, 1.05)
    assert [t[-1] for t in targets] == ["met", "met", "MISSED", "MISSED"]
    assert targets[0][1:3] == ["0.99", "<= 1.05"]


def test_table_left_aligns_names_right_aligns_two_decimal_numbers_under_a_rule(capsys):
    bench.table(["variant", "ms", "peak MB"], [["LoRA", 1.234, 5.0], ["a longer name", 10.0, 6.0]])
    lines = capsys.readouterr().out.splitlines()  # each column as wide as its widest cell, header included
    assert lines == ["variant" + " " * 6 + "  " + "   ms" + "  " + "peak MB",
                     "-------------  -----  -------",
                     "LoRA            1.23     5.00",
                     "a longer name  10.00     6.00", ""]


def test_layer_section_ratios_and_targets_compare_fused_with_lora(monkeypatch, capsys):
    cfg = quick_cfg()
    train = {"LoRA": [1.0, 2.0, 1.0], "LoRA, plain code": [1.1, 2.0, 1.2], "MoELoRA loop": [3.0, 6.0, 3.0],
             "TeamLoRA loop": [2.5, 5.0, 2.5], "TeamLoRA fused": [1.5, 3.0, 1.5]}
    infer = {"LoRA": [1.0, 1.0, 2.0], "LoRA, plain code": [1.0, 1.2, 2.0], "MoELoRA loop": [2.0, 2.0, 4.0],
             "TeamLoRA loop": [1.5, 1.5, 3.0], "TeamLoRA fused": [0.5, 0.5, 1.0]}
    fake_bench(monkeypatch, *[train, infer] * len(cfg.ks))
    mib = {"LoRA": 100, "LoRA, plain code": 101, "MoELoRA loop": 110, "TeamLoRA loop": 130, "TeamLoRA fused": 103}

    def fake_memory(train, module, opt, inputs, device):
        variant = ("LoRA, plain code" if isinstance(module, bench.PlainLoRA) else "MoELoRA loop"
                   if isinstance(module, bench.MoELoRALoop) else "TeamLoRA loop"
                   if isinstance(module, bench.TeamLoRALoop) else "LoRA" if module.experts == 1 else "TeamLoRA fused")
        return mib[variant] * 2**20
    monkeypatch.setattr(bench, "step_memory", fake_memory)
    targets = []
    bench.section_layer(cfg, CPU, torch.float32, targets)
    out = capsys.readouterr().out
    for k in cfg.ks:
        table = out.split(f"k = {k}, r =")[1].split("\n\n")[0]
        rows = table_rows(table, list(train))
        for v in train:  # ms, x LoRA, middle half, x MoELoRA, middle half, infer ms, x LoRA, peak MB, x LoRA
            t, i = [a / b for a, b in zip(train[v], train["LoRA"])], [a / b for a, b in zip(infer[v], infer["LoRA"])]
            m = [a / b for a, b in zip(train[v], train["MoELoRA loop"])]
            assert rows[v][0] == pytest.approx(1e3 * sorted(train[v])[1], abs=0.006)
            assert rows[v][1] == pytest.approx(sorted(t)[1], abs=0.006)
            assert rows[v][3] == pytest.approx(sorted(m)[1], abs=0.006)  # against the loop, with its spread
            assert rows[v][4] == bench.spread(train[v], train["MoELoRA loop"])
            assert rows[v][5] == pytest.approx(1e3 * sorted(infer[v])[1], abs=0.006)
            assert rows[v][6] == pytest.approx(sorted(i)[1], abs=0.006)
            assert rows[v][7:] == [mib[v], pytest.approx(mib[v] / 100, abs=0.006)]
    # Figure 4a (training) and the inference table after it: each variant's median per-repeat ratio to LoRA, each k
    figure, inference = out.split("Figure 4a: training step")[1].split("Inference forward relative to LoRA")
    for text, times in ((figure, train), (inference, infer)):
        header = re.split(r"\s{2,}", text.split("\n")[1].strip())
        assert header == ["k", *train], header  # the variants, in the order of the columns
        for cells in table_rows(text, [f"k={k}" for k in cfg.ks]).values():
            assert cells == [pytest.approx(bench.statistics.median(a / b for a, b in zip(times[v], times["LoRA"])),
                                           abs=0.006) for v in train], (text, cells)
    want = {"fused train / LoRA": ("1.50", "<= 1.05", "MISSED"),  # the targets: peak memory 1.02
            "fused / MoELoRA loop vs LoRA / loop": ("1.50", "<= 1.03", "MISSED"),
            "fused infer / LoRA": ("0.50", "<= 1.05", "met"), "fused peak memory / LoRA": ("1.03", "<= 1.02", "MISSED")}
    assert {tuple(t) for t in targets} == {(f"layer k={k}: {name}", *v) for k in cfg.ks for name, v in want.items()}


def test_model_section_times_every_variant_against_lora_and_compares_fused_peak_memory(monkeypatch, capsys):
    cfg = quick_cfg()
    times = {"LoRA": [1.0, 2.0, 1.0], "MoELoRA loop": [2.0, 4.0, 2.0], "TeamLoRA loop": [1.5, 3.0, 1.5],
             "TeamLoRA fused": [1.02, 2.2, 1.08]}
    fake_bench(monkeypatch, *[times] * len(cfg.ks))

    def fake_memory(train, module, opt, inputs, device):  # MiB: LoRA 100, TeamLoRA 100 + k / 2
        experts = {m.experts for m in module.modules() if isinstance(m, TeamLoRALinear)}
        assert len(experts) == 1 and not any(isinstance(m, bench.TeamLoRALoop) for m in module.modules())
        return (100 + (experts.pop() if experts != {1} else 0) / 2) * 2**20
    monkeypatch.setattr(bench, "step_memory", fake_memory)
    targets = []
    bench.section_model(cfg, CPU, torch.float32, targets)
    out = capsys.readouterr().out
    for k in cfg.ks:
        row = next(line for line in out.splitlines() if line.startswith(f"k={k}, r={k * cfg.model_r_B} "))
        cells = re.split(r"\s{2,}", row.strip())
        # fused: per-repeat ratios 1.02, 1.10, 1.08: median 1.08, quartiles 1.02 and 1.10
        assert cells[1] == "1000.0 (1.00x, 1.00-1.00)" and cells[4] == "1080.0 (1.08x, 1.02-1.10)", cells
        assert float(cells[-1]) == pytest.approx(1 + k / 200, abs=0.006)
    verdicts = {name: (value, verdict) for name, value, _, verdict in targets}
    assert verdicts["model k=4: fused train / LoRA"] == ("1.08", "MISSED")
    assert [verdicts[f"model k={k}: fused peak memory / LoRA"] for k in cfg.ks] == \
        [("1.01", "met"), ("1.02", "met"), ("1.04", "MISSED")]


def test_loss_section_times_the_output_layer_on_labelled_positions_against_every_position(monkeypatch, capsys):
    """Both variants train the same TeamLoRA model on instruction-shaped targets (the prompt unlabelled), one with
    loss_only: the ratio is the labelled-only step's over the every-position step's, per repeat; at LLaMA-3's
    vocabulary the logits dominate, so labelled only peaks lower."""
    cfg, flags = quick_cfg(), []
    real_steps = bench.model_steps

    def steps(model, tokens, targets, device, loss_only=False):
        answer = cfg.seq // 8
        assert (targets[:, :-answer] == -100).all() and (targets[:, -answer:] == tokens.roll(-1, 1)[:, -answer:]).all()
        assert {m.experts for m in model.modules() if isinstance(m, TeamLoRALinear)} == {4}
        flags.append(loss_only)
        return real_steps(model, tokens, targets, device, loss_only)
    monkeypatch.setattr(bench, "model_steps", steps)
    times = {"every position": [1.0, 2.0, 1.0], "labelled only": [0.5, 1.2, 0.7]}
    fake_bench(monkeypatch, times, times)
    bench.section_loss(cfg, CPU, torch.float32)
    out = capsys.readouterr().out
    assert flags == [False, True] * 2
    rows = table_rows(out, [f"{bench.ModelArgs.from_name(cfg.model).vocab_size:,}", "128,256"])
    for cells in rows.values():  # medians 1.0 and 0.7 s; per-repeat ratios 0.5, 0.6, 0.7
        assert cells[0] == 1000.0 and cells[1] == "700.0 (0.60x, 0.50-0.70)", cells
    peak, only = rows["128,256"][2], float(rows["128,256"][3].split()[0])
    assert only < peak


def test_decode_section_tokens_per_second_and_speed_against_the_base(monkeypatch, capsys):
    cfg = quick_cfg()
    prefill = {"base model": [0.10, 0.20, 0.12], "LoRA": [0.12, 0.30, 0.15], "TeamLoRA fused": [0.20, 0.50, 0.21],
               "LoRA merged": [0.11, 0.19, 0.14]}
    decode = {"base model": [0.50, 0.90, 0.60], "LoRA": [0.70, 1.00, 0.95], "TeamLoRA fused": [1.00, 2.50, 1.10],
              "LoRA merged": [0.52, 0.80, 0.61]}
    full = {v: [p + d for p, d in zip(prefill[v], decode[v])] for v in prefill}
    fake_bench(monkeypatch, prefill, full)
    bench.section_decode(cfg, CPU, torch.float32)
    rows = table_rows(capsys.readouterr().out, list(prefill))
    med = bench.statistics.median
    for v in prefill:
        # generate(prompts, 1) is the prefill and its first token: the decode adds new_tokens - 1 per prompt
        d = [f - p for f, p in zip(full[v], prefill[v])]
        d_base = [f - p for f, p in zip(full["base model"], prefill["base model"])]
        want = [cfg.prompts * cfg.prompt_len / med(prefill[v]),
                med(b / a for a, b in zip(prefill[v], prefill["base model"])),
                cfg.prompts * (cfg.new_tokens - 1) / med(d), med(b / a for a, b in zip(d, d_base))]
        assert rows[v] == pytest.approx(want, abs=0.006), v


def test_no_name_in_the_peak_table_hides_a_longer_one_after_it():
    names = list(bench.PEAK_TFLOPS)  # the first name found in the device's wins: "H100" before "H100 PCIe" would
    assert not [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if a in b]  # give a PCIe card SXM's peak


@pytest.mark.parametrize("device_name, peak_tflops, key", [("NVIDIA H100 PCIe", None, "H100 PCIe"),
                                                          ("NVIDIA L40S", None, "L40S"),
                                                          ("NVIDIA H100 PCIe", 0.5, None)])
def test_stack_section_mfu_counts_model_flops_against_the_devices_peak(monkeypatch, capsys, device_name,
                                                                       peak_tflops, key):
    """Model FLOPs per token, from the shapes: the base is frozen, so a training step does its forward (2 per
    weight) and the gradient of its inputs (2), never its weights' gradients; an adapter parameter costs 2 each
    for the forward, the input gradient and its own gradient; causal attention multiplies each query with
    T/2 keys and T/2 values on average, 2 * 2 * T/2 * dim per layer, and backward twice that. A recomputed
    forward (activation checkpointing) is hardware work, not model FLOPs."""
    peak = peak_tflops or bench.PEAK_TFLOPS[key]
    monkeypatch.setattr(bench, "cpu_name", lambda: device_name)
    scale = 1e-4 / peak  # seconds that give MFUs of tens of percent to this tiny stack
    train = {"LoRA": [2 * scale, 3 * scale, 2.5 * scale], "TeamLoRA fused": [3 * scale, 3.5 * scale, 6 * scale]}
    infer = {"LoRA": [1 * scale, 1.2 * scale, 1.1 * scale], "TeamLoRA fused": [1.5 * scale, 2 * scale, 1.8 * scale]}
    fake_bench(monkeypatch, train, infer)
    bench.section_cuda7b(quick_cfg(), CPU, peak_tflops)
    out = capsys.readouterr().out
    assert f"MFU against {peak} TFLOPS" in out
    st, args = stack_shapes(out), bench.ModelArgs.from_name("tiny")
    dim, ffn, layers, vocab, batch, seq, adapter = st.dim, st.ffn, st.layers, st.vocab, st.batch, st.seq, st.adapter
    assert (dim, ffn, layers, vocab) == (args.dim, args.ffn_hidden_dim, args.n_layers, args.vocab_size)
    kv = args.n_kv_heads * args.dim // args.n_heads
    P = layers * (2 * dim * dim + 2 * dim * kv + 3 * dim * ffn) + vocab * dim
    attention = 2 * seq * dim * layers
    rows = table_rows(out, list(train))
    med = bench.statistics.median
    for v in train:
        tps_train, tps_infer = batch * seq / med(train[v]), batch * seq / med(infer[v])
        mfu_train = 100 * (4 * P + 6 * adapter[v] + 3 * attention) * tps_train / (peak * 1e12)
        mfu_infer = 100 * (2 * P + 2 * adapter[v] + attention) * tps_infer / (peak * 1e12)
        assert 5 < mfu_train < 1000 and 5 < mfu_infer < 1000
        tok_s, mfu, _, tok_s_infer, mfu_i = rows[v][:5]
        assert tok_s == pytest.approx(tps_train, rel=1e-6) and tok_s_infer == pytest.approx(tps_infer, rel=1e-6)
        assert (mfu, mfu_i) == (pytest.approx(mfu_train, abs=0.051), pytest.approx(mfu_infer, abs=0.051)), v
        ratios = [med(a / b for a, b in zip(t[v], t["LoRA"])) for t in (train, infer)]  # time x LoRA: v's over LoRA's
        assert [rows[v][2], rows[v][5]] == pytest.approx(ratios, abs=0.006), v


# ----------------------------------------------------------------------------------------------------
# what each section compares: the fns it times run the adapters their labels say, in the mode their column says

CLASS = {"LoRA": "TeamLoRALinear", "LoRA, plain code": "PlainLoRA", "MoELoRA loop": "MoELoRALoop",
         "TeamLoRA loop": "TeamLoRALoop", "TeamLoRA fused": "TeamLoRALinear"}


def ran(variant, r, k, training, merged=False):
    """The adapters a fn of `variant` at total rank r and k experts runs: LoRA one expert of rank r, the others k
    experts of r / k; all at the same alpha (scaling alpha / r_B); train: train mode, inference: inference mode."""
    experts = 1 if variant.startswith("LoRA") else k
    return {(CLASS[variant], r, experts, bench.ALPHA * experts / r, training, not training, merged)}


def spy_bench(monkeypatch):
    """bench.bench calling each fn once, untimed, its i-th call answering i s a repeat; returns its calls, each
    (warmup, {name: the set of (class, r, experts, scaling, training, inference mode, merged) of the adapters
    the fn ran}). step_memory answers 1 MiB."""
    calls, real = [], inspect.signature(bench.bench)

    def fake(*args, **kwargs):
        bound = real.bind(*args, **kwargs)
        bound.apply_defaults()  # the warmup the sections' call would run
        fns, repeats, warmup = bound.arguments["fns"], bound.arguments["repeats"], bound.arguments["warmup"]
        seen = {}
        for name, fn in fns.items():
            adapters = seen[name] = set()

            def hook(m, args):
                if isinstance(m, (TeamLoRALinear, bench.MoELoRALoop, bench.PlainLoRA)):
                    adapters.add((type(m).__name__, m.r, m.experts, m.scaling, m.training,
                                  torch.is_inference_mode_enabled(), getattr(m, "merged", False)))
            handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
            try:
                fn()
            finally:
                handle.remove()
        calls.append((warmup, seen))
        return {name: [float(len(calls))] * repeats for name in fns}
    monkeypatch.setattr(bench, "bench", fake)
    monkeypatch.setattr(bench, "step_memory", lambda *a: 2**20)
    return calls


def test_layer_sections_time_every_variant_at_the_same_total_rank_train_then_infer(monkeypatch, capsys):
    """r = k * r_B for every variant, LoRA included (one expert of the whole rank), as the headers print; the
    train column times training steps, the infer column inference forwards; every fn warmed up first."""
    cfg, variants = quick_cfg(), ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused")
    calls = spy_bench(monkeypatch)
    bench.section_layer(cfg, CPU, torch.float32, [])
    bench.section_layer7b(cfg, CPU, torch.float32, [])
    bench.section_scaling(cfg, CPU, torch.float32)
    out = capsys.readouterr().out
    assert all(f"k = {k}, r = {k * cfg.r_B}" in out for k in cfg.ks)
    want = [{v: ran(v, k * cfg.r_B, k, training) for v in variants + ("LoRA, plain code",)} for k in cfg.ks
            for training in (True, False)]
    want += [{v: ran(v, k * cfg.big_r_B, k, True) for v in ("LoRA", "MoELoRA loop", "TeamLoRA fused")}
             for _ in cfg.big_shapes for k in (2, 4, 8)]
    want += [{v: ran(v, r, k, True) for v in variants}
             for k, r in [(k, cfg.scale_rank) for k in cfg.scale_ks] + [(k, k * cfg.r_B) for k in cfg.scale_ks]]
    assert [seen for _, seen in calls] == want
    assert all(warmup >= 1 for warmup, _ in calls)


def test_model_decode_and_stack_sections_adapt_every_variant_at_the_rank_they_print(monkeypatch, capsys):
    cfg = quick_cfg()
    calls = spy_bench(monkeypatch)
    bench.section_model(cfg, CPU, torch.float32, [])
    bench.section_decode(cfg, CPU, torch.float32)
    bench.section_cuda7b(cfg, CPU, None)
    out = capsys.readouterr().out
    r_decode = int(re.search(r"## 4\..*FFN adapters r=(\d+)", out).group(1))
    r_stack, k_stack = map(int, re.search(r"FFN adapters r=(\d+) \(TeamLoRA k=(\d+)\)", out).groups())
    variants = ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused")
    want = [{v: ran(v, k * cfg.model_r_B, k, True) for v in variants} for k in cfg.ks]
    # decode: LoRA unmerged and merged (a copy: folded into W0, its adapter never runs as one) at TeamLoRA's rank
    want += [{"base model": set(), "LoRA": ran("LoRA", r_decode, 4, False),
              "TeamLoRA fused": ran("TeamLoRA fused", r_decode, 4, False),
              "LoRA merged": ran("LoRA", r_decode, 4, False, merged=True)}] * 2
    assert [seen for _, seen in calls[:-2]] == want
    # the stack: training steps, then inference forwards in eval mode (no dropout), as the other sections
    stack = [{v: ran(v, r_stack, k_stack, training) for v in ("LoRA", "TeamLoRA fused")} for training in (True, False)]
    assert [seen for _, seen in calls[-2:]] == stack
    assert r_decode == 4 * cfg.model_r_B and all(warmup >= 1 for warmup, _ in calls)


def test_layer7b_section_ratios_spread_and_targets_compare_fused_with_lora_and_the_loop(monkeypatch, capsys):
    cfg = quick_cfg()
    # per-repeat ratios: fused / LoRA 1.1, 1.2, 1.04; MoELoRA / LoRA 3, 2, 2; fused / MoELoRA 0.367, 0.6, 0.52
    times = {"LoRA": [1.0, 2.0, 1.0], "MoELoRA loop": [3.0, 4.0, 2.0], "TeamLoRA fused": [1.1, 2.4, 1.04]}
    cfg.big_repeats = 3
    fake_bench(monkeypatch, *[times] * (3 * len(cfg.big_shapes)))
    monkeypatch.setattr(bench, "step_memory", lambda train, module, opt, inputs, device:
                        (100 if module.experts == 1 else 101) * 2**20)
    targets = []
    bench.section_layer7b(cfg, CPU, torch.float32, targets)
    out = capsys.readouterr().out
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith("N=")]
    header = re.split(r"\s{2,}", next(line for line in out.splitlines() if line.startswith("shape")).strip())
    med = lambda a, b: f"{bench.statistics.median(x / y for x, y in zip(times[a], times[b])):.2f}"  # noqa: E731
    for name, (a, b) in {"fused/LoRA": ("TeamLoRA fused", "LoRA"), "MoELoRA/LoRA": ("MoELoRA loop", "LoRA"),
                         "fused/MoELoRA": ("TeamLoRA fused", "MoELoRA loop")}.items():  # each label over its ratio
        assert all(row[header.index(name)] == med(a, b) for row in rows), (name, header)
    for name, v in {"LoRA ms": "LoRA", "MoELoRA ms": "MoELoRA loop", "fused ms": "TeamLoRA fused"}.items():
        assert all(float(row[header.index(name)]) == 1e3 * sorted(times[v])[1] for row in rows), (name, header)
    assert [row[1] for row in rows] == ["2", "4", "8"] * len(cfg.big_shapes)
    for row in rows:  # ms of LoRA, MoELoRA, fused; fused/LoRA, middle half, MoELoRA/LoRA, fused/MoELoRA, middle
        # half, peak mem/LoRA
        assert row[2:] == ["1000.00", "3000.00", "1100.00", "1.10", "1.04-1.20", "2.00", "0.52", "0.37-0.60",
                           "1.01"], row
    # fused / loop against LoRA / loop: 0.52 / 0.5, the medians of the per-repeat ratios
    want = {"fused train / LoRA": ("1.10", "MISSED"), "fused / loop vs LoRA / loop": ("1.04", "MISSED"),
            "fused peak memory / LoRA": ("1.01", "met")}
    n, d_in, d_out = cfg.big_shapes[0]
    assert {(name, value, verdict) for name, value, _, verdict in targets} == \
        {(f"7B FFN N={n} {d_in}->{d_out} k={k}: {name}", *v) for k in (2, 4, 8) for name, v in want.items()}


def test_scaling_section_ratios_and_memory_columns(monkeypatch, capsys):
    cfg = quick_cfg()
    # per-repeat ratios: fused / LoRA 1.5, 1.0, 1.2 (median 1.2); loop / fused 2, 2.5, 1.67 (median 2)
    times = {"LoRA": [1.0, 2.0, 1.0], "MoELoRA loop": [4.0, 4.0, 4.0], "TeamLoRA loop": [3.0, 5.0, 2.0],
             "TeamLoRA fused": [1.5, 2.0, 1.2]}
    cfg.scale_repeats = 3
    fake_bench(monkeypatch, *[times] * (2 * len(cfg.scale_ks)))
    monkeypatch.setattr(bench, "step_memory", lambda train, module, opt, inputs, device:
                        (30 if isinstance(module, bench.TeamLoRALoop) else 20) * 2**20)
    bench.section_scaling(cfg, CPU, torch.float32)
    rows = table_rows(capsys.readouterr().out, [f"fixed r={cfg.scale_rank}", f"fixed r_B={cfg.r_B}"])
    (k,) = cfg.scale_ks
    assert rows[f"fixed r={cfg.scale_rank}"][:2] == [k, cfg.scale_rank] and rows[f"fixed r_B={cfg.r_B}"][:2] == \
        [k, k * cfg.r_B]
    for row in rows.values():  # LoRA, MoELoRA, loop, fused ms; fused/LoRA, loop/fused; loop MB, fused MB
        assert row[2:] == [1000.0, 4000.0, 3000.0, 1500.0, 1.2, 2.0, 30.0, 20.0], row


def test_model_section_compares_compiled_blocks_with_fused_eager(monkeypatch, capsys):
    cfg = quick_cfg()
    cfg.ks, cfg.variants = (2,), list(bench.VARIANTS)
    times = {"LoRA": [1.0, 1.0, 1.0], "MoELoRA loop": [3.0, 3.0, 3.0], "TeamLoRA loop": [2.5, 2.5, 2.5],
             "TeamLoRA fused": [2.0, 2.0, 2.0], "TeamLoRA compiled": [1.9, 1.9, 1.9],
             "blocks compiled": [1.8, 1.9, 1.7]}
    fake_bench(monkeypatch, times)  # never calls the fns: nothing compiles
    monkeypatch.setattr(bench, "step_memory", lambda *a: 2**20)
    targets = []
    bench.section_model(cfg, CPU, torch.float32, targets)
    verdicts = {name: (value, verdict) for name, value, _, verdict in targets}
    assert verdicts["model k=2: blocks compiled / fused eager"] == ("0.90", "met")  # 1.8 / 2, not 1.8 / LoRA's 1
    assert "blocks compiled" in capsys.readouterr().out


def test_sharing_section_times_each_thread_count_alone_then_beside_a_busy_process_and_restores_threads(monkeypatch,
                                                                                                       capsys):
    import subprocess
    import sys
    neighbours, calls = [], []

    class Neighbour:
        def __init__(self, argv):
            self.argv, self.killed, self.waited = argv, False, False
            neighbours.append(self)

        def kill(self):
            self.killed = True

        def wait(self):
            self.waited = True
    monkeypatch.setattr(subprocess, "Popen", Neighbour)
    ms = {(False, 1): [0.1, 0.3], (False, 2): [0.2, 0.2], (True, 1): [0.4, 0.6], (True, 2): [0.9, 1.1]}

    def fake(fns, repeats, device, warmup=2):
        n, busy = torch.get_num_threads(), any(not p.killed for p in neighbours)
        assert list(fns) == [n] and repeats == 2 and warmup >= 1
        calls.append((busy, n))
        return {n: ms[busy, n]}
    monkeypatch.setattr(bench, "bench", fake)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bench.section_sharing(quick_cfg(), CPU, torch.float32)
        assert torch.get_num_threads() == 2  # restored after timing at 1 thread
    finally:
        torch.set_num_threads(threads)
    assert calls == [(False, 1), (False, 2), (True, 1), (True, 2)]
    assert len(neighbours) == 1 and neighbours[0].killed and neighbours[0].waited
    assert neighbours[0].argv[0] == sys.executable and "while True" in neighbours[0].argv[-1]  # a busy loop
    rows = table_rows(capsys.readouterr().out, ["alone", "one busy neighbour"])
    assert rows == {"alone": [200.0, 200.0], "one busy neighbour": [500.0, 1000.0]}


def test_sharing_section_measures_nothing_off_the_cpu(monkeypatch, capsys):
    """Threads sharing a CPU's cores is a CPU question: on a GPU the section prints, starts and times nothing."""
    import subprocess
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a busy neighbour was started"))
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("something was timed"))
    assert bench.section_sharing(quick_cfg(), torch.device("cuda"), torch.float32) is None
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("section", ["sharing", "sharing,sharing"])
def test_the_sharing_section_alone_on_the_gpu_is_a_usage_error_not_a_run_that_prints_nothing(capsys, section):
    """Off the CPU section_sharing measures nothing (above): asked for alone on --device=cuda, the run printed its
    headline and nothing else. Refused before CUDA is looked for, so this runs on a machine without one."""
    with pytest.raises(SystemExit) as e:
        bench.main(["--device=cuda", f"--section={section}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "section sharing times threads sharing a CPU's cores" in err
    assert "run it without --device=cuda" in err


def test_sharing_section_on_one_thread_times_that_one_count_once_per_machine_state(monkeypatch, capsys):
    import subprocess

    class Neighbour:
        def __init__(self, argv):
            pass

        def kill(self):
            pass

        def wait(self):
            pass
    monkeypatch.setattr(subprocess, "Popen", Neighbour)
    calls = []
    monkeypatch.setattr(bench, "bench", lambda fns, repeats, device, warmup=2: calls.append(list(fns)) or
                        {n: [0.1] * repeats for n in fns})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.section_sharing(quick_cfg(), CPU, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert calls == [[1], [1]]
    out = capsys.readouterr().out
    assert out.count("thread(s) ms") == 1
    assert table_rows(out, ["alone", "one busy neighbour"]) == {"alone": [100.0], "one busy neighbour": [100.0]}


def test_spread_of_two_repeats_is_the_middle_half_of_both_ratios_not_the_first_alone():
    """Two repeats (--repeats=2): the quartiles of the two per-repeat ratios (2 and 4), which lie around both."""
    low, high = map(float, bench.spread([2.0, 8.0], [1.0, 2.0]).split("-"))
    q = bench.statistics.quantiles([2.0, 4.0], n=4)
    assert (low, high) == (round(q[0], 2), round(q[2], 2)) and low <= 2.0 < 4.0 <= high


@pytest.mark.parametrize("flag", ["--threads=0", "--repeats=0", "--repeats=-3"])
def test_threads_or_repeats_below_one_are_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", flag])
    assert e.value.code == 2 and "--threads and --repeats must be at least 1" in capsys.readouterr().err


def test_more_threads_than_torch_can_take_are_a_usage_error_not_a_crash():
    """torch.set_num_threads(99999) ended the process with a segmentation fault: no message, exit code -11. A
    subprocess, as the old code would take pytest down with it."""
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--section=layer", "--threads=99999"],
                          cwd=Path(bench.__file__).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.splitlines()[-1] == "bench.py: error: --threads=99999 is more than 1024; give at most one " \
        "thread per core" and done.stdout == ""


def test_the_teamlora_loop_is_the_fused_layers_function_dropping_out_in_training_only():
    """The loop bench.py times against the fused path computes its function: the same output in eval mode (no
    dropout there, so its inference timings run what the fused layer's do), and random masks in training only."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    fused = TeamLoRALinear(base, 8, 4, 32.0, 0.5, True)
    torch.nn.init.normal_(fused.lora_B)
    loop = bench.TeamLoRALoop(base, 8, 4, 32.0, 0.5, True)
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(5, 16)
    for _ in range(2):
        torch.testing.assert_close(loop.eval()(x), fused.eval()(x))
    assert not torch.equal(loop.train()(x), loop.train()(x))  # dropout 0.5: two masks


def test_no_checkpointing_without_full7b_is_a_usage_error_under_quick_too_and_is_taken_with_it(monkeypatch, capsys):
    """--quick runs section cuda7b's tiny stack: --no-checkpointing still applies to --full7b only, with it or not."""
    monkeypatch.setattr(bench, "run_sections", lambda *args: [])
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--section=cuda7b", "--no-checkpointing"])
    assert e.value.code == 2 and "--no-checkpointing applies to --full7b only" in capsys.readouterr().err
    bench.main(["--quick", "--section=cuda7b", "--full7b", "--no-checkpointing"])
    assert "error" not in capsys.readouterr().err


def test_1024_threads_the_most_that_bench_takes_are_set_not_refused(monkeypatch, capsys):
    """1024 is the limit, not past it: that many threads are set (set_num_threads and the sections faked)."""
    set_to = []
    monkeypatch.setattr(bench.torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(bench, "run_sections", lambda *args: [])
    bench.main(["--quick", "--section=layer", "--threads=1024"])
    assert set_to == [1024] and "error" not in capsys.readouterr().err


def test_full7b_without_its_section_is_a_usage_error_not_ignored(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--full7b", "--section=layer"])
    assert e.value.code == 2 and "--full7b applies to section cuda7b, which --section=layer leaves out" in \
        capsys.readouterr().err


def test_full7b_on_the_cpu_is_a_usage_error_not_ignored(monkeypatch, capsys):
    """Section cuda7b skips a CPU unless --quick: a full --full7b there would time every CPU section instead."""
    monkeypatch.setattr(bench, "run_sections", lambda *a: pytest.fail("bench.py measured with --full7b on the CPU"))
    for argv in (["--full7b"], ["--full7b", "--section=cuda7b"], ["--full7b", "--device=cpu"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and "--full7b applies to section cuda7b, which runs on --device=cuda" in \
            capsys.readouterr().err


def test_full7b_and_peak_tflops_on_cuda_reach_the_sections(monkeypatch):
    """`python bench.py --device=cuda --section=cuda7b --full7b` (gpu_check.sh's step bench7b), with or without the
    GPU's --peak_tflops, is refused on the CPU only: on CUDA (stood in for, the sections not run) it runs."""
    ran = []
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(bench, "run_sections", lambda *a: ran.append(a) or [])
    threads = torch.get_num_threads()
    try:
        for flags in (["--full7b"], ["--peak_tflops=989"], ["--full7b", "--peak_tflops=989"]):
            bench.main(["--device=cuda", "--section=cuda7b", f"--threads={threads}", *flags])
    finally:
        torch.set_num_threads(threads)
    assert len(ran) == 3


def test_a_peak_tflops_that_no_section_uses_is_a_usage_error_not_ignored(monkeypatch, capsys):
    """Only section cuda7b's MFU reads it, and that section skips a CPU unless --quick: on the CPU, or without it, the
    peak went unused and unsaid, once every other section was timed (several minutes)."""
    monkeypatch.setattr(bench, "run_sections", lambda *a: pytest.fail("bench.py measured with a peak it ignores"))
    for argv in (["--peak_tflops=989"], ["--peak_tflops=989", "--section=cuda7b"],
                 ["--peak_tflops=989", "--quick", "--section=layer,model"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and "--peak_tflops applies to section cuda7b's MFU, which runs on --device=cuda" in \
            capsys.readouterr().err
    seen = []
    monkeypatch.setattr(bench, "run_sections", lambda cfg, sections, device, dtype, peak: seen.append(peak) or [])
    bench.main(["--peak_tflops=989", "--quick", "--section=cuda7b"])  # the tiny stack's MFU on the CPU uses it
    assert seen == [989.0]


def _main_cfg(monkeypatch, argv, targets=()):
    """The cfg bench.main hands to run_sections, which returns `targets` instead of measuring anything."""
    seen = []
    monkeypatch.setattr(bench, "run_sections", lambda cfg, *rest: seen.append(cfg) or [list(t) for t in targets])
    bench.main(argv + [f"--threads={torch.get_num_threads()}"])
    return seen[0]


def test_repeats_sets_every_sections_repeats_and_checkpointing_is_for_the_full_7b_stack_only(monkeypatch, capsys):
    cfg = _main_cfg(monkeypatch, ["--quick", "--repeats=7", "--section=scaling"])
    assert (cfg.repeats, cfg.scale_repeats) == (7, 7)
    assert _main_cfg(monkeypatch, ["--quick", "--section=cuda7b"]).checkpointing is False  # the 4-block stack
    assert _main_cfg(monkeypatch, ["--quick", "--full7b"]).checkpointing is True
    assert _main_cfg(monkeypatch, ["--quick", "--full7b", "--no-checkpointing"]).checkpointing is False


def test_missed_targets_are_printed_in_a_table_and_only_when_a_section_checked_some(monkeypatch, capsys):
    target = ["layer k=2: fused train / LoRA", "1.20", "<= 1.05", "MISSED"]
    note = "--quick uses tiny shapes"
    _main_cfg(monkeypatch, ["--quick", "--section=layer"], [target])
    out = capsys.readouterr().out
    assert "## Targets" in out and note in out and re.search(r"layer k=2: fused train / LoRA +1\.20 +<= 1\.05 +MISSED",
                                                            out)
    _main_cfg(monkeypatch, ["--section=layer"], [target])
    out = capsys.readouterr().out
    assert "## Targets" in out and note not in out and "MISSED" in out
    _main_cfg(monkeypatch, ["--quick", "--section=scaling"])
    assert "Targets" not in capsys.readouterr().out


def test_full7b_on_cuda_is_taken_without_quick(monkeypatch, capsys):
    """The full stack is meant for a GPU: --full7b --device=cuda goes on (here to the note that CUDA is missing)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench.main(["--full7b", "--device=cuda"])
    assert capsys.readouterr().out.startswith("skipped: --device=cuda asks for a GPU")


def test_an_abbreviated_flag_is_named_not_taken_as_its_flag(monkeypatch, capsys):
    """bench.py reads its flags as the other scripts do (errors.Parser): --quic was taken as --quick."""
    monkeypatch.setattr(bench, "run_sections", lambda *a: pytest.fail("bench.py ran with an abbreviated flag"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--quic"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("did you mean --quick?")


def test_peak_bytes_sums_the_cpu_profilers_memory_events_in_time_order_as_it_lists_them_in_any(monkeypatch):
    """The profiler's events come per thread, not in time order: the live bytes are summed by start time. Summed as
    listed, a free listed before its allocation would hide the peak (here: 0 instead of 4 MiB)."""
    mib = 2**20
    timeline = [(1, 4 * mib), (2, -4 * mib), (3, 2 * mib), (4, -2 * mib), (5, 1)]  # (start ns, bytes): peak 4 MiB
    event = lambda t, n, name="[memory]": SimpleNamespace(start_ns=lambda: t, nbytes=lambda: n, name=lambda: name)  # noqa: E731
    listed = [event(t, n) for t, n in reversed(timeline)] + [event(0, 10**9, "aten::ones")]  # not memory: not counted

    class Profile:  # torch.profiler.profile as peak_bytes reads it
        def __init__(self, **kwargs):
            self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: listed))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(bench.torch.profiler, "profile", Profile)
    live = [sum(n for _, n in timeline[:i + 1]) for i in range(len(timeline))]  # the running sum in time order
    assert bench.peak_bytes(lambda: None, 1000, CPU) == 1000 + max(live) == 1000 + 4 * mib


def test_quiet_stderr_silences_file_descriptor_2_for_the_block_alone_and_closes_what_it_opened(capfd):
    """The profiler's C++ lines are hidden inside the block; after it, stderr is the one it was (bench's own lines
    and a failure's traceback reach the reader), and no descriptor is left open, block after block."""
    def open_fds():
        return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    before = open_fds()
    for _ in range(3):
        with bench.quiet_stderr():
            os.write(2, b"hidden\n")
        os.write(2, b"shown\n")
    with pytest.raises(ZeroDivisionError), bench.quiet_stderr():
        1 / 0
    os.write(2, b"after a failure\n")
    assert capfd.readouterr().err == "shown\n" * 3 + "after a failure\n"
    assert open_fds() == before
