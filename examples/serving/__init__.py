"""Deploying the attribution service beyond one process (Ray Serve): see docs/serving.md."""
