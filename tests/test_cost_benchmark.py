"""The cost benchmark (benchmarks/step_time.py): its report plumbing, and its GPU code path shrunk to CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_time  # noqa: E402


def test_markdown_section_of_a_run_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "cost.md"
    path.write_text("# Cost\n\nHand-written notes.\n")
    step_time.write_markdown(path, "cpu_cpu", "first run")
    step_time.write_markdown(path, "paper_cuda", "gpu run")
    step_time.write_markdown(path, "cpu_cpu", "second run")
    text = path.read_text()
    assert text.startswith("# Cost\n\nHand-written notes.\n")
    assert "first run" not in text and text.count("second run") == 1 and text.count("gpu run") == 1
    assert text.index("second run") < text.index("gpu run")  # replaced where it was


def test_quartiles_and_median_of_step_times():
    summary = step_time.summary_ms([0.004, 0.001, 0.003, 0.002, 0.005])
    assert summary == {"median": 3.0, "q1": 2.0, "q3": 4.0, "n": 5}


def test_unknown_setting_and_method_are_refused():
    with pytest.raises(ValueError, match="Unknown --setting 'gpu'"):
        step_time.get_setting("gpu", tiny=False)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--methods", "adapter"])


@pytest.mark.slow
def test_paper_setting_code_path_runs_every_method_on_cpu(tmp_path):
    # The GPU command (benchmarks/gpu_cost.sh) at a tiny size: bf16 autocast, both backbone families, every
    # method, the report files.
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--setting", "paper", "--tiny"]
    command += ["--device", "cpu", "--threads", "1", "--json", str(out), "--markdown", str(md)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["setting"] == "paper-tiny" and report["device"] == "cpu"
    assert set(report["results"]) == {"swin-tiny", "vit-tiny"}
    for results in report["results"].values():
        assert list(results) == list(step_time.METHODS)
        assert results["full"]["ratios"]["step_vs_full"] == 1.0
        assert results["med_adapter"]["tuned_params"] < results["full"]["tuned_params"]
        assert results["med_adapter"]["adapter_bytes"] < results["med_adapter"]["checkpoint_bytes"]
    assert report["paper_swin_t_adapter"]["adapter_params"] == 737_568
    text = md.read_text()
    assert "<!-- cost:paper-tiny_cpu start -->" in text and "| med_adapter_reference |" in text
