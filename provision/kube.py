"""The one adapter around kubernetes-asyncio: the few Kubernetes API calls provisioning makes.

Every kubernetes-asyncio, aiohttp and ssl exception is translated here into a ``KubeError`` that
names the API server and the request; nothing foreign leaves this module.
"""

from __future__ import annotations

import atexit
import shutil
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from provision.errors import KubeError

MANAGED_BY = {"app.kubernetes.io/managed-by": "kci-tunneld"}

_cert_dir: str | None = None


def _private_cert_dir() -> str:
    """A 0700 directory for the client key kubernetes-asyncio must put in a file, removed at exit.

    One per process: the library caches the files it wrote by content, so the directory must live
    as long as the process.
    """
    global _cert_dir
    if _cert_dir is None:
        _cert_dir = tempfile.mkdtemp(prefix="kci-tunneld-kube-")
        atexit.register(shutil.rmtree, _cert_dir, True)
    return _cert_dir


class KubeApi:
    """A connection to one API server, as one kubeconfig context describes it."""

    def __init__(self, kubeconfig: Mapping[str, Any], context: str, *, request_timeout: float) -> None:
        self._kubeconfig = dict(kubeconfig)
        self.context = context
        self.request_timeout = request_timeout
        self.server = "?"
        self._api: k8s.ApiClient | None = None

    async def __aenter__(self) -> KubeApi:
        cfg = k8s.Configuration()
        try:
            await k8s_config.load_kube_config_from_dict(self._kubeconfig, context=self.context,
                                                        client_configuration=cfg, temp_file_path=_private_cert_dir())
        except (ConfigException, KeyError, TypeError, ValueError) as e:
            raise KubeError(f"kubeconfig context {self.context}: unusable: {e}") from None
        self.server = str(cfg.host)
        self._api = k8s.ApiClient(configuration=cfg)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    @property
    def _core(self) -> Any:
        assert self._api is not None, "KubeApi used outside its context"
        return k8s.CoreV1Api(self._api)

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except ApiException as e:
            raise KubeError(f"{what}: the API server at {self.server} answered {e.status} {e.reason}: "
                            f"{_short(e.body)}", e.status) from None
        except TimeoutError:  # before OSError, of which it is a subclass
            raise KubeError(f"{what}: no answer from the API server at {self.server} "
                            f"within {self.request_timeout:g}s") from None
        except ssl.SSLError as e:
            raise KubeError(f"{what}: TLS with the API server at {self.server} failed: {e}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise KubeError(f"{what}: cannot reach the API server at {self.server}: {e}") from None

    async def readyz(self) -> tuple[bool, str]:
        """Whether GET /readyz answers 200, and what it said."""
        assert self._api is not None
        try:
            resp = await self._call("GET /readyz", self._api.call_api(
                "/readyz", "GET", auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=self.request_timeout, _return_http_data_only=True,
            ))
        except KubeError as e:
            return False, str(e)
        body = await resp.read() if hasattr(resp, "read") else resp.data
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        return True, text.strip()

    async def namespace_exists(self, name: str) -> bool:
        try:
            await self._call(f"reading namespace {name}",
                             self._core.read_namespace(name, _request_timeout=self.request_timeout))
        except KubeError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def node_readiness(self) -> list[tuple[str, bool]]:
        """(name, Ready) for every node."""
        nodes = await self._call("listing nodes", self._core.list_node(_request_timeout=self.request_timeout))
        out = []
        for node in nodes.items or []:
            conditions = (node.status.conditions if node.status else None) or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            out.append((str(node.metadata.name), ready))
        return out

    async def apply_configmap(self, namespace: str, name: str, data: Mapping[str, str]) -> str:
        """Create or update a ConfigMap so its data is ``data``; return "created", "updated" or "unchanged"."""
        what = f"ConfigMap {namespace}/{name}"
        core = self._core
        try:
            current = await self._call(f"reading {what}", core.read_namespaced_config_map(
                name, namespace, _request_timeout=self.request_timeout))
        except KubeError as e:
            if e.status != 404:
                raise
            current = None
        body = k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", data=dict(data),
                               metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(MANAGED_BY)))
        if current is None:
            await self._call(f"creating {what}", core.create_namespaced_config_map(
                namespace, body, _request_timeout=self.request_timeout))
            return "created"
        if dict(current.data or {}) == dict(data):
            return "unchanged"
        # Replace with the version we read: a concurrent writer makes this fail rather than be overwritten.
        body.metadata.resource_version = current.metadata.resource_version
        body.metadata.labels = {**(current.metadata.labels or {}), **MANAGED_BY}
        await self._call(f"updating {what}", core.replace_namespaced_config_map(
            name, namespace, body, _request_timeout=self.request_timeout))
        return "updated"


def _short(body: object) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    return text.strip().replace("\n", " ")[:300]
