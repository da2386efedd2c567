"""The VM suites rely on `--dist loadgroup` keeping an xdist_group on one worker: the two-VM
network is booted once per run, not once per worker (pytest 9.2 with xdist 3.8 silently split
groups, which booted two pairs at once on CI's 2 cores). Real pytest and xdist, in a subprocess."""
import subprocess
import sys
import textwrap

GROUPED_MODULE = textwrap.dedent('''
    import os, pytest
    pytestmark = pytest.mark.xdist_group("pair")

    @pytest.fixture(scope="module")
    def pair():
        with open(os.environ["SETUP_LOG"], "a") as log:
            log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
        yield

    @pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
    def test_scenario(pair, direction): pass
    def test_x(pair): pass
    def test_y(pair): pass
    def test_z(pair): pass
''')


def test_a_group_runs_on_one_worker_with_one_module_setup(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED_MODULE)
    (tmp_path / "test_other.py").write_text(
        "".join(f"def test_other_{i}(): pass\n" for i in range(30)))
    log = tmp_path / "setups.log"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                        "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"SETUP_LOG": str(log), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "35 passed" in r.stdout
    workers = log.read_text().split()
    assert len(workers) == 1, f"the grouped module's fixture was set up on {workers}"
