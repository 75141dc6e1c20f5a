"""Provisioning of the registry and a kind cluster on the remote Docker host: `kci-tunneld up` and `down`
(docs/provisioning.md)."""
