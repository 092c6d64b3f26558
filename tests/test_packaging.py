"""What `pip install` puts on the path: names of our own (the kernels' package is `beit_kernels`, since `kernels` is
Hugging Face's distribution, which transformers depends on), and bounds on the libraries whose internals we read.

Each check runs outside the repository, where only what pip installed is on the path (from the repository's root a
stale `*.egg-info` would stand for our metadata)."""

import subprocess
import sys


def run_outside_repo(code: str, cwd) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_installed_next_to_hugging_faces_kernels_both_import(tmp_path):
    """transformers, a test dependency, installs Hugging Face's `kernels`."""
    out = run_outside_repo("import beit_kernels, engine, kernels, importlib.metadata as m; "
                           "print(m.distribution('kernels').metadata['Name'], kernels.__file__, "
                           "beit_kernels.rel_pos_attention.__module__)", tmp_path)
    name, hf_file, ours = out.split()
    assert name == "kernels" and "site-packages" in hf_file and ours == "beit_kernels.rel_pos_attention"


def test_deepspeed_is_bounded_to_the_tested_versions(tmp_path):
    """The export reads DeepSpeed's checkpoint layout (optimizer-state keys, zero_to_fp32): an upper bound."""
    out = run_outside_repo(
        "from importlib import metadata as m; from packaging.requirements import Requirement; "
        "(r,) = [Requirement(x) for x in m.requires('beit-engine') if x.startswith('deepspeed')]; "
        "print(any(s.operator == '<' for s in r.specifier), r.specifier.contains(m.version('deepspeed')))", tmp_path)
    assert out.split() == ["True", "True"]


def test_no_folder_of_the_tree_shadows_an_installed_distribution():
    """From the repository's root (`python -m pytest` puts it on sys.path) a top-level folder named like an installed
    distribution's package wins over it: a `kernels/` folder broke transformers' import here."""
    from importlib import metadata
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ours = {path.name for path in root.iterdir() if (path / "__init__.py").is_file()}
    theirs = {name for dist in metadata.distributions() if dist.metadata["Name"] != "beit-engine"
              for name in (dist.read_text("top_level.txt") or "").split()}
    theirs |= {Path(str(file)).parts[0] for dist in metadata.distributions() if dist.metadata["Name"] != "beit-engine"
               for file in (dist.files or ()) if str(file).endswith("/__init__.py")}
    assert not ours & theirs
