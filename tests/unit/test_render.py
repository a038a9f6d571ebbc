"""Rendering: env script sourced by real shells, compose file checked by yaml and docker-compose."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

from tasks.lib.render import (
    compose_command,
    compose_project_name,
    load_nccl_preset,
    nccl_preset_names,
    render_compose,
    render_env_script,
)
from tasks.lib.settings import DockerSettings
from tasks.lib.templating import compose_quote, render_template

HOSTILE = {
    "SUBST": "$(touch {marker})",
    "BACKTICK": "`touch {marker}`",
    "VAR": "$HOME ${PATH} $$ $1",
    "QUOTES": "it's \"quoted\" 'twice'",
    "SPACES": "  lead and trail  ",
    "NEWLINES": "line1\nline2\n\nline4\n",
    "BACKSLASH": "a\\b\\\\c\\n\\",
    "GLOB": "* ? [a-z] ~ ~root",
    "UNICODE": "Grüße – 日本語 – \u2028 – 😀",
    "EMPTY": "",
    "SEMICOLON": "x; rm -rf / # not really",
    "EQUALS": "a=b=c",
    "DASH": "-n",
}


def hostile(marker: Path) -> dict[str, str]:
    return {key: value.replace("{marker}", str(marker)) for key, value in HOSTILE.items()}


def source_and_dump(shell: str, script: Path, node_rank: str | None) -> tuple[int, dict[str, str], str]:
    """Source `script` in a clean environment with `shell`; the environment after, as a dict."""
    base_env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    if node_rank is not None:
        base_env["NODE_RANK"] = node_rank
    proc = subprocess.run(
        [shell, "-c", '. "$1" && env -0', "sh", str(script)],
        env=base_env, capture_output=True, timeout=10,
    )
    entries = [item.decode() for item in proc.stdout.split(b"\0") if item]
    return proc.returncode, dict(entry.split("=", 1) for entry in entries), proc.stderr.decode()


def baseline_keys(shell: str) -> set[str]:
    proc = subprocess.run([shell, "-c", "env -0"], env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8",
                                                       "NODE_RANK": "0"},
                          capture_output=True, timeout=10, check=True)
    return {item.decode().split("=", 1)[0] for item in proc.stdout.split(b"\0") if item}


SHELLS = [shell for shell in ("bash", "dash") if shutil.which(shell)]


@pytest.mark.parametrize("shell", SHELLS)
def test_env_script_reproduces_hostile_values_exactly(tmp_path: Path, shell: str) -> None:
    marker = tmp_path / "pwned"
    common = hostile(marker)
    common["NCCL_SOCKET_IFNAME"] = "eth0"  # a preset's value, overridden per node below
    nodes = [
        {"NCCL_SOCKET_IFNAME": "ens1f0", "GLOO_SOCKET_IFNAME": "ens1f0"},
        {"NCCL_SOCKET_IFNAME": "$(touch " + str(marker) + ")", "GLOO_SOCKET_IFNAME": "ib 0"},
        {},
    ]
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(run_id="multinode_28ch_256th_20250101_120000",
                                        common_env=common, node_env=nodes))
    before = baseline_keys(shell)
    for rank, node in enumerate(nodes):
        code, env, err = source_and_dump(shell, script, str(rank))
        assert code == 0, err
        expected = {**common, **node}
        assert {key: env.get(key) for key in expected} == expected
        assert set(env) - before == set(expected) | {"GEMM_ENV_VARS", "GEMM_MASKED_VARS"}
        assert set(env["GEMM_ENV_VARS"].split()) == set(common) | {k for n in nodes for k in n}
    assert not marker.exists()


@pytest.mark.parametrize("node_rank", [None, "3", "", "0; echo"])
def test_env_script_refuses_unknown_node_rank(tmp_path: Path, node_rank: str | None) -> None:
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(run_id="r1", common_env={"A": "1"},
                                        node_env=[{"B": "x"}, {"B": "y"}, {"B": "z"}]))
    code, env, err = source_and_dump("bash", script, node_rank)
    assert code != 0
    assert "unknown NODE_RANK" in err and "0..2" in err
    assert "B" not in env


def test_env_script_executed_instead_of_sourced_still_fails_on_unknown_rank(tmp_path: Path) -> None:
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(run_id="r1", common_env={}, node_env=[{}]))
    proc = subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1
    assert "unknown NODE_RANK" in proc.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_env_script_message_quotes_the_run_id(tmp_path: Path, shell: str) -> None:
    # render_env_script refuses such ids; the template must not rely on that to stay safe.
    marker = tmp_path / "pwned"
    run_id = f'r" $(touch {marker}) `touch {marker}` \'x\' $HOME'
    script = tmp_path / "env.sh"
    script.write_text(render_template("env.sh.j2", run_id=run_id, common_env=[],
                                      node_env=[[("B", "x")]], env_var_names="B",
                                      masked_var_names="", master_port=None,
                                      rendezvous_secret=None))
    code, env, err = source_and_dump(shell, script, "7")
    assert code != 0 and "B" not in env
    assert f"env.sh: unknown NODE_RANK '7' (run {run_id} has 1 node(s): 0..0)" in err
    assert not marker.exists()


def test_run_id_and_container_rules_are_the_registry_ones() -> None:
    from tasks.lib import registry

    # One rule for both: a run id the registry would refuse must not get an env script.
    with pytest.raises(registry.RegistryError, match="run id"):
        render_env_script(run_id="r" * 201, common_env={}, node_env=[{}])
    assert render_env_script(run_id="r" * 200, common_env={}, node_env=[{}])
    import tasks.lib.render as render

    assert not hasattr(render, "_RUN_ID") and not hasattr(render, "_CONTAINER_NAME")


def test_env_script_keeps_common_order() -> None:
    text = render_env_script(run_id="r", common_env={"Z": "1", "A": "2", "M": "3"}, node_env=[{}])
    exports = [line.split("=")[0] for line in text.splitlines() if line.startswith("export ")]
    assert exports == ["export Z", "export A", "export M", "export GEMM_ENV_VARS",
                       "export GEMM_MASKED_VARS"]


def test_env_script_names_the_secrets_and_its_masked_copy_holds_none(tmp_path: Path) -> None:
    """The nodes' env.sh exports the real value and names it in GEMM_MASKED_VARS (the ranks
    record it as ***); the controller's copy holds *** in its place and differs in nothing else."""
    secret = "hf_live_$(touch x)_value"
    common = {"HF_TOKEN": secret, "my_api_key": "k3y", "NCCL_DEBUG": "INFO"}
    nodes = [{"NCCL_SOCKET_IFNAME": "eth0", "DB_PASSWORD": "pw"}]
    real = render_env_script(run_id="r", common_env=common, node_env=nodes)
    script = tmp_path / "env.sh"
    script.write_text(real)
    code, env, err = source_and_dump("bash", script, "0")
    assert code == 0, err
    assert (env["HF_TOKEN"], env["my_api_key"], env["DB_PASSWORD"]) == (secret, "k3y", "pw")
    assert env["GEMM_MASKED_VARS"].split() == ["HF_TOKEN", "my_api_key", "DB_PASSWORD"]
    copy = render_env_script(run_id="r", common_env=common, node_env=nodes, masked=True)
    for value in (secret, "k3y", "pw"):
        assert value not in copy
    script.write_text(copy)
    code, masked_env, err = source_and_dump("bash", script, "0")
    assert code == 0, err
    assert {key: masked_env[key] for key in ("HF_TOKEN", "my_api_key", "DB_PASSWORD")} == \
        dict.fromkeys(("HF_TOKEN", "my_api_key", "DB_PASSWORD"), "***")
    assert {k: v for k, v in masked_env.items() if v != "***"} == \
        {k: v for k, v in env.items() if k not in ("HF_TOKEN", "my_api_key", "DB_PASSWORD")}
    # The patterns are the setting's: none given, nothing masked.
    plain = render_env_script(run_id="r", common_env=common, node_env=nodes, secret_patterns=(),
                              masked=True)
    assert secret in plain and "export GEMM_MASKED_VARS=''" in plain


