"""tasks/lib/slurm.py on output recorded from the real Slurm 22.05 of the test cluster.

The files under tests/unit/data/slurm/ were captured from `scripts/sim-cluster up 2 --slurm`
(cluster "slcap"; tests/unit/data/slurm/README.md says which command printed which file), so the
parsers are held to what squeue, sacct and sbatch really print, not to what we think they print.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.lib import slurm
from tasks.lib.slurm import BatchRequest, SlurmError, StepState

DATA = Path(__file__).parent / "data" / "slurm"
OUR_RUN = "multinode_42ch_512th_20261205_223000"


def read(name: str) -> str:
    return (DATA / name).read_text()


def env_file(name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in read(name).splitlines() if "=" in line)


# -- step names -----------------------------------------------------------------------------------


def test_step_name_round_trips_and_refuses_what_slurm_or_a_shell_would_misread():
    assert slurm.run_id_of(slurm.step_name(OUR_RUN)) == OUR_RUN
    for bad in ["", "a b", "a|b", "a,b", "$(id)", "x\ny", "-leading-dash", "a" * 201]:
        with pytest.raises(SlurmError):
            slurm.step_name(bad)
    assert slurm.run_id_of("other-step") is None
    assert slurm.run_id_of("gemm-run:") is None
    assert slurm.run_id_of("gemm-run:a|b") is None


# -- allocation from the environment --------------------------------------------------------------


def test_allocation_of_a_real_salloc_shell():
    allocation = slurm.detect_allocation(env_file("salloc_env.txt"))
    assert allocation == slurm.Allocation(job_id="5", nodes=("slcap-node0", "slcap-node1"),
                                          partition="sim", step_id=None, cluster="slcap")


def test_allocation_of_a_real_batch_script():
    allocation = slurm.detect_allocation(env_file("batch_env.txt"))
    assert allocation is not None
    assert allocation.job_id == "4" and allocation.nodes == ("slcap-node0", "slcap-node1")


def test_no_allocation_outside_slurm_and_a_half_set_environment_is_an_error():
    assert slurm.detect_allocation({"PATH": "/usr/bin"}) is None
    with pytest.raises(SlurmError, match="SLURM_JOB_NODELIST is not"):
        slurm.detect_allocation({"SLURM_JOB_ID": "7"})
    with pytest.raises(SlurmError, match="not a Slurm host list"):
        slurm.detect_allocation({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-"})
    with pytest.raises(SlurmError, match="names 2 nodes"):
        slurm.detect_allocation({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]",
                                 "SLURM_JOB_NUM_NODES": "3"})
    big = slurm.detect_allocation({"SLURM_JOBID": "9", "SLURM_NODELIST": "gpu-a[01-03],gpu-b7"})
    assert big is not None and big.nodes == ("gpu-a01", "gpu-a02", "gpu-a03", "gpu-b7")


# -- srun -----------------------------------------------------------------------------------------


def test_srun_argv_one_task_per_node_fail_fast_no_label():
    argv = slurm.srun_argv(run_id=OUR_RUN, nodes=2, command=["bash", "/srv/x/launch.sh"])
    assert argv[:7] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1", f"--job-name=gemm-run:{OUR_RUN}", "--input=none"]
    assert "--label" not in argv and "-l" not in argv
    assert argv[-3:] == ["--", "bash", "/srv/x/launch.sh"]
    argv = slurm.srun_argv(run_id="r1", nodes=2, command=["true"], job_id="12",
                           nodelist=["n1", "n2"], overlap=True, output="/srv/r1/node_%n.txt")
    assert {"--jobid=12", "--nodelist=n[1-2]", "--overlap", "--output=/srv/r1/node_%n.txt"} \
        <= set(argv)
    with pytest.raises(SlurmError):
        slurm.srun_argv(run_id="r1", nodes=2, command=["true"], nodelist=["n1"])
    with pytest.raises(SlurmError):
        slurm.srun_argv(run_id="r1", nodes=0, command=["true"])
    with pytest.raises(SlurmError):
        slurm.srun_argv(run_id="r1", nodes=2, command=["true"], job_id="12;id")


def test_srun_command_reaches_srun_unchanged_through_a_real_shell():
    hostile = ["printf", "%s\\n", "$(touch /tmp/pwned)", "a b", "it's", "x\ny"]
    command = slurm.srun_command(run_id="r1", nodes=2, command=hostile, output="/srv/o %n")
    # `printf '%s\0'` stands in for srun: the shell must hand it exactly our argv.
    shown = subprocess.run(["sh", "-c", "printf '%s\\0' " + command.removeprefix("srun ")],
                           capture_output=True, check=True).stdout.split(b"\0")[:-1]
    assert [arg.decode() for arg in shown] == slurm.srun_argv(
        run_id="r1", nodes=2, command=hostile, output="/srv/o %n")[1:]


# -- squeue ---------------------------------------------------------------------------------------


def test_parse_squeue_steps_real_output_names_with_bars_and_spaces():
    steps = slurm.parse_squeue_steps(read("squeue_steps.txt"))
    assert [(s.id, s.user, s.state, s.name) for s in steps] == [
        ("2.0", "gemm-slurm-other", "RUNNING", "other-step"),
        ("2.batch", "gemm-slurm-other", "RUNNING", "batch"),
        ("3.0", "root", "RUNNING", "odd|name with spaces"),
        ("3.1", "root", "RUNNING", f"gemm-run:{OUR_RUN}"),
    ]
    assert steps[3].nodes == ["slcap-node0", "slcap-node1"] and steps[3].run_id == OUR_RUN
    assert steps[1].nodes == ["slcap-node0"]


def test_parse_squeue_steps_after_our_step_was_cancelled():
    steps = slurm.parse_squeue_steps(read("squeue_steps_after_scancel.txt"))
    assert [s.id for s in steps] == ["2.0", "2.batch", "3.0"]
    assert slurm.our_steps(steps, user="root", run_id=OUR_RUN) == []


def test_parse_squeue_refuses_other_formats():
    with pytest.raises(SlurmError):
        slurm.parse_squeue_steps("  STEPID NAME PARTITION USER TIME NODELIST\n")
    with pytest.raises(SlurmError):
        slurm.parse_squeue_steps("3.1|root|RUNNING|\n")
    with pytest.raises(SlurmError):
        slurm.parse_squeue_steps(read("squeue_jobs.txt"))  # the job format: no JOB.STEP
    assert slurm.parse_squeue_steps("") == []


def test_squeue_argv_is_the_format_the_parser_reads():
    argv = slurm.squeue_steps_argv(job_id="3", user="root")
    assert argv[:3] == ["squeue", "--steps", "--noheader"]
    assert "--Format=StepId:|,UserName:|,StepState:|,Nodes:|,TimeUsed:|,StepName:|" in argv
    assert "--jobs=3" in argv and "--user=root" in argv
    with pytest.raises(SlurmError):
        slurm.squeue_steps_argv(job_id="3 4")


# -- sacct ----------------------------------------------------------------------------------------


def test_parse_sacct_real_output_states_exit_codes_and_users():
    records = {r.id: r for r in slurm.parse_sacct(read("sacct_all_end.txt"))}
    assert len(records) == 15
    # A step's line has no user: it is its job's.
    assert records["3.1"].user == "root" and records["2.0"].user == "gemm-slurm-other"
    # scancel --signal=TERM of our step; a rank killed with -9 (--kill-on-bad-exit ended it).
    assert (records["3.1"].state, records["3.1"].exit_code, records["3.1"].signal) == \
        ("CANCELLED", 0, 15)
    assert records["3.3"].name == "gemm-run:kob_run" and records["3.3"].state == "CANCELLED"
    assert (records["3.4"].state, records["3.4"].exit_code) == ("COMPLETED", 0)
    assert (records["3.5"].state, records["3.5"].exit_code) == ("FAILED", 3)
    assert records["3"].state == "CANCELLED"          # printed as "CANCELLED by 0"
    assert records["3"].step_id == "" and records["3"].name == "gemm-alloc"
    assert records["3.0"].name == "odd|name with spaces"
    assert records["4.batch"].nodes == ["slcap-node0"]
    assert records["3.1"].start == "2026-12-05T22:29:36" and records["3.1"].end is not None
    assert not any(r.active for r in records.values())


def test_parse_sacct_refuses_other_formats():
    with pytest.raises(SlurmError):
        slurm.parse_sacct("JobID|JobName|State\n1|x|COMPLETED\n")
    with pytest.raises(SlurmError):
        slurm.parse_sacct("1|root|COMPLETED|zero|n1|s|e|00:00:00|x\n")
    with pytest.raises(SlurmError):
        slurm.parse_sacct("1|root|completed|0:0|n1|s|e|00:00:00|x\n")


def test_sacct_argv():
    argv = slurm.sacct_argv(job_ids=["3", "4"], user="root", starttime="2026-12-05T00:00:00")
    assert argv[:3] == ["sacct", "--parsable2", "--noheader"]
    assert "--format=JobID,User,State,ExitCode,NodeList,Start,End,Elapsed,JobName" in argv
    assert {"--jobs=3,4", "--user=root", "--starttime=2026-12-05T00:00:00"} <= set(argv)
    assert "--allusers" in slurm.sacct_argv(all_users=True)


# -- scoped stop ----------------------------------------------------------------------------------


def test_our_steps_are_ours_by_marker_and_user_only():
    live = slurm.parse_squeue_steps(read("squeue_steps.txt"))
    assert [s.id for s in slurm.our_steps(live, user="root", run_id=OUR_RUN)] == ["3.1"]
    assert [s.id for s in slurm.our_steps(live, user="root")] == ["3.1"]  # emergency-stop
    # The same name under another user is not ours.
    impostor = StepState(job_id="2", step_id="1", name=f"gemm-run:{OUR_RUN}",
                         user="gemm-slurm-other", state="RUNNING", nodelist="n1")
    assert slurm.our_steps([*live, impostor], user="root", run_id=OUR_RUN) == \
        slurm.our_steps(live, user="root", run_id=OUR_RUN)
    assert slurm.our_steps(live, user="gemm-slurm-other") == []
    finished = slurm.parse_sacct(read("sacct_all_end.txt"))
    assert slurm.our_steps(finished, user="root") == []
    assert {s.id for s in slurm.our_steps(finished, user="root", active_only=False)} == \
        {"3.1", "3.3", "3.4", "3.5", "4.0"}


def test_scancel_argv_names_steps_never_jobs():
    live = slurm.parse_squeue_steps(read("squeue_steps.txt"))
    ours = slurm.our_steps(live, user="root", run_id=OUR_RUN)
    assert slurm.scancel_argv(ours, signal="SIGTERM") == ["scancel", "--signal=TERM", "3.1"]
    assert slurm.scancel_argv(ours, signal="kill") == ["scancel", "--signal=KILL", "3.1"]
    with pytest.raises(SlurmError):
        slurm.scancel_argv([])
    with pytest.raises(SlurmError):
        slurm.scancel_argv(ours, signal="TERM; rm -rf /")
    batch = [s for s in live if s.step_id == "batch"]
    with pytest.raises(SlurmError, match="not a run step"):
        slurm.scancel_argv(batch)


# -- sbatch ---------------------------------------------------------------------------------------


def test_batch_script_renders_validated_options_and_quoted_command(tmp_path):
    request = BatchRequest(nodes=2, job_name="gemm-launch", partition="gpu", time="1-02:00:00",
                           account="proj_1", output="/srv/gemm/experiments/slurm-%j.out")
    launch = ["/srv/gemm/.venv/bin/fab", "-f", "/srv/my cfg.yaml", "launch", "--channels",
              "42", "--threads", "512", "--note", "it's $(id)"]
    script = slurm.render_batch_script(request, launch_argv=launch, workdir="/srv/gemm",
                                       env={"NCCL_DEBUG": "INFO x"})
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=gemm-launch", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu", "#SBATCH --time=1-02:00:00", "#SBATCH --account=proj_1",
        "#SBATCH --output=/srv/gemm/experiments/slurm-%j.out"]
    # The body, run by a real bash with `exec` swapped for printing the argv it would exec.
    body = script.replace("exec ", "printf '%s\\0' ").replace("cd /srv/gemm", f"cd {tmp_path}")
    shown = subprocess.run(["bash", "-c", body + 'printf "%s\\0" "$NCCL_DEBUG"'],
                           capture_output=True, check=True).stdout.split(b"\0")[:-1]
    assert [arg.decode() for arg in shown] == [*launch, "INFO x"]


@pytest.mark.parametrize("field,value", [
    ("partition", "gpu --uid=0"), ("account", "a\nb"), ("time", "soon"), ("time", "1:2:3:4"),
    ("job_name", "x y"), ("output", "/srv/a b"), ("nodes", 0), ("nodes", True),
])
def test_batch_request_refuses_what_sbatch_would_misread(field, value):
    fields = {"nodes": 2, "job_name": "gemm-launch", field: value}
    with pytest.raises(SlurmError):
        BatchRequest(**fields).sbatch_options()


def test_time_formats_slurm_accepts():
    for value in ["30", "10:00", "2:00:00", "1-0", "1-02:00", "1-02:00:00", "UNLIMITED"]:
        assert BatchRequest(nodes=1, job_name="j", time=value).sbatch_options()[-1] == \
            f"--time={value}"


def test_parse_sbatch_output():
    assert slurm.parse_sbatch_output(read("sbatch_parsable.txt")) == "4"
    assert slurm.parse_sbatch_output("1234;other-cluster\n") == "1234"
    with pytest.raises(SlurmError):
        slurm.parse_sbatch_output("sbatch: error: Batch job submission failed: Invalid account\n")
    assert slurm.sbatch_argv("/srv/r/job.sh") == ["sbatch", "--parsable", "/srv/r/job.sh"]
