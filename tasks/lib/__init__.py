"""Pure helpers of the task library: no @task, no network, no torch. Unit-tested in tests/unit."""
