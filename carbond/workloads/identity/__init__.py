"""Whose joule: names and metadata for ID consumers (Kubernetes, Docker, Podman, Slurm), and
GPUs by the containers that hold them. See docs/identity.md."""
