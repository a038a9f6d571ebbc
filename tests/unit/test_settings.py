"""Settings validation, defaults as config, and the comment-keeping config edits of setup."""

from __future__ import annotations

import pytest
import yaml
from invoke import Config, Context
from invoke.exceptions import Exit

from tasks.lib.configedit import ConfigEditError, set_yaml_key
from tasks.lib.settings import (
    ClusterSettings,
    DockerSettings,
    LaunchSettings,
    Settings,
    SettingsError,
    default_config,
)
from tasks.cluster.session import load_settings


def test_defaults_round_trip_through_a_config_tree():
    config = Config(overrides=default_config())
    settings = Settings.from_config(config)
    assert settings == Settings(ClusterSettings(), DockerSettings(), LaunchSettings())
    assert config.timeouts.connect == 10


def test_values_are_coerced_and_validated():
    settings = Settings.from_config(
        {
            "cluster": {"hosts": ["a", "b"], "workdir": "/srv/x", "host_key_policy": "reject"},
            "docker": {"enabled": False, "volumes": ["/a:/b:ro"], "env": {"A": 1}},
            "launch": {"nproc": "auto", "hang_timeout": 5},
        }
    )
    assert settings.cluster.hosts == ("a", "b")
    assert settings.docker.volumes == ("/a:/b:ro",)
    assert settings.launch.nproc == "auto" and settings.launch.hang_timeout == 5.0
    assert isinstance(settings.launch.hang_timeout, float)
    hash(settings.cluster)  # frozen and hashable: lists became tuples


def test_missing_sections_take_defaults():
    assert Settings.from_config({}).launch == LaunchSettings()
    assert Settings.from_config({"cluster": None}).cluster == ClusterSettings()


@pytest.mark.parametrize(
    "config,message",
    [
        ({"cluster": {"hostz": []}}, r"cluster: unknown key\(s\) hostz"),
        ({"cluster": {"host_key_policy": "yolo"}}, "cluster.host_key_policy"),
        ({"cluster": {"hosts": "a,b"}}, "cluster.hosts: expected a list"),
        ({"cluster": {"known_hosts": None}}, "cluster.known_hosts: must not be null"),
        ({"cluster": "x"}, "cluster: expected a mapping"),
        ({"docker": {"platform": "tpu"}}, "docker.platform"),
        ({"docker": {"enabled": "yes"}}, "docker.enabled: expected true or false"),
        ({"docker": {"volumes": ["novolume"]}}, "docker.volumes"),
        ({"launch": {"nproc": "eight"}}, "launch.nproc"),
        ({"launch": {"nproc": True}}, "launch.nproc: expected an integer or a string"),
        ({"launch": {"channels": 2.5}}, "launch.channels: expected an integer"),
        ({"launch": {"master_port": "x"}}, "launch.master_port"),
    ],
)
def test_bad_values_name_their_key(config, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_config(config)


@pytest.mark.parametrize("key", ["workdir", "registry_dir", "venv"])
@pytest.mark.parametrize("path, message", [
    ("~/gemm", "'~' is not expanded on the nodes"),
    ("~root/gemm", "'~' is not expanded on the nodes"),
    ("srv/gemm", "must be an absolute path"),
    ("", "must be an absolute path"),
    ("/srv/a\nb", "must be an absolute path"),
])
def test_node_paths_must_be_absolute_without_tilde(key, path, message):
    with pytest.raises(SettingsError, match=f"^cluster.{key}: .*{message}"):
        Settings.from_config({"cluster": {key: path}})
    # What a task sees: a one-line usage error (exit 2), not a traceback from deep inside.
    with pytest.raises(Exit) as raised:
        load_settings(Context(Config(overrides={"cluster": {key: path}})))
    assert raised.value.code == 2 and f"config error: cluster.{key}:" in raised.value.message


def test_node_paths_accept_absolute_paths_and_null_where_the_default_is_null():
    cluster = Settings.from_config({"cluster": {
        "workdir": "/srv/o'k $(x)/~tilde-inside", "registry_dir": "/tmp/r", "venv": None}}).cluster
    assert (cluster.workdir, cluster.registry_dir, cluster.venv) == (
        "/srv/o'k $(x)/~tilde-inside", "/tmp/r", None)
    # null (the default): each user's own /tmp/gemm-runs-<uid>, resolved on the node.
    assert Settings.from_config({"cluster": {"registry_dir": None}}).cluster.registry_dir is None
    assert Settings.from_config({}).cluster.registry_dir is None
    with pytest.raises(SettingsError, match="cluster.experiments_dir: must not be null"):
        Settings.from_config({"cluster": {"experiments_dir": None}})


# -- set_yaml_key (what `fab setup` writes) -------------------------------------------------------

PROJECT = """\
# Project settings: comments must survive.
cluster:
  # the nodes
  hosts_file: node_ip_list.txt
  workdir: /srv/x   # trailing comment
docker:
  enabled: true
"""


def test_insert_key_keeps_comments():
    text = set_yaml_key(PROJECT, "cluster", "socket_ifname", "ens5")
    assert "# Project settings: comments must survive." in text and "# trailing comment" in text
    assert yaml.safe_load(text)["cluster"] == {
        "socket_ifname": "ens5",
        "hosts_file": "node_ip_list.txt",
        "workdir": "/srv/x",
    }
    assert yaml.safe_load(text)["docker"] == {"enabled": True}


def test_replace_key_including_an_indentless_block_list():
    runtime = yaml.safe_dump(
        {
            "user": "root",
            "cluster": {"hosts": ["a", "b", "c"], "workdir": "/w"},
            "docker": {"enabled": False},
        },
        sort_keys=False,
    )
    text = set_yaml_key(runtime, "cluster", "hosts", ["x", "y"])
    assert yaml.safe_load(text) == {
        "user": "root",
        "cluster": {"hosts": ["x", "y"], "workdir": "/w"},
        "docker": {"enabled": False},
    }
    text = set_yaml_key(text, "cluster", "workdir", "/srv/o'k $(x)")
    assert yaml.safe_load(text)["cluster"]["workdir"] == "/srv/o'k $(x)"


def test_new_section_appended_and_empty_file():
    assert yaml.safe_load(
        set_yaml_key("timeouts:\n  connect: 10\n", "cluster", "hosts", ["a"])
    ) == {"timeouts": {"connect": 10}, "cluster": {"hosts": ["a"]}}
    assert yaml.safe_load(set_yaml_key("", "cluster", "socket_ifname", "ib0")) == {
        "cluster": {"socket_ifname": "ib0"}
    }


def test_flow_style_falls_back_to_a_full_dump():
    text = set_yaml_key("cluster: {hosts: [a], workdir: /w}\n", "cluster", "hosts", ["b"])
    assert yaml.safe_load(text) == {"cluster": {"hosts": ["b"], "workdir": "/w"}}


def test_unusable_files_are_refused():
    with pytest.raises(ConfigEditError, match="not a YAML mapping"):
        set_yaml_key("- a\n- b\n", "cluster", "hosts", ["a"])
    with pytest.raises(ConfigEditError, match="'cluster' is not a mapping"):
        set_yaml_key("cluster: 3\n", "cluster", "hosts", ["a"])
    with pytest.raises(ConfigEditError, match="not valid YAML"):
        set_yaml_key("cluster: [\n", "cluster", "hosts", ["a"])
