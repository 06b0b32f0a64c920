"""The device check's JSON (benches/gpu_check.py): make test runs the whole dry run and looks at its exit status;
these check what a lease depends on besides: every step is in the file with a status, and a run stopped in the
middle (the lease ending) still leaves a valid file with the steps so far."""
import json
import signal
import subprocess
import sys
import time

from conftest import ROOT, STIC

CHECK = ROOT / "benches" / "gpu_check.py"
ALL_STEPS = ["versions", "dist", "sdpa", "correctness", "generate", "train", "estimate"]


def test_every_step_is_reported_with_a_status(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, CHECK, STIC, "--dry-run", "--steps", "versions", "--out", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["finished"]
    assert [s["name"] for s in result["steps"]] == ALL_STEPS
    assert all(s["status"] in ("ok", "failed", "skipped", "timeout") and "seconds" in s for s in result["steps"])
    versions = result["steps"][0]
    assert versions["status"] == "ok", versions
    assert versions["measurements"]["stic_version"].startswith("stic ")
    assert "libtorch_cpu.so" in versions["measurements"]["ldd"]
    assert all(s["status"] == "skipped" and s["reason"] == "not in --steps" for s in result["steps"][1:])


def test_a_stopped_run_still_reports(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.Popen([sys.executable, CHECK, STIC, "--dry-run", "--steps", "versions,train", "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("== train"):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 124, proc.stdout.read()
    result = json.loads(out.read_text())
    assert not result["finished"]
    assert [(s["name"], s["status"]) for s in result["steps"]] == [("versions", "ok"), ("dist", "skipped"),
                                                                    ("sdpa", "skipped"), ("correctness", "skipped"),
                                                                    ("generate", "skipped"), ("train", "timeout")]
