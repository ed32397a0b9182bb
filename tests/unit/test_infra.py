"""The infrastructure, checked offline: every Terraform file parses (python-hcl2), every variable and
output is described, the workdir bucket is private, encrypted, versioned and expires old versions,
and every cluster manifest parses with its kind's required fields, its placeholders filled by the
Terraform output `manifest_env`. (checkov runs in its own environment: .ci/infra.)
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import ROOT

TERRAFORM = ROOT / "infra" / "terraform"
MANIFESTS = sorted((ROOT / "cluster").rglob("*.yaml"))
REQUIRED = {
    "RayCluster": [("spec", "headGroupSpec"), ("spec", "workerGroupSpecs")],
    "RayJob": [("spec", "entrypoint"), ("spec", "rayClusterSpec", "headGroupSpec")],
    "RayService": [("spec", "serveConfigV2"), ("spec", "rayClusterConfig", "headGroupSpec")],
}
LAUNCHER_KEYS = ("cluster_name", "provider", "available_node_types", "head_node_type")


def _unquote(value):
    """python-hcl2 8 keeps the quotes of strings and block labels; strip them."""
    return value[1:-1] if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"' else value


def _blocks(parsed: dict, kind: str) -> dict[str, dict]:
    """`resource`/`data` blocks as {"type.name": body}; `variable`/`output`/`module` as {name: body}."""
    found = {}
    for block in parsed.get(kind, []):
        for label, body in block.items():
            if kind in ("resource", "data"):
                for name, inner in body.items():
                    found[f"{_unquote(label)}.{_unquote(name)}"] = inner
            else:
                found[_unquote(label)] = body
    return found


@pytest.fixture(scope="module")
def terraform():
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed (it is in the dev extra)")
    parsed = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as handle:
            parsed[path.name] = hcl2.load(handle)  # a syntax error fails here, naming the file
    merged: dict[str, list] = {}
    for tree in parsed.values():
        for kind, blocks in tree.items():
            if isinstance(blocks, list):
                merged.setdefault(kind, []).extend(blocks)
    return merged


def test_every_variable_and_output_is_described(terraform):
    for kind in ("variable", "output"):
        blocks = _blocks(terraform, kind)
        assert blocks, kind
        undescribed = [name for name, body in blocks.items() if len(_unquote(body.get("description", ""))) < 10]
        assert not undescribed, f"{kind}s without a description: {undescribed}"
    assert "gpu_instance_type" in _blocks(terraform, "variable")


def test_the_cluster_has_cpu_and_gpu_node_groups_and_the_operators(terraform):
    eks = _blocks(terraform, "module")["eks"]
    groups = eks["eks_managed_node_groups"]
    assert set(groups) >= {"cpu", "gpu"}
    assert groups["gpu"]["instance_types"] == ["${var.gpu_instance_type}"]
    charts = {_unquote(body["chart"]) for name, body in _blocks(terraform, "resource").items()
              if name.startswith("helm_release.")}
    assert {"kuberay-operator", "nvidia-device-plugin", "external-secrets"} <= charts


def test_workdir_bucket_is_private_encrypted_versioned_with_lifecycle(terraform):
    resources = _blocks(terraform, "resource")
    block = resources["aws_s3_bucket_public_access_block.workdirs"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                          "restrict_public_buckets"))
    assert _unquote(resources["aws_s3_bucket_versioning.workdirs"]["versioning_configuration"][0]["status"]) == "Enabled"
    sse = resources["aws_s3_bucket_server_side_encryption_configuration.workdirs"]["rule"][0]
    assert _unquote(sse["apply_server_side_encryption_by_default"][0]["sse_algorithm"]) == "aws:kms"
    rules = resources["aws_s3_bucket_lifecycle_configuration.workdirs"]["rule"]
    assert any("noncurrent_version_expiration" in rule for rule in rules)


def test_pods_reach_only_the_workdir_bucket(terraform):
    statements = _blocks(terraform, "data")["aws_iam_policy_document.workdirs"]["statement"]
    resources = [r for statement in statements for r in statement["resources"]]
    assert resources and all("aws_s3_bucket.workdirs.arn" in r or "aws_kms_key.main.arn" in r for r in resources)


def _manifest(path):
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_has_the_required_fields_of_its_kind(path):
    doc = _manifest(path)
    assert isinstance(doc, dict), f"{path}: not a YAML mapping"
    if "kind" not in doc:  # the Ray cluster launcher's format
        missing = [k for k in LAUNCHER_KEYS if k not in doc]
        assert not missing, f"{path}: launcher config lacks {missing}"
        assert doc["head_node_type"] in doc["available_node_types"]
        return
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in REQUIRED, path
    assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), f"{path}: metadata.name"
    for keys in REQUIRED[doc["kind"]]:
        node = doc
        for key in keys:
            assert isinstance(node, dict) and node.get(key), f"{path}: {'.'.join(keys)} is missing"
            node = node[key]
    if doc["kind"] == "RayService":
        apps = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
        assert apps and all(app.get("import_path") for app in apps)


def test_manifest_placeholders_are_filled_by_terraform_outputs(terraform):
    exports = _unquote(_blocks(terraform, "output")["manifest_env"]["value"])
    provided = set(re.findall(r"export ([A-Z_]+)=", exports))
    for path in (ROOT / "cluster" / "kuberay").glob("*.yaml"):
        wanted = set(re.findall(r"\$\{([A-Z_]+)\}", path.read_text()))
        assert wanted <= provided, f"{path.name}: {sorted(wanted - provided)} not in the manifest_env output"


def test_no_manifest_holds_a_secret_value():
    for path in MANIFESTS:
        text = path.read_text()
        assert not re.search(r"(?i)(api[_-]?key|token|password)\s*:\s*['\"]?[A-Za-z0-9_-]{16,}", text), path