@pytest.mark.parametrize("common, nodes, message", [
    ({"1BAD": "x"}, [{}], "1BAD"),
    ({"A-B": "x"}, [{}], "A-B"),
    ({"A B": "x"}, [{}], "A B"),
    ({"ÄB": "x"}, [{}], "ÄB"),
    ({}, [{"X;Y": "x"}], "node_env[0]"),
    ({"A": None}, [{}], "None"),
    ({"A": True}, [{}], "True"),
    ({"A": ["x"]}, [{}], "['x']"),
    ({"A": "nul\0byte"}, [{}], "NUL"),
    ({}, [], "at least one node"),
])
def test_env_script_refuses_bad_input(common: dict, nodes: list, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        render_env_script(run_id="r", common_env=common, node_env=nodes)
    assert message in str(info.value)


@pytest.mark.parametrize("run_id", ["", "a b", "x\ny", "$(id)", "-rf", "a/b"])
def test_env_script_refuses_odd_run_ids(run_id: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        render_env_script(run_id=run_id, common_env={}, node_env=[{}])


def test_env_script_numbers_become_strings(tmp_path: Path) -> None:
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(run_id="r", common_env={"NCCL_MAX_NCHANNELS": 42,
                                                                "RATIO": 0.5}, node_env=[{}]))
    code, env, err = source_and_dump("bash", script, "0")
    assert code == 0, err
    assert env["NCCL_MAX_NCHANNELS"] == "42" and env["RATIO"] == "0.5"


def test_templates_are_strict() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render_template("env.sh.j2", run_id="r", common_env=[])


# -- NCCL presets ---------------------------------------------------------------------------------

def test_presets_have_the_original_workflow_values() -> None:
    assert nccl_preset_names() == ["debug", "ethernet", "ib"]
    ib = load_nccl_preset("ib")
    assert ib["NCCL_IB_DISABLE"] == "0" and ib["NCCL_IB_GID_INDEX"] == "3"
    assert ib["NCCL_SOCKET_IFNAME"] == "ib0" and ib["NCCL_IB_HCA"].startswith("mlx5")
    assert load_nccl_preset("ethernet") == {"NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "eth0",
                                            "NCCL_NSOCKS_PERTHREAD": "4", "NCCL_SOCKET_NTHREADS": "2"}
    assert load_nccl_preset("debug") == {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "ALL"}


@pytest.mark.parametrize("name", ["infiniband", "../nccl/ib", "IB", ""])
def test_unknown_preset_lists_the_presets(name: str) -> None:
    with pytest.raises(ValueError, match="available: debug, ethernet, ib"):
        load_nccl_preset(name)


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping"),
    ("bad-name: '1'\n", "bad-name"),
    ("FLAG: true\n", "quote it"),
])
def test_malformed_preset_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "custom.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_nccl_preset("custom", presets_dir=tmp_path)
    assert "custom.yaml" in str(info.value)


