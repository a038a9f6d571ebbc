"""Task namespace for `fab`: every task lives in tasks/, one module per capability.

The tasks are flat (`fab launch`, not `fab launch.launch`) to keep the original scripts' verbs.
"""
from invoke import Collection

from tasks import check, collect, diagnose, docker, launch, report, runs, setup, sweep, sync, tune
from tasks.cluster import fab_hooks
from tasks.lib.settings import default_config

ns = Collection()
for module in (check, setup, sync, docker, launch, collect, runs, sweep, tune, report, diagnose):
    for name, task in module.ns.tasks.items():
        ns.add_task(task, name)
ns.configure(default_config())
# Config files and a closed stdout are handled where Invoke handles them, before and after any
# task runs: see tasks/cluster/fab_hooks.py for why.
fab_hooks.install(ns.configuration())
