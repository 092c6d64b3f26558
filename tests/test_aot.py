"""tools.aot, the ahead-of-time compile check: a real sm_90 compile on the CPU (Triton's bundled ptxas, no GPU),
and the failure rule on hand-made rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import triton.backends.nvidia.compiler as nvidia_compiler
from conftest import SUBPROCESS_ENV

import tools.aot.__main__ as cli
from tools.aot import compile as aot_compile
from tools.aot import launchers, report, spec, sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compiles_a_kernel_for_sm90_without_a_gpu(tmp_path):
    # A subprocess: the test session runs Triton's interpreter (TRITON_INTERPRET=1), which has nothing to compile.
    command = [sys.executable, "-m", "tools.aot", "--kernels=_bwd_preprocess_kernel", "--arch=90", "--jobs=1",
               f"--out={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (jsonl,) = tmp_path.glob("aot_triton-*.jsonl")
    assert jsonl.with_suffix(".md").exists()
    (row,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (row["kernel"], row["arch"], row["dtype"], row["head_dim"]) == ("_bwd_preprocess_kernel", 90, "bf16", 64)
    assert row["meta"] == {"BLOCK_M": 32} and (row["num_warps"], row["num_stages"]) == (4, 3)
    assert row["error"] is None
    assert 0 < row["n_regs"] <= 255
    assert row["spill_stores"] == row["spill_loads"] == row["n_spills"] == 0
    assert 0 <= row["shared"] <= row["shared_limit"] == 232448
    assert row["compile_s"] > 0
    assert row["triton"] and row["date"] and "ptxas" in row["ptxas"]


def test_spec_matches_the_kernels():
    for name in spec.SPECS:
        aot_compile.check_spec(name, sweep.kernel_function(name))


@pytest.mark.slow
def test_spec_matches_what_the_launchers_pass():
    command = [sys.executable, "-m", "tools.aot", "--check-launchers"]
    result = subprocess.run(command, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every recorded launch matches the spec" in result.stdout


def test_launch_mismatches_name_the_argument():
    variant = spec.Variant("_fwd_kernel", 90, "bf16", 64, True, "fp32", (("BLOCK_M", 32), ("BLOCK_N", 16)), 4, 3)
    fn = sweep.kernel_function("_fwd_kernel")
    source = aot_compile.ast_source(fn, variant)
    launch = ["_fwd_kernel", dict(source.signature), dict(source.constants), dict(source.attrs)]
    assert launchers.launch_mismatches([tuple(launch)]) == []
    stride_qh = fn.arg_names.index("stride_qh")
    del launch[3][(stride_qh,)]
    launch[1]["N"] = "i64"
    assert launchers.launch_mismatches([tuple(launch)]) == [
        "SPEC MISMATCH _fwd_kernel.N: spec i32 -, launcher i64 -",
        "SPEC MISMATCH _fwd_kernel.stride_qh: spec divisible by 16 = True, launcher False",
    ]


def _row(**fields) -> dict:
    row = dict(
        kernel="_fwd_kernel", arch=90, dtype="bf16", head_dim=64, has_bias=True,
        table_dtype="fp32", meta={"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3,
        config="BLOCK_M=64 BLOCK_N=64 w4 s3", candidate=True, pruned=False, n_regs=200, n_spills=0, spill_stores=0,
        spill_loads=0, stack_bytes=0, shared=65536, shared_limit=232448, compile_s=1.5, error=None,
    )
    row.update(fields)
    return row


def _spilling(**fields) -> dict:
    return _row(n_regs=255, n_spills=30, spill_stores=120, spill_loads=116, stack_bytes=120, **fields)


def test_clean_rows_pass():
    assert report.failures([_row(), _spilling(config="big"), _row(head_dim=128)]) == []


def test_failure_rule_gives_one_line_per_failure():
    rows = [
        _row(error="CompilationError: boom", n_regs=None, shared=None, spill_stores=None, spill_loads=None),
        _row(config="huge", shared=240000, pruned=True),
        _row(config="candidate only", shared=240000),  # overflows, but the arch's tuned list leaves it out: no failure
        _row(config="fine"),  # keeps the sm_90 bias group usable
        _row(arch=80, shared_limit=166912),  # a healthy group
        _spilling(arch=80, shared_limit=166912, config="pruned one", pruned=True),
        _spilling(has_bias=False, table_dtype=None),  # a group whose only config spills
        _spilling(has_bias=False, table_dtype=None, config="other", shared=999999, pruned=True),
    ]
    lines = report.failures(rows)
    assert lines == [
        "COMPILE ERROR _fwd_kernel sm_90 bf16 table=fp32 D=64 bias [BLOCK_M=64 BLOCK_N=64 w4 s3]: "
        "CompilationError: boom",
        "SMEM OVERFLOW _fwd_kernel sm_90 bf16 table=fp32 D=64 bias [huge]: 240000 B > 232448 B",
        "PRUNED CONFIG SPILLS _fwd_kernel sm_80 bf16 table=fp32 D=64 bias [pruned one]: 120 B stores, 116 B loads, "
        "255 regs",
        "SMEM OVERFLOW _fwd_kernel sm_90 bf16 D=64 no-bias [other]: 999999 B > 232448 B",
        "NO SPILL-FREE CONFIG _fwd_kernel sm_90 bf16 D=64 no-bias: all 2 compiled configs spill or overflow "
        "(least: [BLOCK_M=64 BLOCK_N=64 w4 s3] 120 B stores)",
    ]


def test_report_exit_status_and_files(tmp_path, capsys):
    args = cli.parse_args([f"--out={tmp_path}", "--kernels=_fwd_kernel"])
    header = {"triton": "0.0", "date": "today", "subset": "ci", "archs": [90], "dtypes": ["bf16"], "head_dims": [64],
              "wall_s": 1.0, "jobs": 1, "ptxas": "ptxas 12.8", "kernels_sha": "abc"}
    assert cli.report([_row()], args, header) == 0
    assert cli.report([_row(), _row(config="huge", shared=240000, pruned=True)], args, header) == 1
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("SMEM OVERFLOW _fwd_kernel sm_90")
    markdown = next(tmp_path.glob("aot_*.md")).read_text()
    assert "## Candidate sweep" in markdown and "SMEM OVERFLOW" in markdown
    assert report.candidate_overflows([_row(config="candidate only", shared=240000)]) == [
        "_fwd_kernel sm_90 bf16 table=fp32 D=64 bias [candidate only]: 240000 B > 232448 B"]
    rows = [json.loads(line) for line in next(tmp_path.glob("aot_*.jsonl")).read_text().splitlines()]
    assert [row["triton"] for row in rows] == ["0.0", "0.0"]


def test_ptxas_log_parsing():
    log = ("ptxas info    : Function properties for _fwd_kernel\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert aot_compile.parse_ptxas_log(log) == {"stack_bytes": 8, "spill_stores": 4, "spill_loads": 12, "n_regs": 255,
                                        "n_spills": 2}


def test_user_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli.triton.knobs.runtime, "interpret", False)

    def no_ptxas(arch):
        raise RuntimeError("Cannot find ptxas")

    monkeypatch.setattr(nvidia_compiler, "get_ptxas", no_ptxas)
    assert cli.main(["--arch=90"]) == 2
    assert cli.main(["--kernels=_no_such_kernel"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("tools.aot: no ptxas for sm_90") and "TRITON_PTXAS_PATH" in errors[0]
    assert errors[1].startswith("tools.aot: unknown kernel(s) ['_no_such_kernel']")


def test_compare_names_the_variants_that_differ(tmp_path, capsys):
    spilling = dict(spill_stores=8, spill_loads=4, n_regs=255)
    sweep_a = [_row(), _row(config="only usable in B", **spilling), _row(config="in neither", error="CompilationError"),
               _row(config="only in A")]
    sweep_b = [_row(**spilling), _row(config="only usable in B"), _row(config="in neither", shared=240000),
               _row(config="only in B"), _row(config="also only in B")]
    assert report.compare(sweep_a, sweep_b, names=("3.9", "3.6")) == [
        "variants in both: 3; only in 3.9: 1; only in 3.6: 2; usable in both: 0; in neither: 1; differ: 2",
        "_fwd_kernel sm_90 bf16 table=fp32 D=64 bias [BLOCK_M=64 BLOCK_N=64 w4 s3]: "
        "3.9 200 regs, spill 0/0 B, smem 65536 B; 3.6 255 regs, spill 8/4 B, smem 65536 B",
        "_fwd_kernel sm_90 bf16 table=fp32 D=64 bias [only usable in B]: "
        "3.9 255 regs, spill 8/4 B, smem 65536 B; 3.6 200 regs, spill 0/0 B, smem 65536 B",
    ]
    assert report.compare([_row(error="CompilationError")], [_row()])[1].endswith(
        "A compile error; B 200 regs, spill 0/0 B, smem 65536 B")
    files = {}
    for name, rows in (("a", sweep_a), ("b", sweep_b), ("same", [_row()])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(["--compare", str(files["same"]), str(files["same"])]) == 0
    assert capsys.readouterr().out.startswith("variants in both: 1; only in")
    assert cli.main(["--compare", str(files["a"]), str(files["b"])]) == 1
    assert "a.jsonl 200 regs" in capsys.readouterr().out
    for bad in ("not json", "{}\n", "1\n", ""):
        (tmp_path / "bad.jsonl").write_text(bad)
        assert cli.main(["--compare", str(files["a"]), str(tmp_path / "bad.jsonl")]) == 2
        assert "give a .jsonl that tools.aot wrote" in capsys.readouterr().err