def test_preset_feeds_the_env_script_and_per_node_interface_wins(tmp_path: Path) -> None:
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(run_id="r", common_env=load_nccl_preset("ethernet"),
                                        node_env=[{"NCCL_SOCKET_IFNAME": "enp49s0f0np0"}]))
    code, env, err = source_and_dump("bash", script, "0")
    assert code == 0, err
    assert env["NCCL_SOCKET_IFNAME"] == "enp49s0f0np0" and env["NCCL_NSOCKS_PERTHREAD"] == "4"


# -- compose --------------------------------------------------------------------------------------

WORKDIR = "/home/user/gemm overlap"  # a space: mounts must still be one string each
REGISTRY = "/tmp/gemm-runs"


def compose_for(platform: str, **overrides: object) -> dict:
    docker = DockerSettings(image="gemm-sim:latest", platform=platform, **overrides)
    return yaml.safe_load(render_compose(docker=docker, workdir=WORKDIR, registry_dir=REGISTRY))


@pytest.mark.parametrize("platform", ["rocm", "cuda", "cpu"])
def test_compose_structure(platform: str) -> None:
    doc = compose_for(platform, container="exp-1", shm_size="8G",
                      volumes=("/data:/data:ro", "cache:/root/.cache"), env={"HF_HOME": "/data/hf"})
    assert list(doc) == ["services"]
    service = doc["services"]["exp-1"]
    assert service["container_name"] == "exp-1"
    assert service["image"] == "gemm-sim:latest"
    assert service["network_mode"] == "host" and service["ipc"] == "host"
    assert service["shm_size"] == "8G"
    assert service["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert service["cap_add"] == ["SYS_PTRACE"]
    assert service["security_opt"] == ["seccomp=unconfined"]
    assert service["command"] == ["sleep", "infinity"] and service["init"] is True
    assert service["working_dir"] == WORKDIR
    assert service["volumes"] == [f"{WORKDIR}:{WORKDIR}", f"{REGISTRY}:{REGISTRY}", "/data:/data:ro",
                                  f"{WORKDIR}/cache:/root/.cache"]
    assert service["environment"] == {"HF_HOME": "/data/hf"}
    if platform == "rocm":
        assert service["devices"] == ["/dev/kfd", "/dev/dri"] and service["group_add"] == ["video"]
    else:
        assert "devices" not in service and "group_add" not in service
    if platform == "cuda":
        assert service["deploy"] == {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}
    else:
        assert "deploy" not in service


def test_compose_without_env_has_no_environment_key() -> None:
    assert "environment" not in compose_for("cpu")["services"]["training-overlap"]


@pytest.mark.parametrize("value", ["yes", "no", "null", "~", "1", "0x10", "1e3", "a: b", "- x",
                                   "#c", "[1]", "{a}", "'", '"', "\\", "line\nbreak", "\t", "€ 😀",
                                   "\u2028", "&anchor", "*alias", "!tag", "%dir", "@", "`", ""])
def test_compose_quote_keeps_every_value_a_string(value: str) -> None:
    assert yaml.safe_load(f"key: {compose_quote(value)}") == {"key": value}


def test_compose_quote_doubles_dollars() -> None:
    assert yaml.safe_load(compose_quote("$HOME ${X} $(id)")) == "$$HOME $${X} $$(id)"


@pytest.mark.parametrize("kwargs, message", [
    ({"image": None}, "docker.image is not set"),
    ({"image": "x", "container": "-bad"}, "not a valid container name"),
    ({"image": "x", "container": "a b"}, "not a valid container name"),
    ({"image": "x", "env": {"A=B": "1"}}, "A=B"),
    ({"image": "x", "env": {"A": None}}, "None"),
])
def test_compose_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_compose(docker=DockerSettings(**kwargs), workdir="/w", registry_dir=REGISTRY)


@pytest.mark.parametrize("workdir", ["relative/dir", "/a:b"])
def test_compose_refuses_unmountable_paths(workdir: str) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        render_compose(docker=DockerSettings(image="x"), workdir=workdir, registry_dir=REGISTRY)


def test_compose_project_name() -> None:
    assert compose_project_name("training-overlap") == "training-overlap"
    assert compose_project_name("Training.Overlap_2") == "training-overlap_2"
    text = render_compose(docker=DockerSettings(image="x"), workdir="/w", registry_dir=REGISTRY,
                          project_name="training-overlap")
    assert "-p training-overlap" in text
    with pytest.raises(ValueError, match="project name"):
        render_compose(docker=DockerSettings(image="x"), workdir="/w", registry_dir=REGISTRY,
                       project_name="bad\nname")


def test_compose_command() -> None:
    assert compose_command("v2") == ["docker", "compose"]
    assert compose_command("v1") == ["docker-compose"]
    with pytest.raises(ValueError, match="install"):
        compose_command("none")


HOSTILE_ENV = {"PLAIN": "1", "DOLLAR": "$HOME ${PATH} $(id) $$", "QUOTES": "it's \"x\"",
               "NEWLINE": "a\nb", "BACKSLASH": "c:\\dir\\", "UNICODE": "Grüße 😀", "yes": "no",
               "COLON": "a: b # c"}


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (v1) not installed: "
                    "scripts/install-system-deps installs it")
