"""The repository's kernels/ folder is fastnlg.kernels only: from the repository root (where pytest and
`python -m` put it on sys.path) a top-level `import kernels` never resolves to it, so Hugging Face's
`kernels` package (which bitsandbytes imports) is found, or reads as not installed to Transformers."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_top_level_kernels_is_not_the_repo_folder():
    r = _run("""
        import os, sys
        assert sys.path[0] in ('', os.getcwd())   # the repository root is importable, as under pytest
        import kernels
        print("found", getattr(kernels, "__file__", None), getattr(kernels, "__path__", None))
        try:
            from kernels import get_kernel
        except ImportError:
            pass
        import fastnlg.kernels.rms_norm           # the package itself still imports
        print("fastnlg.kernels", os.path.dirname(fastnlg.kernels.rms_norm.__file__))
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "found None None" or os.path.join(ROOT, "kernels") not in lines[0], lines[0]
    assert lines[1] == f"fastnlg.kernels {os.path.join(ROOT, 'kernels')}"


def test_top_level_kernels_finds_the_real_package(tmp_path):
    """With a package named `kernels` further down sys.path (standing in for Hugging Face's), `import kernels`
    and `from kernels import get_kernel` get that package, as bitsandbytes expects."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    r = _run("""
        from kernels import get_kernel
        import kernels, fastnlg.kernels
        print(kernels.__file__)
        print(get_kernel("x"))
    """, PYTHONPATH=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(fake / "__init__.py"), "hub:x"]


def test_transformers_sees_no_kernels_package():
    """Transformers' check finds the folder on sys.path, imports it and must read "not installed"."""
    r = _run("""
        from transformers.utils import import_utils
        print(import_utils._is_package_available("kernels", return_version=True)[0])
        print(import_utils._is_package_available("kernels", return_version=True)[0])  # asked again: no raise
        print(import_utils.is_kernels_available(), import_utils.is_kernels_available("0.0.1"))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False", "False"]
