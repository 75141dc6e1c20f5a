"""Provisioning of the registry and a kind cluster on the remote Docker host (see issue 6)."""
