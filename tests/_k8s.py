"""Kubernetes helpers for the deployment tests: Helm's value merge, a NetworkPolicy
evaluator, and the NetworkPolicy the Z2JH chart renders for user pods.

The evaluator covers what our policies use (matchLabels selectors, namespace selectors,
ipBlocks with exceptions, ports): a pod selected by policies of a type gets only what one of
their rules allows, and a connection needs both the source's egress and the destination's
ingress. A pod or address is a dict: ``labels`` (None outside the cluster), ``ip``, ``ns``
(its namespace's labels, None outside the cluster).
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any


def helm_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's value merge: maps merge recursively, anything else replaces, null deletes."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


NS = {"kubernetes.io/metadata.name": "bulle"}
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}


def _selects(selector: dict[str, Any], labels: dict[str, str] | None) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions not evaluated here"
    return labels is not None and selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict[str, Any], target: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(target["ip"])
        block = peer["ipBlock"]
        return (ip in ipaddress.ip_network(block["cidr"])
                and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])))
    if target["labels"] is None:  # an address outside the cluster matches no selector
        return False
    ns_ok = (_selects(peer["namespaceSelector"], target["ns"]) if "namespaceSelector" in peer
             else target["ns"] == NS)  # podSelector alone: the policy's own namespace
    pod_ok = _selects(peer["podSelector"], target["labels"]) if "podSelector" in peer else True
    return ns_ok and pod_ok


def _port_ok(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") in (None, port) for p in ports)


def allowed(policies: list[dict[str, Any]], src: dict[str, Any], dst: dict[str, Any],
            port: int) -> bool:
    """Both ends must allow: the source's egress and the destination's ingress."""
    def side(pod: dict[str, Any], kind: str, key: str, other: dict[str, Any]) -> bool:
        if pod["labels"] is None:
            return True  # outside the cluster: no policy applies there
        mine = [p["spec"] for p in policies
                if p["metadata"].get("namespace", "bulle") == pod["ns"].get(
                    "kubernetes.io/metadata.name") and _selects(p["spec"]["podSelector"],
                                                                pod["labels"])
                and kind in p["spec"].get("policyTypes", ["Ingress"])]
        if not mine:
            return True
        return any(_port_ok(rule, port) and (key not in rule or any(
            _peer_matches(peer, other) for peer in rule[key]))
            for spec in mine for rule in spec.get(kind.lower(), []))

    return side(src, "Egress", "to", dst) and side(dst, "Ingress", "from", src)


def chart_singleuser_policy(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The NetworkPolicy the chart renders for user pods (templates/singleuser/netpol.yaml
    and _helpers-netpol.tpl), from our values merged over its defaults."""
    su = helm_merge(defaults, values)["singleuser"]
    netpol, rules_on = su["networkPolicy"], su["networkPolicy"]["egressAllowRules"]
    meta = f"{su['cloudMetadata']['ip']}/32"
    private = [{"ipBlock": {"cidr": c}} for c in ("10.0.0.0/8", "172.16.0.0/12",
                                                   "192.168.0.0/16")]
    chart = {"app": "jupyterhub"}
    egress = [
        {"to": [{"podSelector": {"matchLabels": {"component": "hub", **chart}}}],
         "ports": [{"port": 8081}]},
        {"to": [{"podSelector": {"matchLabels": {"component": "proxy", **chart}}}],
         "ports": [{"port": 8000}]},
        {"to": [{"podSelector": {"matchLabels": {"component": "autohttps", **chart}}}],
         "ports": [{"port": 8080}, {"port": 8443}]},
    ]
    dns_to = ([{"ipBlock": {"cidr": meta}}] if rules_on["dnsPortsCloudMetadataServer"] else [])
    if rules_on["dnsPortsKubeSystemNamespace"]:
        dns_to.append({"namespaceSelector": {"matchLabels": KUBE_SYSTEM}})
    if rules_on["dnsPortsPrivateIPs"]:
        dns_to += private
    if dns_to:
        egress.append({"to": dns_to, "ports": [{"port": 53}]})
    if rules_on["nonPrivateIPs"]:
        egress.append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [
            "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", meta]}}]})
    if rules_on["privateIPs"]:
        egress.append({"to": private})
    if rules_on["cloudMetadataServer"]:
        egress.append({"to": [{"ipBlock": {"cidr": meta}}]})
    egress += netpol.get("egress", [])
    return {"metadata": {"name": "singleuser", "namespace": "bulle"},
            "spec": {"podSelector": {"matchLabels": {"component": "singleuser-server", **chart}},
                     "policyTypes": ["Ingress", "Egress"], "egress": egress,
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {
                         "hub.jupyter.org/network-access-singleuser": "true"}}}]}]}}
