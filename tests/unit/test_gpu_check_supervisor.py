"""The GPU check's supervisor (benchmarks/gpu/supervisor.py) with a stand-in child process that
imports nothing heavy: caps, crashes, children that never start, the budget, and helper processes
a child leaves behind, in seconds."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))

from supervisor import Supervisor, SupervisorConfig  # noqa: E402

# Runs the sections named by --sections; what each does comes from the plan (section -> action):
# "ok:SECONDS" works that long and writes its JSON, "crash" exits mid-section, "hang" never
# starts it (stuck before reporting it), "leave:SECONDS" is "ok" but first starts a helper process
# that outlives the child (as multiprocessing's resource tracker does) and writes its pid.
CHILD = textwrap.dedent('''
    import json, os, subprocess, sys, time
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    plan = json.loads(args["--plan"])
    for name in args["--sections"].split(","):
        action = plan[name]
        if action == "hang":
            time.sleep(3600)
        if action.startswith("leave"):
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            with open(args["--out"] + ".helper", "w") as f:
                f.write(str(helper.pid))
        with open(args["--running"] + ".tmp", "w") as f:
            json.dump({"section": name, "started": time.time()}, f)
        os.replace(args["--running"] + ".tmp", args["--running"])
        if action == "crash":
            sys.exit(3)
        time.sleep(float(action.split(":")[1]))
        # Written in two steps, as a writer that is not atomic would: the supervisor may find
        # the file empty or half-written and must read it again rather than fail.
        with open(os.path.join(args["--out"], name + ".json"), "w") as f:
            text = json.dumps({"section": name, "status": "ok", "pid": os.getpid()})
            f.write(text[:5]); f.flush(); time.sleep(0.05); f.write(text[5:])
        time.sleep(0.3)  # tidying up between sections (the real child frees GPU memory here)
''')


def supervise(tmp_path, plan, caps, budget=60.0, start_timeout=5.0):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out = tmp_path / "out"
    config = SupervisorConfig(
        out_dir=out, caps=caps, budget=budget, start_timeout=start_timeout,
        running_file=tmp_path / "running.json",
        child_command=[sys.executable, str(child), "--plan", json.dumps(plan), "--out", str(out),
                       "--running", str(tmp_path / "running.json")],
    )
    status = Supervisor(config, list(plan)).run()
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in plan}
    return status, records, json.loads((out / "summary.json").read_text())


def test_all_sections_in_one_child_even_past_the_start_timeout(tmp_path):
    # Three sections of 1 s and 0.3 s gaps, with a 2 s start timeout (room for a loaded machine to
    # start Python): only the first start is bounded by it; a gap counts against the next
    # section's cap.
    plan = {"a": "ok:1.0", "b": "ok:1.0", "c": "ok:1.0"}
    status, records, summary = supervise(tmp_path, plan, {n: 5.0 for n in plan}, start_timeout=2.0)
    assert status == {"a": "ok", "b": "ok", "c": "ok"}
    assert len({r["pid"] for r in records.values()}) == 1 and summary["children"] == 1


def test_an_overrun_is_killed_and_the_next_section_runs_in_a_new_child(tmp_path):
    plan = {"a": "ok:0.1", "b": "ok:30", "c": "ok:0.1"}
    status, records, summary = supervise(tmp_path, plan, {"a": 5.0, "b": 0.5, "c": 5.0})
    assert status == {"a": "ok", "b": "timed_out", "c": "ok"}
    assert records["b"]["cap_s"] == 0.5 and "cap of 0.5 s" in records["b"]["error"]
    assert records["a"]["pid"] != records["c"]["pid"] and summary["children"] == 2


def test_a_crash_is_recorded_with_the_log_and_the_rest_still_run(tmp_path):
    plan = {"a": "crash", "b": "ok:0.1"}
    status, records, _ = supervise(tmp_path, plan, {"a": 5.0, "b": 5.0})
    assert status == {"a": "failed", "b": "ok"}
    assert "exited with status 3 during a" in records["a"]["error"]
    assert "===== child 1: a, b" in records["a"]["log_tail"]


def test_a_child_that_never_starts_a_section(tmp_path):
    plan = {"a": "hang", "b": "ok:0.1"}
    # b's child must start within the same 2 s: enough for Python even on a loaded machine
    status, records, _ = supervise(tmp_path, plan, {"a": 5.0, "b": 5.0}, start_timeout=2.0)
    assert status == {"a": "failed", "b": "ok"}
    assert "did not start a within 2 s" in records["a"]["error"]


def test_the_budget_ends_the_run_and_skips_what_is_left(tmp_path):
    plan = {"a": "ok:30", "b": "ok:0.1"}
    status, records, _ = supervise(tmp_path, plan, {"a": 60.0, "b": 60.0}, budget=0.3)
    assert status == {"a": "timed_out", "b": "skipped"}
    assert "budget" in records["a"]["error"] and "budget" in records["b"]["error"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def test_what_a_finished_child_leaves_running_is_ended(tmp_path):
    status, _, _ = supervise(tmp_path, {"a": "leave:0.1"}, {"a": 5.0})
    assert status == {"a": "ok"}
    helper = int((tmp_path / "out.helper").read_text())
    deadline = time.time() + 5
    while _alive(helper) and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(helper), "the child's helper process outlived the supervisor's run"
    finally:
        if _alive(helper):
            os.kill(helper, 9)
