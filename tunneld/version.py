"""The version, in one place: ``kci-tunneld --version`` reads it here and the package build
(pyproject.toml's dynamic version) reads it too, so neither needs the installed metadata."""

__version__ = "0.1.0"
