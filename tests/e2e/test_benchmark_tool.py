"""tools/benchmark.py end to end on the miniature SD: figures per implementation, ratios, cost-only mode."""

import json

import pytest

import emerdiff

from conftest import TINY, load_tool
from emerdiff.profiling import STAGES

benchmark = load_tool("benchmark")


def test_benchmark_tool_writes_per_impl_figures_and_ratios(tmp_path, capsys):
    argv = ["--cfg", str(TINY), "segmentor.resolution=64", "segmentor.num_masks=2", "segmentor.denoise_steps=2",
            "--output", str(tmp_path), "--no-warmup"]
    assert benchmark.main(argv) == 0
    record = json.loads((tmp_path / "benchmark.json").read_text())
    assert record["command"].startswith("python tools/benchmark.py --cfg")
    assert (record["emerdiff_version"], record["format_version"]) == (emerdiff.__version__, 1)
    for impl in ("fast", "reference"):
        figures = record["impls"][impl]
        assert {"flops", "seconds", "unet_calls", "vae_calls", "peak_mem_bytes"} <= figures.keys()
        assert set(figures["stages"]) == set(STAGES) and figures["flops"] > 0 and figures["seconds"] > 0
    assert 0 < record["ratios"]["modulated_flops"] < 1 and record["ratios"]["seconds"] > 0
    printed = capsys.readouterr().out
    assert "| modulated |" in printed and "fast/ref" in printed and "projected fast" in printed


def test_benchmark_cost_only_needs_no_run_and_rejects_real_weights(tmp_path, capsys):
    argv = ["--cfg", str(TINY), "segmentor.resolution=64", "segmentor.denoise_steps=2", "--cost-only",
            "--impl", "reference", "--output", str(tmp_path)]
    assert benchmark.main(argv) == 0
    record = json.loads((tmp_path / "benchmark.json").read_text())
    assert record["measured"] is False and record["impls"]["reference"]["seconds"] is None
    assert record["impls"]["reference"]["unet_samples"] == 1 + 2 + 2 * 6 * 2  # features, inversion, K = 6 masks
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["model.pretrained=some/real-model", "--cost-only"])
    error = capsys.readouterr().err  # argparse's own errors (also status 2) start with the usage line instead
    assert stopped.value.code == 2 and error.startswith("error: --cost-only builds random weights on the meta device: set model.random_init=true")
