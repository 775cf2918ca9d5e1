"""Subresources with their own request and response kinds: ``/scale``, ``pods/eviction`` and
``serviceaccounts/token`` (``pods/binding`` and ``/status`` live in the store).

- ``/scale`` (autoscaling/v1 Scale; get, update, patch) on Deployments, ReplicaSets,
  StatefulSets and custom resources whose CRD version declares ``subresources.scale``: the Scale
  is a view of the parent (``spec.replicas``, ``status.replicas``, ``status.selector`` as a
  selector string); writing it writes the parent's replicas (a generation bump, as a spec edit).
- ``pods/eviction`` (policy/v1 Eviction; create), as ``pkg/registry/core/pod/storage/eviction.go``:
  terminal, pending and terminating pods are deleted outright; otherwise the one
  PodDisruptionBudget selecting the pod must allow a disruption per its *status* (kept by the
  disruption controller of the controller-manager): its ``disruptionsAllowed`` is taken, the pod
  recorded in ``disruptedPods``, the pod gets the ``DisruptionTarget`` condition and is deleted.
  A budget that does not allow it is 429 TooManyRequests with a ``DisruptionBudget`` cause.
- ``serviceaccounts/token`` (authentication.k8s.io/v1 TokenRequest; create): a JWT signed by
  this server's key, RS256 with a per-server RSA key when ``cryptography`` is importable (as
  upstream), else HS256 with a per-server secret; claims as upstream's ``pkg/serviceaccount``
  (``iss``, ``sub`` ``system:serviceaccount:NS:NAME``, ``aud``, ``exp``/``iat``/``nbf``, ``jti``
  and the ``kubernetes.io`` claim naming the namespace, account and the bound pod/secret/node).
  The public key is served as a JWK set (:meth:`TokenIssuer.jwks`).

:func:`handle` is the one entry point the server's router calls, with the parsed request.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from typing import Any

from kubeemu import errors, validation
from kubeemu.objects import PODS, SERVICEACCOUNTS, DeleteOptions, Obj, metadata_of, now_rfc3339
from kubeemu.patch import patched
from kubeemu.resources import ResourceType
from kubeemu.store import Store

_log = logging.getLogger(__name__)

HANDLED = frozenset({"scale", "eviction", "token"})
PDBS = ("policy", "poddisruptionbudgets")
ISSUER = "https://kubernetes.default.svc.cluster.local"
#: The projected token the ServiceAccount admission plugin asks for (3607s) is issued for a year
#: and warned after its hour (--service-account-extend-token-expiration, on by default).
WARN_ONLY_SECONDS = 3607
EXTENDED_SECONDS = 365 * 24 * 3600
_SUCCESS = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}


def handle(store: Store, rt: ResourceType, version: str, ns: str, name: str, sub: str, method: str,
           ctype: str, body: Any, dry_run: bool) -> tuple[int, Obj]:
    """Serve one subresource request; returns (HTTP code, body)."""
    if sub == "scale":
        if not rt.has_scale(version):
            raise errors.no_route()
        if method == "GET":
            return 200, get_scale(store, rt, version, ns, name)
        if method == "PUT":
            return 200, update_scale(store, rt, version, ns, name, body, dry_run)
        if method == "PATCH":
            return 200, patch_scale(store, rt, version, ns, name, ctype, body, dry_run)
        raise errors.method_not_allowed(method)
    if method != "POST":
        raise errors.method_not_allowed(method)
    if sub == "eviction" and rt.key == PODS:
        return 201, evict(store, ns, name, body, dry_run)
    if sub == "token" and rt.key == SERVICEACCOUNTS:
        return 201, request_token(store, ns, name, body, dry_run)
    raise errors.no_route()


# ---------------------------------------------------------------------------- scale


def _at(obj: Any, path: str) -> Any:
    """The value at a CRD JSONPath like ``.spec.replicas`` (None when absent)."""
    cur = obj
    for part in [p for p in path.split(".") if p]:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = [p for p in path.split(".") if p]
    cur = obj
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def get_scale(store: Store, rt: ResourceType, version: str, ns: str, name: str) -> Obj:
    """The Scale view of a parent object."""
    return _scale_of(rt, version, store.get(rt, ns, name))


def _scale_of(rt: ResourceType, version: str, obj: Obj) -> Obj:
    meta = metadata_of(obj)
    spec_path, status_path, selector_path = rt.scale_paths_of(version)
    if rt.builtin:
        sel = (obj.get("spec") or {}).get("selector")
        selector = validation.selector_string(sel) if isinstance(sel, dict) else ""
    else:
        selector = str(_at(obj, selector_path) or "") if selector_path else ""
    status: dict[str, Any] = {"replicas": int(_at(obj, status_path) or 0)}
    if selector:
        status["selector"] = selector
    out_meta = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta}
    return {"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": out_meta,
            "spec": {"replicas": int(_at(obj, spec_path) or 0)}, "status": status}


def update_scale(store: Store, rt: ResourceType, version: str, ns: str, name: str, body: Any,
                 dry_run: bool) -> Obj:
    """PUT Scale: the replicas go to the parent (resourceVersion and uid, when given, are preconditions)."""
    if not isinstance(body, dict):
        raise errors.bad_request("the body of the request must be a Scale object")
    kind = body.get("kind")
    if kind not in (None, "", "Scale"):
        raise errors.bad_request(f"the body of the request is a {kind}, not an autoscaling/v1 Scale")
    old = store.get(rt, ns, name)
    replicas = (body.get("spec") or {}).get("replicas", 0)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise errors.invalid("Scale", "autoscaling", name, [validation.invalid(
            "spec.replicas", replicas, validation.NON_NEGATIVE_MSG)])
    # scaleUpdatedObjectInfo.UpdatedObject: after the Scale's validation, its uid is a precondition
    # on the parent (PUT and PATCH alike: a patch is applied to the current Scale first).
    want_uid = metadata_of(body).get("uid")
    if want_uid and want_uid != old["metadata"].get("uid"):
        raise errors.conflict(f"{rt.plural}/scale", rt.group, name,
                              errors.uid_precondition_failed(want_uid, old["metadata"].get("uid", "")))
    want_rv = metadata_of(body).get("resourceVersion")
    if want_rv and str(want_rv) != old["metadata"]["resourceVersion"]:
        raise errors.conflict(rt.plural, rt.group, name)
    new = copy.deepcopy(old)
    _set(new, rt.scale_paths_of(version)[0], replicas)
    new["metadata"] = {k: v for k, v in new["metadata"].items() if k != "resourceVersion"}
    out = store.update(rt, ns, name, new, version, None, dry_run)
    return _scale_of(rt, version, out)


def patch_scale(store: Store, rt: ResourceType, version: str, ns: str, name: str, ctype: str, body: Any,
                dry_run: bool) -> Obj:
    """PATCH Scale (``kubectl scale`` sends a merge patch): patch the Scale view, then PUT it."""
    current = get_scale(store, rt, version, ns, name)
    # a Scale is a built-in kind (autoscaling/v1) whatever its parent's: it takes strategic patches
    return update_scale(store, rt, version, ns, name, patched(ctype, current, body, strategic=True), dry_run)


# ---------------------------------------------------------------------------- eviction

_EVICT_MSG = "Cannot evict pod as it would violate the pod's disruption budget."


def _too_many(message: str, cause: str, retry_after: int) -> errors.ApiError:
    details: dict[str, Any] = {"causes": [{"reason": "DisruptionBudget", "message": cause}]}
    if retry_after:
        details["retryAfterSeconds"] = retry_after
    return errors.ApiError(429, "TooManyRequests", message, details)


def _pod_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def evict(store: Store, ns: str, name: str, body: Any, dry_run: bool) -> Obj:
    """POST pods/NAME/eviction: delete the pod unless its disruption budget forbids it."""
    body = body if isinstance(body, dict) else {}
    if body.get("kind") not in (None, "", "Eviction"):
        raise errors.bad_request(f"the body of the request is a {body.get('kind')}, not a policy/v1 Eviction")
    bname = metadata_of(body).get("name")
    if bname and bname != name:
        raise errors.bad_request("name in URL does not match name in Eviction object")
    opts_body = body.get("deleteOptions") or {}
    dry_run = dry_run or "All" in (opts_body.get("dryRun") or [])
    pods = store.registry.get(PODS)
    assert pods is not None
    pod = store.get(pods, ns, name)
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed", "Pending") or metadata_of(pod).get("deletionTimestamp"):
        return _evict_delete(store, pod, opts_body, dry_run)
    labels = metadata_of(pod).get("labels") or {}
    pdb_rt = store.registry.get(PDBS)
    budgets = []
    if pdb_rt is not None:
        for (pns, _), pdb in sorted(store.bucket(PDBS).items()):
            sel = (pdb.get("spec") or {}).get("selector")
            if pns != ns or not isinstance(sel, dict) or validation.selector_empty(sel):
                continue  # a nil or empty selector matches nothing here, as upstream
            if validation.selector_matches(sel, labels):
                budgets.append(pdb)
    if len(budgets) > 1:
        raise errors.internal("This pod has more than one PodDisruptionBudget, which the eviction subresource "
                              "does not support.")
    if not budgets:
        return _evict_delete(store, pod, opts_body, dry_run)
    pdb = budgets[0]
    pname = pdb["metadata"]["name"]
    st = pdb.get("status") or {}
    if not _pod_ready(pod):
        policy = (pdb.get("spec") or {}).get("unhealthyPodEvictionPolicy") or "IfHealthyBudget"
        healthy = int(st.get("currentHealthy") or 0) >= int(st.get("desiredHealthy") or 0) > 0
        if policy == "AlwaysAllow" or healthy:
            return _evict_delete(store, pod, opts_body, dry_run)
    if int(st.get("observedGeneration") or 0) < int(pdb["metadata"].get("generation") or 0):
        raise _too_many(_EVICT_MSG, f"The disruption budget {pname} is still being processed by the server.", 10)
    allowed = int(st.get("disruptionsAllowed") or 0)
    if allowed < 0:
        raise errors.ApiError(403, "Forbidden", f'poddisruptionbudgets.policy "{pname}" is forbidden: pdb '
                              "disruptions allowed is negative", {"name": pname, "group": "policy",
                                                                  "kind": "poddisruptionbudgets"})
    if allowed == 0:
        raise _too_many(_EVICT_MSG, f"The disruption budget {pname} needs {int(st.get('desiredHealthy') or 0)} "
                                    f"healthy pods and has {int(st.get('currentHealthy') or 0)} currently", 0)
    if not dry_run:
        assert pdb_rt is not None
        new = copy.deepcopy(pdb)
        nst = new.setdefault("status", {})
        nst["disruptionsAllowed"] = allowed - 1
        nst.setdefault("disruptedPods", {})[name] = now_rfc3339()
        if allowed - 1 == 0:
            conds = [c for c in nst.get("conditions") or [] if c.get("type") != "DisruptionAllowed"]
            conds.append({"type": "DisruptionAllowed", "status": "False", "reason": "InsufficientPods",
                          "message": "", "observedGeneration": nst.get("observedGeneration", 0),
                          "lastTransitionTime": now_rfc3339()})
            nst["conditions"] = conds
        store._write(pdb_rt, pdb, new, True, False)
    return _evict_delete(store, pod, opts_body, dry_run)


def _evict_delete(store: Store, pod: Obj, opts_body: dict[str, Any], dry_run: bool) -> Obj:
    """addConditionAndDeletePod: mark DisruptionTarget (EvictionByEvictionAPI), then delete."""
    pods = store.registry.get(PODS)
    assert pods is not None
    meta = metadata_of(pod)
    ns, name = meta.get("namespace", ""), meta["name"]
    pre = opts_body.get("preconditions") or {}
    if pre.get("uid") and pre["uid"] != meta.get("uid"):
        raise errors.conflict("pods", "", name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                                                f"object meta: {meta.get('uid')}")
    if dry_run:
        return dict(_SUCCESS)
    if not meta.get("deletionTimestamp"):
        new = copy.deepcopy(pod)
        conds = [c for c in (new.setdefault("status", {}).get("conditions") or [])
                 if c.get("type") != "DisruptionTarget"]
        conds.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                      "message": "Eviction API: evicting", "lastTransitionTime": now_rfc3339()})
        new["status"]["conditions"] = conds
        store._write(pods, pod, new, True, False)
    opts = DeleteOptions(precondition_uid=pre.get("uid"), precondition_rv=pre.get("resourceVersion"))
    if opts_body.get("gracePeriodSeconds") is not None:
        opts.grace_seconds = int(opts_body["gracePeriodSeconds"])
    opts.propagation = opts_body.get("propagationPolicy")
    store.delete(pods, ns, name, opts)
    return dict(_SUCCESS)


# ---------------------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """The server's service-account token signer: RS256 (RSA 2048) when ``cryptography`` is
    importable, else HS256 with a random secret (then only this server can verify)."""

    def __init__(self) -> None:
        self._rsa: Any = None
        self._secret = b""
        try:
            from cryptography.hazmat.primitives.asymmetric import rsa
        except ImportError:  # pragma: no cover - depends on the host
            self.alg = "HS256"
            self._secret = secrets.token_bytes(32)
            self.kid = _b64(hashlib.sha256(self._secret).digest())[:16]
            _log.info("service-account tokens: cryptography not importable, signing HS256")
            return
        self.alg = "RS256"
        self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        from cryptography.hazmat.primitives import serialization

        der = self._rsa.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = _b64(hashlib.sha256(der).digest())

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": self.alg, "kid": self.kid}
        signing_input = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64(json.dumps(claims, separators=(",", ":")).encode()))
        if self._rsa is not None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            sig = self._rsa.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        else:
            sig = hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + _b64(sig)

    def public_pem(self) -> bytes:
        """The RSA public key in PEM (empty for HS256)."""
        if self._rsa is None:
            return b""
        from cryptography.hazmat.primitives import serialization

        return bytes(self._rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))

    def jwks(self) -> dict[str, Any]:
        """The JWK set of ``/openid/v1/jwks`` (empty for HS256: a secret is not published)."""
        if self._rsa is None:
            return {"keys": []}
        nums = self._rsa.public_key().public_numbers()

        def b(n: int) -> str:
            return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        return {"keys": [{"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256", "n": b(nums.n),
                          "e": b(nums.e)}]}


def issuer_of(store: Store) -> TokenIssuer:
    """The store's issuer, made on first use (an RSA key takes a moment to generate)."""
    if store.token_issuer is None:
        store.token_issuer = TokenIssuer()
    assert isinstance(store.token_issuer, TokenIssuer)
    return store.token_issuer