@pytest.mark.parametrize("platform", ["rocm", "cuda", "cpu"])
def test_docker_compose_accepts_the_rendered_file(tmp_path: Path, platform: str) -> None:
    docker = DockerSettings(image="registry.example:5000/team/img:tag", platform=platform,
                            env=HOSTILE_ENV, volumes=("/data:/data:ro",))
    compose_file = tmp_path / "docker-compose.yaml"
    compose_file.write_text(render_compose(docker=docker, workdir=WORKDIR, registry_dir=REGISTRY,
                                           project_name="training-overlap"))
    proc = subprocess.run(["docker-compose", "-p", "training-overlap", "-f", str(compose_file),
                           "config"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    service = yaml.safe_load(proc.stdout)["services"]["training-overlap"]
    # `config` prints the file after interpolation, re-escaping literal dollars as $$.
    environment = {key: value.replace("$$", "$") for key, value in service["environment"].items()}
    assert environment == HOSTILE_ENV
    assert service["image"] == docker.image
    assert f"{WORKDIR}:{WORKDIR}:rw" in service["volumes"]


def test_env_script_sources_under_strict_bash_options(tmp_path: Path) -> None:
    """The node launcher may run with `set -euo pipefail`: sourcing must not trip over it."""
    script = tmp_path / "env.sh"
    script.write_text(render_env_script(run_id="r", common_env={"A": "1"}, node_env=[{"B": "2"}]))
    ok = subprocess.run(["bash", "-c", 'set -euo pipefail; . "$1"; echo "$A$B"', "sh", str(script)],
                        env={"PATH": "/usr/bin:/bin", "NODE_RANK": "0"}, capture_output=True,
                        text=True, timeout=10)
    assert ok.returncode == 0 and ok.stdout == "12\n", ok.stderr
    unset = subprocess.run(["bash", "-c", 'set -euo pipefail; . "$1"; echo reached', "sh",
                            str(script)], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, timeout=10)
    assert unset.returncode == 1 and "reached" not in unset.stdout
    assert "unknown NODE_RANK ''" in unset.stderr
