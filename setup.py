"""Install the `engine` and `beit_kernels` packages.

The kernels' package is not called `kernels`: that is the top-level package of an unrelated, widely installed
distribution (Hugging Face's, which transformers depends on); two distributions with one top-level name overwrite
each other's files, and a `kernels/` folder in the working directory shadows the installed one.

The native data-path extensions (`engine.data._native_masking` and `engine.data._native_pixels`, built from
`csrc/` by `CMakeLists.txt`) are optional: they are built when CMake and a C++ compiler are present; otherwise the
pure-Python masking and PIL's (and numpy's) pixel maps are used (the same masks' distribution, the same pixels;
slower workers).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class OptionalCMakeBuild(build_ext):
    """Builds the CMake project (every extension, all in engine/data/) once; a missing toolchain or a failed build
    only warns."""

    def run(self):
        try:
            self.build_cmake()
        except (OSError, subprocess.CalledProcessError) as err:
            names = ", ".join(ext.name for ext in self.extensions)
            print(f"[setup.py] WARNING: native extensions {names} not built ({err}); the pure-Python paths will be "
                  "used (slower data workers).", file=sys.stderr)

    def build_cmake(self):
        if shutil.which("cmake") is None:
            raise OSError("cmake not found")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "native"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            "cmake", str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYTHON_MODULE_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 1)], cwd=build_dir)


setup(
    name="beit-engine",
    version="0.1.0",
    description="Kernel-optimised BEiT pretraining and fine-tuning engine (Triton kernels, DeepSpeed ZeRO)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "beit_kernels"]),
    package_data={"engine": ["data/assets/**/*"]},
    include_package_data=True,
    ext_modules=[CMakeExtension("engine.data._native_masking"), CMakeExtension("engine.data._native_pixels")],
    cmdclass={"build_ext": OptionalCMakeBuild},
    install_requires=[
        "torch>=2.10",  # Triton 3.6, the oldest we support, works with torch >= 2.10 only
        "triton>=3.6,<3.10",  # tested: 3.6.0 (make aot-oldest, the GPU nodes' image) and 3.9.0; tools/aot reads it
        "deepspeed>=0.16,<0.20",  # tested: 0.19.8; the export reads its checkpoint layout (engine/train/export.py)
        "numpy",
        "pillow",
        "simplejpeg>=1.8",  # the workers' JPEG decoder: PIL's pixels, ~2.5x faster (engine/data/pixels.py)
        "safetensors",
        "tqdm",
        "tomli>=1.1; python_version < '3.11'",  # --config=FILE.toml (tomllib from 3.11)
        "matplotlib",  # curves.png and the evidence plot (a plain PIL drawing is the fallback)
    ],
    extras_require={
        # transformers: the export's parity tests load our exports with it (it installs Hugging Face's `kernels`,
        # next to which ours must import: tests/test_packaging.py); tensorboard, wandb: --report_to's tests
        "test": ["pytest", "pytest-benchmark", "ruff", "transformers>=4.40,<6", "tensorboard", "wandb",
                 "pycocotools>=2.0.7"],
        # detection (engine/detection/, recipes/detect_*.py): torchvision's detection models and ops and the COCO
        # metric; install the torchvision release made for your torch (the Makefile pins the tested pair)
        "detection": ["torchvision", "pycocotools>=2.0.7"],
        "tensorboard": ["tensorboard"],  # --report_to=tensorboard
        "wandb": ["wandb"],  # --report_to=wandb
        "hub": ["huggingface_hub"],  # recipes/export_hf.py --push_to_hub
        "flash": ["flash-attn"],
        "dali": ["nvidia-dali-cuda120>=2.4,<3"],  # --data_backend=dali (CUDA 12; nvidia-dali-cuda130 for CUDA 13)
    },
)
