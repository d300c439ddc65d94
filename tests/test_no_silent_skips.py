"""CI runs every test: conftest.py fails the session on any skip whose reason is not in its
hardware allow-list (ALLOWED_SKIPS), so a missing package can never turn a test into a pass."""
import pathlib
import shutil
import subprocess
import sys

import conftest

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")


def _pytest(tmp_path, body):
    """Run pytest on one test file (body) beside a copy of the suite's conftest.py: (exit code, output)."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_case.py").write_text("import pytest\n\n" + body)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_case.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_unexpected_skips_fail_the_session_naming_test_and_reason(tmp_path):
    rc, out = _pytest(tmp_path, (
        "def test_ok():\n    pass\n\n"
        "def test_needs_package():\n    pytest.importorskip('no_such_package_vtp')\n\n"
        "@pytest.mark.skipif(True, reason='data file absent')\ndef test_marked():\n    pass\n\n"
        "def test_skips_itself():\n    pytest.skip('not today')\n"))
    assert rc == 1, out
    lines = sorted(l for l in out.splitlines() if l.startswith("UNEXPECTED SKIP "))
    assert lines == [
        "UNEXPECTED SKIP test_case.py::test_marked: data file absent",
        "UNEXPECTED SKIP test_case.py::test_needs_package: could not import 'no_such_package_vtp': "
        "No module named 'no_such_package_vtp'",
        "UNEXPECTED SKIP test_case.py::test_skips_itself: not today",
    ], out


def test_a_module_skipped_at_collection_fails_the_session(tmp_path):
    rc, out = _pytest(tmp_path, "pytest.importorskip('no_such_package_vtp')\n\ndef test_never_runs():\n    pass\n")
    assert rc == 1, out
    assert "UNEXPECTED SKIP test_case.py: could not import 'no_such_package_vtp'" in out, out


def test_hardware_skips_in_the_allow_list_pass(tmp_path):
    assert conftest.ALLOWED_SKIPS == ("needs a GPU", "needs a TPU")
    rc, out = _pytest(tmp_path, (
        "def test_ok():\n    pass\n\n"
        "@pytest.mark.skipif(True, reason='needs a GPU: no CUDA device')\ndef test_gpu():\n    pass\n\n"
        "def test_tpu():\n    pytest.skip('needs a TPU: none attached')\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_xfail():\n    assert False\n"))
    assert rc == 0, out
    assert "UNEXPECTED SKIP" not in out and "1 passed, 2 skipped, 1 xfailed" in out, out


def test_a_failing_test_still_fails(tmp_path):
    rc, out = _pytest(tmp_path, "def test_bad():\n    assert False\n")
    assert rc == 1 and "1 failed" in out, out
