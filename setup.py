"""Packaging shim: ships csrc/ inside pmkernels so a non-editable install can still JIT-build.

The extensions themselves are compiled on first use by pmkernels/_build.py against the torch
that is installed; nothing here imports torch.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        dst = Path(self.build_lib) / "pmkernels" / "_csrc"
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
