"""The one quoting function: whatever goes in comes out of a real shell unchanged."""

from __future__ import annotations

import subprocess

import pytest

from tasks.lib.quoting import is_env_name, sh_join, sh_quote, shell_command

HOSTILE = [
    "",
    "plain",
    "with space",
    "it's",
    '"double"',
    "$(touch /tmp/pwned-by-quoting)",
    "`id`",
    "$HOME",
    "a;b|c&d>e<f",
    "line1\nline2\n",
    "tab\there",
    "back\\slash",
    "*?[glob]",
    "~user",
    "-n",
    "ünï©ødé",
    "!event",
]


def _echo_through_sh(command: str) -> bytes:
    return subprocess.run(["sh", "-c", command], capture_output=True, check=True).stdout


@pytest.mark.parametrize("value", HOSTILE)
def test_sh_quote_round_trips_through_a_real_shell(value):
    assert _echo_through_sh(f"printf '%s' {sh_quote(value)}") == value.encode()


def test_sh_join_keeps_argument_boundaries():
    out = _echo_through_sh("printf '<%s>' " + sh_join(HOSTILE))
    assert out == "".join(f"<{v}>" for v in HOSTILE).encode()


def test_sh_quote_refuses_none_and_maps_bools():
    with pytest.raises(ValueError):
        sh_quote(None)
    assert sh_quote(True) == "1" and sh_quote(False) == "0"
    assert sh_quote(42) == "42"


def test_shell_command_cd_env_and_argv(tmp_path):
    target = tmp_path / "dir with 'quote'"
    target.mkdir()
    command = shell_command(
        ["sh", "-c", 'printf "%s|%s|%s" "$PWD" "$A" "$1"', "arg0", "$(x) y"],
        cwd=str(target),
        env={"A": "v $(id) ' \n"},
    )
    assert _echo_through_sh(command).decode() == f"{target}|v $(id) ' \n|$(x) y"


def test_shell_command_rejects_bad_env_names():
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        shell_command(["true"], env={"A-B": "1"})
    with pytest.raises(ValueError):
        shell_command(["true"], env={"1A": "1"})


@pytest.mark.parametrize(
    "name,ok",
    [
        ("NCCL_SOCKET_IFNAME", True),
        ("_x1", True),
        ("a", True),
        ("", False),
        ("1A", False),
        ("A-B", False),
        ("A B", False),
        ("é", False),
        ("A=B", False),
    ],
)
def test_is_env_name(name, ok):
    assert is_env_name(name) is ok
