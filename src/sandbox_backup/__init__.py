"""sandbox-backup: a backup control plane for fleets of container sandboxes."""

__version__ = "0.1.0"