_BOUND_KINDS = {"Pod": ("", "pods"), "Secret": ("", "secrets"), "Node": ("", "nodes")}


def request_token(store: Store, ns: str, name: str, body: Any, dry_run: bool) -> Obj:
    """POST serviceaccounts/NAME/token: validate the TokenRequest, check the bound object, sign."""
    body = body if isinstance(body, dict) else {}
    if body.get("kind") not in (None, "", "TokenRequest"):
        raise errors.bad_request(f"the body of the request is a {body.get('kind')}, not an "
                                 "authentication.k8s.io/v1 TokenRequest")
    sa_rt = store.registry.get(SERVICEACCOUNTS)
    assert sa_rt is not None
    sa = store.get(sa_rt, ns, name)
    spec = dict(body.get("spec") or {})
    exp = spec.get("expirationSeconds", 3600)
    causes = []
    if isinstance(exp, bool) or not isinstance(exp, int):
        causes.append(validation.invalid("spec.expirationSeconds", exp, "must be an integer"))
    elif exp < 600:
        causes.append(validation.invalid("spec.expirationSeconds", exp,
                                         "may not specify a duration less than 10 minutes"))
    elif exp > 1 << 32:
        causes.append(validation.invalid("spec.expirationSeconds", exp,
                                         "may not specify a duration larger than 2^32 seconds"))
    if causes:
        raise errors.invalid("TokenRequest", "authentication.k8s.io", name, causes)
    audiences = list(spec.get("audiences") or [ISSUER])
    spec["audiences"], spec["expirationSeconds"] = audiences, exp
    k8s: dict[str, Any] = {"namespace": ns, "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]}}
    ref = spec.get("boundObjectRef")
    pod: Obj | None = None
    if isinstance(ref, dict) and ref:
        kind = ref.get("kind", "")
        if kind not in _BOUND_KINDS:
            raise errors.bad_request(f"cannot bind token to object of type {ref.get('apiVersion', 'v1')}, "
                                     f"Kind={kind}")
        brt = store.registry.get(_BOUND_KINDS[kind])
        assert brt is not None
        bound = store.get(brt, ns, str(ref.get("name", "")))
        if ref.get("uid") and ref["uid"] != bound["metadata"]["uid"]:
            raise errors.conflict(kind, "", str(ref.get("name", "")),
                                  f"the UID in the bound object reference ({ref['uid']}) does not match the UID "
                                  "in record. The object might have been deleted and then recreated")
        ident = {"name": bound["metadata"]["name"], "uid": bound["metadata"]["uid"]}
        if kind == "Pod":
            pod = bound
            if (bound.get("spec") or {}).get("serviceAccountName", "default") != name:
                raise errors.bad_request(f'cannot bind token for serviceaccount "{name}" to pod running with '
                                         "different serviceaccount name.")
            k8s["pod"] = ident
            node_name = (bound.get("spec") or {}).get("nodeName")
            node_rt = store.registry.get(("", "nodes"))
            node = store.bucket(("", "nodes")).get(("", node_name)) if node_name and node_rt else None
            if node is not None:
                k8s["node"] = {"name": node_name, "uid": node["metadata"]["uid"]}
        elif kind == "Secret":
            k8s["secret"] = ident
        else:
            k8s["node"] = ident
    now = int(time.time())
    lifetime = exp
    if pod is not None and exp == WARN_ONLY_SECONDS and audiences == [ISSUER]:
        k8s["warnafter"] = now + exp
        lifetime = EXTENDED_SECONDS
    claims = {"aud": audiences, "exp": now + lifetime, "iat": now, "iss": ISSUER, "jti": str(uuid.uuid4()),
              "kubernetes.io": k8s, "nbf": now, "sub": f"system:serviceaccount:{ns}:{name}"}
    token = "" if dry_run else issuer_of(store).sign(claims)
    return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": None},
            "spec": spec, "status": {"token": token, "expirationTimestamp": now_rfc3339(now + exp)}}


__all__ = ["HANDLED", "ISSUER", "TokenIssuer", "evict", "get_scale", "handle", "issuer_of", "patch_scale",
           "request_token", "update_scale"]
