"""Golden losses (torchtitan's check): the first steps of the demo pretraining, as a user runs it
(recipes/pretrain_demo.py's settings; the fixed random tokenizer of tests/conftest.py instead of a trained one),
reproduce the per-step loss, accuracy and gradient norm committed in tests/golden/pretrain_demo.json. A refactor
that moves the numbers is seen here; a change meant to move them rewrites the file:

    python tests/test_golden.py --update
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_demo.py"
GOLDEN = Path(__file__).parent / "golden" / "pretrain_demo.json"
ARGS = ["--device=cpu", "--max_steps=6", "--log_every=1", "--heldout_every=3", "--num_workers=0", "--progress=false",
        "--probe=false"]  # on the CPU everywhere: a GPU would pick bf16 and the fused loss
KEYS = ("loss", "mlm_acc", "grad_norm", "heldout_loss")
# float32 on one CPU: what differs between machines (vector width, thread count) moves the 6th digit at most
RELATIVE_TOLERANCE = 1e-4


def golden_rows(tokenizer_dir: Path, output_dir: Path) -> list[dict]:
    """Runs the demo's first steps in a fresh process (the recipe's own command) → its metric rows, KEYS only."""
    from conftest import SUBPROCESS_ENV

    subprocess.run([sys.executable, str(RECIPE), *ARGS, f"--tokenizer={tokenizer_dir}",
                    f"--output_dir={output_dir}"], cwd=ROOT, env=SUBPROCESS_ENV, check=True, capture_output=True)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": row["step"], **{key: row[key] for key in KEYS if key in row}} for row in rows]


def test_demo_pretraining_reproduces_the_golden_losses(tokenizer_dir, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == ARGS, "the golden file was written with other arguments: rerun with --update"
    rows = golden_rows(tokenizer_dir, tmp_path)
    assert [row["step"] for row in rows] == [row["step"] for row in golden["rows"]]
    for row, expected in zip(rows, golden["rows"]):
        assert row.keys() == expected.keys(), row["step"]
        for key in KEYS:
            if key in row:
                assert row[key] == pytest.approx(expected[key], rel=RELATIVE_TOLERANCE), (row["step"], key)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: python {Path(__file__).name} --update   (rewrites {GOLDEN.relative_to(ROOT)})")
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(ROOT))
    from conftest import save_random_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = save_random_tokenizer(Path(scratch) / "tokenizer")
        rows = golden_rows(tokenizer, Path(scratch) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"command": f"python tests/{Path(__file__).name} --update", "args": ARGS,
                                  "rows": rows}, indent=1) + "\n")
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {len(rows)} rows")
