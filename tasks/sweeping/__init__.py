"""What `fab sweep` runs on: the per-point runner and the rank-pool runner."""
