"""One run's pipeline below `fab launch`: the plan, start-up, the watch loop, Slurm submission."""
