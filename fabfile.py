"""Task namespace for `fab`: every task lives in tasks/, one module per capability.

The tasks are flat (`fab launch`, not `fab launch.launch`) to keep the original scripts' verbs.
"""
from importlib import import_module

from invoke import Collection

from tasks.lib.settings import default_config

# Modules are imported by name so a task module under construction can be listed here early.
TASK_MODULES = ("cluster", "docker", "launch", "runs", "sweep", "report", "diagnose")

ns = Collection()
for module_name in TASK_MODULES:
    try:
        module = import_module(f"tasks.{module_name}")
    except ModuleNotFoundError as err:
        if err.name != f"tasks.{module_name}":
            raise
        continue
    for name, task in module.ns.tasks.items():
        ns.add_task(task, name)
ns.configure(default_config())
