"""bench.py: a smoke test (the measurements themselves are the benchmark's, never a test's).

    python -m pytest -q
"""

import pytest
import torch

import bench


def test_quick_run_prints_every_section_with_every_variant(capsys):
    bench.main(["--quick", "--no-compile", "--threads=1"])  # compile's warm-up alone takes a minute
    out = capsys.readouterr().out
    for header in ("## 1. Layer level", "## 1b. Layer level at LLaMA-2-7B's FFN shapes", "## 2. Model level",
                   "## 3. Beyond the paper", "## 4. Prefill and decode", "## 6. Sharing the CPU", "## 5. 7B-shaped",
                   "## Targets"):
        assert header in out, header
    layer, model = out.split("## 2.")[0], out.split("## 2.")[1].split("## 3.")[0]
    variants = ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused")
    for variant in variants:  # a row in the table of each k (2, 4, 8)
        assert sum(line.startswith(variant + "  ") for line in layer.splitlines()) == 3, variant
    for section in (layer.split("Figure 4a")[1], model):  # a column in the summaries
        header = next(line for line in section.splitlines() if line.startswith("k  "))
        assert all(v in header for v in variants), header
    rows_and_headers = [line for line in out.splitlines() if line.startswith(("k  ", "TeamLoRA compiled", "blocks"))]
    assert not any("compiled" in line for line in rows_and_headers)  # --no-compile: no compiled variant ran
    decode = out.split("## 4.")[1].split("## 6.")[0]
    assert all(any(line.startswith(v + "  ") for line in decode.splitlines())
               for v in ("base model", "LoRA", "LoRA merged", "TeamLoRA fused"))
    sharing = out.split("## 6.")[1].split("## 5.")[0]
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


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--section=layer,speed"])
    assert e.value.code == 2 and "unknown section" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(256,), (4, 64)])
def test_fused_training_step_holds_no_second_copy_of_the_input(shape):
    """The router rides in A's GEMM, so a TeamLoRA step holds what a LoRA step holds plus the router's
    parameter-sized and (N, k) tensors: never a second (N, d_in) buffer (a reshape of x once cost one,
    8-13% more than LoRA at LLaMA-2-7B's down projection)."""
    torch.manual_seed(0)
    d_in, d_out = 2048, 256
    base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    x = torch.randn(*shape, d_in, requires_grad=True)
    grad_out = torch.randn(*shape, d_out)
    peak = {}
    for variant in ("LoRA", "TeamLoRA fused"):
        train, _, memory = bench.layer_steps(bench.adapt(base, variant, 16, 4, torch.float32), x, grad_out,
                                             torch.device("cpu"))
        train()
        peak[variant] = memory()
    assert peak["TeamLoRA fused"] - peak["LoRA"] < x.numel() * x.element_size() / 2, peak
